"""Prediction from raw files: geometry, bad cases, seeds, fold/sample ensembles, uncertainty, safe
checkpoints, `spinediff ensemble` and `spinediff find_best`, on tiny phantom models trained once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import nnunet_folders

from spinediff.cli import main
from spinediff.errors import SpineDiffError
from spinediff.inference.api import predict
from spinediff.inference.inputs import InputCase
from spinediff.inference.models import load_checkpoint, model_folder
from spinediff.inference.predictor import PredictionOptions, SpineDiffPredictor
from spinediff.training.api import TrainingOptions, train

TINY = TrainingOptions(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, num_inference_steps=2,
                       validation_samples=1)
SEG, TRANS = "Dataset901_SpinePhantomSeg", "Dataset902_SpinePhantomTranslation"
GEN = "Dataset903_SpinePhantomGeneration"
CONFIG = "2d_diffusion"
FAST = {"num_samples": 2, "num_inference_steps": 2, "progress": False}


@pytest.fixture(scope="module")
def trained(phantom_root, tmp_path_factory):
    """Plan the phantom datasets and train tiny folds: segmentation folds 0 and 1, translation (diffusion
    and regression) fold 0, generation fold 0."""
    from spinediff.planning.api import plan_dataset

    base = tmp_path_factory.mktemp("nnunet_inference")
    with nnunet_folders(phantom_root, base) as env:
        for dataset in (901, 902, 903):
            plan_dataset(dataset, configurations=[CONFIG], device="cpu", num_processes=1, show_progress_bar=False)
        for dataset, trainer, fold in ((901, "DiffusionSegmentationTrainer", 0),
                                       (901, "DiffusionSegmentationTrainer", 1),
                                       (902, "DiffusionTranslationTrainer", 0), (902, "RegressionTrainer", 0),
                                       (903, "SegGuidedGenerationTrainer", 0)):
            train(dataset, CONFIG, fold, trainer, TINY)
        yield {**env, "raw": Path(phantom_root), "base": base}


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5)
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _oblique_copy(source: Path, target: Path) -> sitk.Image:
    """The source's voxels, cropped to another size, on an oblique, anisotropic grid of other spacing."""
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))[:7, 3:45, 2:40]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.9, 3.6, 6.1))
    image.SetOrigin((-12.5, 40.25, 7.0))
    image.SetDirection(tuple(_rotation(23.0, -31.0).ravel()))
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(target), True)
    return image


def _oblique_inputs(raw: Path, dataset: str, case: str, folder: Path, stem: str) -> sitk.Image:
    """Both MR channels of ``case`` as ``stem_000X`` on one oblique grid; returns the grid's image."""
    images = [_oblique_copy(raw / dataset / "imagesTr" / f"{case}_{c:04d}.nii.gz", folder / f"{stem}_{c:04d}.nii.gz")
              for c in (0, 1)]
    return images[0]


def _case_inputs(raw: Path, dataset: str, case: str, channels: tuple[int, ...], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for c in channels:
        shutil.copy(raw / dataset / "imagesTr" / f"{case}_{c:04d}.nii.gz", folder)


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---------------------------------------------------------------------- geometry, uncertainty maps
@pytest.mark.parametrize("dataset,trainer", [(SEG, "DiffusionSegmentationTrainer"),
                                             (TRANS, "DiffusionTranslationTrainer")])
def test_outputs_keep_the_oblique_anisotropic_input_geometry(trained, tmp_path, dataset, trainer):
    inputs = tmp_path / "in"
    reference = _oblique_inputs(trained["raw"], dataset, "phantom_001", inputs, "oblique")
    out = tmp_path / "out"
    report = predict(inputs, out, dataset, CONFIG, trainer, folds=[0], save_uncertainty=True, **FAST)
    assert report.exit_code == 0, report.cases
    maps = ["oblique.nii.gz", "oblique_uncertainty.nii.gz"]
    maps += ["oblique_variance.nii.gz"] if dataset == SEG else []
    for name in maps:
        _assert_same_geometry(sitk.ReadImage(str(out / name)), reference)
    prediction = _read(out / "oblique.nii.gz")
    summary = json.loads((out / "oblique_uncertainty.json").read_text())
    assert summary["members"] == 2
    if dataset == SEG:
        assert set(np.unique(prediction)) <= {0, 1, 2, 3}
        assert _read(out / "oblique_uncertainty.nii.gz").max() > 0  # two samples disagree somewhere
        assert summary["mean_uncertainty_foreground"] is None or summary["mean_uncertainty_foreground"] >= 0
    else:
        assert -1300 < prediction.min() and prediction.max() < 3200  # HU
        assert _read(out / "oblique_uncertainty.nii.gz").max() > 0
        assert summary["channels"]["2"]["units"] == "HU"


@pytest.mark.parametrize("dataset,trainer", [(SEG, "DiffusionSegmentationTrainer"),
                                             (TRANS, "DiffusionTranslationTrainer")])
def test_uncertainty_is_zero_with_one_member_and_has_the_input_geometry(trained, tmp_path, dataset, trainer):
    inputs = tmp_path / "in"
    reference = _oblique_inputs(trained["raw"], dataset, "phantom_002", inputs, "one")
    out = tmp_path / "out"
    report = predict(inputs, out, dataset, CONFIG, trainer, folds=[0], num_samples=1, num_inference_steps=2,
                     save_uncertainty=True, progress=False)
    assert report.exit_code == 0
    for name in ["one_uncertainty.nii.gz"] + (["one_variance.nii.gz"] if dataset == SEG else []):
        image = sitk.ReadImage(str(out / name))
        _assert_same_geometry(image, reference)
        assert np.all(sitk.GetArrayFromImage(image) == 0)


# ---------------------------------------------------------------------- bad cases, overwrite
def test_bad_cases_are_reported_and_skipped_the_others_predicted_exit_2(trained, tmp_path, capsys):
    raw = trained["raw"] / TRANS / "imagesTr"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for c in (0, 1):
        shutil.copy(raw / f"phantom_000_{c:04d}.nii.gz", inputs / f"good_{c:04d}.nii.gz")
        shutil.copy(raw / f"phantom_000_{c:04d}.nii.gz", inputs / f"extra_{c:04d}.nii.gz")
    shutil.copy(raw / "phantom_000_0002.nii.gz", inputs / "extra_0002.nii.gz")  # the CT: a third channel
    shutil.copy(raw / "phantom_000_0000.nii.gz", inputs / "missing_0000.nii.gz")  # no T2w
    shutil.copy(raw / "phantom_000_0000.nii.gz", inputs / "mismatch_0000.nii.gz")
    moved = sitk.ReadImage(str(raw / "phantom_000_0001.nii.gz"))
    moved.SetSpacing((3.2, 3.2, 9.0))
    sitk.WriteImage(moved, str(inputs / "mismatch_0001.nii.gz"))
    shutil.copy(raw / "phantom_000_0000.nii.gz", inputs / "nan_0000.nii.gz")
    nan = sitk.GetArrayFromImage(moved).astype(np.float32)
    nan[0, 0, 0] = np.nan
    broken = sitk.GetImageFromArray(nan)
    broken.CopyInformation(moved)
    broken.SetSpacing((3.2, 3.2, 7.0))
    sitk.WriteImage(broken, str(inputs / "nan_0001.nii.gz"))
    shutil.copy(raw / "phantom_000_0000.nii.gz", inputs / "corrupt_0000.nii.gz")
    (inputs / "corrupt_0001.nii.gz").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    code = main(["predict", "-i", str(inputs), "-o", str(out), "-d", "902", "-c", CONFIG, "-tr",
                 "DiffusionTranslationTrainer", "-f", "0", "--samples", "1", "--steps", "1"])
    printed = capsys.readouterr()
    assert code == 2
    assert (out / "good.nii.gz").is_file()
    for bad in ("extra", "missing", "mismatch", "nan", "corrupt"):
        assert not (out / f"{bad}.nii.gz").exists()
    text = printed.out + printed.err
    assert "extra_0002.nii.gz" in text and "unexpected channel" in text
    assert "missing_0001" in text and "T2w" in text
    assert "mismatch_0001.nii.gz" in text and "spacing" in text
    assert "nan_0001.nii.gz" in text and "NaN" in text
    assert "corrupt_0001.nii.gz" in text
    summary = json.loads((out / "prediction.json").read_text())
    assert summary["num_failed"] == 5 and summary["cases"]["good"]["ok"]

    # existing outputs are never silently replaced
    code = main(["predict", "-i", str(inputs), "-o", str(out), "-d", "902", "-c", CONFIG, "-tr",
                 "DiffusionTranslationTrainer", "-f", "0", "--samples", "1", "--steps", "1"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err


def test_default_folds_are_the_trained_ones(trained, tmp_path):
    """Without -f, predict ensembles the folds that were trained (here only fold 0), not a fixed 0-4."""
    from spinediff.inference.api import trained_folds

    _case_inputs(trained["raw"], TRANS, "phantom_001", (0, 1), tmp_path / "in")
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", "902", "-c", CONFIG,
                 "-tr", "DiffusionTranslationTrainer", "--samples", "1", "--steps", "1"]) == 0
    assert json.loads((tmp_path / "out" / "prediction.json").read_text())["folds"] == ["0"]
    with pytest.raises(SpineDiffError, match="No trained fold"):
        trained_folds(tmp_path)


# ---------------------------------------------------------------------- seeds and ensembles
def test_same_seed_gives_identical_output_and_another_seed_differs(trained, tmp_path):
    _case_inputs(trained["raw"], TRANS, "phantom_001", (0, 1), tmp_path / "in")
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        predict(tmp_path / "in", tmp_path / name, TRANS, CONFIG, "DiffusionTranslationTrainer", folds=[0], seed=seed,
                **FAST)
        runs[name] = _read(tmp_path / name / "phantom_001.nii.gz")
    assert np.array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"])


def test_solver_option_changes_the_solver_and_is_recorded(trained, tmp_path):
    """--solver dpm++2m: a different trajectory than DDIM at the same steps and seed, a valid HU image, the
    solver named in prediction.json; 1 step of any solver is the network's single x0 estimate; a wrong name
    is refused before anything is loaded."""
    from spinediff.io import read_json

    _case_inputs(trained["raw"], TRANS, "phantom_001", (0, 1), tmp_path / "in")
    runs = {}
    for name, solver, steps in (("ddim", "ddim", 3), ("dpm", "dpm++2m", 3), ("ddim1", "ddim", 1),
                                 ("unipc1", "unipc", 1)):
        predict(tmp_path / "in", tmp_path / name, TRANS, CONFIG, "DiffusionTranslationTrainer", folds=[0],
                num_samples=1, num_inference_steps=steps, solver=solver, progress=False)
        runs[name] = _read(tmp_path / name / "phantom_001.nii.gz")
    assert read_json(tmp_path / "dpm" / "prediction.json")["solver"] == "dpm++2m"
    assert not np.allclose(runs["ddim"], runs["dpm"]) and np.isfinite(runs["dpm"]).all()
    assert -1100 < runs["dpm"].min() and runs["dpm"].max() < 3200  # inside the CT window, not diverged
    # one step from noise at the first timestep: both read x0 off the network once (timesteps differ by
    # the solvers' spacing, 999 for both with a single step)
    assert np.allclose(runs["ddim1"], runs["unipc1"], atol=1.0)
    with pytest.raises(SpineDiffError, match="--solver must be one of"):
        predict(tmp_path / "in", tmp_path / "bad", TRANS, CONFIG, "DiffusionTranslationTrainer", folds=[0],
                solver="heun", **FAST)
    # euler is the rectified-flow solver: a cosine-schedule model refuses it, naming the solvers it takes
    with pytest.raises(SpineDiffError, match="samples with ddim, dpm\\+\\+2m, unipc"):
        predict(tmp_path / "in", tmp_path / "bad", TRANS, CONFIG, "DiffusionTranslationTrainer", folds=[0],
                solver="euler", **FAST)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_tune_sampling_writes_the_cheapest_good_setting_and_predict_uses_it(trained, tmp_path):
    """tune_sampling on fold 0's validation cases: the choice is the cheapest candidate within the tolerance of the
    best, sampling.json holds it with every candidate's score, predict samples with it (and says so) unless told
    otherwise; a candidate that does not fit the model's schedule is refused."""
    from spinediff import tune_sampling
    from spinediff.inference.sampling_choice import SamplingChoice
    from spinediff.io import read_json

    plans_file = Path(trained["nnUNet_preprocessed"]) / SEG / "nnUNetPlans.json"
    planned = plans_file.read_text()
    try:
        record = tune_sampling(SEG, CONFIG, "DiffusionSegmentationTrainer", folds=[0], max_cases=1,
                               candidates=["ddim:1", "ddim:3", "dpm++2m:3", "ddim:2@0.5"], tolerance=0.05,
                               progress=False)
        # the measured choice replaces the planner's guess in the plans' diffusion block, the reason in its notes
        entry = json.loads(plans_file.read_text())["configurations"][CONFIG]
        chosen_setting = record["choice"].partition("@")[0].split(":")
        assert [entry["diffusion"]["solver"], str(entry["diffusion"]["num_inference_steps"])] == chosen_setting
        measured = [n for n in entry["notes"] if n.startswith("Sampling measured:")]
        assert len(measured) == 1 and record["choice"] in measured[0] and "1 validation case" in measured[0]
    finally:
        plans_file.write_text(planned)  # the other tests train and sample as planned
    rows = {row["setting"]: row for row in record["candidates"]}
    best = max(row["quality"] for row in rows.values())
    chosen = rows[record["choice"]]
    assert chosen["quality"] >= 0.95 * best
    good = [row for row in rows.values() if row["quality"] >= 0.95 * best]
    assert all(row["network_calls"] >= chosen["network_calls"] for row in good)
    assert rows["ddim:2@0.5"]["network_calls"] == 3 and 0 <= min(r["quality"] for r in rows.values())
    folder = model_folder(SEG, CONFIG, "DiffusionSegmentationTrainer").path
    choice = SamplingChoice.read(folder)
    with pytest.raises(SpineDiffError, match="already exists"):  # a decision is not replaced silently
        tune_sampling(SEG, CONFIG, "DiffusionSegmentationTrainer", folds=[0], max_cases=1, candidates=["ddim:1"],
                      progress=False)
    assert choice is not None and choice.setting.label() == record["choice"]
    _case_inputs(trained["raw"], SEG, "phantom_000", (0, 1), tmp_path / "in")
    try:
        predict(tmp_path / "in", tmp_path / "tuned", SEG, CONFIG, "DiffusionSegmentationTrainer", folds=[0],
                num_samples=1, progress=False)
        said = read_json(tmp_path / "tuned" / "prediction.json")
        assert said["sampling_from"].endswith("sampling.json")
        assert (said["solver"], said["num_inference_steps"]) == (choice.setting.solver,
                                                                 choice.setting.num_inference_steps)
        predict(tmp_path / "in", tmp_path / "told", SEG, CONFIG, "DiffusionSegmentationTrainer", folds=[0],
                num_samples=1, num_inference_steps=2, progress=False)
        assert read_json(tmp_path / "told" / "prediction.json")["sampling_from"] == "command line"
    finally:
        (folder / "sampling.json").unlink()  # the other tests sample as the plans say
    with pytest.raises(SpineDiffError, match="do not fit"):
        tune_sampling(SEG, CONFIG, "DiffusionSegmentationTrainer", folds=[0], max_cases=1, candidates=["euler:2"],
                      progress=False)


def test_two_fold_ensemble_is_the_mean_of_the_single_folds(trained):
    case = InputCase("phantom_002", tuple(trained["raw"] / SEG / "imagesTr" / f"phantom_002_{c:04d}.nii.gz"
                                          for c in (0, 1)), ".nii.gz")
    folder = model_folder(SEG, CONFIG, "DiffusionSegmentationTrainer")
    both = SpineDiffPredictor(folder, [0, 1])
    options = PredictionOptions(both.sampling(num_samples=2, num_inference_steps=2), seed=11)
    condition = both.preprocess(case).condition
    ensemble = both.sample(condition, options)
    singles = [SpineDiffPredictor(folder, [f]).sample(condition, options) for f in (0, 1)]
    assert ensemble.count == 4
    assert torch.allclose(ensemble.mean, (singles[0].mean + singles[1].mean) / 2, atol=1e-6)
    assert not torch.allclose(singles[0].mean, singles[1].mean)  # the folds differ, so the test can fail
    assert torch.allclose(ensemble.mean.sum(0), torch.ones_like(ensemble.mean[0]), atol=1e-5)  # probabilities


@pytest.mark.parametrize("dataset,trainer", [(SEG, "DiffusionSegmentationTrainer"),
                                             (TRANS, "DiffusionTranslationTrainer")])
def test_preprocessing_of_raw_inputs_matches_the_training_data(trained, dataset, trainer):
    """Translation reads only the sources; the placeholder target must leave crop and normalisation as in training."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = model_folder(dataset, CONFIG, trainer)
    case = InputCase("phantom_000", tuple(trained["raw"] / dataset / "imagesTr" / f"phantom_000_{c:04d}.nii.gz"
                                          for c in (0, 1)), ".nii.gz")
    condition = SpineDiffPredictor(folder, [0]).preprocess(case).condition
    preprocessed = trained["base"] / "preprocessed" / dataset / folder.configuration_manager.data_identifier
    data = infer_dataset_class(str(preprocessed))(str(preprocessed), ["phantom_000"]).load_case("phantom_000")[0]
    expected = torch.from_numpy(np.asarray(data[:2], dtype=np.float32))
    assert condition.shape == expected.shape
    assert torch.allclose(condition, expected, atol=1e-5)


def test_generation_predicts_from_a_label_map(trained, tmp_path):
    label_map = sitk.ReadImage(str(trained["raw"] / GEN / "labelsTr" / "phantom_000.nii.gz"))[10:34, 12:40, 20:26]
    (tmp_path / "in").mkdir()
    sitk.WriteImage(label_map, str(tmp_path / "in" / "small.nii.gz"))
    report = predict(tmp_path / "in", tmp_path / "out", GEN, CONFIG, "SegGuidedGenerationTrainer", folds=[0],
                     save_uncertainty=True, num_samples=1, num_inference_steps=1, progress=False)
    assert report.exit_code == 0, report.cases
    image = sitk.ReadImage(str(tmp_path / "out" / "small.nii.gz"))
    _assert_same_geometry(image, label_map)
    assert image.GetPixelID() == sitk.sitkFloat32 and np.all(_read(tmp_path / "out" / "small_uncertainty.nii.gz") == 0)


# ---------------------------------------------------------------------- safe checkpoints
class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["nnUNet_results"]) / "pwned",))


def test_checkpoints_that_would_run_code_are_refused(trained, tmp_path):
    folder = model_folder(TRANS, CONFIG, "DiffusionTranslationTrainer")
    evil = folder.fold_folder(7)
    evil.mkdir()
    try:
        state = load_checkpoint(folder.fold_folder(0) / "checkpoint_final.pth")
        state["extra"] = _Payload()
        torch.save(state, evil / "checkpoint_final.pth")
        with pytest.raises(SpineDiffError, match="other than tensors"):
            SpineDiffPredictor(folder, [7])
        assert not (Path(os.environ["nnUNet_results"]) / "pwned").exists()
    finally:
        shutil.rmtree(evil)


# ---------------------------------------------------------------------- ensemble and find_best commands
def test_ensemble_command_averages_images_and_probabilities(trained, tmp_path):
    _case_inputs(trained["raw"], TRANS, "phantom_000", (0, 1), tmp_path / "trans_in")
    for trainer in ("DiffusionTranslationTrainer", "RegressionTrainer"):
        predict(tmp_path / "trans_in", tmp_path / trainer, TRANS, CONFIG, trainer, folds=[0], **FAST)
    assert main(["ensemble", "-i", str(tmp_path / "DiffusionTranslationTrainer"), str(tmp_path / "RegressionTrainer"),
                 "-o", str(tmp_path / "trans_ens")]) == 0
    members = [_read(tmp_path / t / "phantom_000.nii.gz") for t in ("DiffusionTranslationTrainer", "RegressionTrainer")]
    assert np.allclose(_read(tmp_path / "trans_ens" / "phantom_000.nii.gz"), (members[0] + members[1]) / 2, atol=1e-3)

    _case_inputs(trained["raw"], SEG, "phantom_000", (0, 1), tmp_path / "seg_in")
    for fold in (0, 1):
        predict(tmp_path / "seg_in", tmp_path / f"seg_{fold}", SEG, CONFIG, "DiffusionSegmentationTrainer",
                folds=[fold], save_probabilities=True, **FAST)
    assert main(["ensemble", "-i", str(tmp_path / "seg_0"), str(tmp_path / "seg_1"), "-o", str(tmp_path / "seg_ens"),
                 "--save-probabilities"]) == 0
    probabilities = [np.load(tmp_path / f"seg_{f}" / "phantom_000.npz")["probabilities"] for f in (0, 1)]
    expected = np.argmax((probabilities[0] + probabilities[1]) / 2, axis=0)
    labels = _read(tmp_path / "seg_ens" / "phantom_000.nii.gz")
    assert np.array_equal(labels, expected.reshape(labels.shape))
    _assert_same_geometry(sitk.ReadImage(str(tmp_path / "seg_ens" / "phantom_000.nii.gz")),
                          sitk.ReadImage(str(trained["raw"] / SEG / "imagesTr" / "phantom_000_0000.nii.gz")))
    # label maps alone cannot be averaged: a clear error
    (tmp_path / "seg_0" / "phantom_000.npz").unlink()
    assert main(["ensemble", "-i", str(tmp_path / "seg_0"), str(tmp_path / "seg_1"), "-o",
                 str(tmp_path / "seg_ens2")]) == 2


def test_find_best_ranks_candidates_and_prints_the_predict_command(trained, capsys):
    assert main(["find_best", "-d", "902"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((trained["base"] / "results" / TRANS / "find_best.json").read_text())
    assert result["metric"] == "mae_body" and result["folds"] == ["0"]
    maes = [row["scores"]["mae_body"] for row in result["ranking"]]
    assert len(maes) == 2 and maes == sorted(maes)
    assert {row["trainer"] for row in result["ranking"]} == {"DiffusionTranslationTrainer", "RegressionTrainer"}
    assert "scores" in result["ensemble"] and result["ensemble"]["cases"] == 1
    assert result["commands"][0] in printed and result["commands"][0].startswith("spinediff predict -i INPUT_FOLDER")
    if result["winner"].startswith("ensemble"):
        assert result["commands"][-1].startswith("spinediff ensemble")
    else:
        assert f"-tr {result['ranking'][0]['trainer']}" in result["commands"][0]
    assert main(["find_best", "-d", "902"]) == 2  # the JSON is not silently replaced


def test_find_best_segmentation_ensemble_by_re_prediction(trained, capsys):
    """Two candidates that are copies of one model: the re-predicted ensemble must equal the singles."""
    results = trained["base"] / "results" / SEG
    copy = results / "DiffusionSegmentationTrainer__nnUNetPlansCopy__2d_diffusion"
    shutil.copytree(results / "DiffusionSegmentationTrainer__nnUNetPlans__2d_diffusion", copy)
    try:
        assert main(["find_best", "-d", "901", "-o", str(trained["base"] / "seg1.json")]) == 0
        assert "pass --repredict" in capsys.readouterr().out
        assert main(["find_best", "-d", "901", "--repredict", "-o", str(trained["base"] / "seg2.json")]) == 0
        printed = capsys.readouterr().out
        result = json.loads((trained["base"] / "seg2.json").read_text())
        ensemble = result["ensemble"]
        assert result["folds"] == ["0", "1"] and ensemble["cases"] == 2 and "re-predicted" in ensemble["method"]
        singles = list(ensemble["singles"].values())
        assert singles[0] == singles[1] == ensemble["scores"]["dice"]  # identical members: nothing to gain
        assert not result["winner"].startswith("ensemble")
        assert "-f 0 1" in printed and "spinediff predict -i INPUT_FOLDER" in printed
    finally:
        shutil.rmtree(copy)


# ---------------------------------------------------------------------- post-processing decided by find_best
def test_predict_and_postprocess_apply_the_models_level_numbering(trained, tmp_path):
    """A model folder's postprocessing.json is applied by `predict` (not with --no-postprocessing) and by
    `spinediff postprocess` to another tool's outputs; both give the level numbering of the raw output."""
    from spinediff.inference.level_order import LevelOrder, renumber
    from spinediff.inference.postprocessing import POSTPROCESSING_FILE

    model = trained["base"] / "results" / SEG / "DiffusionSegmentationTrainer__nnUNetPlans__2d_diffusion"
    decision = model / POSTPROCESSING_FILE
    # an order of the phantom's labels along world y (any order: the test checks that it is applied)
    order = LevelOrder((1, 2, 3), (0.0, 1.0, 0.0))
    decision.write_text(json.dumps({"level_order": order.to_dict(), "applied": True}))
    _case_inputs(trained["raw"], SEG, "phantom_001", (0, 1), tmp_path / "in")
    common = ["-i", str(tmp_path / "in"), "-d", "901", "-c", CONFIG, "-tr", "DiffusionSegmentationTrainer", "-f", "0",
              "--samples", "1", "--steps", "1"]
    try:
        assert main(["predict", *common, "-o", str(tmp_path / "raw_out"), "--no-postprocessing"]) == 0
        assert main(["predict", *common, "-o", str(tmp_path / "pp_out")]) == 0
        assert main(["postprocess", "-i", str(tmp_path / "raw_out"), "-o", str(tmp_path / "pp_cmd"), "-m",
                     str(model)]) == 0
        assert main(["postprocess", "-i", str(tmp_path / "raw_out"), "-o", str(tmp_path / "pp_cmd"), "-m",
                     str(model)]) == 2  # never silently replaced
    finally:
        decision.unlink()
    raw_image = sitk.ReadImage(str(tmp_path / "raw_out" / "phantom_001.nii.gz"))
    expected = renumber(sitk.GetArrayFromImage(raw_image), raw_image, order)
    assert np.array_equal(_read(tmp_path / "pp_out" / "phantom_001.nii.gz"), expected)
    assert np.array_equal(_read(tmp_path / "pp_cmd" / "phantom_001.nii.gz"), expected)
    assert json.loads((tmp_path / "pp_out" / "prediction.json").read_text())["postprocessing"]
    # without a decision, postprocess says what to run first
    assert main(["postprocess", "-i", str(tmp_path / "raw_out"), "-o", str(tmp_path / "x"), "-m", str(model)]) == 2


# ---------------------------------------------------------------------- review flags
def test_review_rule_flags_and_ranks_cases_from_the_model_folder(trained, tmp_path, capsys):
    """With a review.json in the model folder, predict scores each case, flags those above the threshold, writes
    review.csv (most doubtful first) and names the flagged cases; the rule is read back as written."""
    import csv

    from spinediff.inference.review import ReviewRule

    model = Path(trained["nnUNet_results"]) / SEG / f"DiffusionSegmentationTrainer__nnUNetPlans__{CONFIG}"
    inputs = tmp_path / "in"
    for case in ("phantom_000", "phantom_001", "phantom_002"):
        _case_inputs(trained["raw"], SEG, case, (0, 1), inputs)
    first = _read(trained["raw"] / SEG / "labelsTr" / "phantom_000.nii.gz")
    volumes = {label: float((first == label).sum()) * 1e-3 for label in np.unique(first) if label > 0}
    rule = ReviewRule("level_anomaly", 0.5, volumes, {"rule": "set by this test"})
    path = rule.write(model)
    try:
        assert ReviewRule.read(model) == rule
        assert main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", "901", "-c", CONFIG,
                     "-tr", "DiffusionSegmentationTrainer", "-f", "0", "--samples", "2", "--steps", "1",
                     "--save-uncertainty"]) == 0
    finally:
        path.unlink()
    rows = list(csv.DictReader((tmp_path / "out" / "review.csv").open()))
    values = [float(row["value"]) for row in rows]
    assert len(rows) == 3 and values == sorted(values, reverse=True)
    for row in rows:
        summary = json.loads((tmp_path / "out" / f"{row['case']}_uncertainty.json").read_text())
        assert summary["review"]["value"] == pytest.approx(summary["scores"]["level_anomaly"])
        assert (row["review"] == "yes") == (summary["scores"]["level_anomaly"] > 0.5)
        assert 0.0 <= summary["scores"]["sample_disagreement"] <= 1.0
    flagged = [row["case"] for row in rows if row["review"] == "yes"]
    summary = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert summary["review_flagged"] == flagged
    printed = capsys.readouterr().out
    assert f"review: {len(flagged)} case(s) above the model's review threshold" in printed
    # the flagged cases drawn beside the table (a sheet only when a case is flagged)
    assert (tmp_path / "out" / "review.png").is_file() == bool(flagged)
    assert (summary["review_sheet"] is not None) == bool(flagged) == ("drawn in" in printed)
    with pytest.raises(SpineDiffError, match="not one of"):
        ReviewRule("dice", 0.5)


def test_predict_flags_a_scan_oriented_unlike_the_training_scans(trained, tmp_path):
    """`spinediff predict` checks each scan's orientation code against the rule's (the training scans'): a rule of
    another code flags every case with the code to reorient to; the scans' own code flags none."""
    from spinediff.inference.review import ReviewRule
    from spinediff.utilities.geometry import orientation_code

    model = Path(trained["nnUNet_results"]) / SEG / f"DiffusionSegmentationTrainer__nnUNetPlans__{CONFIG}"
    inputs = tmp_path / "in"
    _case_inputs(trained["raw"], SEG, "phantom_000", (0, 1), inputs)
    code = orientation_code(sitk.ReadImage(str(sorted(inputs.iterdir())[0])).GetDirection())
    other = "RAS" if code != "RAS" else "LPS"
    first = _read(trained["raw"] / SEG / "labelsTr" / "phantom_000.nii.gz")
    volumes = {label: float((first == label).sum()) * 1e-3 for label in np.unique(first) if label > 0}
    for orientation, flagged in ((other, True), (code, False)):
        rule = ReviewRule("level_anomaly", 100.0, volumes, {"rule": "set by this test"}, orientation=orientation)
        path = rule.write(model)
        out = tmp_path / f"out_{orientation}"
        try:
            assert main(["predict", "-i", str(inputs), "-o", str(out), "-d", "901", "-c", CONFIG, "-tr",
                         "DiffusionSegmentationTrainer", "-f", "0", "--samples", "1", "--steps", "1"]) == 0
        finally:
            path.unlink()
        summary = json.loads((out / "prediction.json").read_text())
        assert summary["review_flagged"] == (["phantom_000"] if flagged else [])
        reasons = (out / "review.csv").read_text()
        assert (f"oriented unlike the training scans (its axes {code}, theirs {other}" in reasons) == flagged


# ---------------------------------------------------------------------- split prediction
def test_parts_are_disjoint_cover_the_folder_and_match_an_unsplit_run(trained, tmp_path):
    """--num-parts 2: each part predicts every other case into the same folder, with its own run summary;
    together exactly the cases of one unsplit run, with identical outputs."""
    inputs = tmp_path / "in"
    for case in ("phantom_000", "phantom_001", "phantom_002"):
        _case_inputs(trained["raw"], TRANS, case, (0, 1), inputs)
    common = ["-i", str(inputs), "-d", "902", "-c", CONFIG, "-tr", "DiffusionTranslationTrainer", "-f", "0",
              "--samples", "1", "--steps", "1"]
    assert main(["predict", *common, "-o", str(tmp_path / "whole")]) == 0
    for part in (0, 1):
        assert main(["predict", *common, "-o", str(tmp_path / "split"), "--num-parts", "2", "--part-id",
                     str(part)]) == 0
    parts = [json.loads((tmp_path / "split" / f"prediction_part{p}of2.json").read_text()) for p in (0, 1)]
    cases = [set(p["cases"]) for p in parts]
    assert cases == [{"phantom_000", "phantom_002"}, {"phantom_001"}]
    assert not (tmp_path / "split" / "prediction.json").exists()
    for case in ("phantom_000", "phantom_001", "phantom_002"):
        np.testing.assert_array_equal(_read(tmp_path / "split" / f"{case}.nii.gz"),
                                      _read(tmp_path / "whole" / f"{case}.nii.gz"))
    with pytest.raises(SpineDiffError, match="--part-id must be in 0..1"):
        predict(inputs, tmp_path / "bad", 902, CONFIG, "DiffusionTranslationTrainer", num_parts=2, part_id=2)


# ---------------------------------------------------------------------- distillation
def test_distill_writes_a_student_that_predict_samples_at_its_steps(trained, tmp_path):
    """spinediff distill: a student checkpoint beside the teacher (which is untouched), with its step count in its
    diffusion block and the rounds logged; refused a second time without overwrite; `predict --checkpoint distilled`
    samples with it at that step count and says so."""
    from spinediff.io import read_json
    from spinediff.training.distillation import distill

    fold = Path(trained["nnUNet_results"]) / TRANS / f"DiffusionTranslationTrainer__nnUNetPlans__{CONFIG}" / "fold_0"
    teacher_before = (fold / "checkpoint_final.pth").read_bytes()
    path = distill(902, CONFIG, 0, "DiffusionTranslationTrainer", steps=1, teacher_steps=2, iterations=3,
                   progress=False)
    assert path == fold / "checkpoint_distilled.pth"
    assert (fold / "checkpoint_final.pth").read_bytes() == teacher_before
    student = torch.load(path, weights_only=True)
    teacher = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert student["spinediff"]["diffusion"]["num_inference_steps"] == 1
    assert student["spinediff"]["diffusion"]["solver"] == "ddim"
    assert [r["iterations"] for r in student["spinediff"]["distillation"]["rounds"]] == [3]
    assert read_json(fold / "distillation.json")["teacher_steps"] == 2
    assert any(not torch.equal(student["network_weights"][k], teacher["network_weights"][k])
               for k in teacher["network_weights"])
    with pytest.raises(SpineDiffError, match="already exists"):
        distill(902, CONFIG, 0, "DiffusionTranslationTrainer", steps=1, teacher_steps=2, iterations=1, progress=False)

    _case_inputs(trained["raw"], TRANS, "phantom_001", (0, 1), tmp_path / "in")
    predict(tmp_path / "in", tmp_path / "student", TRANS, CONFIG, "DiffusionTranslationTrainer", folds=[0],
            checkpoint="distilled", num_samples=1, progress=False)
    predict(tmp_path / "in", tmp_path / "teacher", TRANS, CONFIG, "DiffusionTranslationTrainer", folds=[0],
            num_samples=1, num_inference_steps=1, progress=False)
    summary = read_json(tmp_path / "student" / "prediction.json")
    assert (summary["checkpoint"], summary["num_inference_steps"], summary["sampling_from"]) == ("distilled", 1,
                                                                                  "distilled checkpoint")
    student_image, teacher_image = (_read(tmp_path / n / "phantom_001.nii.gz") for n in ("student", "teacher"))
    assert np.isfinite(student_image).all() and not np.allclose(student_image, teacher_image)
