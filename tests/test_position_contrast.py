"""Issue 34: contrast and field-of-view augmentation, level numbering confidence, review of out-of-distribution scans
(numpy/torch only: fast)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from spinediff.inference.level_order import LevelOrder, renumber_with_report
from spinediff.inference.review import ReviewRule, intensity_reference, intensity_signature
from spinediff.training.augmentation import (
    BiasFieldTransform,
    FieldOfViewCutTransform,
    RandomRemapTransform,
    SpineShiftZoomTransform,
    elastic_probability,
    insert_planned_transforms,
)


def patch() -> tuple[torch.Tensor, torch.Tensor]:
    """A 2D patch (C, H, W): five 'vertebrae' stacked along axis 0, brighter than the background."""
    seg = torch.zeros(1, 80, 40, dtype=torch.int16)
    for i in range(5):
        seg[0, 10 + i * 12:10 + i * 12 + 9, 10:30] = i + 1
    image = torch.randn(1, 80, 40) * 0.1 + (seg > 0).float() * 2.0 - 1.0
    image[0, :, :5] = 4.0  # a bright structure (fat) beside them
    return image, seg


def test_remap_is_non_monotone_and_keeps_the_normalised_scale():
    np.random.seed(3)
    image, seg = patch()
    out = RandomRemapTransform((5, 5))(image=image.clone(), segmentation=seg.clone())
    assert torch.equal(out["segmentation"], seg)  # an intensity transform never touches the labels
    assert out["image"].mean().item() == pytest.approx(image.mean().item(), abs=1e-4)
    assert out["image"].std().item() == pytest.approx(image.std().item(), rel=1e-3)
    # three tissues ordered background < vertebra < fat before; some pair changes its order after some draw
    orders = set()
    for seed in range(10):
        np.random.seed(seed)
        x = RandomRemapTransform((5, 7))(image=image.clone())["image"][0]
        means = (x[:, 5:][seg[0, :, 5:] == 0].mean().item(), x[seg[0] > 0].mean().item(), x[:, :5].mean().item())
        orders.add(tuple(np.argsort(means)))
    assert len(orders) > 1  # not monotone: the tissues' order changes between draws


def test_inversion_and_bias_field_change_the_image_not_the_labels():
    from batchgeneratorsv2.transforms.intensity.inversion import InvertImageTransform

    image, seg = patch()
    inverted = InvertImageTransform(p_invert_image=1.0)(image=image.clone(), segmentation=seg.clone())
    assert torch.equal(inverted["segmentation"], seg)
    assert inverted["image"][seg > 0].mean() < inverted["image"][seg == 0].mean()  # bright vertebrae became dark
    np.random.seed(0)
    biased = BiasFieldTransform(3, (0.4, 0.6))(image=image.clone(), segmentation=seg.clone())
    assert torch.equal(biased["segmentation"], seg)
    ratio = (biased["image"] - biased["image"].min() + 1) / (image - image.min() + 1)
    assert ratio.std() > 0.01  # a smooth field that varies across the patch


@pytest.mark.parametrize("synchronize", [True, False])
def test_contrast_channels_move_together_only_when_synchronised(synchronize):
    """``synchronize_channels`` in the contrast block: channels that are views of one image (lateral context) get
    one remapping, gamma (with its inversion) and bias field; channels of different contrasts get a draw each."""
    from spinediff.training.augmentation import contrast_transforms

    block = {"p_inversion": 0, "p_remap": 1, "p_gamma": 1, "p_bias_field": 1, "synchronize_channels": synchronize}
    transforms = contrast_transforms(block)
    assert len(transforms) == 3
    base, _ = patch()
    for transform in transforms:
        differs = []
        for seed in range(6):
            np.random.seed(seed)
            torch.manual_seed(seed)
            out = transform(image=base.repeat(3, 1, 1).clone())["image"]
            assert not torch.equal(out[0], base[0])  # each transform changes the image
            differs.append(max(float((out[0] - out[c]).abs().max()) for c in (1, 2)) > 1e-5)
        name = type(transform.transform).__name__
        assert (not any(differs)) if synchronize else any(differs), name


def test_shift_moves_labels_with_the_image_and_cut_keeps_the_visible_labels():
    image, seg = patch()
    marker = (seg > 0).float()  # an image that is the foreground itself: labels must follow it exactly
    np.random.seed(1)
    transform = SpineShiftZoomTransform(axis=0, max_shift=0.3)
    out = transform(image=marker.clone(), segmentation=seg.clone())
    moved = out["segmentation"][0]
    assert not torch.equal(moved, seg[0])
    assert torch.equal(out["image"][0] > 0.5, moved > 0)
    rows = torch.nonzero(moved[:, 20] == 3).flatten()
    assert len(rows) == 9  # a level keeps its label and its size
    np.random.seed(2)
    zoomed = SpineShiftZoomTransform(axis=0, max_shift=0.0, zoom=(0.6, 0.6))(image=marker.clone(),
                                                                             segmentation=seg.clone())
    assert (zoomed["segmentation"] > 0).sum() < 0.5 * (seg > 0).sum()  # zoomed out: smaller vertebrae
    image_fg, label_fg = zoomed["image"][0] > 0.5, zoomed["segmentation"][0] > 0
    assert (image_fg & label_fg).sum() >= 0.9 * (image_fg | label_fg).sum()  # the labels still cover the image's
    assert set(torch.unique(zoomed["segmentation"]).tolist()) == {0, 1, 2, 3, 4, 5}
    for seed in range(20):
        np.random.seed(seed)
        cut = FieldOfViewCutTransform(axis=0, max_fraction=0.6)(image=image.clone(), segmentation=seg.clone())
        visible = cut["segmentation"][0] > 0
        assert torch.equal(cut["segmentation"][0][visible], seg[0][visible])  # true labels where still visible
        removed = (seg[0] > 0) & ~visible
        assert torch.all(cut["image"][0][removed] == 0)
        lost_rows = torch.nonzero(removed.any(1)).flatten()
        if len(lost_rows):  # one contiguous end of the patch
            assert lost_rows.min() == 10 or lost_rows.max() == 66  # the first or last labelled row


def test_cut_side_follows_its_planned_probability():
    image, seg = patch()
    sides = {}
    for p_top in (1.0, 0.0, 0.8):
        np.random.seed(5)
        tops = cuts = 0
        for _ in range(200):
            out = FieldOfViewCutTransform(axis=0, max_fraction=0.6, p_top=p_top)(image=image.clone(),
                                                                                 segmentation=seg.clone())
            lost = torch.nonzero(((seg[0] > 0) & (out["segmentation"][0] == 0)).any(1)).flatten()
            if len(lost):  # a plane at the very edge of the labelled extent removes no label
                cuts += 1
                tops += int(lost.min() == 10)  # the first labelled row is gone: a cut from the top
        assert cuts > 150
        sides[p_top] = tops / cuts
    assert sides[1.0] == 1.0 and sides[0.0] == 0.0
    assert 0.7 < sides[0.8] < 0.9


def test_cuts_near_the_ends_fall_around_the_first_or_last_level():
    # the patch's labelled extent: rows 10-66, a level every 12 rows (80-row patch: a pitch is 0.15 of it)
    from spinediff.training.augmentation import _end_range, field_of_view_transforms

    block = {"axis": 0, "p_cut": 1.0, "max_cut_fraction": 0.6, "level_pitch_mm": 30.0, "patch_extent_mm": 200.0,
             "cut_near_ends": [0.5, 1.5]}
    assert _end_range(block) == pytest.approx((0.075, 0.225))
    assert _end_range({**block, "cut_near_ends": None}) is None  # the plans' default: anywhere in the extent
    image, seg = patch()
    planes = {True: [], False: []}
    for seed in range(300):
        np.random.seed(seed)
        transform = FieldOfViewCutTransform(axis=0, max_fraction=0.6, end_range=_end_range(block))
        region = transform.get_parameters(image=image, segmentation=seg)["region"]
        top = region[0] == 0
        planes[top].append(region[1] if top else region[0])
    assert min(planes[True]) >= 10 - 6 and max(planes[True]) <= 10 + 18  # 0.5 pitch above L1 to 1.5 inside
    assert min(planes[False]) >= 67 - 18 and max(planes[False]) <= 67 + 6
    assert max(planes[True]) > 20 and min(planes[True]) < 10  # both sides of the end are reached
    assert min(planes[False]) < 57 and max(planes[False]) > 67
    assert len(field_of_view_transforms(block)) == 1  # the plans key reaches the transform


def test_planned_transforms_join_nnunets_pipeline_in_order():
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from spinediff.planning.label_order import CONTRAST_DEFAULTS

    pipeline = nnUNetTrainer.get_training_transforms([80, 40], (-0.2, 0.2), None, (1,), False)
    block = {"contrast": dict(CONTRAST_DEFAULTS),
             "field_of_view": {"axis": 0, "p_shift": 0.5, "max_shift_fraction": 0.2, "zoom_range": [0.8, 1.0],
                               "p_cut": 0.3, "max_cut_fraction": 0.5}}
    composed = insert_planned_transforms(pipeline, block).transforms
    names = [type(getattr(t, "transform", t)).__name__ for t in composed]
    assert names.index("SpineShiftZoomTransform") == names.index("SpatialTransform") + 1
    assert names.index("FieldOfViewCutTransform") == names.index("SpineShiftZoomTransform") + 1
    mirror = next(i for i, t in enumerate(composed) if isinstance(t, MirrorTransform))
    for name in ("InvertImageTransform", "RandomRemapTransform", "BiasFieldTransform"):
        assert names.index("SimulateLowResolutionTransform") < names.index(name) < mirror
    assert insert_planned_transforms(pipeline, {"contrast": {"enabled": False}}) is pipeline
    image, seg = patch()
    out = ComposeCall(composed)(image, seg)
    assert out["image"].shape == (1, 80, 40) and set(torch.unique(out["segmentation"]).tolist()) <= {0, 1, 2, 3, 4, 5}


def test_planned_elastic_deformation_switches_on_nnunets_own():
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    def spatial(composed):
        return next(t for t in composed.transforms if isinstance(t, SpatialTransform))

    pipeline = nnUNetTrainer.get_training_transforms([80, 40], (-0.2, 0.2), None, (1,), False)
    assert spatial(pipeline).p_elastic_deform == 0  # nnU-Net leaves it off
    assert insert_planned_transforms(pipeline, {"elastic": {"p": 0.3, "enabled": False}}) is pipeline
    assert spatial(pipeline).p_elastic_deform == 0
    composed = insert_planned_transforms(pipeline, {"elastic": {"p": 1.0}})
    assert spatial(composed).p_elastic_deform == 1.0
    torch.manual_seed(0)
    np.random.seed(0)
    image, seg = patch()
    out = ComposeCall(composed.transforms)(image, seg)
    assert out["image"].shape == (1, 80, 40) and set(torch.unique(out["segmentation"]).tolist()) <= {0, 1, 2, 3, 4, 5}
    with pytest.raises(ValueError, match="augmentation.elastic.p"):
        elastic_probability({"p": 1.5})


class ComposeCall:
    def __init__(self, transforms):
        from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

        self.compose = ComposeTransforms(transforms)

    def __call__(self, image, seg):
        return self.compose(image=image.clone(), segmentation=seg.clone())


# ---------------------------------------------------------------------- level numbering and its confidence
ORDER = LevelOrder((1, 2, 3, 4, 5), (0.0, 1.0, 0.0))


def stack(labels: list[int], start: int, length: int = 80) -> np.ndarray:
    """Vertebrae of 9 voxels (18 mm) every 12 voxels along array axis 1 (world y), top first."""
    array = np.zeros((10, length, 20), np.uint8)
    for i, value in enumerate(labels):
        array[2:8, max(start + i * 12, 0):start + i * 12 + 9, 5:15] = value
    return array


def numbered(array: np.ndarray) -> tuple[list[int], dict]:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 2.0, 3.0))
    out, report = renumber_with_report(array, image, ORDER)
    bodies = [int(np.bincount(out[array == v].ravel()).argmax()) for v in dict.fromkeys(array[4, :, 10]) if v]
    values = [int(out[4, r, 10]) for r in range(array.shape[1])
              if array[4, r, 10] and (r == 0 or not array[4, r - 1, 10])]
    return values if len(values) >= len(bodies) else bodies, report


@pytest.mark.parametrize("labels,start,expected,open_end,confident", [
    ([2, 3, 4, 5], 0, [2, 3, 4, 5], "top", True),  # L1 cut off at the top, right labels: kept, confident
    ([1, 2, 3, 4], 0, [2, 3, 4, 5], "top", False),  # top cut but numbered from L1: the bottom is closed -> L2..L5
    ([1, 2, 3, 4], 40, [1, 2, 3, 4], "bottom", True),  # L5 cut off at the bottom
    ([2, 3, 4, 5], 40, [1, 2, 3, 4], "bottom", False),  # bottom cut, numbered up to L5: the top is closed -> L1..
])
def test_numbering_follows_the_open_end_of_the_field_of_view(labels, start, expected, open_end, confident):
    values, report = numbered(stack(labels, start))
    assert values == expected
    assert report[f"{open_end}_open"] and not report[f"{'bottom' if open_end == 'top' else 'top'}_open"]
    assert report["applied"]
    assert (report["confidence"] >= 0.9) == confident
    assert report["confidence"] >= 0.5  # the field of view leaves one numbering: not a blind shift
    assert report["anchored"]  # the closed end anchors it


@pytest.mark.parametrize("factor", [0.45, 1.0])
@pytest.mark.parametrize("labels", [[1, 2, 3, 4, 5], [2, 3, 4, 5]])
def test_a_numbering_with_both_ends_open_is_flagged_however_sure_the_network(monkeypatch, factor, labels):
    # the scan cuts the spine just above the first vertebra found and just below the last: a T12 called L1 (or an S1
    # called L5) would fit this field of view as well, so nothing anchors the numbering but the network's labels
    # (the stress test's whole-scan shifts: every level one off, both ends open, the network sure of it)
    from spinediff.inference import level_order

    monkeypatch.setattr(level_order, "UNANCHORED_FACTOR", factor)
    values, report = numbered(stack(labels, 0, length=12 * (len(labels) - 1) + 9))
    assert values == labels and report["applied"]
    assert report["top_open"] and report["bottom_open"] and not report["anchored"]
    assert "both ends" in report["basis"]
    if factor < 1.0:
        assert report["confidence"] < 0.5  # under the review rule's numbering threshold
    else:  # the switch off: as before, the network's agreement (raised when only one full numbering fits)
        assert report["confidence"] >= 0.9


def test_zeros_padded_around_a_scan_are_not_room_at_its_ends(tmp_path):
    # five vertebrae from the top edge of the scan to its bottom edge, the scan placed in a grid 60 mm longer (zeros
    # below it, as a scan shifted inside a larger grid): the zeros are no field of view in which an S1 was seen
    import json

    from spinediff.inference.postprocess_command import postprocess_folder
    from spinediff.inference.postprocessing import Postprocessing, image_content_box
    from spinediff.inference.review import ReviewRule

    scan = stack([1, 2, 3, 4, 5], 0, length=57)
    labels = np.pad(scan, ((0, 0), (0, 30), (0, 0)))
    image = np.pad(np.where(scan > 0, 200.0, 50.0), ((0, 0), (0, 30), (0, 0)))
    box = image_content_box([image])
    assert box == [[0, 10], [0, 57], [0, 20]]  # nnU-Net's nonzero crop
    assert image_content_box([np.zeros_like(image)]) is None
    _, grid = renumber_with_report(labels, _spaced(labels), ORDER)
    _, content = renumber_with_report(labels, _spaced(labels), ORDER, box)
    assert not grid["bottom_open"] and grid["anchored"] and grid["confidence"] >= 0.9  # the zeros read as room
    assert content["bottom_open"] and not content["anchored"] and content["confidence"] < 0.5
    # through `spinediff postprocess --images` (nnU-Net's trainers, the stress test): the inputs give the box
    model, predictions, images = tmp_path / "model", tmp_path / "pred", tmp_path / "images"
    for folder in (model, predictions, images):
        folder.mkdir()
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w"}, "file_ending": ".nii.gz",
                                                    "labels": {"background": 0, **{f"L{v}": v for v in range(1, 6)}}}))
    (model / "postprocessing.json").write_text(json.dumps(Postprocessing(ORDER).to_dict()))
    ReviewRule("level_anomaly", 10.0, {v: 1.0 for v in range(1, 6)}, numbering_threshold=0.5).write(model)
    sitk.WriteImage(_spaced(labels), str(predictions / "case.nii.gz"))
    padded = sitk.GetImageFromArray(image)
    padded.CopyInformation(_spaced(labels))
    sitk.WriteImage(padded, str(images / "case_0000.nii.gz"))
    result = postprocess_folder(predictions, tmp_path / "out", model, progress=False, review=True, images=images)
    report = json.loads((tmp_path / "out" / "level_numbering.json").read_text())["cases"]["case.nii.gz"]
    assert not report["anchored"] and result.flags["case"]["review"]
    postprocess_folder(predictions, tmp_path / "plain", model, progress=False, review=True)  # no inputs: the grid
    assert json.loads((tmp_path / "plain" / "level_numbering.json").read_text())["cases"]["case.nii.gz"]["anchored"]


def test_a_level_missing_inside_the_field_of_view_is_not_renumbered_and_has_low_confidence():
    # four vertebrae, room for a fifth at both ends, numbered 1..4 by the network: the gap is not explained
    values, report = numbered(stack([1, 2, 3, 4], 15))
    assert values == [1, 2, 3, 4]
    assert not report["top_open"] and not report["bottom_open"]
    assert report["confidence"] <= 0.5 and "inside the field of view" in report["basis"]


def test_an_extra_vertebra_below_is_dropped_and_the_rest_keep_their_levels():
    # L2..L5 with the top cut, and an S1 the network also called L5: S1 (outermost) becomes background
    array = stack([2, 3, 4, 5, 5], 0)
    values, report = numbered(array)
    assert values[:4] == [2, 3, 4, 5] and values[4] == 0
    assert report["missing_labels"] == [1] and report["confidence"] > 0.6


def test_a_shift_without_support_keeps_the_networks_numbering():
    # four vertebrae with room for a fifth at both ends, numbered 2..5: nothing in the field of view says whether L1
    # or L5 was missed, so the levels are not moved, and the confidence says so
    values, report = numbered(stack([2, 3, 4, 5], 15))
    assert values == [2, 3, 4, 5] and report["confidence"] <= 0.5


def cut_sliver_above_l2(room: int = 0) -> np.ndarray:
    """L1 cut by the top edge of the scan to a 4 mm sliver (``room`` rows of background above it), fused to L2 by a
    thin bridge of "L2" through the disc; L2..L5 below, room for another vertebra under L5."""
    array = np.zeros((10, 80 + room, 20), np.uint8)
    array[2:8, room:room + 2, 5:15] = 1  # the sliver: 16 % of the component it forms with L2
    array[3:7, room + 2:room + 5, 6:14] = 2  # the bridge: thicker than the sliver, so erosion cannot part them
    for i, value in enumerate((2, 3, 4, 5)):
        array[2:8, room + 5 + 12 * i:room + 14 + 12 * i, 5:15] = value
    return array


@pytest.mark.parametrize("edge_parts", [True, False])
@pytest.mark.parametrize("end", ["top", "bottom"])
def test_a_sliver_the_edge_cuts_keeps_its_level_though_fused_to_its_neighbour(monkeypatch, edge_parts, end):
    from spinediff.inference import level_order

    monkeypatch.setattr(level_order, "EDGE_PARTS", edge_parts)
    array, sliver_level, neighbour = cut_sliver_above_l2(), 1, 2
    if end == "bottom":  # upside down and renumbered: an L5 sliver at the bottom edge fused to L4
        array = np.where(array > 0, 6 - array, 0).astype(np.uint8)[:, ::-1].copy()
        sliver_level, neighbour = 5, 4
    out, report = renumber_with_report(array, _spaced(array), ORDER)
    assert report[f"{end}_open"] and not report[f"{'bottom' if end == 'top' else 'top'}_open"]
    for level in {1, 2, 3, 4, 5} - {sliver_level}:
        assert np.unique(out[array == level]).tolist() == [level]
    sliver = np.unique(out[array == sliver_level])
    if edge_parts:  # numbered on its own: a place in the column beyond its neighbour
        assert sliver.tolist() == [sliver_level] and report["edge_parts"] == 1
        assert report["labels"] == [1, 2, 3, 4, 5]
    else:  # as one component with its neighbour it takes the neighbour's level (what the stress test's cuts showed)
        assert sliver.tolist() == [neighbour] and "edge_parts" not in report


def test_rescoring_kept_stress_cases_summarises_per_variant_and_lists_changes(tmp_path):
    from studies.rescore_stress import held_out_folders, kept_folder_parts, markdown, summary

    kept = ("out_Dataset505_X_0", "out_Dataset505_X_training_scans_0", "out_Dataset504_Y_0_1", "ref_Dataset505_X_0")
    for name in kept:  # --training-scans' folders and the references are not rescored
        (tmp_path / name).mkdir()
    assert [p.name for p in held_out_folders(tmp_path)] == ["out_Dataset504_Y_0_1", "out_Dataset505_X_0"]

    assert kept_folder_parts("out_Dataset505_LumbarVB3VB2mixed_2") == ("Dataset505_LumbarVB3VB2mixed", "2")
    assert kept_folder_parts("out_Dataset504_Lumbar_T1_0_1_2_3_4") == ("Dataset504_Lumbar_T1", "0_1_2_3_4")

    rows = [{"fold": "1", "case": "a", "variant": "plain", "kept": 0.9, "now": 0.9},
            {"fold": "1", "case": "a", "variant": "crop_top_20", "kept": 0.6, "now": 0.8, "kept_confidence": 0.4,
             "now_confidence": 0.9},
            {"fold": "2", "case": "b", "variant": "crop_top_20", "kept": 0.8, "now": 0.8, "kept_confidence": 0.3,
             "now_confidence": 0.45}]
    table = summary(rows)
    assert [t["variant"] for t in table] == ["plain", "crop_top_20"]
    assert table[1]["cases"] == 2 and table[1]["kept"] == pytest.approx(0.7) and table[1]["now"] == pytest.approx(0.8)
    assert (table[1]["kept_low_confidence"], table[1]["now_low_confidence"]) == (2, 1)
    text = markdown(rows, table, "cmd")
    assert "| crop_top_20 | 2 | 0.700 | 0.800 | +0.100 | 2, 1 |" in text
    assert "(1 of 3)" in text and "- a crop_top_20 (fold 1): 0.600 -> 0.800" in text
    assert "Stressed case-variants: 2; flagged by the numbering confidence: 2 as kept, 1 now." in text
    rows[2]["now"] = 0.1  # b fails now, and its confidence 0.45 flags it
    assert "Under 0.5 level Dice now: 1; of them flagged: 1 as kept, 1 now." in markdown(rows, summary(rows), "c")


def test_rescoring_averaged_with_other_trainings_pairs_the_same_folders_and_refuses_others(tmp_path):
    from studies.rescore_stress import averaged_raw_folders, markdown, summary

    def kept(root, cases):
        raw = root / "stress_cases" / "out_Dataset505_X_0" / "nnunet_raw_output"
        raw.mkdir(parents=True)
        for case in cases:
            (raw / f"{case}.npz").write_bytes(b"")
        return root / "stress_cases"

    first = kept(tmp_path / "seed0", ["a-plain", "a-crop_top_20"])
    second = kept(tmp_path / "seed1", ["a-plain", "a-crop_top_20"])
    folders = averaged_raw_folders(first, [second])
    assert folders == {"out_Dataset505_X_0": [second / "out_Dataset505_X_0" / "nnunet_raw_output"]}
    short = kept(tmp_path / "other", ["a-plain"])  # a case missing: refused before any work, naming the folder
    with pytest.raises(SystemExit, match="other/stress_cases/out_Dataset505_X_0/nnunet_raw_output does not hold"):
        averaged_raw_folders(first, [second, short])
    with pytest.raises(SystemExit, match="does not hold"):  # a folder of another dataset or fold
        averaged_raw_folders(first, [tmp_path / "nowhere"])
    for answer in (first / "out_Dataset505_X_0" / "nnunet_raw_output").glob("*.npz"):
        answer.unlink()  # the first training's own answers without probabilities
    with pytest.raises(SystemExit, match="seed0/stress_cases/out_Dataset505_X_0/nnunet_raw_output holds no raw"):
        averaged_raw_folders(first, [second])
    rows = [{"fold": "0", "case": "a", "variant": "plain", "kept": 0.9, "now": 0.8}]
    assert "averaged with those of S1 (nnU-Net's ensembling)" in markdown(rows, summary(rows), "c", ["S1"])
    assert "averaged" not in markdown(rows, summary(rows), "c")


def test_the_room_at_an_end_is_measured_across_the_scan_not_from_its_far_corner():
    # a wide scan (240 mm) whose level direction is tilted 8.4 degrees from its rows, L1 cut off at the top: L2 starts
    # at the top edge. From the grid's far corner along the tilted direction, the top had 18.6 mm of room (closed, at
    # a 24 mm pitch: L1 was then "missing inside the field of view", confidence 0.5); across the rows it has none
    array = np.zeros((4, 80, 240), np.uint8)
    for i, value in enumerate((2, 3, 4, 5)):
        array[:, 12 * i:12 * i + 9, 100:120] = value
    image = _spaced(array)
    direction = np.array([-0.146, 0.989, 0.0])
    order = LevelOrder((1, 2, 3, 4, 5), tuple(direction / np.linalg.norm(direction)))
    out, report = renumber_with_report(array, image, order)
    assert report["top_open"] and not report["bottom_open"] and report["room_above_mm"] < 1.0
    assert report["labels"] == [2, 3, 4, 5] and report["confidence"] >= 0.9 and (out == array).all()


def test_a_part_with_room_above_it_is_not_an_edge_part():
    # the same sliver 20 mm below the top edge: not a cut, so it stays with the vertebra it touches
    array = cut_sliver_above_l2(room=10)
    out, report = renumber_with_report(array, _spaced(array), ORDER)
    assert "edge_parts" not in report and np.unique(out[array == 1]).tolist() == [2]


def _spaced(array: np.ndarray):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 2.0, 3.0))
    return image


def volumes_of(array: np.ndarray, spacing=(3.0, 2.0, 1.0)) -> dict[str, dict]:
    """review scores' ``levels`` (ml) of a label map with ``spacing`` (z, y, x mm)."""
    ml = float(np.prod(spacing)) / 1000.0
    return {str(v): {"volume_ml": float((array == v).sum()) * ml} for v in range(1, 6)}


def test_the_review_flag_counts_no_level_the_field_of_view_explains():
    whole = stack([1, 2, 3, 4, 5], 10)
    expected = {int(k): v["volume_ml"] for k, v in volumes_of(whole).items()}
    rule = ReviewRule("level_anomaly", 0.69, expected, {}, None, 0.5)

    def flag(array):
        out, report = renumber_with_report(array, _image(array), ORDER)
        return rule.flag({"level_anomaly": 9.0, "levels": volumes_of(out)}, None, report), report

    # the top of the scan cuts L1 away and L2 in half: both are what the scan shows, not a failure
    cut = whole[:, 27:].copy()
    plain, report = flag(cut)
    assert report["beyond_view"] == [1] and report["at_view_edge"] == [2] and report["top_open"]
    assert not plain["review"] and plain["value"] < 0.69 and plain["value_whole_scan"] == 9.0
    # L1 missing with room for it above (a closed top): the network missed a vertebra, the flag stays
    missed = stack([2, 3, 4, 5], 22)
    flagged, report = flag(missed)
    assert report["beyond_view"] == [] and not report["top_open"]
    assert flagged["review"] and "(level 1 missing)" in flagged["reasons"][0]
    # a level at the open edge larger than expected is still flagged (the edge explains only a smaller one)
    big = cut.copy()
    big[:, 0:7, :] = 2  # 2.6 x its expected volume
    grown, report = flag(big)
    assert report["at_view_edge"] == [2] and grown["review"] and "level 2 at" in grown["reasons"][0]


def _image(array: np.ndarray):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 2.0, 3.0))
    return image


# ---------------------------------------------------------------------- review of out-of-distribution scans
def test_an_inverted_contrast_is_out_of_the_training_intensity_distribution():
    rng = np.random.default_rng(0)
    training = []
    for _ in range(5):  # T2w-like: mostly dark background, bright structures
        image = rng.gamma(1.5, 20.0, size=(20, 40, 40))
        image[5:15, 10:30, 15:25] += 120 + rng.normal(0, 10)
        training.append([intensity_signature(image)])
    reference = intensity_reference(training)
    rule = ReviewRule("level_anomaly", 1.0, {1: 1.0}, {}, reference, 0.5)
    new = rng.gamma(1.5, 20.0, size=(20, 40, 40))
    new[5:15, 10:30, 15:25] += 125
    same = rule.flag({"level_anomaly": 0.1}, [intensity_signature(new)])
    inverted = rule.flag({"level_anomaly": 0.1}, [intensity_signature(new.max() - new)])
    assert not same["review"] and same["intensity_distance"] < reference["threshold"]
    assert inverted["review"] and "intensities out of distribution" in inverted["reasons"][0]
    low = rule.flag({"level_anomaly": 0.1}, [intensity_signature(new)], {"confidence": 0.2, "basis": "x"})
    assert low["review"] and "numbering" in low["reasons"][0]


def test_the_entropy_threshold_flags_an_uncertain_case_and_is_read_through_the_schema(tmp_path):
    from spinediff.errors import SpineDiffError

    rule = ReviewRule("level_anomaly", 1.0, {1: 1.0}, {}, None, 0.5, 0.2)
    sure = rule.flag({"level_anomaly": 0.1, "entropy": 0.1})
    unsure = rule.flag({"level_anomaly": 0.1, "entropy": 0.3})
    assert not sure["review"] and sure["entropy"] == 0.1
    assert unsure["review"] and unsure["reasons"] == ["entropy 0.3 > 0.2 (less sure than the cross-validation's cases)"]
    assert not rule.flag({"level_anomaly": 0.1})["review"]  # no probabilities: nothing to check
    rule.write(tmp_path)
    assert ReviewRule.read(tmp_path) == rule
    with pytest.raises(SpineDiffError, match="entropy_threshold"):
        ReviewRule.from_dict({"score": "level_anomaly", "threshold": 1.0, "entropy_threshold": -1}, "x/review.json")
