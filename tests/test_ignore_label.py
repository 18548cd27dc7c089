"""nnU-Net's ignore label (unannotated voxels) through planning, augmentation and every score, and the mixed-contrast
dataset of issue 34 that needs it (studies/mixed_contrast505.py)."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_the_benchmark_trains_every_segmentation_method_on_an_ignore_label_and_refuses_other_tasks():
    from spinediff.datasets.dataset_json import check_ignore_label
    from spinediff.errors import SpineDiffError
    from spinediff.tasks import task_spec

    check_ignore_label(task_spec({"labels": LABELS}).task, "Dataset777_X")  # segmentation: every method trains
    translation = task_spec({"labels": LABELS, "channel_names": {"0": "MR", "1": "CT"},
                             "spinediff": {"task": "translation", "source_channels": [0], "target_channels": [1]}})
    with pytest.raises(SpineDiffError, match="Dataset777_X has nnU-Net's ignore label.*translation.*Remove"):
        check_ignore_label(translation.task, "Dataset777_X")


def segmentation_adapter(num_classes: int = 4, ignore: int | None = 4):
    from spinediff.tasks import Segmentation
    from spinediff.training.task_adapter import TaskAdapter

    return TaskAdapter(Segmentation(), (0,), (), num_classes, None, ignore)


def test_a_segmentation_target_is_unknown_on_the_ignore_label_and_its_loss_mask_leaves_it_out():
    labels = torch.as_tensor(column()[None, :1].astype(np.int64))  # (1, 1, 120, 10)
    labels[0, 0, 0, 0] = -1  # nnU-Net's "outside the crop": background, known
    adapter = segmentation_adapter()
    target = adapter.target(torch.zeros(1, 1, 120, 10), labels)
    mask = adapter.loss_mask(labels)
    assert target.shape == (1, 4, 120, 10) and mask.shape == (1, 1, 120, 10) and mask.dtype == torch.bool
    assert torch.allclose(target[0, :, 80, 5], torch.full((4,), 2 / 4 - 1))  # unknown: every class at 1/4
    assert target[0, 2, 50, 5] == 1 and target[0, 0, 50, 5] == -1  # L2 stays one-hot
    assert target[0, 0, 0, 0] == 1  # -1 → background
    assert not mask[0, 0, 70:].any() and mask[0, 0, :70].all()
    assert segmentation_adapter(ignore=None).loss_mask(labels) is None  # no ignore label: no mask


@pytest.mark.parametrize("loss,prediction_type", [("dice_ce", "sample"), ("l1", "epsilon"), ("mse", "v_prediction")])
def test_every_diffusion_loss_leaves_the_unannotated_voxels_out(loss, prediction_type):
    """With a mask that is True everywhere the loss is the unmasked one (monai's DiceCELoss for dice_ce); what the
    network says on masked voxels changes nothing; what it says on the others does."""
    from spinediff.diffusion.process import DiffusionProcess

    process = DiffusionProcess(1000, "cosine", prediction_type, loss)
    labels = torch.as_tensor(column(40)[None, :1].astype(np.int64)).repeat(2, 1, 1, 1)  # (2, 1, 40, 10)
    labels[:, :, 30:] = 4
    adapter = segmentation_adapter()
    target, mask = adapter.target(torch.zeros(2, 1, 40, 10), labels), adapter.loss_mask(labels)
    generator = torch.Generator().manual_seed(0)
    masked = process.prepare_training_batch(torch.randn(2, 1, 40, 10), target, generator, mask)
    full = type(masked)(**{**masked.__dict__, "mask": torch.ones_like(mask)})
    plain = type(masked)(**{**masked.__dict__, "mask": None})
    output = torch.randn(2, 4, 40, 10, generator=torch.Generator().manual_seed(1))
    assert torch.isclose(process.loss(output, full), process.loss(output, plain), atol=1e-6)
    changed_unknown, changed_known = output.clone(), output.clone()
    changed_unknown[:, 1, 30:] += 3.0  # one channel: a shift of every logit would change no probability
    changed_known[:, 1, :10] += 3.0
    assert torch.isclose(process.loss(changed_unknown, masked), process.loss(output, masked), atol=1e-6)
    assert not torch.isclose(process.loss(changed_known, masked), process.loss(output, masked), atol=1e-3)
    assert not torch.isclose(process.loss(changed_unknown, plain), process.loss(output, plain), atol=1e-3)
    if loss == "dice_ce":  # deep supervision: every resolution masked alike
        coarse = [output, torch.nn.functional.avg_pool2d(output, 2)]
        coarse_changed = [changed_unknown, torch.nn.functional.avg_pool2d(changed_unknown, 2)]
        assert torch.isclose(process.deep_supervision_loss(coarse, full), process.deep_supervision_loss(coarse, plain),
                             atol=1e-6)
        assert torch.isclose(process.deep_supervision_loss(coarse_changed, masked),
                             process.deep_supervision_loss(coarse, masked), atol=1e-6)


def test_the_epoch_validation_counts_leave_the_unannotated_voxels_out():
    from spinediff.training.validation import batch_segmentation_counts

    labels = torch.as_tensor(column(40)[None, :1].astype(np.int64))
    labels[:, :, 30:] = 4
    adapter = segmentation_adapter()
    target, mask = adapter.target(torch.zeros(1, 1, 40, 10), labels), adapter.loss_mask(labels)
    estimate = adapter.target(torch.zeros(1, 1, 40, 10), torch.where(labels == 4, 3, labels))  # L3 on the unknown rows
    with_mask = batch_segmentation_counts(estimate, target, mask)
    assert with_mask["fp_hard"].sum() == 0 and with_mask["fn_hard"].sum() == 0
    assert batch_segmentation_counts(estimate, target)["fp_hard"][2] > 0  # counted, without the mask


def phantom_with_ignore(source: Path, raw: Path, unannotated) -> int:
    """``raw``: the phantom dataset ``source`` (images linked) with an ignore label added to its dataset.json (one
    above its labels, returned) and written into the label maps where ``unannotated(index, array, ignore)`` puts it
    (it edits the array of the index-th case in place)."""
    (raw / "labelsTr").mkdir(parents=True)
    (raw / "imagesTr").symlink_to(source / "imagesTr", target_is_directory=True)
    dataset_json = json.loads((source / "dataset.json").read_text())
    ignore = max(dataset_json["labels"].values()) + 1
    dataset_json["labels"]["ignore"] = ignore
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    for index, label_file in enumerate(sorted(source.glob("labelsTr/*.nii.gz"))):
        image = sitk.ReadImage(str(label_file))
        array = sitk.GetArrayFromImage(image)
        unannotated(index, array, ignore)
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(raw / "labelsTr" / label_file.name))
    return ignore


def test_diffusion_segmentation_trains_and_validates_on_a_dataset_with_an_ignore_label(phantom_root, tmp_path_factory):
    """The phantom's segmentation with its top level unannotated (ignore) in one case: spinediff's diffusion trainer
    trains (the batches of that case masked there), validates and scores without the ignored voxels."""
    from conftest import nnunet_folders

    from spinediff.planning.api import plan_dataset
    from spinediff.training.api import TrainingOptions, build_trainer, ensure_splits, train

    base = tmp_path_factory.mktemp("ignore_seg")
    raw = base / "raw" / "Dataset931_SpinePhantomSegIgnore"

    def top_level_of_the_first_case(index, array, ignore):
        if index == 0:
            array[array == ignore - 1] = ignore

    top = phantom_with_ignore(phantom_root / "Dataset901_SpinePhantomSeg", raw, top_level_of_the_first_case) - 1
    with nnunet_folders(base / "raw", base):
        plan_dataset(931, configurations=["2d_diffusion"], device="cpu", num_processes=1, show_progress_bar=False)
        ensure_splits(base / "preprocessed" / raw.name)
        trainer = build_trainer(931, "2d_diffusion", 0, "DiffusionSegmentationTrainer",
                                results_folder=str(base / "probe"))
        assert trainer.task.ignore_label == top + 1 and trainer.label_manager.num_segmentation_heads == top + 1
        batch = {"data": torch.zeros(1, 1, 8, 8), "target": torch.full((1, 1, 8, 8), top + 1)}
        assert not trainer.loss_mask(batch).any()
        options = TrainingOptions(epochs=2, iterations_per_epoch=2, val_iterations_per_epoch=1, num_inference_steps=2,
                                  validation_samples=1)
        folder = train(931, "2d_diffusion", 0, "DiffusionSegmentationTrainer", options,
                       results_folder=str(base / "results"))
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    assert np.isfinite(summary["foreground_mean"]["Dice"])
    assert str(top + 1) not in {str(k) for k in summary["mean"]}  # no score for the ignore label


def test_a_generation_dataset_with_an_ignore_label_is_refused_before_training(phantom_root, tmp_path_factory, capsys):
    """The labels are a generation model's condition: an unannotated voxel means nothing there. `spinediff train`
    exits 2 with a message that names the ignore label and the fix, and writes no fold."""
    from conftest import nnunet_folders

    from spinediff.cli import main
    from spinediff.planning.api import plan_dataset

    base = tmp_path_factory.mktemp("ignore_gen")

    def first_slice(index, array, ignore):
        array[:1] = ignore

    raw = base / "raw" / "Dataset933_SpinePhantomGenIgnore"
    phantom_with_ignore(phantom_root / "Dataset903_SpinePhantomGeneration", raw, first_slice)
    with nnunet_folders(base / "raw", base) as env:
        plan_dataset(933, configurations=["2d_diffusion"], device="cpu", num_processes=1, show_progress_bar=False)
        capsys.readouterr()
        status = main(["train", "-d", "933", "-c", "2d_diffusion", "-f", "0", "-tr", "SegGuidedGenerationTrainer",
                       "--device", "cpu"])
        captured = capsys.readouterr()
        results = Path(env["nnUNet_results"])
    assert status == 2 and "Traceback" not in captured.err
    assert "ignore label" in captured.err and "generation" in captured.err and "Remove" in captured.err
    assert not list(results.rglob("fold_0"))
