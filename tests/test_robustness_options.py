"""Bad options, wrong kinds of path, damaged headers and damaged files we read, through the real command line.

The second half of the robustness table (documentation/robustness.md): every case ends with exit status 2 and
one message that names the option or the file at fault and what it needs, without a traceback, and leaves every
file and folder as it was (``test_robustness.run_cli`` checks all of that and records the message when
``SPINEDIFF_ROBUSTNESS_TABLE`` is set). Options are refused while the command line is parsed, before anything
is read or written, so most cases need no data at all.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_robustness import NAME, _blob, _image, run_cli, write_raw

from spinediff.cli import main

TRAIN = ["train", "-d", "996", "-c", "2d_diffusion", "-f", "0", "-tr", "DiffusionSegmentationTrainer"]
BENCHMARK = ["benchmark", "-d", "996"]
PLAN = ["plan", "-d", "996", "-q", "-np", "1"]
TUNE = ["tune_sampling", "-d", "996", "-c", "2d_diffusion", "-tr", "DiffusionSegmentationTrainer"]
DISTILL = ["distill", "-d", "996", "-c", "2d_diffusion", "-f", "0", "-tr", "DiffusionSegmentationTrainer"]
PHANTOM = ["phantom", "--cases", "1", "--task", "segmentation"]  # -o is added per case

#: case → (command line, the option the message must name, a word of what it needs)
OPTION_CASES: dict[str, tuple[list[str], str, str]] = {
    "train_steps_negative": ([*TRAIN, "--steps", "-3"], "--steps", "at least 1"),
    "train_steps_zero": ([*TRAIN, "--steps", "0"], "--steps", "at least 1"),
    "train_epochs_zero": ([*TRAIN, "--epochs", "0"], "--epochs", "at least 1"),
    "train_iters_per_epoch_negative": ([*TRAIN, "--iters-per-epoch", "-1"], "--iters-per-epoch", "at least 1"),
    "train_val_iters_per_epoch_zero": ([*TRAIN, "--val-iters-per-epoch", "0"], "--val-iters-per-epoch",
                                       "at least 1"),
    "train_lr_negative": ([*TRAIN, "--lr", "-1"], "--lr", "greater than 0"),
    "train_lr_nan": ([*TRAIN, "--lr", "nan"], "--lr", "finite"),
    "train_lr_infinite": ([*TRAIN, "--lr", "inf"], "--lr", "finite"),
    "train_budget_minutes_negative": ([*TRAIN, "--budget-minutes", "-5"], "--budget-minutes", "greater than 0"),
    "train_budget_zero": ([*TRAIN, "--budget", "0m"], "--budget", "positive"),
    "train_budget_unreadable": ([*TRAIN, "--budget", "fast"], "--budget", "90s"),
    "train_mask_ablation_above_one": ([*TRAIN, "--mask-ablation", "1.5"], "--mask-ablation", "from 0 to 1"),
    "train_seed_below_minus_one": ([*TRAIN, "--seed", "-2"], "--seed", "from -1"),
    "train_steps_not_a_number": ([*TRAIN, "--steps", "ten"], "--steps", "whole number"),
    "benchmark_workers_zero": ([*BENCHMARK, "-j", "0"], "-j/--workers", "at least 1"),
    "benchmark_workers_negative": ([*BENCHMARK, "-j", "-2"], "-j/--workers", "at least 1"),
    "benchmark_epochs_zero": ([*BENCHMARK, "--epochs", "0"], "--epochs", "at least 1"),
    "benchmark_budget_negative": ([*BENCHMARK, "--budget=-5m"], "--budget", "90s"),
    "benchmark_steps_zero": ([*BENCHMARK, "--steps", "0"], "--steps", "at least 1"),
    "benchmark_val_samples_zero": ([*BENCHMARK, "--val-samples", "0"], "--val-samples", "at least 1"),
    "benchmark_seed_below_minus_one": ([*BENCHMARK, "--seed", "-2"], "--seed", "from -1"),
    "plan_budget_too_short": ([*PLAN, "--budget", "10s"], "--budget", "at least 30 s"),
    "plan_budget_zero": ([*PLAN, "--budget", "0"], "--budget", "positive"),
    "plan_memory_negative": ([*PLAN, "--memory-target-gb", "-1"], "--memory-target-gb", "greater than 0"),
    "plan_memory_nan": ([*PLAN, "--memory-target-gb", "nan"], "--memory-target-gb", "finite"),
    "plan_processes_zero": ([*PLAN[:-2], "-np", "0"], "-np/--num-processes", "at least 1"),
    "tune_sampling_tolerance_negative": ([*TUNE, "--tolerance", "-1"], "--tolerance", "from 0 to 1"),
    "tune_sampling_max_cases_zero": ([*TUNE, "--max-cases", "0"], "--max-cases", "at least 1"),
    "tune_sampling_candidate_zero_steps": ([*TUNE, "--candidates", "ddim:0"], "--candidates", "at least 1"),
    "tune_sampling_candidate_unknown_solver": ([*TUNE, "--candidates", "warp:5"], "--candidates", "warp"),
    "distill_iterations_zero": ([*DISTILL, "--iterations", "0"], "--iterations", "at least 1"),
    "distill_teacher_steps_zero": ([*DISTILL, "--teacher-steps", "0"], "--teacher-steps", "at least 1"),
    "distill_lr_zero": ([*DISTILL, "--lr", "0"], "--lr", "greater than 0"),
    "distill_budget_unreadable": ([*DISTILL, "--budget", "never"], "--budget", "90s"),
    "demo_seed_negative": (["demo", "--quick", "--seed", "-1"], "--seed", "at least 0"),
    "phantom_spacing_zero": ([*PHANTOM, "--mr-spacing", "0", "1", "1"], "--mr-spacing", "from 0.05 to 50"),
    "phantom_spacing_negative": ([*PHANTOM, "--mr-spacing", "-1", "1", "1"], "--mr-spacing", "from 0.05 to 50"),
    "phantom_spacing_nan": ([*PHANTOM, "--mr-spacing", "nan", "1", "1"], "--mr-spacing", "finite"),
    "phantom_ct_spacing_zero": ([*PHANTOM, "--ct-spacing", "1", "1", "0"], "--ct-spacing", "from 0.05 to 50"),
    "phantom_shape_zero": ([*PHANTOM, "--shape", "0", "48", "6"], "--shape", "from 4 to 1024"),
    "phantom_shape_negative": ([*PHANTOM, "--shape", "32", "-48", "6"], "--shape", "from 4 to 1024"),
    "phantom_cases_zero": ([*PHANTOM, "--cases", "0"], "--cases", "at least 1"),
    "phantom_rotation_out_of_range": ([*PHANTOM, "--max-rotation-deg", "400"], "--max-rotation-deg",
                                      "from 0 to 180"),
    "phantom_translation_negative": ([*PHANTOM, "--max-translation-mm", "-3"], "--max-translation-mm",
                                     "at least 0"),
    "phantom_dataset_id_too_large": ([*PHANTOM, "--dataset-id", "999"], "--dataset-id", "from 1 to 997"),
}

#: predict's options need an existing input folder (-i), given per case.
PREDICT_OPTION_CASES: dict[str, tuple[list[str], str, str]] = {
    "predict_steps_zero": (["--steps", "0"], "--steps", "at least 1"),
    "predict_samples_zero": (["--samples", "0"], "--samples", "at least 1"),
    "predict_eta_above_one": (["--eta", "1.5"], "--eta", "from 0 to 1"),
    "predict_warm_start_negative": (["--warm-start", "-0.1"], "--warm-start", "from 0 to 1"),
    "predict_num_parts_zero": (["--num-parts", "0"], "--num-parts", "at least 1"),
    "predict_part_id_negative": (["--part-id", "-1"], "--part-id", "at least 0"),
    "predict_seed_negative": (["--seed", "-1"], "--seed", "at least 0"),
}


@pytest.fixture
def bare(tmp_path, monkeypatch) -> Path:
    """Empty nnU-Net folders: parse-time refusals need no data."""
    for key in ("raw", "preprocessed", "results"):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(f"nnUNet_{key}", str(tmp_path / key))
    return tmp_path


def _predict(root: Path, *extra: str) -> list[str]:
    return ["predict", "-i", str(root / "raw"), "-o", str(root / "out"), "-d", "996", "-c", "2d_diffusion",
            "-tr", "DiffusionSegmentationTrainer", *extra]


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option_value(bare, capsys, case):
    argv, option, need = OPTION_CASES[case]
    if argv[0] == "phantom":
        argv = [*argv, "-o", str(bare / "phantoms")]
    outcome = run_cli(argv, bare, capsys)
    assert f"argument {option}" in outcome.message and need in outcome.message


@pytest.mark.parametrize("case", sorted(PREDICT_OPTION_CASES))
def test_bad_predict_option_value(bare, capsys, case):
    extra, option, need = PREDICT_OPTION_CASES[case]
    outcome = run_cli(_predict(bare, *extra), bare, capsys)
    assert f"argument {option}" in outcome.message and need in outcome.message


def test_evaluate_data_range_low_above_high(bare, capsys):
    (bare / "ref").mkdir()
    (bare / "pred").mkdir()
    outcome = run_cli(["evaluate", "-ref", str(bare / "ref"), "-pred", str(bare / "pred"), "--data-range", "100",
                       "0"], bare, capsys)
    assert "--data-range" in outcome.message and "LOW below HIGH" in outcome.message


def test_evaluate_data_range_nan(bare, capsys):
    (bare / "ref").mkdir()
    (bare / "pred").mkdir()
    outcome = run_cli(["evaluate", "-ref", str(bare / "ref"), "-pred", str(bare / "pred"), "--data-range", "nan",
                       "1"], bare, capsys)
    assert "argument --data-range" in outcome.message and "finite" in outcome.message


def test_evaluate_negative_label(bare, capsys):
    (bare / "ref").mkdir()
    (bare / "pred").mkdir()
    outcome = run_cli(["evaluate", "-ref", str(bare / "ref"), "-pred", str(bare / "pred"), "-l", "-1"], bare, capsys)
    assert "argument -l/--labels" in outcome.message


# ---------------------------------------------------------------------- --device cuda without a GPU
DEVICE_COMMANDS = {
    "train": TRAIN, "distill": DISTILL, "tune_sampling": TUNE, "benchmark": BENCHMARK,
    "find_best": ["find_best", "-d", "996"], "demo": ["demo", "--quick"], "predict": None,
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here: --device cuda is valid")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
@pytest.mark.parametrize("command", sorted(DEVICE_COMMANDS))
def test_cuda_device_without_a_gpu(bare, capsys, command, device):
    argv = _predict(bare) if command == "predict" else list(DEVICE_COMMANDS[command])
    if command == "demo":
        argv += ["-o", str(bare / "demo_out")]  # the demo must not leave half a folder
    outcome = run_cli([*argv, "--device", device], bare, capsys)
    assert "argument --device" in outcome.message and "no CUDA device is visible to torch" in outcome.message
    assert "--device cpu" in outcome.message


def test_cuda_device_beyond_the_visible_ones(bare, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    outcome = run_cli([*TRAIN, "--device", "cuda:1"], bare, capsys)
    assert "cuda:1 does not exist" in outcome.message and "torch sees 1 CUDA device(s)" in outcome.message


# ---------------------------------------------------------------------- a file for a folder, a folder for a file
def _path_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """case → (command line, the kind the message must say); ``root/a_file.txt`` and ``root/a_folder`` exist."""
    file, folder = str(root / "a_file.txt"), str(root / "a_folder")
    register = ["register", "--case-id", "c", "-o", str(root / "raw" / "Dataset950_Pairs")]
    return {
        "predict_input_is_a_file": (["predict", "-i", file, "-o", str(root / "out"), "-d", "996", "-c",
                                     "2d_diffusion"], "is a file, not a folder"),
        "evaluate_reference_is_a_file": (["evaluate", "-ref", file, "-pred", folder], "is a file, not a folder"),
        "evaluate_prediction_is_a_file": (["evaluate", "-ref", folder, "-pred", file], "is a file, not a folder"),
        "ensemble_input_is_a_file": (["ensemble", "-i", folder, file, "-o", str(root / "ens")],
                                     "is a file, not a folder"),
        "postprocess_model_is_a_file": (["postprocess", "-i", folder, "-o", str(root / "pp"), "-m", file],
                                        "is a file, not a folder"),
        "report_input_is_a_file": (["report", "-i", file], "is a file, not a folder"),
        "register_unaligned_is_a_file": (["register", file, "-o", str(root / "raw" / "Dataset950_Pairs")],
                                         "is a file, not a folder"),
        "register_ct_is_a_folder": ([*register, "--ct", folder, "--mr", f"T1w={file}"], "is a folder, not a file"),
        "register_mr_is_a_folder": ([*register, "--ct", file, "--mr", f"T1w={folder}"], "is a folder, not a file"),
        "register_vertebrae_is_a_folder": ([*register, "--ct", file, "--mr", file, "--ct-vertebrae", folder],
                                           "is a folder, not a file"),
        "train_perception_model_is_a_file": ([*TRAIN, "--perception-model", file], "is a file, not a folder"),
        "train_perception_model_missing": ([*TRAIN, "--perception-model", str(root / "nowhere")], "does not exist"),
    }


PATH_CASES = sorted(_path_cases(Path("/x")))


@pytest.mark.parametrize("case", PATH_CASES)
def test_wrong_kind_of_path(bare, capsys, case):
    (bare / "a_file.txt").write_text("keep me")
    (bare / "a_folder").mkdir()
    argv, kind = _path_cases(bare)[case]
    outcome = run_cli(argv, bare, capsys)
    assert kind in outcome.message
    assert ("a_file.txt" if "is a file" in kind else "a_folder" if "is a folder" in kind else "nowhere") \
        in outcome.message


def test_plan_preprocessed_is_a_file(bare, capsys):
    write_raw(bare / "raw")
    (bare / "pre.txt").write_text("keep me")
    outcome = run_cli([*PLAN, "--preprocessed", str(bare / "pre.txt")], bare, capsys)
    assert "pre.txt" in outcome.message and "is a file, not a folder" in outcome.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the check is the same")
def test_plan_preprocessed_is_read_only(bare, capsys):
    write_raw(bare / "raw")
    (bare / "ro").mkdir()
    (bare / "ro").chmod(0o500)
    try:
        outcome = run_cli([*PLAN, "--preprocessed", str(bare / "ro")], bare, capsys)
    finally:
        (bare / "ro").chmod(0o700)
    assert "ro" in outcome.message and "Cannot write" in outcome.message


# ---------------------------------------------------------------------- headers and dataset.json (validate and plan)
def _nifti_pixdim(path: Path, pixdim) -> None:
    """Rewrite a NIfTI header's voxel size (no qform/sform, so that readers take pixdim as it is)."""
    image = nib.load(str(path))
    header = image.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(None, code=0)
    header["pixdim"][1:4] = pixdim
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), None, header), str(path))


def _as_mha(dataset: Path) -> None:
    for path in sorted(dataset.glob("*Tr/*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path).replace(".nii.gz", ".mha"))
        path.unlink()
    data = json.loads((dataset / "dataset.json").read_text())
    (dataset / "dataset.json").write_text(json.dumps(dict(data, file_ending=".mha")))


def _header_damages() -> dict:
    image0, label = "imagesTr/case001_0000.nii.gz", "labelsTr/case001.nii.gz"

    def dataset_json_is_a_list(d):
        (d / "dataset.json").write_text("[]")
        return "dataset.json", "channel_names"

    def dataset_json_is_a_folder(d):
        (d / "dataset.json").unlink()
        (d / "dataset.json").mkdir()
        return "dataset.json", "is a folder, not a file"

    def label_is_a_folder(d):
        (d / label).unlink()
        (d / label).mkdir()
        return "case001.nii.gz", "is a folder, not a file"

    def image_is_a_folder(d):
        (d / image0).unlink()
        (d / image0).mkdir()
        return "case001_0000.nii.gz", "is a folder, not a file"

    def one_case_2d(d):
        for path in (d / image0, d / "imagesTr/case001_0001.nii.gz", d / label):
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            sitk.WriteImage(sitk.GetImageFromArray(array[6]), str(path))
        return "case001_0000.nii.gz", "2D image"

    def every_case_2d(d):
        for path in sorted(d.glob("*Tr/*.nii.gz")):
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            sitk.WriteImage(sitk.GetImageFromArray(array[6]), str(path))
        return "case000_0000.nii.gz", "2D image"

    def complex_voxels(d):
        image = sitk.ReadImage(str(d / image0))
        array = sitk.GetArrayFromImage(image).astype(np.complex64) * (1 + 1j)
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(d / image0))
        return "case001_0000.nii.gz", "complex"

    def nan_spacing(d):
        _nifti_pixdim(d / image0, [np.nan, 1.0, 2.0])
        return "case001_0000.nii.gz", "spacing"

    def label_nan_spacing(d):
        _nifti_pixdim(d / label, [1.0, np.nan, 2.0])
        return "case001.nii.gz", "spacing"

    def direction_not_orthonormal(d):
        _as_mha(d)
        path = d / "imagesTr/case001_0000.mha"
        header = path.read_bytes()
        assert b"TransformMatrix = 1 0 0 0 1 0 0 0 1" in header
        path.write_bytes(header.replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 0 1 0 0 0 2"))
        return "case001_0000.mha", "not a rotation"

    return {f.__name__: f for f in (dataset_json_is_a_list, dataset_json_is_a_folder, label_is_a_folder,
                                    image_is_a_folder, one_case_2d, every_case_2d, complex_voxels, nan_spacing,
                                    label_nan_spacing, direction_not_orthonormal)}


HEADER_DAMAGES = _header_damages()


@pytest.fixture
def world(bare) -> Path:
    write_raw(bare / "raw")
    return bare


@pytest.mark.parametrize("command", ["validate", "plan"])
@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGES))
def test_bad_header_or_dataset_json(world, capsys, command, damage):
    culprit, reason = HEADER_DAMAGES[damage](world / "raw" / NAME)
    argv = ["validate", "-d", "996", "-q"] if command == "validate" else [*PLAN, "--device", "cpu"]
    outcome = run_cli(argv, world, capsys)
    assert culprit in outcome.message and reason in outcome.message
    if command == "plan":
        assert not (world / "preprocessed" / NAME).exists()


# ---------------------------------------------------------------------- plans (preprocessed and a model's plans.json)
@pytest.fixture(scope="module")
def planned_once(tmp_path_factory) -> Path:
    """One dataset planned (plans only, no preprocessing) for the plans cases to copy and damage."""
    root = tmp_path_factory.mktemp("planned")
    for key in ("raw", "preprocessed", "results"):
        (root / key).mkdir()
    write_raw(root / "raw")
    saved = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                      nnUNet_results=str(root / "results"))
    try:
        assert main(["plan", "-d", "996", "--device", "cpu", "-np", "1", "-q", "-c", "2d_diffusion",
                     "--no-preprocess"]) == 0
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return root


def _damage_configuration(plans_file: Path, damage: str) -> None:
    plans = json.loads(plans_file.read_text())
    configuration = plans["configurations"]["2d_diffusion"]
    if damage == "plans_is_a_list":
        plans_file.write_text("[]")
        return
    if damage == "patch_zero":
        configuration["patch_size"] = [0, 0]
    elif damage == "patch_negative":
        configuration["patch_size"] = [-8, 8]
    elif damage == "spacing_zero":
        configuration["spacing"] = [0.0, 1.0]
    elif damage == "spacing_wrong_length":
        configuration["spacing"] = [1.0, 1.0, 1.0]
    elif damage == "batch_zero":
        configuration["batch_size"] = 0
    elif damage == "elastic_above_one":  # a hand-edited elastic deformation (documentation/planning.md)
        configuration.setdefault("augmentation", {})["elastic"] = {"p": 1.5}
    plans_file.write_text(json.dumps(plans))


PLANS_DAMAGES = ["patch_zero", "patch_negative", "spacing_zero", "spacing_wrong_length", "batch_zero",
                 "elastic_above_one", "plans_is_a_list"]


@pytest.fixture
def planned(planned_once, bare) -> Path:
    shutil.copytree(planned_once / "raw", bare / "raw", dirs_exist_ok=True)
    shutil.copytree(planned_once / "preprocessed", bare / "preprocessed", dirs_exist_ok=True)
    return bare


@pytest.mark.parametrize("damage", PLANS_DAMAGES)
def test_train_on_damaged_plans(planned, capsys, damage):
    plans_file = planned / "preprocessed" / NAME / "nnUNetPlans.json"
    _damage_configuration(plans_file, damage)
    outcome = run_cli([*TRAIN, "--device", "cpu"], planned, capsys)
    assert "nnUNetPlans.json" in outcome.message and "spinediff plan" in outcome.message
    assert not (planned / "results" / NAME).exists()


@pytest.mark.parametrize("damage", ["patch_zero", "spacing_wrong_length", "batch_zero"])
def test_predict_with_a_damaged_model_plans(planned, capsys, damage):
    model = planned / "results" / NAME / "DiffusionSegmentationTrainer__nnUNetPlans__2d_diffusion"
    (model / "fold_0").mkdir(parents=True)
    shutil.copy(planned / "preprocessed" / NAME / "nnUNetPlans.json", model / "plans.json")
    shutil.copy(planned / "raw" / NAME / "dataset.json", model / "dataset.json")
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"not used: the plans are refused first")
    _damage_configuration(model / "plans.json", damage)
    inputs = planned / "inputs"
    inputs.mkdir()
    for channel in range(2):
        sitk.WriteImage(_image(_blob().astype(np.float32)), str(inputs / f"c_{channel:04d}.nii.gz"))
    outcome = run_cli(["predict", "-i", str(inputs), "-o", str(planned / "out"), "-d", "996", "-c", "2d_diffusion",
                       "-tr", "DiffusionSegmentationTrainer", "--device", "cpu"], planned, capsys)
    assert str(model / "plans.json").replace(str(planned), "") in outcome.message.replace(str(planned), "")


# ---------------------------------------------------------------------- postprocessing.json
POSTPROCESSING_DAMAGES = {
    "postprocessing_is_a_list": ("[]", "JSON list"),
    "postprocessing_unknown_key": (json.dumps({"level_order": None, "applied": False, "levle_order": 1}),
                                   "unknown key(s) ['levle_order']"),
    "postprocessing_missing_level_order": (json.dumps({"applied": False}), "lacks 'level_order'"),
    "postprocessing_malformed_level_order": (json.dumps({"level_order": {"labels": [1, 2]}}), "malformed"),
    "postprocessing_unknown_foreground": (json.dumps({"level_order": None, "foreground": "magic"}), "magic"),
    "postprocessing_is_a_folder": (None, "is a folder, not a file"),
}


@pytest.mark.parametrize("damage", sorted(POSTPROCESSING_DAMAGES))
def test_postprocess_with_a_damaged_decision(bare, capsys, damage):
    model = bare / "results" / NAME / "nnUNetTrainer__nnUNetPlans__2d"
    model.mkdir(parents=True)
    text, reason = POSTPROCESSING_DAMAGES[damage]
    if text is None:
        (model / "postprocessing.json").mkdir()
    else:
        (model / "postprocessing.json").write_text(text)
    predictions = bare / "predictions"
    predictions.mkdir()
    sitk.WriteImage(_image(_blob()), str(predictions / "case000.nii.gz"))
    outcome = run_cli(["postprocess", "-i", str(predictions), "-o", str(bare / "pp"), "-m", str(model)], bare,
                      capsys)
    assert "postprocessing.json" in outcome.message and reason in outcome.message
