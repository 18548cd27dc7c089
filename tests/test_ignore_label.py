"""nnU-Net's ignore label (unannotated voxels) through planning, augmentation and every score, and the mixed-contrast
dataset of issue 34 that needs it (studies/mixed_contrast505.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from spinediff.datasets.dataset_json import annotated, foreground_labels, ignore_label
from spinediff.metrics.segmentation_metrics import case_dice

LABELS = {"background": 0, "L1": 1, "L2": 2, "L3": 3, "ignore": 4}


def column(rows: int = 120) -> np.ndarray:
    """(4, rows, 10): L1 rows 10-29, L2 rows 40-59, the rest of the column below unannotated (ignore, rows 70-)."""
    labels = np.zeros((4, rows, 10), np.uint8)
    labels[:, 10:30], labels[:, 40:60], labels[:, 70:] = 1, 2, 4
    return labels


def test_the_dataset_json_names_the_ignore_label_and_keeps_it_out_of_the_foreground():
    assert ignore_label({"labels": LABELS}) == 4
    assert foreground_labels({"labels": LABELS}) == [1, 2, 3]
    assert ignore_label({"labels": {"background": 0, "a": 1}}) is None
    assert foreground_labels({"labels": {"background": 0, "a": 1, "b": 2}}) == [1, 2]
    labels = column()
    assert annotated(labels, {"labels": LABELS}).sum() == (labels == 1).sum() + (labels == 2).sum()


def test_the_dice_leaves_the_ignored_voxels_out():
    reference = column()
    prediction = reference.copy()
    prediction[:, 70:90] = 3  # a level where nothing is annotated
    prediction[:, 95:] = 1  # and more of L1
    plain = case_dice(prediction, reference, [1, 2, 3])
    assert plain["3"] == 0.0 and plain["1"] < 0.7
    ignored = case_dice(prediction, reference, [1, 2, 3], ignore=4)
    assert ignored == {"1": 1.0, "2": 1.0, "3": pytest.approx(float("nan"), nan_ok=True)}
    wrong = prediction.copy()
    wrong[:, 10:30] = 2  # an annotated voxel still counts
    assert case_dice(wrong, reference, [1, 2, 3], ignore=4)["1"] == 0.0


def test_the_merged_and_stress_scores_leave_the_ignored_voxels_out(tmp_path):
    from spinediff.experiments.benchmark import merged_foreground_dice
    from spinediff.experiments.stress import level_scores

    reference = column()
    prediction = np.where(reference == 4, 3, reference).astype(np.uint8)  # a level where nothing is annotated
    background = np.where(reference == 4, 0, reference).astype(np.uint8)  # or nothing there
    for name, array in (("ref", reference), ("pred", background)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"{name}.nii.gz"))
    assert merged_foreground_dice(tmp_path / "ref.nii.gz", tmp_path / "pred.nii.gz", 4) == 1.0
    assert merged_foreground_dice(tmp_path / "ref.nii.gz", tmp_path / "pred.nii.gz") < 0.7
    scores = level_scores(prediction, reference, [1, 2, 3], ignore=4)
    assert scores["level_dice"] == 1.0 and scores["merged_dice"] == 1.0
    assert level_scores(prediction, reference, [1, 2, 3])["level_dice"] < 1.0


def test_spinediff_evaluate_reads_the_ignore_label_beside_the_references(tmp_path, capsys):
    from spinediff.cli import main

    raw, predictions = tmp_path / "Dataset777_X", tmp_path / "pred"
    (raw / "labelsTr").mkdir(parents=True)
    predictions.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"labels": LABELS, "channel_names": {"0": "MRI"},
                                                  "numTraining": 1, "file_ending": ".nii.gz"}))
    reference = column()
    sitk.WriteImage(sitk.GetImageFromArray(reference), str(raw / "labelsTr" / "c1.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.where(reference == 4, 1, reference).astype(np.uint8)),
                    str(predictions / "c1.nii.gz"))
    assert main(["evaluate", "-ref", str(raw / "labelsTr"), "-pred", str(predictions)]) == 0
    summary = json.loads((predictions / "summary.json").read_text())
    assert sorted(summary["per_label"]) == ["1", "2"]  # no row for the ignore label
    assert summary["per_label"]["1"]["dice"]["mean"] == 1.0
    assert main(["evaluate", "-ref", str(raw / "labelsTr"), "-pred", str(predictions), "--ignore-label", "9"]) == 0
    summary = json.loads((predictions / "summary.json").read_text())
    assert summary["per_label"]["1"]["dice"]["mean"] < 0.5  # told another value: label 4 is scored as a class


def test_the_planner_measures_levels_and_extent_without_the_ignore_label(tmp_path):
    from spinediff.planning.budget import case_extents_mm
    from spinediff.planning.label_order import field_of_view_block, label_geometry

    raw = tmp_path / "Dataset778_Y"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    dataset_json = {"labels": {"background": 0, "L1": 1, "L2": 2, "L3": 3, "L4": 4, "ignore": 5},
                    "channel_names": {"0": "MRI"}, "numTraining": 2, "file_ending": ".nii.gz"}
    full = np.zeros((4, 200, 10), np.uint8)
    for level in range(1, 5):
        full[:, 40 * level - 30:40 * level - 10] = level  # centres 20, 60, 100, 140 mm: 40 mm apart
    sparse = np.where(np.isin(full, (1, 2, 4)), full, 0).astype(np.uint8)
    sparse[:, 90:120] = 5  # L3 not annotated
    sparse[:, 160:] = 5  # nor what lies below L4
    for case, labels in (("a", full), ("b", sparse)):
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(raw / "labelsTr" / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(labels.astype(np.float32)),
                        str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
    extents = case_extents_mm(raw, dataset_json, use_labels=True)
    assert [e[1] for e in extents] == [140.0, 140.0]  # rows 10-149: the ignored rows below are no foreground
    geometry = label_geometry(raw, dataset_json)
    assert sorted(geometry[1]["centroids"]) == [1, 2, 4]
    block = field_of_view_block(geometry, [1], [0, 1, 2], [96, 8], [2.5, 1.0])
    assert block["level_pitch_mm"] == 40.0  # L1 to L4 over three pitches, not two


def test_a_cut_of_the_field_of_view_stays_inside_the_annotated_levels():
    from spinediff.training.augmentation import FieldOfViewCutTransform

    seg = torch.from_numpy(column(rows=120)[:1, :, :].astype(np.int16))  # (1, 120, 10): one channel, 2D patch
    image = torch.ones((1, 120, 10))
    planes = {}
    for ignore in (None, 4):
        transform = FieldOfViewCutTransform(axis=0, max_fraction=0.6, p_top=0.0, ignore=ignore)
        found = []
        for seed in range(30):
            np.random.seed(seed)
            found.append(transform.get_parameters(image=image, segmentation=seg)["region"][0])
        planes[ignore] = found
    assert max(planes[4]) <= 60  # the bottom cut lies within the annotated rows 10-59
    assert max(planes[None]) > 60  # the unannotated rows would count as levels otherwise


def test_the_mixed_dataset_marks_the_levels_its_masks_lack_and_puts_one_t1w_scan_in_each_fold():
    from studies.mixed_contrast505 import IGNORE, folds, with_ignored_levels

    centres = (80, 120, 160, 200, 240)  # L1..L5, mm along y (1 mm rows)
    source = np.zeros((4, 280, 10), np.uint8)
    for value, centre in ((3, 12), (5, 40), (1, 120), (4, 160), (2, 240)):  # T11, T12, L2, L3, L5 as in Dataset504
        source[:, centre - 12:centre + 12] = value
    reference = with_ignored_levels(source, sitk.GetImageFromArray(source), centres)
    assert sorted(np.unique(reference)) == [0, 2, 3, 5, IGNORE]
    assert (reference[:, 70:90] == IGNORE).all()  # L1's body (dropped at source) is left out of the loss
    assert (reference[:, 190:210] == IGNORE).all()  # and L4's
    assert (reference[:, 0:24] == 0).all() and (reference[:, 30:50] == 0).all()  # T11, T12: background
    assert (reference[:, 110:130] == 2).all()  # the labelled bodies keep their level
    assert not (reference[:, 260:] == IGNORE).any()  # below L5 nothing is missing
    t2w, t1w = [f"t2_{i:02d}" for i in range(14)], [f"t1_{i}" for i in range(5)]
    splits = folds(t2w, t1w)
    assert [sum(c.startswith("t1") for c in s["val"]) for s in splits] == [1] * 5
    assert sorted(c for s in splits for c in s["val"]) == sorted(t2w + t1w)
    assert all(not set(s["val"]) & set(s["train"]) for s in splits)


def test_the_benchmark_trains_only_nnunets_trainer_on_an_ignore_label(capsys):
    from spinediff.errors import SpineDiffError
    from spinediff.experiments.benchmark import methods_for, methods_for_ignore_label
    from spinediff.tasks import task_spec

    offered = methods_for(task_spec({"labels": LABELS}).task, ["2d_diffusion", "2d_cpu"])
    trainers = {m.trainer for m in offered}
    assert "nnUNetTrainer" in trainers and len(trainers) > 1  # diffusion is offered beside it
    kept = methods_for_ignore_label(offered, named=False, dataset="Dataset777_X")
    assert [m.trainer for m in kept] == ["nnUNetTrainer"]
    assert "left out" in capsys.readouterr().out
    with pytest.raises(SpineDiffError, match="ignore label.*--methods nnUNetTrainer"):
        methods_for_ignore_label(offered, named=True, dataset="Dataset777_X")
    nnunet = [m for m in offered if m.trainer == "nnUNetTrainer"]
    assert methods_for_ignore_label(nnunet, named=True, dataset="Dataset777_X") == nnunet
