"""Issue 34 end to end on a phantom with numbered levels (L1-L5 from the phantom's vertebra instances), on tiny
models trained once for the module: a T1w scan predicted by a T2w-only model trained without contrast augmentation
is flagged in review.csv and named by the run, and benchmarks/stress_position.py runs for nnU-Net's trainer and for
diffusion segmentation (crops, pads and shifts along the spine, and another dataset's T1w scans)."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_SETTINGS, nnunet_folders, requires_shared_data

from spinediff.cli import main
from spinediff.errors import SpineDiffError

LEVELS_ID, OTHER_ID = 911, 912
LEVELS = f"Dataset{LEVELS_ID}_SpinePhantomLevels"
OTHER = f"Dataset{OTHER_ID}_SpinePhantomLevelsT1"
NUM_CASES = 5
#: VerSe numbering of the phantom's vertebra instances: 20..24 = L1..L5 (T11/T12 are background, as in Dataset504)
LUMBAR = {20 + i: i + 1 for i in range(5)}
FOLDS = ("0", "1")
SEG_CONFIG, CPU_CONFIG = "2d_diffusion", "2d_cpu"
COMMON = ["--val-iters-per-epoch", "1", "--steps", "2", "--val-samples", "1", "--device", "cpu"]
TRAIN = ["--epochs", "1", "--iters-per-epoch", "10", *COMMON]  # the commands' run, not the models' quality
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def level_labels(instances: sitk.Image) -> sitk.Image:
    """The phantom's vertebra instances as levels L1..L5 = 1..5 (other vertebrae background)."""
    array = sitk.GetArrayFromImage(instances)
    levels = np.zeros_like(array, dtype=np.uint8)
    for verse, level in LUMBAR.items():
        levels[array == verse] = level
    image = sitk.GetImageFromArray(levels)
    image.CopyInformation(instances)
    return image


def write_dataset(folder: Path, seed: int, num_cases: int, channel: str, name: str, levels: bool = True) -> list:
    """A raw nnU-Net dataset of phantom MR (one channel: ``t2`` or ``t1``) labelled with the lumbar levels
    (``levels``) or the phantom's vertebra/disc/spinal canal."""
    from spinediff.datasets.anatomy import SEMANTIC_LABELS
    from spinediff.datasets.phantom import generate_case

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    cases = []
    for index in range(num_cases):
        case = generate_case(seed, index, TINY_SETTINGS)
        sitk.WriteImage(getattr(case, channel), str(folder / "imagesTr" / f"{case.case_id}_0000.nii.gz"), True)
        label = level_labels(case.mr_instances) if levels else case.mr_labels
        sitk.WriteImage(label, str(folder / "labelsTr" / f"{case.case_id}.nii.gz"), True)
        cases.append(case)
    labels = {"background": 0, **{f"L{level}": level for level in range(1, 6)}} if levels else dict(SEMANTIC_LABELS)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2w" if channel == "t2" else "T1w"}, "labels": labels, "numTraining": num_cases,
        "file_ending": ".nii.gz", "name": name}))
    return cases


def plan_without_contrast_augmentation(dataset_id: int, preprocessed: Path, configurations: list[str]) -> None:
    """``spinediff plan``, then augmentation.contrast.enabled false in the plans (what the planner's note says to
    do to train without it)."""
    assert main(["plan", "-d", str(dataset_id), "-c", *configurations, "--device", "cpu", "-np", "1"]) == 0
    plans_file = next(preprocessed.glob(f"Dataset{dataset_id}_*")) / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    for name in configurations:
        block = plans["configurations"][name]["augmentation"]
        assert block["contrast"]["enabled"]  # planned for MR segmentation by default
        block["contrast"]["enabled"] = False
    plans_file.write_text(json.dumps(plans, indent=2))


@pytest.fixture(scope="module")
def levels(tmp_path_factory):
    """The level phantom (L1-L5, T2w) with contrast augmentation off in the plans: diffusion segmentation
    (2d_diffusion) and nnU-Net's trainer (2d_cpu) trained briefly on folds 0 and 1, find_best deciding their
    post-processing (the level numbering); and a T1w level phantom as the other dataset."""
    raw = tmp_path_factory.mktemp("levels_raw")
    base = tmp_path_factory.mktemp("levels_nnunet")
    write_dataset(raw / LEVELS, 3, NUM_CASES, "t2", "SpinePhantomLevels")
    write_dataset(raw / OTHER, 4, 2, "t1", "SpinePhantomLevelsT1")
    with nnunet_folders(raw, base) as env:
        plan_without_contrast_augmentation(LEVELS_ID, base / "preprocessed", [SEG_CONFIG, CPU_CONFIG])
        for fold in FOLDS:
            for trainer, configuration in (("DiffusionSegmentationTrainer", SEG_CONFIG), ("nnUNetTrainer", CPU_CONFIG)):
                assert main(["train", "-d", str(LEVELS_ID), "-c", configuration, "-f", fold, "-tr", trainer,
                             *TRAIN]) == 0
        assert main(["find_best", "-d", str(LEVELS_ID)]) == 0
        yield {**env, "raw": raw, "base": base}


# ---------------------------------------------------------------------- acceptance 3 of issue 34
def t2w_scans_and_a_t1w_scan(levels, inputs: Path) -> tuple[Path, list[str]]:
    """The module's T2w training scans and the phantom's T1w scan of an unseen subject (``t1w``) in ``inputs``;
    returns it and the T2w case names."""
    from spinediff.datasets.phantom import generate_case

    inputs.mkdir()
    normal = [f"phantom_{i:03d}" for i in range(NUM_CASES)]
    for case in normal:
        (inputs / f"{case}_0000.nii.gz").write_bytes(
            (levels["raw"] / LEVELS / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())
    sitk.WriteImage(generate_case(4, 0, TINY_SETTINGS).t1, str(inputs / "t1w_0000.nii.gz"), True)
    return inputs, normal


@pytest.mark.slow
def test_a_t1w_scan_is_flagged_by_a_t2w_model_without_contrast_augmentation(levels, tmp_path, capsys):
    """spinediff predict with the T2w-only model trained without contrast augmentation (review rule written by
    find_best) on its T2w scans and on the phantom's T1w scan of an unseen subject (CSF and discs dark, marrow
    bright: a non-monotone remapping of the tissues): the T1w scan lies furthest from the training intensities, is
    flagged in review.csv and named by the run; no T2w scan is flagged for its intensities. (This 10-step model
    also misses levels on the T2w scans, so level volumes flag those too; a trained model does not.)"""
    folder = levels["base"] / "results" / LEVELS / f"DiffusionSegmentationTrainer__nnUNetPlans__{SEG_CONFIG}"
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"][SEG_CONFIG]["augmentation"]["contrast"]["enabled"] is False
    log = next((folder / "fold_0").glob("training_log*.txt")).read_text()
    assert not [line for line in log.splitlines() if "Planned augmentation: " in line and "contrast" in line]
    assert "field_of_view" in log  # the rest of the planned augmentation still ran
    rule = json.loads((folder / "review.json").read_text())  # written by find_best's cross-validation
    assert rule["intensity"]["threshold"] >= 4.0
    inputs, normal = t2w_scans_and_a_t1w_scan(levels, tmp_path / "in")
    assert main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", str(LEVELS_ID), "-c", SEG_CONFIG,
                 "-tr", "DiffusionSegmentationTrainer", "-f", *FOLDS, "--samples", "2", "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    rows = {row["case"]: row for row in csv.DictReader((tmp_path / "out" / "review.csv").open())}
    assert set(rows) == {*normal, "t1w"}
    distance = {case: float(row["intensity_distance"]) for case, row in rows.items()}
    assert distance["t1w"] > max(distance[case] for case in normal), distance
    assert rows["t1w"]["review"] == "yes"
    for case in normal:
        assert distance[case] <= rule["intensity"]["threshold"]
        assert "intensities" not in rows[case]["reasons"]
    summary = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert "t1w" in summary["review_flagged"]
    assert "t1w" in printed.split("review:")[-1]  # the run's closing summary names it


def test_real_t1w_scans_lie_outside_the_t2w_training_intensities():
    """The review rule's intensity reference of Dataset501's 14 T2w scans (every case within the threshold,
    leave-one-out) puts each of Dataset504's 5 T1w scans beyond it."""
    from spinediff.inference.review import intensity_distance, intensity_reference, intensity_signature

    t2 = sorted(requires_shared_data("Dataset501_LumbarVB3dev", "imagesTr").glob("*_0000.nii.gz"))
    t1 = sorted(requires_shared_data("Dataset504_LumbarVB2T1dev", "imagesTr").glob("*_0000.nii.gz"))
    signatures = [[intensity_signature(sitk.GetArrayFromImage(sitk.ReadImage(str(f))))] for f in t2]
    reference = intensity_reference(signatures)
    assert reference["leave_one_out_max"] < reference["threshold"]
    for path in t1:
        signature = intensity_signature(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
        distance = intensity_distance(signature, reference["mean"][0], reference["spread"][0])
        assert distance > reference["threshold"], (path.name, distance, reference["threshold"])


# ---------------------------------------------------------------------- benchmarks/stress_position.py
def run_stress(levels, output: Path, *args: str) -> dict:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import stress_position
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert stress_position.main([*args, "-o", str(output), "--device", "cpu"]) == 0
    result = json.loads((output / "stress_position.json").read_text())
    table = (output / "stress_position.md").read_text()
    assert (output / "stress_position.png").read_bytes()[:4] == b"\x89PNG"  # the test drawn beside its table
    return result, table


@pytest.mark.slow
def test_nnunets_trainer_flags_the_t1w_scan_through_find_bests_commands(levels, tmp_path, capsys):
    """The other prediction path: the module's nnU-Net trainer (T2w only, no contrast augmentation) run as find_best
    prints it for nnU-Net's trainers, nnUNetv2_predict (the shell command) then `spinediff postprocess --images`:
    the T1w scan lies furthest from the training intensities, is flagged in review.csv and named by the run; no T2w
    scan is flagged for its intensities (as for diffusion above: the phantom's T1w is flagged by its level volumes,
    its intensities lying under the threshold of a two-case reference; Dataset504's real T1w scans lie beyond it,
    test_real_t1w_scans_lie_outside_the_t2w_training_intensities)."""
    import os
    import shlex
    import subprocess

    from spinediff.inference.candidates import Candidate
    from spinediff.inference.find_best import nnunet_commands

    folder = levels["base"] / "results" / LEVELS / f"nnUNetTrainer__nnUNetPlans__{CPU_CONFIG}"
    decision = json.loads((folder / "postprocessing.json").read_text())
    commands = nnunet_commands(str(LEVELS_ID), Candidate(folder, "nnUNetTrainer", "nnUNetPlans", CPU_CONFIG,
                                                         list(FOLDS)), decision)
    inputs, normal = t2w_scans_and_a_t1w_scan(levels, tmp_path / "in")
    fill = {"OUTPUT_FOLDER_PP": str(tmp_path / "pp"), "OUTPUT_FOLDER": str(tmp_path / "out"),
            "INPUT_FOLDER": str(inputs)}
    argv = []
    for command in commands:
        for key, value in fill.items():
            command = command.replace(key, value)
        argv.append(shlex.split(command))
    assert argv[0][0] == "nnUNetv2_predict" and argv[1][:2] == ["spinediff", "postprocess"]
    executable = Path(sys.executable).parent / "nnUNetv2_predict"
    subprocess.run([str(executable), *argv[0][1:], "-device", "cpu", "-npp", "1", "-nps", "1"], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert main(argv[1][1:]) == 0
    printed = capsys.readouterr().out
    rows = {row["case"]: row for row in csv.DictReader((tmp_path / "pp" / "review.csv").open())}
    assert set(rows) == {*normal, "t1w"}
    distance = {case: float(row["intensity_distance"]) for case, row in rows.items()}  # checked for every case
    assert distance["t1w"] > max(distance[case] for case in normal), distance
    assert rows["t1w"]["review"] == "yes"
    for case in normal:
        assert "intensities" not in rows[case]["reasons"]
    assert "t1w" in printed.split("review:")[-1] and "intensities not checked" not in printed


SOME_VARIANTS = ["plain", "crop_top_35", "crop_bottom_30", "pad_top_30", "shift_down_20"]  # crop_bottom_30: by amount


@pytest.mark.slow
@pytest.mark.parametrize("trainer,configuration,extra", [
    ("nnUNetTrainer", CPU_CONFIG, ["--variants", *SOME_VARIANTS, "--keep"]),  # nnU-Net's predictor + postprocess
    ("DiffusionSegmentationTrainer", SEG_CONFIG, ["--steps", "1", "--samples", "1"]),  # spinediff predict, all
])
def test_stress_position_runs_for_both_prediction_paths(levels, tmp_path, trainer, configuration, extra):
    result, table = run_stress(levels, tmp_path / "stress", "-d", str(LEVELS_ID), "-c", configuration, "-tr",
                               trainer, *extra, "--other-dataset", str(OTHER_ID))
    from stress_position import VARIANTS  # noqa: E402  (imported by run_stress)

    wanted = SOME_VARIANTS if "--variants" in extra else list(VARIANTS)
    assert result["folds"] == list(FOLDS) and result["labels"] == [1, 2, 3, 4, 5]
    assert list(result["variants"]) == wanted
    if "crop_bottom_30" in wanted:  # a variant named by its amount
        assert result["variants"]["crop_bottom_30"] == [0.0, 0.3, 0.0, 0.0]
    sources = {row["source"] for row in result["summary"]}
    assert sources == {LEVELS, OTHER}
    for source in sources:
        variants = [row["variant"] for row in result["summary"] if row["source"] == source]
        assert variants == wanted
    for row in result["summary"]:
        assert math.isfinite(row["mean_level_dice"]) and 0.0 <= row["mean_level_dice"] <= 1.0
        assert math.isfinite(row["mean_merged_dice"]) and 0.0 <= row["mean_merged_dice"] <= 1.0
        assert f"| {row['source']} | {row['variant']} |" in table
    cases = [row for row in result["cases"] if row["source"] == LEVELS]
    assert len(cases) == len(FOLDS) * len(wanted)  # one validation case per fold of the 5-case split
    assert len([row for row in result["cases"] if row["source"] == OTHER]) == 2 * len(wanted)
    for row in result["cases"]:  # every level scored (NaN: absent from both the cropped reference and the output)
        assert set(row["per_label"]) == {"1", "2", "3", "4", "5"}
        assert math.isfinite(row["merged_dice"]) and row["seconds_per_case"] > 0
    assert "Mean level Dice over the stressed variants" in table
    for row in result["cases"]:  # levels at least half in view: never below the score over every level by a sliver
        assert 0.0 <= row["level_dice_in_view"] <= 1.0 or math.isnan(row["level_dice_in_view"])
    assert "levels ≥ half in view" in table
    # the review flags as the user's prediction gives them (find_best wrote the model's review.json)
    assert all(isinstance(row["flagged"], bool) for row in result["cases"])
    assert "Review flags" in table
    stressed = [row for row in cases if row["variant"] != "plain"]
    split = result["review_split"]  # the dataset's own stressed scans, not flagged and flagged
    assert split["unflagged"] + split["flagged"] == len(stressed)
    assert split["flagged"] == sum(row["flagged"] for row in stressed)
    assert "What the review lets through" in table
    kept = tmp_path / "stress" / "stress_cases"
    assert kept.is_dir() == ("--keep" in extra)
    if kept.is_dir():  # the varied inputs, their cut references and the predictions, one of each per case
        for row in result["cases"]:
            stem = f"{row['case']}-{row['variant']}"
            where = f"{row['source']}_{'_'.join(row['folds'])}"
            assert (kept / f"in_{where}" / f"{stem}_0000.nii.gz").is_file()
            assert (kept / f"ref_{where}" / f"{stem}.nii.gz").is_file()
            assert (kept / f"out_{where}" / f"{stem}.nii.gz").is_file()


def test_variants_are_named_by_their_amounts_beside_the_fixed_ones(capsys):
    from spinediff.experiments.stress_variants import VARIANTS, variant_fractions

    assert variant_fractions("crop_top_20") == VARIANTS["crop_top_20"]
    assert variant_fractions("crop_top_10") == (0.1, 0.0, 0.0, 0.0)
    assert variant_fractions("crop_bottom_5") == (0.0, 0.05, 0.0, 0.0)
    assert variant_fractions("pad_top_150") == (0.0, 0.0, 1.5, 0.0)
    assert variant_fractions("shift_up_25") == (0.0, 0.25, 0.25, 0.0)
    assert variant_fractions("shift_down_20") == VARIANTS["shift_down_20"] == (0.2, 0.0, 0.0, 0.2)
    for bad in ("crop_top_0", "crop_top_95", "crop_down_10", "shift_top_10", "pad_bottom_250", "crop_top", "zoom_10"):
        with pytest.raises(SpineDiffError, match="crop_top_N"):
            variant_fractions(bad)
    sys.path.insert(0, str(BENCHMARKS))
    from stress_position import main as stress_main  # noqa: E402

    with pytest.raises(SystemExit) as exit_info:  # refused while parsing, before any model is opened
        stress_main(["-d", "999", "-c", "2d", "-tr", "nnUNetTrainer", "-o", "unused", "--variants", "crop_top_95"])
    assert exit_info.value.code == 2
    assert "Unknown stress variant 'crop_top_95'" in capsys.readouterr().err


def test_time_left_counts_what_the_running_folds_have_done_and_queues_the_rest():
    """The stress test's estimate of the time left (seconds per case-variant from the folds done)."""
    from spinediff.experiments.stress import time_left

    # two folds side by side, the smaller one done after 132 s (22 s each): the other has 8 x 22 - 132 s left
    assert time_left([8, 6], {0: 0.0, 1: 0.0}, {1: 132.0}, 132.0, 2) == pytest.approx(44.0)
    # one process: the second fold has just started
    assert time_left([8, 6], {0: 0.0, 1: 160.0}, {0: 160.0}, 160.0, 1) == pytest.approx(120.0)
    # three folds, two workers: the third queued behind whichever ends first
    assert time_left([4, 4, 4, 4], {0: 0.0, 1: 0.0, 2: 40.0}, {0: 40.0}, 40.0, 2) == pytest.approx(40.0)
    assert time_left([4, 4], {0: 0.0, 1: 0.0}, {0: 40.0, 1: 40.0}, 40.0, 2) == 0.0
    assert math.isnan(time_left([4, 4], {0: 0.0, 1: 0.0}, {}, 10.0, 2))


def test_stress_shares_split_the_folds_into_scans_side_by_side_unless_kept():
    """One share per fold in one process or with --keep (the kept layout in_/out_/ref_<dataset>_<folds>); a share
    per scan side by side, in the same order, each with folders of its own."""
    from spinediff.experiments.stress import stress_shares

    groups = [("D", Path("raw"), ["0"], ["a", "b"]), ("D", Path("raw"), ["1"], ["c"]),
              ("T1", Path("other"), ["0", "1"], ["x"])]
    whole = stress_shares(groups, 1, False)
    assert [(s[2], s[3], s[4]) for s in whole] == [(["0"], ["a", "b"], "D_0"), (["1"], ["c"], "D_1"),
                                                   (["0", "1"], ["x"], "T1_0_1")]
    assert stress_shares(groups, 2, True) == whole
    split = stress_shares(groups, 2, False)
    assert [case for share in split for case in share[3]] == ["a", "b", "c", "x"]
    assert [share[4] for share in split] == ["D_0_a", "D_0_b", "D_1_c", "T1_0_1_x"]
    assert [share[2] for share in split] == [["0"], ["0"], ["1"], ["0", "1"]]


def test_the_time_left_counts_a_shares_work_in_voxels(tmp_path):
    """A long scan's share weighs as much more as it has voxels (the T1w scans, 381 mm, against 224 mm T2w ones)."""
    from spinediff.experiments.stress import _StressContext, share_voxels

    (tmp_path / "imagesTr").mkdir()
    for case, size in (("short", (10, 20, 4)), ("long", (10, 60, 4))):
        sitk.WriteImage(sitk.Image(size, sitk.sitkFloat32), str(tmp_path / "imagesTr" / f"{case}_0000.nii.gz"))
    context = _StressContext(tmp_path, None, {"plain": (0, 0, 0, 0), "crop_top_20": (0.2, 0, 0, 0)}, None, ["0"],
                             ".nii.gz", tmp_path)
    assert share_voxels(context, ("D", tmp_path, ["0"], ["short"], "D_0_short")) == 2 * 800
    assert share_voxels(context, ("D", tmp_path, ["0"], ["short", "long"], "D_0")) == 2 * (800 + 2400)


def test_share_order_hands_the_largest_shares_out_first_when_side_by_side():
    """Longest first (ties in their order) with two workers or more and largest_first; as given otherwise."""
    from spinediff.experiments.stress import share_order

    assert share_order([1.0, 5.0, 3.0, 5.0], 2, True) == [1, 3, 2, 0]
    assert share_order([1.0, 5.0, 3.0, 5.0], 2, False) == [0, 1, 2, 3]
    assert share_order([1.0, 5.0, 3.0], 1, True) == [0, 1, 2]


def _timed_share(context, share):
    """A stand-in for a share's work in a worker process: when it started, then a pause."""
    import time

    started = time.time()
    time.sleep(0.5)
    return [{"case": share[3][0], "started": started}]


def test_shares_side_by_side_start_largest_first_and_come_back_in_their_order(tmp_path, capsys):
    """Three shares on two workers: the smallest, handed out last, starts only once a worker is free again; the rows
    come back in the shares' order all the same."""
    from spinediff.experiments.stress import StressSettings, _StressContext, run_stress_shares

    (tmp_path / "imagesTr").mkdir()
    for case, rows in (("small", 10), ("large", 60), ("middle", 30)):
        sitk.WriteImage(sitk.Image((10, rows, 4), sitk.sitkFloat32), str(tmp_path / "imagesTr" / f"{case}_0000.nii.gz"))
    context = _StressContext(tmp_path, StressSettings(workers=2), {"plain": (0, 0, 0, 0)}, None, ["0"], ".nii.gz",
                             tmp_path)
    shares = [("D", tmp_path, ["0"], [case], f"D_0_{case}") for case in ("small", "large", "middle")]
    rows = run_stress_shares(context, shares, _timed_share)
    assert [r[0]["case"] for r in rows] == ["small", "large", "middle"]
    started = {r[0]["case"]: r[0]["started"] for r in rows}
    # handed out third, the small share waits until a worker has done one of the others (0.5 s each); in its given
    # order it would have started first
    assert started["small"] >= min(started["large"], started["middle"]) + 0.45
    printed = capsys.readouterr().out
    assert "2 side by side, the largest first" in printed and printed.count("min left") == 3


def test_review_split_tells_what_the_review_lets_through():
    """The stressed scans not flagged and those flagged, counted and scored apart (NaN levels left out); none without
    review flags; the stress test's Markdown says it beside the plain mean."""
    from spinediff.experiments.stress import markdown, review_split

    rows = [{"level_dice": 0.9, "flagged": False}, {"level_dice": 0.8, "flagged": False},
            {"level_dice": float("nan"), "flagged": False}, {"level_dice": 0.0, "flagged": True},
            {"level_dice": 0.6, "flagged": True}]
    split = review_split(rows)
    assert (split["unflagged"], split["flagged"]) == (3, 2)
    assert split["unflagged_mean_level_dice"] == pytest.approx(0.85)
    assert split["flagged_mean_level_dice"] == pytest.approx(0.3)
    assert review_split([{"level_dice": 0.9, "flagged": None}]) is None
    assert math.isnan(review_split([{"level_dice": 0.9, "flagged": False}])["flagged_mean_level_dice"])
    cases = [{"source": "D", "variant": "crop_top_20", **row} for row in rows]
    cases.append({"source": "D", "variant": "plain", "level_dice": 0.9, "flagged": False})
    summary = [{"source": "D", "variant": "plain", "mean_level_dice": 0.9},
               {"source": "D", "variant": "crop_top_20", "mean_level_dice": 0.575}]
    text = markdown({"model": "m", "dataset": "D", "folds": ["0"], "labels": [1], "command": "c",
                     "summary": [{**row, "cases": 1, "mean_level_dice_in_view": None, "mean_merged_dice": 0.9,
                                  "cases_below_0.5": 0, "minus_plain": 0.0, "mean_numbering_confidence": None}
                                 for row in summary], "cases": cases})
    assert "the 3 stressed scans not flagged score a mean level Dice of 0.850 (-0.050 from plain)" in text
    assert "the 2 flagged 0.300" in text


def test_stress_workers_benchmark_tells_the_same_rows_from_different_ones():
    """benchmarks/stress_workers.py's check that one process and folds side by side scored alike, and its table."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import stress_workers
    finally:
        sys.path.remove(str(BENCHMARKS))
    row = {"case": "a", "variant": "plain", "folds": ["0"], "flagged": False, "level_dice": 0.8}
    one = {"cases": [row, {**row, "variant": "crop_top_20", "level_dice": float("nan")}]}
    assert stress_workers.same_rows(one, {"cases": [dict(r) for r in one["cases"]]})  # NaN matches NaN
    assert not stress_workers.same_rows(one, {"cases": [{**row, "level_dice": 0.7}, one["cases"][1]]})
    assert not stress_workers.same_rows(one, {"cases": [{**row, "flagged": True}, one["cases"][1]]})
    assert not stress_workers.same_rows(one, {"cases": one["cases"][:1]})
    table = stress_workers.markdown({"command": "c", "case_variants": 2, "folds": ["0"], "variants": ["plain"],
                                     "cores": 2, "load_average_start": 0.1, "workers": 2, "median_ratio": 1.9,
                                     "same_rows": True, "pairs": [{"one": 10.0, "side_by_side": 5.3, "ratio": 1.89}]})
    assert "| 1 | 10.0 | 5.3 | 1.89 |" in table and "**1.90**" in table and "in their order" not in table
    table = stress_workers.markdown({"command": "c", "case_variants": 2, "folds": ["0"], "variants": ["plain"],
                                     "cores": 2, "load_average_start": 0.1, "workers": 2, "median_ratio": 1.9,
                                     "median_order_ratio": 1.2, "same_rows": True,
                                     "pairs": [{"one": 10.0, "side_by_side": 5.3, "ratio": 1.89, "in_order": 6.4,
                                                "order_ratio": 1.21}]})
    assert "| 1 | 10.0 | 5.3 | 1.89 | 6.4 | 1.21 |" in table and "largest first: **1.20**" in table


@pytest.mark.slow
def test_stress_position_side_by_side_scores_as_one_process(levels, tmp_path, capsys):
    """-j 2: the scans predicted in two worker processes (a share each) give the same rows, in the same order, as one
    process (a share per fold), and each share's end is printed with the time left."""
    variants = ["plain", "crop_bottom_35"]
    common = ["-d", str(LEVELS_ID), "-c", CPU_CONFIG, "-tr", "nnUNetTrainer", "--variants", *variants]
    serial, _ = run_stress(levels, tmp_path / "one", *common)
    printed_serial = capsys.readouterr().out
    parallel, _ = run_stress(levels, tmp_path / "two", *common, "-j", "2")
    printed = capsys.readouterr().out
    assert len(parallel["cases"]) == len(serial["cases"]) == len(FOLDS) * len(variants)
    for one, two in zip(serial["cases"], parallel["cases"], strict=True):
        assert (one["case"], one["variant"], one["folds"]) == (two["case"], two["variant"], two["folds"])
        assert two["level_dice"] == pytest.approx(one["level_dice"], abs=1e-9, nan_ok=True)
        assert two["flagged"] == one["flagged"]
    assert parallel["stress_dice"] == pytest.approx(serial["stress_dice"], abs=1e-9)
    assert serial["seen_unseen"] is None  # the training scans only when asked for
    assert "2 side by side" in printed and "1 side by side" in printed_serial
    scans = len(parallel["cases"]) // len(variants)
    assert printed.count("min left") == scans and printed_serial.count("min left") == len(FOLDS)  # a line per share


@pytest.mark.slow
def test_stress_position_on_the_training_scans_too_tells_seen_from_unseen_subjects(levels, tmp_path):
    """--training-scans: each fold's training scans predicted by that fold, varied the same way, as a source of their
    own; the score find_best ranks on stays the validation scans' own, and the report puts seen beside unseen."""
    from spinediff.experiments.stress import stress_dice, training_source
    from spinediff.experiments.stress_report import READINGS, seen_unseen_reading

    variants = ["plain", "crop_bottom_35"]
    result, table = run_stress(levels, tmp_path / "seen", "-d", str(LEVELS_ID), "-c", CPU_CONFIG, "-tr",
                               "nnUNetTrainer", "-f", "0", "--variants", *variants, "--training-scans", "--keep")
    seen_source = training_source(LEVELS)
    assert {row["source"] for row in result["summary"]} == {LEVELS, seen_source}
    unseen = [row for row in result["cases"] if row["source"] == LEVELS]
    seen = [row for row in result["cases"] if row["source"] == seen_source]
    held_out = {row["case"] for row in unseen}
    assert len(held_out) == 1 and len(unseen) == len(variants)  # fold 0 of the 5-case split holds out one scan
    assert len({row["case"] for row in seen}) == NUM_CASES - 1 and len(seen) == (NUM_CASES - 1) * len(variants)
    assert not held_out & {row["case"] for row in seen} and all(row["folds"] == ["0"] for row in seen)
    own = [row for row in result["summary"] if row["source"] == LEVELS]
    assert result["stress_dice"] == pytest.approx(stress_dice(own, LEVELS))  # the training scans do not count
    split = result["seen_unseen"]
    for key, rows in (("seen", seen), ("unseen", unseen)):
        stressed = [row["level_dice"] for row in rows if row["variant"] != "plain"]
        assert split[key]["scans"] == len({row["case"] for row in rows})
        assert split[key]["stressed_answers"] == len(stressed)
        assert split[key]["failures"] == sum(1 for d in stressed if not d >= 0.5)
        assert split[key]["stressed"] == pytest.approx(float(np.nanmean(stressed)), nan_ok=True)
    assert "Scans the folds were trained on" in table and f"| {seen_source} | crop_bottom_35 |" in table
    assert READINGS[seen_unseen_reading(split)] in table and split["reading"] == seen_unseen_reading(split)
    kept = tmp_path / "seen" / "stress_cases"  # folder names without the source's spaces and brackets
    assert (kept / f"in_{LEVELS}_training_scans_0").is_dir() and (kept / f"in_{LEVELS}_0").is_dir()


# ---------------------------------------------------------------------- spinediff benchmark --stress and find_best
@pytest.mark.slow
def test_benchmark_stress_tests_every_method_and_find_best_ranks_on_it(levels, tmp_path):
    """`spinediff benchmark --stress` (the module's folds, reused): each model folder gets stress_position.json over
    the benchmark's folds, the table dice_stress (the mean over the variants, plain included) and its worst variant;
    find_best then ranks on dice_stress and says so, and on the plain cross-validation when a candidate has none."""
    out = tmp_path / "bench"
    assert main(["benchmark", "-d", str(LEVELS_ID), "-f", *FOLDS, "--methods", "nnUNetTrainer",
                 "DiffusionSegmentationTrainer", "--stress", *COMMON, "-o", str(out)]) == 0
    summary = json.loads((out / "benchmark.json").read_text())
    results = levels["base"] / "results" / LEVELS
    for row in summary["methods"]:
        record = json.loads((results / summary["model_folders"][row["method"]] / "stress_position.json").read_text())
        assert record["folds"] == list(FOLDS)
        own = [r["mean_level_dice"] for r in record["summary"] if r["source"] == LEVELS]
        assert len(own) == 8 and row["dice_stress"] == pytest.approx(float(np.mean(own)))
        assert row["dice_stress_worst"] == pytest.approx(min(r["mean_level_dice"] for r in record["summary"]
                                                             if r["variant"] != "plain"))
        assert record["environment"]["packages"]["nnunetv2"] == summary["environment"]["packages"]["nnunetv2"]
    assert "dice_stress" in (out / "benchmark.md").read_text()
    # the report draws each method's stress test
    assert main(["report", "-i", str(out), "-o", str(tmp_path / "report")]) == 0
    assert len(list((tmp_path / "report" / "figures").glob("stress_*.png"))) == 2
    assert "Stress test" in (tmp_path / "report" / "report.md").read_text()
    # the software of the run beside its numbers: a seeded training repeats only with the same packages
    assert summary["environment"]["packages"]["torch"] and "Software: Python" in (out / "benchmark.md").read_text()
    assert main(["find_best", "-d", str(LEVELS_ID), "--overwrite", "-o", str(tmp_path / "find_best.json")]) == 0
    best = json.loads((tmp_path / "find_best.json").read_text())
    assert best["ranked_on"] == "dice_stress"
    ranked = [entry["scores"]["dice_stress"] for entry in best["ranking"]]
    assert ranked == sorted(ranked, reverse=True) and len(ranked) == 2
    assert any("Ranked on the stress test" in note for note in best["notes"])
    # one candidate without a stress test: the plain cross-validation decides, and the note names it
    (results / summary["model_folders"][summary["methods"][0]["method"]] / "stress_position.json").unlink()
    assert main(["find_best", "-d", str(LEVELS_ID), "--overwrite", "-o", str(tmp_path / "find_best2.json")]) == 0
    plain = json.loads((tmp_path / "find_best2.json").read_text())
    assert plain["ranked_on"] == "dice_pp" and any("has no stress test" in note for note in plain["notes"])


@pytest.mark.slow
def test_benchmark_replaces_a_decision_made_on_fewer_folds_and_keeps_it_when_run_on_some(levels, tmp_path, capsys):
    """A benchmark over every trained fold replaces the model folder's postprocessing.json made on fewer folds (an
    earlier run on some of them), so that its stress test and `spinediff postprocess` use the decision of the whole
    cross-validation; a run on some of the folds keeps the decision it finds, and says so."""
    from spinediff.inference.postprocessing import POSTPROCESSING_FILE
    target = levels["base"] / "results" / LEVELS / "nnUNetTrainer__nnUNetPlans__2d_cpu" / POSTPROCESSING_FILE
    original = target.read_text()  # find_best's decision on folds 0 and 1 (the module's fixture)
    stale = {**json.loads(original), "cases": 1, "dice_after": 0.5}  # as if decided on one fold
    try:
        target.write_text(json.dumps(stale))
        one = tmp_path / "one"
        assert main(["benchmark", "-d", str(LEVELS_ID), "-f", "0", "--methods", "nnUNetTrainer", *COMMON,
                     "-o", str(one)]) == 0
        assert json.loads(target.read_text()) == stale
        assert "postprocessing.json was made on other folds or results and is kept" in capsys.readouterr().out
        both = tmp_path / "both"
        assert main(["benchmark", "-d", str(LEVELS_ID), "-f", *FOLDS, "--methods", "nnUNetTrainer", *COMMON,
                     "-o", str(both)]) == 0
        decided = json.loads(target.read_text())
        assert decided == json.loads(next(both.glob("postprocessing_*.json")).read_text())
        assert decided["cases"] == len(FOLDS)  # one validation case per fold of the 5-case split
        assert "is kept" not in capsys.readouterr().out
    finally:
        target.write_text(original)


def test_level_order_refuses_labels_that_keep_no_order(tmp_path):
    """The stress test's precondition (checked by `benchmark --stress` before any training): three labels whose
    places change from case to case keep no order along any direction; the same labels in one order do."""
    from spinediff.experiments.stress import level_order

    def write(case: str, rows: tuple[int, int, int]) -> None:
        array = np.zeros((24, 16, 16), np.uint8)
        for label, row in enumerate(rows, 1):
            array[row:row + 2, 6:9, 6:9] = label
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((3.0, 3.0, 3.0))
        sitk.WriteImage(image, str(tmp_path / "labelsTr" / f"{case}.nii.gz"))

    (tmp_path / "labelsTr").mkdir()
    write("c0", (2, 10, 18))
    write("c1", (18, 2, 10))
    write("c2", (10, 18, 2))
    with pytest.raises(SpineDiffError, match="keep no order"):
        level_order(tmp_path, [1, 2, 3])
    for case in ("c1", "c2"):
        write(case, (2, 10, 18))
    assert list(level_order(tmp_path, [1, 2, 3]).labels) == [1, 2, 3]


# ---------------------------------------------------------------------- nnU-Net + level context (issue 34, point 2)
@pytest.mark.slow
def test_level_context_trainer_trains_predicts_and_is_stress_tested_with_the_datasets_own_labels(levels, tmp_path):
    """nnUNetTrainerLevelContext through `spinediff train` and the stress test (nnU-Net's predictor finds the class by
    name): its auxiliary classes never leave the network, so the validation exports and the model folder's
    dataset.json hold the dataset's labels only, and the stress test scores all five levels."""
    for fold in FOLDS:
        assert main(["train", "-d", str(LEVELS_ID), "-c", CPU_CONFIG, "-f", fold, "-tr", "nnUNetTrainerLevelContext",
                     *TRAIN]) == 0
    folder = levels["base"] / "results" / LEVELS / f"nnUNetTrainerLevelContext__nnUNetPlans__{CPU_CONFIG}"
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {
        "background": 0, **{f"L{level}": level for level in range(1, 6)}}
    for fold in FOLDS:
        exports = sorted((folder / f"fold_{fold}" / "validation").glob("*.nii.gz"))
        assert exports
        for export in exports:
            assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(export))))) <= {0, 1, 2, 3, 4, 5}
    result, _ = run_stress(levels, tmp_path / "stress", "-d", str(LEVELS_ID), "-c", CPU_CONFIG, "-tr",
                           "nnUNetTrainerLevelContext", "--variants", "plain", "crop_top_35")
    assert [row["variant"] for row in result["summary"]] == ["plain", "crop_top_35"]
    for row in result["cases"]:
        assert set(row["per_label"]) == {"1", "2", "3", "4", "5"}
