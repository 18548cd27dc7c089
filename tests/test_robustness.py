"""Bad input through the real command line: every case ends with exit status 2 and one message that names
the file (or folder) at fault, without a traceback, and leaves every file and folder as it was (nothing
half-written, nothing replaced). The table in documentation/robustness.md lists the messages."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from spinediff.cli import main

NAME = "Dataset996_Robust"
SHAPE_ZYX = (12, 24, 24)


# ---------------------------------------------------------------------- a tiny valid dataset to break
def _image(array: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _blob() -> np.ndarray:
    label = np.zeros(SHAPE_ZYX, np.uint8)
    label[3:9, 6:18, 6:18] = 1
    return label


def write_raw(root: Path, cases: int = 3) -> Path:
    rng = np.random.default_rng(0)
    dataset = root / NAME
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    for case in range(cases):
        for channel in range(2):
            array = (rng.normal(100, 20, SHAPE_ZYX) + 50 * _blob()).astype(np.float32)
            sitk.WriteImage(_image(array), str(dataset / "imagesTr" / f"case{case:03d}_{channel:04d}.nii.gz"))
        sitk.WriteImage(_image(_blob()), str(dataset / "labelsTr" / f"case{case:03d}.nii.gz"))
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1w", "1": "T2w"}, "labels": {"background": 0, "vertebra": 1},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    return dataset


def _rewrite(path: Path, change: Callable[[sitk.Image], sitk.Image]) -> None:
    sitk.WriteImage(change(sitk.ReadImage(str(path))), str(path))


def _with(image: sitk.Image, **geometry) -> sitk.Image:
    out = sitk.GetImageFromArray(sitk.GetArrayFromImage(image))
    out.SetSpacing(geometry.get("spacing", image.GetSpacing()))
    out.SetOrigin(geometry.get("origin", image.GetOrigin()))
    out.SetDirection(geometry.get("direction", image.GetDirection()))
    return out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set_voxel(path: Path, value, index=(2, 3, 4)) -> None:
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    array[index] = value
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------- dataset damages (validate and plan)
def _dataset_damages() -> dict[str, Callable[[Path], str]]:
    """Damage name → function that breaks the dataset and returns the name the message must contain."""
    image0, image1 = "imagesTr/case001_0000.nii.gz", "imagesTr/case001_0001.nii.gz"
    label = "labelsTr/case001.nii.gz"

    def truncated(d):
        _truncate(d / image0)
        return "case001_0000.nii.gz"

    def not_an_image(d):
        (d / image0).write_text("this is not an image")
        return "case001_0000.nii.gz"

    def nan(d):
        _set_voxel(d / image0, np.nan)
        return "case001_0000.nii.gz"

    def infinite(d):
        _set_voxel(d / image1, np.inf)
        return "case001_0001.nii.gz"

    def undeclared_label(d):
        _set_voxel(d / label, 7)
        return "case001.nii.gz"

    def channel_origin(d):
        _rewrite(d / image1, lambda i: _with(i, origin=(5.0, 0.0, 0.0)))
        return "case001_0001.nii.gz"

    def channel_direction(d):
        _rewrite(d / image1, lambda i: _with(i, direction=(0, 1, 0, 1, 0, 0, 0, 0, -1)))
        return "case001_0001.nii.gz"

    def channel_spacing(d):
        _rewrite(d / image1, lambda i: _with(i, spacing=(1.5, 1.5, 2.0)))
        return "case001_0001.nii.gz"

    def channel_shape(d):
        sitk.WriteImage(_image(np.zeros((12, 20, 24), np.float32)), str(d / image1))
        return "case001_0001.nii.gz"

    def label_origin(d):
        _rewrite(d / label, lambda i: _with(i, origin=(0.0, 7.0, 0.0)))
        return "case001.nii.gz"

    def missing_channel(d):
        (d / image1).unlink()
        return "case001_0001.nii.gz"

    def missing_label(d):
        (d / label).unlink()
        return "case001"

    def image_4d(d):
        sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(d / image0))] * 2), str(d / image0))
        return "case001_0000.nii.gz"

    def labels_as_list(d):
        _edit_json(d / "dataset.json", labels=["background", "vertebra"])
        return "dataset.json"

    def num_training_string(d):
        _edit_json(d / "dataset.json", numTraining="three")
        return "dataset.json"

    def file_ending_matches_nothing(d):
        _edit_json(d / "dataset.json", file_ending=".mha")
        return "ending in .mha"

    def invalid_json(d):
        (d / "dataset.json").write_text("{not json")
        return "dataset.json"

    def channel_names_missing(d):
        data = json.loads((d / "dataset.json").read_text())
        del data["channel_names"]
        (d / "dataset.json").write_text(json.dumps(data))
        return "dataset.json"

    return {f.__name__: f for f in (truncated, not_an_image, nan, infinite, undeclared_label, channel_origin,
                                    channel_direction, channel_spacing, channel_shape, label_origin, missing_channel,
                                    missing_label, image_4d, labels_as_list, num_training_string,
                                    file_ending_matches_nothing, invalid_json, channel_names_missing)}


DATASET_DAMAGES = _dataset_damages()


# ---------------------------------------------------------------------- running a case
@dataclass
class Outcome:
    status: int
    message: str


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` with its size and modification time."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            state[str(path.relative_to(root))] = (path.is_dir(), info.st_size, info.st_mtime_ns)
    return state


def run_cli(argv: list[str], root: Path, capsys) -> Outcome:
    """Run the CLI and check what every bad-input case must satisfy, whatever the command."""
    capsys.readouterr()
    before = snapshot(root)
    try:
        status = main(argv)
    except SystemExit as refused:  # argparse refuses a bad option value while parsing (status 2)
        status = refused.code
    captured = capsys.readouterr()
    after = snapshot(root)
    assert status == 2, f"{argv}: exit status {status}\n{captured.out}\n{captured.err}"
    assert "Traceback" not in captured.err + captured.out
    assert captured.err.strip(), "no message on stderr"
    created = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and before[k] != after[k] and not before[k][0])
    removed = sorted(set(before) - set(after))
    assert not created and not changed and not removed, f"created {created}, changed {changed}, removed {removed}"
    table = os.environ.get("SPINEDIFF_ROBUSTNESS_TABLE")  # collect the messages for documentation/robustness.md
    if table:
        case = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
        message = " ".join(captured.err.split()).replace(str(root), "…")
        with open(table, "a") as handle:
            handle.write(json.dumps({"case": case, "message": message}) + "\n")
    return Outcome(status, captured.err.strip())


@pytest.fixture
def world(tmp_path, monkeypatch) -> Path:
    """$nnUNet_raw with one small valid dataset, empty preprocessed and results folders."""
    for key in ("raw", "preprocessed", "results"):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(f"nnUNet_{key}", str(tmp_path / key))
    write_raw(tmp_path / "raw")
    return tmp_path


@pytest.mark.parametrize("command", ["validate", "plan"])
@pytest.mark.parametrize("damage", sorted(DATASET_DAMAGES))
def test_bad_dataset(world, capsys, command, damage):
    culprit = DATASET_DAMAGES[damage](world / "raw" / NAME)
    argv = ["validate", "-d", "996", "-q"] if command == "validate" else \
        ["plan", "-d", "996", "--device", "cpu", "-np", "1", "-q"]
    outcome = run_cli(argv, world, capsys)
    assert culprit in outcome.message
    if command == "plan":
        assert not (world / "preprocessed" / NAME).exists()


# ---------------------------------------------------------------------- evaluate
def _evaluation_folders(world: Path) -> tuple[Path, Path]:
    reference, prediction = world / "ref", world / "pred"
    reference.mkdir()
    prediction.mkdir()
    sitk.WriteImage(_image(_blob()), str(reference / "case000.nii.gz"))
    sitk.WriteImage(_image(_blob()), str(prediction / "case000.nii.gz"))
    return reference, prediction


EVALUATE_DAMAGES = {
    "spacing": lambda p: _rewrite(p, lambda i: _with(i, spacing=(1.5, 1.5, 3.0))),
    "origin": lambda p: _rewrite(p, lambda i: _with(i, origin=(0.0, 0.0, 9.0))),
    "direction": lambda p: _rewrite(p, lambda i: _with(i, direction=(0, 1, 0, 1, 0, 0, 0, 0, -1))),
    "size": lambda p: sitk.WriteImage(_image(np.zeros((12, 24, 20), np.uint8)), str(p)),
    "truncated": _truncate,
    "not_an_image": lambda p: p.write_text("nope"),
}


@pytest.mark.parametrize("damage", sorted(EVALUATE_DAMAGES))
def test_evaluate_bad_prediction(world, capsys, damage):
    reference, prediction = _evaluation_folders(world)
    EVALUATE_DAMAGES[damage](prediction / "case000.nii.gz")
    outcome = run_cli(["evaluate", "-ref", str(reference), "-pred", str(prediction)], world, capsys)
    assert "case000.nii.gz" in outcome.message


def test_evaluate_missing_reference_folder(world, capsys):
    _, prediction = _evaluation_folders(world)
    outcome = run_cli(["evaluate", "-ref", str(world / "nowhere"), "-pred", str(prediction)], world, capsys)
    assert "nowhere" in outcome.message


def test_ensemble_output_is_a_file(world, capsys):
    _, prediction = _evaluation_folders(world)
    (world / "ens.txt").write_text("keep me")
    outcome = run_cli(["ensemble", "-i", str(prediction), str(prediction), "-o", str(world / "ens.txt")], world,
                      capsys)
    assert "ens.txt" in outcome.message and "is a file" in outcome.message


def test_evaluate_output_is_a_file(world, capsys):
    reference, prediction = _evaluation_folders(world)
    (world / "out.txt").write_text("keep me")
    outcome = run_cli(["evaluate", "-ref", str(reference), "-pred", str(prediction), "-o", str(world / "out.txt")],
                      world, capsys)
    assert "out.txt" in outcome.message


# ---------------------------------------------------------------------- report
REPORT_DAMAGES = {
    "no_results_file": lambda folder: None,
    "benchmark_json_not_json": lambda folder: (folder / "benchmark.json").write_text("{not json"),
    "benchmark_json_wrong_layout": lambda folder: (folder / "benchmark.json").write_text(json.dumps({"x": 1})),
    "evaluation_without_cases": lambda folder: ((folder / "summary.json").write_text(json.dumps(
        {"task": "segmentation", "per_label": {}})), (folder / "per_case.csv").write_text("case,label,dice\n")),
}


@pytest.mark.parametrize("damage", sorted(REPORT_DAMAGES))
def test_report_of_a_bad_folder(world, capsys, damage):
    folder = world / "bench"
    folder.mkdir()
    REPORT_DAMAGES[damage](folder)
    outcome = run_cli(["report", "-i", str(folder)], world, capsys)
    assert str(folder) in outcome.message


def test_report_of_a_missing_folder(world, capsys):
    outcome = run_cli(["report", "-i", str(world / "nowhere")], world, capsys)
    assert "nowhere" in outcome.message


# ---------------------------------------------------------------------- postprocess
def _model_and_predictions(world: Path, decision: bool = True) -> tuple[Path, Path]:
    model = world / "results" / NAME / "nnUNetTrainer__nnUNetPlans__2d"
    model.mkdir(parents=True)
    if decision:
        (model / "postprocessing.json").write_text(json.dumps({"level_order": None, "applied": False}))
    predictions = world / "predictions"
    predictions.mkdir()
    sitk.WriteImage(_image(_blob()), str(predictions / "case000.nii.gz"))
    return model, predictions


def test_postprocess_without_a_decision(world, capsys):
    model, predictions = _model_and_predictions(world, decision=False)
    outcome = run_cli(["postprocess", "-i", str(predictions), "-o", str(world / "pp"), "-m", str(model)], world,
                      capsys)
    assert "postprocessing.json" in outcome.message and "find_best" in outcome.message


def test_postprocess_into_its_input(world, capsys):
    model, predictions = _model_and_predictions(world)
    outcome = run_cli(["postprocess", "-i", str(predictions), "-o", str(predictions), "-m", str(model)], world,
                      capsys)
    assert "differ" in outcome.message


def test_postprocess_over_existing_outputs(world, capsys):
    model, predictions = _model_and_predictions(world)
    (world / "pp").mkdir()
    sitk.WriteImage(_image(_blob()), str(world / "pp" / "case000.nii.gz"))
    outcome = run_cli(["postprocess", "-i", str(predictions), "-o", str(world / "pp"), "-m", str(model)], world,
                      capsys)
    assert "case000.nii.gz" in outcome.message and "--overwrite" in outcome.message


def test_postprocess_corrupt_prediction(world, capsys):
    model, predictions = _model_and_predictions(world)
    _truncate(predictions / "case000.nii.gz")
    outcome = run_cli(["postprocess", "-i", str(predictions), "-o", str(world / "pp"), "-m", str(model)], world,
                      capsys)
    assert "case000.nii.gz" in outcome.message


def _review_rule(model: Path, score: str = "level_anomaly") -> None:
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w"}, "labels": {"background": 0,
                                                                                             "vertebra": 1},
                                                    "file_ending": ".nii.gz"}))
    (model / "review.json").write_text(json.dumps({"score": score, "threshold": 0.7,
                                                   "expected_volumes_ml": {"1": 2.3}}))


def test_postprocess_review_with_an_image_missing(world, capsys):
    model, predictions = _model_and_predictions(world)
    _review_rule(model)
    images = world / "images"
    images.mkdir()
    outcome = run_cli(["postprocess", "-i", str(predictions), "-o", str(world / "pp"), "-m", str(model),
                       "--images", str(images)], world, capsys)
    assert "case000_0000.nii.gz" in outcome.message and "--images" in outcome.message


def test_postprocess_review_by_a_score_the_predictions_cannot_give(world, capsys):
    model, predictions = _model_and_predictions(world)
    _review_rule(model, "entropy")
    outcome = run_cli(["postprocess", "-i", str(predictions), "-o", str(world / "pp"), "-m", str(model)], world,
                      capsys)
    assert "review.json" in outcome.message and "--save_probabilities" in outcome.message


def test_postprocess_images_with_no_review(world, capsys):
    model, predictions = _model_and_predictions(world)
    _review_rule(model)
    outcome = run_cli(["postprocess", "-i", str(predictions), "-o", str(world / "pp"), "-m", str(model),
                       "--images", str(predictions), "--no-review"], world, capsys)
    assert "--images" in outcome.message and "--no-review" in outcome.message


def test_postprocess_images_without_a_review_rule(world, capsys):
    model, predictions = _model_and_predictions(world)
    outcome = run_cli(["postprocess", "-i", str(predictions), "-o", str(world / "pp"), "-m", str(model),
                       "--images", str(predictions)], world, capsys)
    assert "--images" in outcome.message and "review.json" in outcome.message


# ---------------------------------------------------------------------- train and predict without a model
def test_train_unplanned_dataset(world, capsys):
    outcome = run_cli(["train", "-d", "996", "-c", "2d_diffusion", "-f", "0", "-tr", "DiffusionSegmentationTrainer"],
                      world, capsys)
    assert "996" in outcome.message and "plan" in outcome.message


def test_train_fold_out_of_range(world, capsys):
    assert main(["plan", "-d", "996", "--device", "cpu", "-np", "1", "-q", "-c", "2d_diffusion"]) == 0
    outcome = run_cli(["train", "-d", "996", "-c", "2d_diffusion", "-f", "7", "-tr", "DiffusionSegmentationTrainer"],
                      world, capsys)
    assert "Fold 7 does not exist" in outcome.message


def test_predict_without_a_trained_model(world, capsys):
    _, predictions = _model_and_predictions(world)
    outcome = run_cli(["predict", "-i", str(predictions), "-o", str(world / "out"), "-d", "996", "-c", "2d_diffusion",
                       "-tr", "DiffusionSegmentationTrainer"], world, capsys)
    assert "DiffusionSegmentationTrainer" in outcome.message


def test_predict_output_is_a_file(world, capsys):
    _, predictions = _model_and_predictions(world)
    (world / "out.nii.gz").write_text("keep me")
    outcome = run_cli(["predict", "-i", str(predictions), "-o", str(world / "out.nii.gz"), "-d", "996", "-c",
                       "2d_diffusion", "-tr", "DiffusionSegmentationTrainer"], world, capsys)
    assert "out.nii.gz" in outcome.message and "is a file" in outcome.message


@pytest.mark.parametrize("command", ["phantom", "demo"])
def test_output_is_a_file(world, capsys, command):
    (world / "taken.txt").write_text("keep me")
    argv = ["phantom", "-o", str(world / "taken.txt"), "--cases", "1"] if command == "phantom" else \
        ["demo", "--quick", "-o", str(world / "taken.txt"), "--overwrite"]
    outcome = run_cli(argv, world, capsys)
    assert "taken.txt" in outcome.message and "is a file" in outcome.message


# ---------------------------------------------------------------------- register
def _registration_inputs(world: Path) -> dict[str, Path]:
    folder = world / "pair"
    folder.mkdir()
    vertebrae = np.zeros((24, 24, 24), np.uint8)
    for i, label in enumerate((20, 21, 22)):
        vertebrae[2 + 7 * i:7 + 7 * i, 8:16, 6:18] = label
    files = {"mr": folder / "mr.nii.gz", "ct": folder / "ct.nii.gz", "mr_vert": folder / "mr_vert.nii.gz",
             "ct_vert": folder / "ct_vert.nii.gz"}
    sitk.WriteImage(_image(vertebrae.astype(np.float32) * 5, spacing=(1.0, 1.0, 1.0)), str(files["mr"]))
    sitk.WriteImage(_image(vertebrae.astype(np.float32) * 40 - 1000, spacing=(1.0, 1.0, 1.0)), str(files["ct"]))
    for key in ("mr_vert", "ct_vert"):
        sitk.WriteImage(_image(vertebrae, spacing=(1.0, 1.0, 1.0)), str(files[key]))
    return files


def _register_argv(world: Path, files: dict[str, Path], *extra: str) -> list[str]:
    return ["register", "--case-id", "sub01", "--mr", f"T1w={files['mr']}", "--ct", str(files["ct"]),
            "--mr-vertebrae", str(files["mr_vert"]), "--ct-vertebrae", str(files["ct_vert"]),
            "-o", str(world / "raw" / "Dataset950_Pairs"), *extra]


@pytest.mark.parametrize("damage", ["missing_ct", "truncated_ct", "ct_not_an_image", "mr_vertebrae_4d", "ct_nan"])
def test_register_bad_inputs(world, capsys, damage):
    files = _registration_inputs(world)
    if damage == "missing_ct":
        files["ct"].unlink()
        culprit = "ct.nii.gz"
    elif damage == "truncated_ct":
        _truncate(files["ct"])
        culprit = "ct.nii.gz"
    elif damage == "ct_nan":
        _set_voxel(files["ct"], np.nan, index=(slice(2, 5), slice(2, 5), slice(2, 5)))
        culprit = "ct.nii.gz"
    elif damage == "ct_not_an_image":
        files["ct"].write_text("not an image")
        culprit = "ct.nii.gz"
    else:
        sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(files["mr_vert"]))] * 2), str(files["mr_vert"]))
        culprit = "mr_vert.nii.gz"
    outcome = run_cli(_register_argv(world, files), world, capsys)
    assert culprit in outcome.message
    reason = {"missing_ct": "does not exist", "truncated_ct": "truncated", "ct_not_an_image": "could not be read",
              "mr_vertebrae_4d": "3D", "ct_nan": "NaN"}[damage]
    assert reason in outcome.message


def test_train_with_no_validation_samples_writes_nothing(world, capsys):
    outcome = run_cli(["train", "-d", "996", "-c", "2d_diffusion", "-f", "0", "-tr", "DiffusionSegmentationTrainer",
                       "--val-samples", "0"], world, capsys)
    assert "--val-samples" in outcome.message
