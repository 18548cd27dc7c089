"""Files we read through a schema, locks on the remaining outputs, two concurrent predictions, and options that
were checked only after work had started (issue 33, last part).

- ``prediction.json`` (read by ``spinediff ensemble`` and the demo), a model's ``review.json`` and
  ``sampling.json`` (read by ``spinediff predict`` and ``find_best``) and landmark JSON (``spinediff register``):
  a JSON list, unknown or missing keys and values of the wrong type are refused naming the file and the fix;
- ``find_best``, ``tune_sampling`` and ``distill`` take their output's lock before they look at it, so a second
  run is refused at once with the other's PID;
- two real ``spinediff predict`` processes into one ``-o`` folder: one predicts, the other is refused naming the
  first's PID, and the folder holds complete outputs described by one ``prediction.json``;
- options of ``convert``, ``register``, ``find_best``, ``benchmark``, ``tune_sampling``, ``distill`` and
  ``predict`` that were checked after work had started (or not at all) are refused while parsing.

The CLI failure cases go through :func:`test_robustness.run_cli` (exit 2, message on stderr, no traceback,
nothing created or changed) and so land in the ``SPINEDIFF_ROBUSTNESS_TABLE`` record as the others do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_robustness import NAME, _blob, _evaluation_folders, _registration_inputs, run_cli, write_raw

from spinediff.cli import main
from spinediff.inference.inputs import RUN_SUMMARY, read_run_summary
from spinediff.utilities.lock import LOCK_NAME

TRAINER = "DiffusionSegmentationTrainer"
MODEL = f"{TRAINER}__nnUNetPlans__2d_diffusion"
PLAN = ["plan", "-d", "996", "--device", "cpu", "-np", "1", "-q", "-c", "2d_diffusion"]
TRAIN = ["train", "-d", "996", "-c", "2d_diffusion", "-f", "0", "-tr", TRAINER, "--epochs", "1", "--iters-per-epoch",
         "1", "--val-iters-per-epoch", "1", "--steps", "1", "--val-samples", "1", "--device", "cpu"]


@pytest.fixture
def bare(tmp_path, monkeypatch) -> Path:
    """Empty nnU-Net folders."""
    for key in ("raw", "preprocessed", "results"):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(f"nnUNet_{key}", str(tmp_path / key))
    return tmp_path


# ---------------------------------------------------------------------- prediction.json (ensemble reads it)
PREDICTION_DAMAGES = {
    "prediction_is_a_list": ([], "JSON list"),
    "prediction_unknown_key": ({"task": "segmentation", "tsak": "segmentation"}, "unknown key(s) ['tsak']"),
    "prediction_missing_task": ({"num_samples": 2, "folds": ["0"]}, "lacks 'task'"),
    "prediction_unknown_task": ({"task": "denoising"}, "'task' is 'denoising'"),
    "prediction_samples_a_string": ({"task": "segmentation", "num_samples": "three"}, "'num_samples' must be"),
    "prediction_samples_zero": ({"task": "segmentation", "num_samples": 0}, "'num_samples' must be at least 1"),
    "prediction_cases_a_list": ({"task": "segmentation", "cases": ["case000"]}, "'cases' must be an object"),
    "prediction_is_a_folder": (None, "is a folder, not a file"),
}


@pytest.mark.parametrize("damage", sorted(PREDICTION_DAMAGES))
def test_ensemble_of_a_folder_with_a_damaged_prediction_json(bare, capsys, damage):
    _, prediction = _evaluation_folders(bare)
    other = bare / "pred2"
    shutil.copytree(prediction, other)
    content, reason = PREDICTION_DAMAGES[damage]
    if content is None:
        (other / RUN_SUMMARY).mkdir()
    else:
        (other / RUN_SUMMARY).write_text(json.dumps(content))
    outcome = run_cli(["ensemble", "-i", str(prediction), str(other), "-o", str(bare / "ens")], bare, capsys)
    assert str(other / RUN_SUMMARY) in outcome.message and reason in outcome.message
    assert not (bare / "ens").exists()


def test_an_ensembles_prediction_json_passes_the_schema(bare):
    """What spinediff writes is what it reads: an ensemble's prediction.json, then an ensemble of ensembles."""
    _, prediction = _evaluation_folders(bare)
    shutil.copytree(prediction, bare / "pred2")
    assert main(["ensemble", "-i", str(prediction), str(bare / "pred2"), "-o", str(bare / "ens")]) == 0
    assert read_run_summary(bare / "ens" / RUN_SUMMARY)["task"] == "translation"  # images without probabilities
    shutil.copytree(bare / "ens", bare / "ens2")
    assert main(["ensemble", "-i", str(bare / "ens"), str(bare / "ens2"), "-o", str(bare / "ens3")]) == 0
    assert read_run_summary(bare / "ens3" / RUN_SUMMARY)["ensemble_of"] == [str(bare / "ens"), str(bare / "ens2")]


# ---------------------------------------------------------------------- landmark JSON (register reads it)
GOOD_LANDMARKS = {"space": "LPS", "units": "mm", "vertebrae": {
    str(label): {"body": [10.0, 12.0, 4.5 + 7 * i], "posterior": [10.0, 4.0, 4.5 + 7 * i]}
    for i, label in enumerate((20, 21, 22))}}

LANDMARK_DAMAGES = {
    "landmarks_unknown_key": (dict(GOOD_LANDMARKS, frame="scanner"), "unknown key(s) ['frame']"),
    "landmarks_in_centimetres": (dict(GOOD_LANDMARKS, units="cm"), "millimetres"),
    "landmarks_in_ras": (dict(GOOD_LANDMARKS, space="RAS"), "'RAS' space"),
    "landmarks_space_a_number": (dict(GOOD_LANDMARKS, space=3), "must be text"),
    "landmarks_without_vertebrae": ({"space": "LPS", "units": "mm"}, "'vertebrae'"),
    "landmarks_is_a_list": ([[1, 2, 3]], "'vertebrae'"),
    "landmarks_label_zero": (dict(GOOD_LANDMARKS, vertebrae={"0": {"body": [1, 2, 3]}}), "not a vertebra label"),
    "landmarks_disc_label": (dict(GOOD_LANDMARKS, vertebrae={"120": {"body": [1, 2, 3]}}), "not a vertebra label"),
    "landmarks_two_numbers": (dict(GOOD_LANDMARKS, vertebrae={"20": {"body": [1, 2]}}), "20/body"),
    "landmarks_no_points": (dict(GOOD_LANDMARKS, vertebrae={}), "no landmarks"),
}


@pytest.mark.parametrize("damage", sorted(LANDMARK_DAMAGES))
def test_register_with_damaged_landmark_json(bare, capsys, damage):
    files = _registration_inputs(bare)
    content, reason = LANDMARK_DAMAGES[damage]
    (bare / "pair" / "mr_landmarks.json").write_text(json.dumps(content))
    (bare / "pair" / "ct_landmarks.json").write_text(json.dumps(GOOD_LANDMARKS))
    argv = ["register", "--case-id", "sub01", "--mr", f"T1w={files['mr']}", "--ct", str(files["ct"]),
            "--mr-landmarks", str(bare / "pair" / "mr_landmarks.json"), "--ct-landmarks",
            str(bare / "pair" / "ct_landmarks.json"), "--mr-labels", str(files["mr_vert"]), "-o",
            str(bare / "raw" / "Dataset950_Pairs"), "--no-overlay"]
    outcome = run_cli(argv, bare, capsys)
    assert "mr_landmarks.json" in outcome.message and reason in outcome.message


def test_register_with_good_landmark_json(bare):
    """The same files with good landmarks register (so the cases above fail on the damage alone)."""
    files = _registration_inputs(bare)
    for key in ("mr", "ct"):
        (bare / "pair" / f"{key}_landmarks.json").write_text(json.dumps(GOOD_LANDMARKS))
    assert main(["register", "--case-id", "sub01", "--mr", f"T1w={files['mr']}", "--ct", str(files["ct"]),
                 "--mr-landmarks", str(bare / "pair" / "mr_landmarks.json"), "--ct-landmarks",
                 str(bare / "pair" / "ct_landmarks.json"), "--mr-labels", str(files["mr_vert"]), "-o",
                 str(bare / "raw" / "Dataset950_Pairs"), "--no-overlay"]) == 0
    assert (bare / "raw" / "Dataset950_Pairs" / "imagesTr" / "sub01_0001.nii.gz").is_file()


# ---------------------------------------------------------------------- options checked after work had started
def _option_cases(root: Path) -> dict[str, tuple[list[str], str, str]]:
    """case → (command line, the option the message must name, a word of what it needs)."""
    subjects = str(root / "a_folder")
    convert = ["convert", "-i", subjects, "-o", str(root / "raw")]
    register = ["register", "--ct", str(root / "a_file.txt"), "--mr", str(root / "a_file.txt"), "-o",
                str(root / "raw" / "Dataset950_Pairs")]
    tune = ["tune_sampling", "-d", "996", "-c", "2d_diffusion", "-tr", TRAINER]
    distill = ["distill", "-d", "996", "-c", "2d_diffusion", "-tr", TRAINER]
    return {
        "convert_dataset_id_zero": ([*convert, "-d", "0"], "-d/--dataset-id", "from 1 to 999"),
        "convert_slab_folds_zero": ([*convert, "-d", "10", "--slab-folds", "0"], "--slab-folds", "from 2 to 100"),
        "convert_gap_nan": ([*convert, "-d", "10", "--slab-folds", "3", "--gap-mm", "nan"], "--gap-mm", "finite"),
        "convert_gap_negative": ([*convert, "-d", "10", "--slab-folds", "3", "--gap-mm", "-5"], "--gap-mm",
                                 "at least 0"),
        "register_case_id_with_a_path": ([*register, "--case-id", "../evil"], "--case-id", "case identifier"),
        "register_case_id_empty": ([*register, "--case-id", ""], "--case-id", "case identifier"),
        "register_case_id_channel_suffix": ([*register, "--case-id", "sub01_0001"], "--case-id", "_NNNN"),
        "find_best_output_is_a_folder": (["find_best", "-d", "996", "-o", subjects], "-o/--output",
                                         "is a folder, not a file"),
        "find_best_fold_not_a_number": (["find_best", "-d", "996", "-f", "first"], "-f/--folds", "not a fold"),
        "benchmark_fold_negative": (["benchmark", "-d", "996", "-f", "0", "-1"], "-f/--folds", "numbered from 0"),
        "benchmark_fold_not_a_number": (["benchmark", "-d", "996", "-f", "x"], "-f/--folds", "not a fold"),
        "tune_sampling_fold_not_a_number": ([*tune, "-f", "zero"], "-f/--folds", "not a fold"),
        "distill_fold_negative": ([*distill, "-f", "-1"], "-f/--fold", "numbered from 0"),
        "predict_init_from_missing": (["predict", "-i", subjects, "-o", str(root / "out"), "-d", "996", "-c",
                                       "2d_diffusion", "--init-from", str(root / "nowhere")], "--init-from",
                                      "does not exist"),
        "predict_init_from_a_file": (["predict", "-i", subjects, "-o", str(root / "out"), "-d", "996", "-c",
                                      "2d_diffusion", "--init-from", str(root / "a_file.txt")], "--init-from",
                                     "is a file, not a folder"),
    }


@pytest.mark.parametrize("case", sorted(_option_cases(Path("/x"))))
def test_option_checked_while_parsing(bare, capsys, case):
    (bare / "a_file.txt").write_text("keep me")
    (bare / "a_folder").mkdir()
    argv, option, need = _option_cases(bare)[case]
    outcome = run_cli(argv, bare, capsys)
    assert f"argument {option}" in outcome.message and need in outcome.message


# ---------------------------------------------------------------------- a tiny trained model (slow)
@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    """The small dataset of test_robustness planned, preprocessed and trained for one iteration (fold 0)."""
    root = tmp_path_factory.mktemp("trained")
    for key in ("raw", "preprocessed", "results"):
        (root / key).mkdir()
    write_raw(root / "raw")
    saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                      nnUNet_results=str(root / "results"))
    try:
        assert main(PLAN) == 0
        assert main(TRAIN) == 0
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    inputs = root / "inputs"
    inputs.mkdir()
    for path in sorted((root / "raw" / NAME / "imagesTr").glob("*.nii.gz")):
        shutil.copy(path, inputs / path.name)
    return root


@pytest.fixture
def trained(trained_once, tmp_path, monkeypatch) -> Path:
    world = tmp_path / "world"
    shutil.copytree(trained_once, world)
    for key in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{key}", str(world / key))
    return world


def _predict(world: Path, output: Path, *extra: str) -> list[str]:
    return ["predict", "-i", str(world / "inputs"), "-o", str(output), "-d", "996", "-c", "2d_diffusion", "-tr",
            TRAINER, "--device", "cpu", *extra]


REVIEW_DAMAGES = {
    "review_is_a_list": ([], "JSON list"),
    "review_unknown_key": ({"score": "level_anomaly", "threshold": 1.0, "treshold": 2.0},
                           "unknown key(s) ['treshold']"),
    "review_missing_threshold": ({"score": "level_anomaly"}, "lacks ['threshold']"),
    "review_unknown_score": ({"score": "luck", "threshold": 1.0}, "'score' 'luck' is not one of"),
    "review_threshold_a_string": ({"score": "level_anomaly", "threshold": "high"}, "'threshold' must be a finite"),
    "review_negative_volume": ({"score": "level_anomaly", "threshold": 1.0, "expected_volumes_ml": {"1": -2}},
                               "expected_volumes_ml/1"),
    "review_intensity_malformed": ({"score": "level_anomaly", "threshold": 1.0, "intensity": {"mean": [1],
                                                                                            "spread": [1],
                                                                                            "threshold": 4}},
                                   "intensity/mean"),
    "review_numbering_threshold_above_one": ({"score": "level_anomaly", "threshold": 1.0,
                                              "numbering_threshold": 3}, "from 0 to 1"),
    "review_orientation_not_a_code": ({"score": "level_anomaly", "threshold": 1.0, "orientation": "LLS"},
                                      "'orientation' must be a three-letter orientation code"),
    "review_is_a_folder": (None, "is a folder, not a file"),
}

SAMPLING_DAMAGES = {
    "sampling_is_a_list": ([], "JSON list"),
    "sampling_unknown_key": ({"solver": "ddim", "num_inference_steps": 2, "stesp": 3}, "unknown key(s) ['stesp']"),
    "sampling_chosen_a_list": ({"solver": "ddim", "num_inference_steps": 2, "chosen": []}, "'chosen' must be"),
    "sampling_missing_steps": ({"solver": "ddim"}, "not a sampling choice"),
    "sampling_zero_steps": ({"solver": "ddim", "num_inference_steps": 0}, "at least 1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(REVIEW_DAMAGES) + sorted(SAMPLING_DAMAGES))
def test_predict_with_a_damaged_review_or_sampling_json(trained, capsys, damage):
    model = trained / "results" / NAME / MODEL
    name = "review.json" if damage.startswith("review") else "sampling.json"
    content, reason = {**REVIEW_DAMAGES, **SAMPLING_DAMAGES}[damage]
    if content is None:
        (model / name).mkdir()
    else:
        (model / name).write_text(json.dumps(content))
    steps = ["--steps", "1"] if name == "review.json" else []  # steps named: sampling.json would not be read
    outcome = run_cli(_predict(trained, trained / "out", *steps, "--samples", "1"), trained, capsys)
    assert str(model / name).replace(str(trained), "…") in outcome.message.replace(str(trained), "…")
    assert reason in outcome.message


# ---------------------------------------------------------------------- locks of find_best, tune_sampling, distill
HOLDER = """
import sys, time
from spinediff.utilities.lock import folder_lock
with folder_lock(sys.argv[1], name=sys.argv[2], command="spinediff (holder)"):
    print("held", flush=True)
    time.sleep(120)
"""


def _held(folder: Path, name: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), name], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_find_best_refuses_a_held_dataset(bare, capsys):
    dataset = bare / "results" / NAME
    dataset.mkdir()
    process = _held(dataset, f".find_best{LOCK_NAME}")
    try:
        outcome = run_cli(["find_best", "-d", "996"], bare, capsys)
    finally:
        process.kill()
        process.wait()
    assert f"PID {process.pid}" in outcome.message and NAME in outcome.message and "in use" in outcome.message


def test_find_best_refuses_a_held_output_file(bare, capsys):
    (bare / "results" / NAME).mkdir()
    (bare / "elsewhere").mkdir()
    process = _held(bare / "elsewhere", f".ranking.json{LOCK_NAME}")
    try:
        outcome = run_cli(["find_best", "-d", "996", "-o", str(bare / "elsewhere" / "ranking.json")], bare, capsys)
    finally:
        process.kill()
        process.wait()
    assert f"PID {process.pid}" in outcome.message and "elsewhere" in outcome.message


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tune_sampling", "distill"])
def test_a_held_model_refuses_tune_sampling_and_distill(trained, capsys, command):
    model = trained / "results" / NAME / MODEL
    folder, name = (model, f".sampling.json{LOCK_NAME}") if command == "tune_sampling" else \
        (model / "fold_0", LOCK_NAME)
    argv = ["tune_sampling", "-d", "996", "-c", "2d_diffusion", "-tr", TRAINER, "--device", "cpu",
            "--candidates", "ddim:1", "--max-cases", "1"] if command == "tune_sampling" else \
        ["distill", "-d", "996", "-c", "2d_diffusion", "-f", "0", "-tr", TRAINER, "--device", "cpu",
         "--iterations", "1", "--teacher-steps", "2"]
    process = _held(folder, name)
    try:
        started = time.perf_counter()
        outcome = run_cli(argv, trained, capsys)
        assert time.perf_counter() - started < 30  # at once, not after the work
    finally:
        process.kill()
        process.wait()
    assert f"PID {process.pid}" in outcome.message and str(folder) in outcome.message
    # the lock released, the same command runs
    assert main(argv) == 0
    assert (model / "sampling.json").is_file() if command == "tune_sampling" else \
        (model / "fold_0" / "checkpoint_distilled.pth").is_file()
    assert not list(model.rglob(f"*{LOCK_NAME}"))


# ---------------------------------------------------------------------- two predict processes into one folder
@pytest.mark.slow
def test_two_concurrent_predictions_into_one_folder(trained):
    """Started together with the same -o: exactly one predicts; the other is refused at once naming its PID;
    the folder holds every case, complete, and one prediction.json that describes them."""
    output = trained / "out"
    argv = _predict(trained, output, "--samples", "2", "--steps", "40")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, "-m", "spinediff.cli", *argv], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=600), p.returncode) for p in processes]
    codes = sorted(code for *_, code in results)
    assert codes == [0, 2], results
    (winner, *_), (loser_pid, _, loser_err, _) = sorted(results, key=lambda r: r[3])
    assert f"PID {winner}" in loser_err and "in use by another spinediff run" in loser_err, loser_err
    assert "Traceback" not in loser_err and str(output) in loser_err
    summary = read_run_summary(output / RUN_SUMMARY)
    cases = sorted({p.name.rsplit("_", 1)[0] for p in (trained / "inputs").glob("*.nii.gz")})
    assert sorted(summary["cases"]) == cases and all(c["ok"] for c in summary["cases"].values())
    assert summary["num_samples"] == 2 and summary["num_inference_steps"] == 40
    for case in cases:
        image = sitk.ReadImage(str(output / f"{case}.nii.gz"))
        labels = sitk.GetArrayFromImage(image)
        assert labels.shape == _blob().shape and set(np.unique(labels)) <= {0, 1}
    assert sorted(p.name for p in output.iterdir()) == sorted([RUN_SUMMARY, *(f"{c}.nii.gz" for c in cases)])

