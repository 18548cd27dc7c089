"""Trainers: each trains 2 tiny epochs on the phantom, checkpoints, resumes, validates and exports
NIfTI in the raw geometry; a killed training resumes; nnUNetv2_train finds our trainers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import nnunet_folders

from spinediff.errors import SpineDiffError
from spinediff.planning.plans import SpineDiffPlans
from spinediff.training.api import TrainingOptions, build_trainer, train

TINY = TrainingOptions(epochs=2, iterations_per_epoch=2, val_iterations_per_epoch=1, num_inference_steps=2,
                       validation_samples=1)
DATASET_OF_TASK = {"segmentation": 901, "translation": 902, "generation": 903}
RAW_NAME = {901: "Dataset901_SpinePhantomSeg", 902: "Dataset902_SpinePhantomTranslation",
            903: "Dataset903_SpinePhantomGeneration"}


@pytest.fixture(scope="module")
def nnunet_env(phantom_root, tmp_path_factory):
    """Plan and preprocess the three phantom datasets (2d_diffusion only, CPU target)."""
    from spinediff.planning.api import plan_dataset

    with nnunet_folders(phantom_root, tmp_path_factory.mktemp("nnunet")) as env:
        for dataset in (901, 902, 903):
            plan_dataset(dataset, configurations=["2d_diffusion"], device="cpu", num_processes=1,
                         show_progress_bar=False)
        yield env


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing())
    assert np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection())


@pytest.mark.parametrize("trainer_name,task", [
    ("DiffusionTranslationTrainer", "translation"),
    ("DiffusionSegmentationTrainer", "segmentation"),
    ("SegGuidedGenerationTrainer", "generation"),
    ("RegressionTrainer", "translation"),
    ("Pix2PixTrainer", "translation"),
])
def test_trainer_trains_checkpoints_resumes_validates_and_exports(nnunet_env, phantom_root, trainer_name, task):
    dataset = DATASET_OF_TASK[task]
    folder = train(dataset, "2d_diffusion", 0, trainer_name, TINY)
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["current_epoch"] == 2 and checkpoint["trainer_name"] == trainer_name
    assert checkpoint["network_weights"].keys() == checkpoint["training_weights"].keys()
    # EMA weights (used for prediction) differ from the raw training weights after training.
    assert any(not torch.equal(checkpoint["network_weights"][k], checkpoint["training_weights"][k])
               for k in checkpoint["network_weights"] if checkpoint["network_weights"][k].is_floating_point())
    assert (folder / "progress.png").stat().st_size > 0

    # Resume: one more epoch continues from the final checkpoint, not from scratch.
    resumed = train(dataset, "2d_diffusion", 0, trainer_name, TrainingOptions(
        epochs=3, iterations_per_epoch=2, val_iterations_per_epoch=1, num_inference_steps=2, validation_samples=1),
        continue_training=True)
    checkpoint = torch.load(resumed / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["current_epoch"] == 3
    assert len(checkpoint["logging"]["train_losses"]) == 3

    # The validation export has the raw geometry and is scored.
    metrics = json.loads((folder / "validation_metrics.json").read_text())
    exported = sorted((folder / "validation").glob("*.nii.gz"))
    assert exported
    raw = Path(phantom_root) / RAW_NAME[dataset]
    for path in exported:
        case = path.name[: -len(".nii.gz")]
        reference = raw / ("labelsTr" if task == "segmentation" else "imagesTr") / (
            f"{case}.nii.gz" if task == "segmentation" else f"{case}_{2 if task == 'translation' else 0:04d}.nii.gz")
        _assert_same_geometry(sitk.ReadImage(str(path)), sitk.ReadImage(str(reference)))
    if task == "segmentation":
        assert 0.0 <= metrics["mean_dice"] <= 1.0 and set(metrics["dice_per_class"]) == {"1", "2", "3"}
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(exported[0])))
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
    else:
        assert np.isfinite(metrics["mean"]["psnr"]) and 0 < metrics["mean"]["mae_body"] < 3000
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(exported[0])))
        assert -1100 < hu.min() and hu.max() < 3100  # written back in HU


def test_noise_mode_is_a_configuration_derived_at_planning_time(nnunet_env):
    plans_file = Path(nnunet_env["nnUNet_preprocessed"]) / RAW_NAME[902] / "nnUNetPlans.json"
    before = plans_file.read_bytes()
    plans = SpineDiffPlans.read(plans_file)
    assert plans.for_prediction_type("2d_diffusion", "x0") == "2d_diffusion"
    assert plans.for_prediction_type("2d_diffusion", "eps") == "2d_diffusion_eps"
    assert plans.configuration("2d_diffusion_v").diffusion.prediction_type == "v_prediction"
    assert "2d_diffusion_eps" not in plans.planned_names and plans.configuration("2d_diffusion_eps").is_derived
    trainer = build_trainer(902, "2d_diffusion", 0, "DiffusionTranslationTrainer", prediction_type="eps")
    assert trainer.settings.prediction_type == "epsilon"
    assert trainer.output_folder.endswith("DiffusionTranslationTrainer__nnUNetPlans__2d_diffusion_eps/fold_0")
    assert plans_file.read_bytes() == before  # training reads the plans, it does not write them
    with pytest.raises(SpineDiffError, match="Unknown prediction type"):
        plans.for_prediction_type("2d_diffusion", "banana")


def test_wrong_trainer_for_the_task_is_a_clear_error(nnunet_env):
    with pytest.raises(SpineDiffError, match="trains segmentation"):
        build_trainer(902, "2d_diffusion", 0, "DiffusionSegmentationTrainer")
    with pytest.raises(SpineDiffError, match="Unknown trainer"):
        build_trainer(902, "2d_diffusion", 0, "NoSuchTrainer")


def test_intensity_augmentation_never_touches_the_target_channel(nnunet_env):
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    from spinediff.training.augmentation import ChannelSubsetTransform, restrict_intensity_augmentation

    trainer = build_trainer(902, "2d_diffusion", 1, "DiffusionTranslationTrainer")
    pipeline = trainer.get_training_transforms(trainer.configuration_manager.patch_size, (0.0, 0.0), None, None, False)
    wrapped = [t for t in pipeline.transforms if isinstance(t, ChannelSubsetTransform)]
    assert len(wrapped) == 7 and all(t.channels == [0, 1] for t in wrapped)  # nnU-Net's seven intensity transforms

    noise = ComposeTransforms([RandomTransform(GaussianNoiseTransform((0.5, 0.5), p_per_channel=1), 1.0)])
    torch.manual_seed(0)
    image = torch.rand(3, 16, 16)
    out = restrict_intensity_augmentation(noise, trainer.task)(image=image.clone())["image"]
    assert not torch.allclose(out[:2], image[:2])  # sources augmented
    assert torch.equal(out[2], image[2])  # target untouched
    generation = build_trainer(903, "2d_diffusion", 1, "SegGuidedGenerationTrainer")
    out = restrict_intensity_augmentation(noise, generation.task)(image=image.clone())["image"]
    assert torch.equal(out, image)  # generation: every image channel is a target


def test_killed_training_resumes_from_its_last_checkpoint(nnunet_env, tmp_path):
    """kill -9 in the middle of a run, then --c finishes it from the last epoch's checkpoint."""
    env = dict(os.environ, **nnunet_env)
    command = [sys.executable, "-m", "spinediff.cli", "train", "-d", "902", "-c", "2d_diffusion", "-f", "1",
               "-tr", "RegressionTrainer", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1", "--steps", "1"]
    process = subprocess.Popen(command + ["--epochs", "200"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    latest = (Path(nnunet_env["nnUNet_results"]) / RAW_NAME[902] / "RegressionTrainer__nnUNetPlans__2d_diffusion"
              / "fold_1" / "checkpoint_latest.pth")
    deadline = time.time() + 180
    while time.time() < deadline and not latest.exists():
        time.sleep(0.5)
    time.sleep(1.0)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert latest.exists(), "no checkpoint was written before the kill"
    epoch_at_kill = torch.load(latest, map_location="cpu", weights_only=True)["current_epoch"]
    result = subprocess.run(command + ["--epochs", str(epoch_at_kill + 2), "--c"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    final = torch.load(latest.parent / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert final["current_epoch"] == epoch_at_kill + 2
    assert len(final["logging"]["train_losses"]) == epoch_at_kill + 2


def test_nnunetv2_train_finds_spinediff_trainers_and_follows_the_plans_schedule(nnunet_env):
    """``nnUNetv2_train -tr DiffusionSegmentationTrainer`` works, and takes its epochs and iterations from the
    configuration's ``schedule`` block (as a ``--budget`` plan writes it): nnU-Net has no flags for them."""
    import spinediff.training.nnunet_entry as entry

    plans_file = Path(nnunet_env["nnUNet_preprocessed"]) / RAW_NAME[901] / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["2d_diffusion_short"] = {
        "inherits_from": "2d_diffusion",
        "schedule": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, "budget_seconds": 60}}
    plans_file.write_text(json.dumps(plans))
    # the split spinediff train would write (the phantom may have fewer than 5 cases, which nnU-Net's own fails on),
    # so that this test does not depend on an earlier one having trained
    from spinediff.training.api import ensure_splits

    ensure_splits(plans_file.parent)
    env = dict(os.environ, **nnunet_env, nnUNet_extTrainer=entry.__path__[0])
    result = subprocess.run([sys.executable, "-c", "from nnunetv2.run.run_training import run_training_entry; "
                             "run_training_entry()", "901", "2d_diffusion_short", "2", "-tr",
                             "DiffusionSegmentationTrainer", "-device", "cpu"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    folder = (Path(nnunet_env["nnUNet_results"]) / RAW_NAME[901]
              / "DiffusionSegmentationTrainer__nnUNetPlans__2d_diffusion_short" / "fold_2")
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["trainer_name"] == "DiffusionSegmentationTrainer" and checkpoint["current_epoch"] == 1
    log = (next(folder.glob("training_log_*.txt"))).read_text()
    assert "Epoch 0" in log and "Epoch 1" not in log
    assert (folder / "validation_metrics.json").exists()


def test_same_seed_same_training_other_seed_other_training(nnunet_env, tmp_path):
    """--seed fixes network initialisation, augmentation and diffusion noise on the CPU."""
    from dataclasses import replace

    def weights(seed: int, tag: str) -> dict:
        folder = train(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer", replace(TINY, seed=seed),
                       results_folder=str(tmp_path / tag))
        checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
        return checkpoint["training_weights"], checkpoint["logging"]["train_losses"]

    first, first_losses = weights(3, "a")
    second, second_losses = weights(3, "b")
    other, other_losses = weights(4, "c")
    assert first_losses == second_losses
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first_losses != other_losses
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_a_started_fold_is_never_restarted_silently(nnunet_env, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", nnunet_env["nnUNet_results"])  # restored after the test
    results = str(tmp_path / "results")
    train(902, "2d_diffusion", 2, "RegressionTrainer", TINY, results_folder=results)
    final = next(Path(results).rglob("checkpoint_final.pth"))
    stamp = final.stat().st_mtime_ns
    with pytest.raises(SpineDiffError, match="--c"):
        train(902, "2d_diffusion", 2, "RegressionTrainer", TINY, results_folder=results)
    assert final.stat().st_mtime_ns == stamp
    train(902, "2d_diffusion", 2, "RegressionTrainer", TINY, results_folder=results, overwrite=True)
    assert final.stat().st_mtime_ns != stamp


def test_plans_of_another_dataset_are_refused_before_writing(nnunet_env, tmp_path, monkeypatch):
    import shutil

    for key in ("nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, nnunet_env[key])  # build_trainer points them elsewhere; restored after

    preprocessed = tmp_path / "preprocessed"
    copy = preprocessed / "Dataset921_Other"
    shutil.copytree(Path(nnunet_env["nnUNet_preprocessed"]) / RAW_NAME[901], copy)
    with pytest.raises(SpineDiffError, match="was made for 'Dataset901_SpinePhantomSeg'"):
        build_trainer(921, "2d_diffusion", 0, "DiffusionSegmentationTrainer", preprocessed_folder=str(preprocessed),
                      results_folder=str(tmp_path / "results"))
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*"))


def test_truncated_checkpoint_is_a_clear_error(nnunet_env, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", nnunet_env["nnUNet_results"])
    results = str(tmp_path / "results")
    folder = train(902, "2d_diffusion", 1, "RegressionTrainer", TINY, results_folder=results)
    final = folder / "checkpoint_final.pth"
    final.write_bytes(final.read_bytes()[:5000])
    with pytest.raises(SpineDiffError, match="cannot be read.*truncated"):
        train(902, "2d_diffusion", 1, "RegressionTrainer", TINY, results_folder=results, continue_training=True)


def test_npz_keeps_the_final_validations_class_probabilities(nnunet_env, tmp_path):
    """--npz (TrainingOptions.save_probabilities): validation/CASE.npz beside each label map, probabilities that
    sum to one over the classes, on the label map's grid; without it, none."""
    from dataclasses import replace

    import numpy as np
    import SimpleITK as sitk

    with_npz = train(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer",
                     replace(TINY, save_probabilities=True, validation_samples=3), results_folder=str(tmp_path / "npz"))
    assert json.loads((with_npz / "validation_metrics.json").read_text())["samples"] == 3
    without = train(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer", TINY, results_folder=str(tmp_path / "no"))
    files = sorted((with_npz / "validation").glob("*.npz"))
    assert files and not list((without / "validation").glob("*.npz"))
    probabilities = np.load(files[0])["probabilities"]
    label_map = sitk.GetArrayFromImage(sitk.ReadImage(str(files[0]).replace(".npz", ".nii.gz")))
    assert probabilities.shape[1:] == label_map.shape and probabilities.shape[0] == 4
    assert np.allclose(probabilities.sum(axis=0), 1.0, atol=1e-3)


def test_deep_supervision_trains_every_resolution_and_predicts_from_the_full_one(nnunet_env, tmp_path):
    """A configuration with ``deep_supervision``: the training network returns one output per decoder
    resolution and the loss scores them; the EMA network that validates and predicts returns only the full
    resolution; training, validation and export run end to end."""
    import copy

    plans_file = Path(nnunet_env["nnUNet_preprocessed"]) / RAW_NAME[901] / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    if "2d_diffusion_ds" not in plans["configurations"]:
        configuration = copy.deepcopy(plans["configurations"]["2d_diffusion"])
        configuration["diffusion"]["deep_supervision"] = True
        plans["configurations"]["2d_diffusion_ds"] = configuration
        plans_file.write_text(json.dumps(plans))
    trainer = build_trainer(901, "2d_diffusion_ds", 0, "DiffusionSegmentationTrainer",
                            results_folder=str(tmp_path / "structure"))
    trainer.initialize()
    patch = tuple(trainer.configuration_manager.patch_size)
    x = torch.randn(2, trainer.settings.input_channels, *patch)
    t = torch.tensor([10, 900])
    outputs = trainer.network(x, t)
    assert isinstance(outputs, list) and len(outputs) > 1
    assert tuple(outputs[0].shape[2:]) == patch and outputs[1].shape[-1] < patch[-1]
    assert isinstance(trainer.inference_network(x, t), torch.Tensor)
    target = torch.nn.functional.one_hot(torch.randint(0, 4, (2, *patch)), 4).movedim(-1, 1).float() * 2 - 1
    loss = trainer.compute_loss(trainer.network, x[:, :trainer.settings.condition_channels], target)
    loss.backward()
    coarse = trainer.plain_network.output_layers[-2].weight.grad  # a lower-resolution head learns too
    assert coarse is not None and float(coarse.abs().sum()) > 0
    folder = train(901, "2d_diffusion_ds", 0, "DiffusionSegmentationTrainer", TINY,
                   results_folder=str(tmp_path / "run"))
    exported = sorted((folder / "validation").glob("*.nii.gz"))
    assert exported and np.isfinite(json.loads((folder / "validation" / "summary.json").read_text())[
        "foreground_mean"]["Dice"])


def test_final_validation_averages_the_samples_class_probabilities(nnunet_env):
    """K validation samples are combined by the prediction core that `spinediff predict` uses: segmentation averages
    the class probabilities of the samples, images average the samples in the target's units; the default K is the
    plans' num_samples."""
    from spinediff.prediction.core import add_members, new_statistics

    trainer = build_trainer(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer")
    assert trainer.final_validation_samples == trainer.settings.num_samples
    assert trainer.validation_sampling().num_samples == trainer.settings.num_samples
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 1], [2, 3]]), 4).movedim(-1, 0).float() * 2 - 1
    other = torch.roll(one_hot, 1, dims=0)  # every voxel another class
    statistics = new_statistics(trainer.task)
    add_members(statistics, torch.stack([one_hot, one_hot, other]), trainer.task)
    expected = (2 * (one_hot + 1) / 2 + (other + 1) / 2) / 3
    assert torch.allclose(statistics.mean, expected, atol=1e-6)
    assert torch.equal(statistics.mean.argmax(0), one_hot.argmax(0))  # the majority wins
    translation = build_trainer(902, "2d_diffusion", 0, "DiffusionTranslationTrainer")
    images = torch.randn(3, 1, 4, 4)
    statistics = new_statistics(translation.task)
    add_members(statistics, images, translation.task)
    assert torch.allclose(statistics.mean, translation.task.to_original_units(images, channel_axis=1).mean(0),
                          atol=1e-3)


def test_rectified_flow_configuration_trains_validates_and_predicts(nnunet_env, tmp_path):
    """The planned ``2d_diffusion_rflow`` (rectified flow, Euler sampling): training, the final validation and
    ``spinediff predict`` run end to end, and the checkpoint carries the flow schedule that prediction reads."""
    from spinediff.inference.api import predict
    from spinediff.io import read_json

    results = tmp_path / "results"
    folder = train(901, "2d_diffusion_rflow", 0, "DiffusionSegmentationTrainer", TINY, results_folder=str(results))
    state = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert state["spinediff"]["diffusion"]["noise_schedule"] == "rflow"
    assert np.isfinite(json.loads((folder / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"])
    case = sorted((Path(nnunet_env["nnUNet_raw"]) / RAW_NAME[901] / "imagesTr").glob("*_0000.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for channel in sorted(case.parent.glob(case.name.replace("_0000.nii.gz", "_*.nii.gz"))):
        (inputs / channel.name).symlink_to(channel)
    report = predict(inputs, tmp_path / "out", 901, "2d_diffusion_rflow", "DiffusionSegmentationTrainer",
                     folds=[0], num_samples=1, num_inference_steps=2, results_folder=results, progress=False)
    assert report.exit_code == 0 and read_json(report.summary_file)["solver"] == "euler"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / case.name.replace("_0000", ""))))
    assert labels.max() <= 3 and labels.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(case))).shape
    with pytest.raises(SpineDiffError, match="samples with euler"):
        predict(inputs, tmp_path / "out2", 901, "2d_diffusion_rflow", "DiffusionSegmentationTrainer", folds=[0],
                num_samples=1, num_inference_steps=2, solver="ddim", results_folder=results, progress=False)
