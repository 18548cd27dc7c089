"""The translation baselines of the SynthRAD winners and of Graf et al.: nnsyn's masked regression with an anatomical
perception loss (a frozen CT segmenter's encoder), and CUT trained unpaired."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import nnunet_folders

from spinediff.errors import SpineDiffError
from spinediff.training.api import TrainingOptions, build_trainer, ensure_splits, train

TINY = TrainingOptions(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, validation_samples=1)
TRANSLATION = "Dataset902_SpinePhantomTranslation"


@pytest.fixture(scope="module")
def env_with_segmenter(phantom_root, tmp_path_factory):
    """The phantom translation dataset planned (2d_diffusion) beside its CT segmenter (nnU-Net 2d_cpu, one tiny epoch
    on the real CT of fold 0's training cases)."""
    from spinediff.experiments.downstream import copy_splits, write_segmenter_dataset
    from spinediff.planning.api import plan_dataset

    base = tmp_path_factory.mktemp("baselines")
    raw = base / "raw"
    raw.mkdir()
    (raw / TRANSLATION).symlink_to(phantom_root / TRANSLATION, target_is_directory=True)
    write_segmenter_dataset(raw / TRANSLATION, raw / "Dataset991_PhantomCTSegmenter")
    with nnunet_folders(raw, base) as env:
        plan_dataset(902, configurations=["2d_diffusion"], device="cpu", num_processes=1, show_progress_bar=False)
        plan_dataset(991, configurations=["2d_cpu"], device="cpu", num_processes=1, show_progress_bar=False)
        ensure_splits(base / "preprocessed" / TRANSLATION)  # the split every trainer of the dataset uses
        copy_splits(base / "preprocessed" / TRANSLATION, base / "preprocessed" / "Dataset991_PhantomCTSegmenter")
        fold = train(991, "2d_cpu", 0, "nnUNetTrainer", TrainingOptions(epochs=1, iterations_per_epoch=2,
                                                                        val_iterations_per_epoch=1))
        yield {**env, "segmenter": str(fold.parent)}


def test_perception_loss_is_zero_for_the_real_image_and_grows_with_corruption(env_with_segmenter):
    """The feature distance of the frozen encoder: 0 for the real CT itself, larger for a worse synthetic CT; its
    gradient reaches the synthetic image and never the segmenter."""
    from spinediff.training.perception import AnatomicalPerception

    perception = AnatomicalPerception(env_with_segmenter["segmenter"], 0, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    real = torch.full((2, 1, 32, 32), -1000.0)
    real[:, :, 8:24, 8:24] = 300.0 + 50 * torch.randn(2, 1, 16, 16, generator=generator)
    body = (real > -500).float()
    assert perception(real.clone(), real, body).item() == pytest.approx(0.0, abs=1e-6)
    mild = real + 30 * torch.randn(real.shape, generator=generator)
    strong = (real + 400 * torch.randn(real.shape, generator=generator)).requires_grad_(True)
    loss = perception(strong, real, body)
    assert 0 < perception(mild, real, body).item() < loss.item()
    loss.backward()
    assert strong.grad is not None and strong.grad.abs().sum() > 0
    assert all(p.grad is None for p in perception.encoder.parameters())
    # a 3D patch is read slice by slice by the 2D segmenter
    volume = real[:1].unsqueeze(2).expand(1, 1, 3, 32, 32)
    assert perception(volume, volume, (volume > -500).float()).item() == pytest.approx(0.0, abs=1e-6)


def test_perception_regression_trains_with_the_segmenter_and_refuses_to_start_without(env_with_segmenter):
    trainer = build_trainer(902, "2d_diffusion", 0, "PerceptionRegressionTrainer")
    trainer.apply_options(TINY)
    with pytest.raises(SpineDiffError, match="--perception-model"):
        trainer.initialize()
    options = TrainingOptions(**{**TINY.__dict__, "perception_model": env_with_segmenter["segmenter"]})
    folder = train(902, "2d_diffusion", 0, "PerceptionRegressionTrainer", options)
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["trainer_name"] == "PerceptionRegressionTrainer"
    assert all(math.isfinite(v) for v in checkpoint["logging"]["train_losses"])
    # the L1 counts the body only: an error in the air around the body costs nothing
    trainer = build_trainer(902, "2d_diffusion", 0, "PerceptionRegressionTrainer")
    to_network = trainer.task.target_intensity.to_network
    target = to_network(torch.tensor([-1000.0, -1000.0, 0.0, 400.0]).reshape(1, 1, 2, 2), channel_axis=1)
    assert trainer.body_mask(target).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_patch_nce_prefers_the_same_location():
    """InfoNCE over locations: queries equal to their own keys (distinct unit vectors) cost ~0; unrelated queries
    cost about log(N)."""
    from spinediff.training.unpaired import patch_nce

    keys = torch.eye(8).unsqueeze(0)
    assert patch_nce(keys.clone(), keys, 0.07).item() < 1e-4
    unrelated = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert patch_nce(unrelated, keys, 0.07).item() > 1.0
    assert patch_nce(torch.ones(1, 8, 8), keys, 0.07).item() == pytest.approx(math.log(8), rel=1e-5)


def test_cut_trains_unpaired(env_with_segmenter):
    """CUT's real CT of a step is another batch's, never the CT of the MR it translates; it trains, checkpoints its
    projection heads and discriminator, and resumes."""
    trainer = build_trainer(902, "2d_diffusion", 0, "CUTTrainer")
    trainer.apply_options(TINY)
    trainer.initialize()
    first, second = torch.arange(3.0).reshape(3, 1, 1, 1), torch.arange(3.0, 6.0).reshape(3, 1, 1, 1)
    assert trainer.unpaired_targets(first).flatten().tolist() == [2.0, 0.0, 1.0]  # the first batch, rolled
    assert torch.equal(trainer.unpaired_targets(second), first)  # afterwards: the previous batch
    folder = train(902, "2d_diffusion", 0, "CUTTrainer", TINY)
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert "nce_heads" in checkpoint and "discriminator_weights" in checkpoint
    assert len(checkpoint["optimizer_state"]["param_groups"]) == 2  # the generator and its projection heads
    resumed = train(902, "2d_diffusion", 0, "CUTTrainer", TrainingOptions(**{**TINY.__dict__, "epochs": 2}),
                    continue_training=True)
    assert torch.load(resumed / "checkpoint_final.pth", map_location="cpu", weights_only=True)["current_epoch"] == 2


def test_benchmark_offers_every_translation_baseline_and_selects_by_trainer():
    """Translation's benchmark rows: regression, masked regression + perception, diffusion x0/eps/v, Pix2Pix, CUT,
    SDEdit, the diffusion refinement of the regression and the residual diffusion on it, in 2D and 3D (10 methods x 2);
    `--methods` picks a subset by trainer (and prediction type), and names what exists otherwise."""
    from spinediff.experiments.benchmark import methods_for, select_methods
    from spinediff.tasks import get_task

    methods = methods_for(get_task("translation"), ["2d_diffusion", "3d_diffusion"], ("2d", "3d"))
    assert len(methods) == 20 and {m.configuration for m in methods} == {"2d_diffusion", "3d_diffusion"}
    assert {m.trainer for m in methods} >= {"PerceptionRegressionTrainer", "CUTTrainer", "Pix2PixTrainer",
                                            "UnpairedDiffusionTrainer", "DiffusionRefinementTrainer",
                                            "ResidualRefinementTrainer"}
    assert [m.name for m in methods if m.trainer == "DiffusionRefinementTrainer"] == [
        "Regression + diffusion refinement 2D", "Regression + diffusion refinement 3D"]
    assert sorted({m.prediction_type for m in methods if m.trainer == "DiffusionTranslationTrainer"},
                  key=str) == sorted([None, "eps", "v"], key=str)
    chosen = select_methods(methods, ["CUTTrainer", "DiffusionTranslationTrainer:v@3d_diffusion"])
    assert [(m.trainer, m.configuration) for m in chosen] == [
        ("CUTTrainer", "2d_diffusion"), ("DiffusionTranslationTrainer", "3d_diffusion"), ("CUTTrainer", "3d_diffusion")]
    assert select_methods(methods, None) == methods
    with pytest.raises(SpineDiffError, match="offers .*PerceptionRegressionTrainer"):
        select_methods(methods, ["SynDiffTrainer"])


def test_histogram_matching_follows_the_target_distribution_and_keeps_the_order():
    from spinediff.diffusion.unpaired import HISTOGRAM_BINS, match_histogram, target_histogram

    target = torch.cat([torch.full((300,), -0.9), torch.full((700,), 0.4)])  # 30 % air, 70 % tissue
    histogram = target_histogram(target)
    assert histogram.sum() == 1000 and histogram.shape == (HISTOGRAM_BINS,)
    image = torch.linspace(5.0, 9.0, 2000).reshape(40, 50)  # any units, any shape
    mapped = match_histogram(image, histogram)
    assert mapped.shape == image.shape
    flat = mapped.flatten()
    assert torch.all(flat[1:] >= flat[:-1])  # monotone: the MR's order (its anatomy) is kept
    assert (flat < -0.8).float().mean().item() == pytest.approx(0.3, abs=0.002)
    assert ((flat > 0.38) & (flat < 0.42)).float().mean().item() == pytest.approx(0.7, abs=0.002)


def test_unpaired_diffusion_never_reads_the_paired_source_and_predicts_from_the_matched_mr(env_with_segmenter,
                                                                                           tmp_path):
    """The CT model's loss is the same whatever the MR beside the CT (its condition is zero); training gathers the CT
    histogram; spinediff predict translates a raw case from the histogram-matched MR, in the input's geometry."""
    import SimpleITK as sitk

    from spinediff.inference.api import predict

    trainer = build_trainer(902, "2d_diffusion", 0, "UnpairedDiffusionTrainer")
    trainer.apply_options(TINY)
    trainer.initialize()
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, *trainer.configuration_manager.patch_size, generator=generator) * 2 - 1
    losses = []
    for _ in range(2):
        condition = torch.randn(2, trainer.task.condition_channels, *target.shape[2:], generator=generator)
        trainer.generator.manual_seed(5)
        losses.append(trainer.compute_loss(trainer.inference_network, condition, target).item())
    assert losses[0] == losses[1]
    assert trainer.target_histogram.sum() == 0  # validation losses gather nothing

    folder = train(902, "2d_diffusion", 0, "UnpairedDiffusionTrainer", TINY)
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    patch = int(torch.tensor(trainer.configuration_manager.patch_size).prod())
    seen = TINY.iterations_per_epoch * trainer.configuration_manager.batch_size * patch
    assert checkpoint["sdedit"]["target_histogram"].sum().item() == seen and checkpoint["sdedit"]["start"] == 0.5
    raw = env_with_segmenter["nnUNet_raw"] + "/" + TRANSLATION
    inputs = tmp_path / "in"
    inputs.mkdir()
    for channel in (0, 1):
        (inputs / f"phantom_001_{channel:04d}.nii.gz").symlink_to(f"{raw}/imagesTr/phantom_001_{channel:04d}.nii.gz")
    report = predict(inputs, tmp_path / "out", 902, "2d_diffusion", "UnpairedDiffusionTrainer", folds=[0],
                     num_samples=1, num_inference_steps=2, progress=False)
    assert report.exit_code == 0
    synthetic = sitk.ReadImage(str(tmp_path / "out" / "phantom_001.nii.gz"))
    reference = sitk.ReadImage(f"{raw}/imagesTr/phantom_001_0002.nii.gz")
    assert synthetic.GetSize() == reference.GetSize()
    hu = sitk.GetArrayFromImage(synthetic)
    assert -1100 < hu.min() < hu.max() < 3100
