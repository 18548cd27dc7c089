"""review.png: the flagged cases drawn, each on the sagittal slice with most of its segmentation, head up whatever
the acquisition (spinediff/inference/review_sheet.py); `spinediff postprocess` writes it beside review.csv."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from spinediff.cli import main
from spinediff.datasets.dataset_json import label_names
from spinediff.inference.review import ReviewRule
from spinediff.inference.review_sheet import MAX_PANELS, SheetCase, case_view, write_review_sheet


def spine(shape=(40, 16, 8)) -> np.ndarray:
    """Array (z, y, x): five levels stacked along z, L1 at the highest z, all in the slice x = 5; a stray blob in
    x = 1. As the spine datasets here store it: sagittal slices along x, under whatever header."""
    labels = np.zeros(shape, np.uint8)
    for level in range(1, 6):
        top = shape[0] - 2 - 7 * level
        labels[top:top + 5, 3:11, 5] = level
    labels[5:8, 3:5, 1] = 1
    return labels


def image_of(array: np.ndarray, spacing=(3.0, 1.0, 1.5)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)  # x (the slices) coarsest
    return image


def test_the_view_is_the_slice_with_most_labels_across_the_slice_axis_spine_upright_whatever_the_storage():
    labels = image_of(spine())
    view, picture, aspect = case_view(labels)
    assert picture is None
    assert view.shape == (40, 16)  # the spine (z, the longest extent) along the rows, cut across x (3 mm slices)
    assert aspect == pytest.approx(1.5 / 1.0)  # a pixel's height (z spacing) over its width (y spacing)
    rows = {level: np.nonzero(view == level)[0].mean() for level in range(1, 6)}
    assert rows[1] < rows[2] < rows[3] < rows[4] < rows[5]  # L1 drawn at the top
    assert int((view > 0).sum()) == 5 * 5 * 8  # the slice x = 5, not the stray blob's
    # the same scan stored in another axis order, and with z stored from L1 down: the same picture
    assert np.array_equal(case_view(sitk.PermuteAxes(labels, [2, 0, 1]))[0], view)
    flipped = sitk.GetImageFromArray(spine()[::-1].copy())
    flipped.SetSpacing(labels.GetSpacing())
    flipped.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    flipped.SetOrigin(labels.TransformIndexToPhysicalPoint((0, 0, spine().shape[0] - 1)))
    assert np.array_equal(case_view(flipped)[0], view)
    # isotropic voxels: cut across the axis with the fewest (x: 8 of 40 x 16 x 8)
    assert case_view(image_of(spine(), spacing=(1.0, 1.0, 1.0)))[0].shape == (40, 16)


def test_one_label_is_drawn_head_up_by_the_header():
    single = (spine() > 0).astype(np.uint8)
    single[20:, :, 5] = 0  # only the lower half of the column: the header decides which end is up
    up = image_of(single)  # identity direction: z grows to the head, so the labels lie near the bottom rows
    rows = np.nonzero(case_view(up)[0])[0]
    assert rows.mean() > 20
    down = image_of(single)
    down.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # z grows to the feet
    assert np.nonzero(case_view(down)[0])[0].mean() < 20


def test_nnunets_ignore_label_is_background_in_the_view():
    """A reference mask's unannotated band runs across the whole scan: counted as foreground it would lay the spine
    on its side."""
    banded = spine(shape=(40, 80, 8))  # y 80 mm across the scan, longer than the spine's 52 mm along z
    banded[10:14, :, :] = 6  # a band across y and x, 4 rows along the spine
    view = case_view(image_of(banded), ignore=6)[0]
    assert view.shape == (40, 80) and 6 not in view
    assert case_view(image_of(banded))[0].shape == (80, 40)  # without it, the band decides the axes


def test_the_image_is_drawn_only_on_the_segmentations_grid():
    labels = image_of(spine())
    intensities = image_of(np.arange(spine().size, dtype=np.float32).reshape(spine().shape))
    view, picture, _ = case_view(labels, intensities)
    assert picture is not None and picture.shape == view.shape
    assert np.all(picture[view > 0] > 0)
    elsewhere = image_of(spine().astype(np.float32), spacing=(1.0, 1.0, 1.0))  # another grid
    assert case_view(labels, elsewhere)[1] is None


def test_the_sheet_draws_at_most_max_panels_cases(tmp_path):
    from matplotlib.image import imread

    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(image_of(spine()), str(path))
    sizes = {}
    for count in (2, MAX_PANELS, MAX_PANELS + 3):
        cases = [SheetCase(f"case{i}", path, None, ("level numbering confidence 0.45 < 0.5",)) for i in range(count)]
        target = write_review_sheet(cases, {"labels": {"L1": 1, "L2": 2}}, tmp_path / f"sheet{count}.png")
        sizes[count] = imread(target).shape
    assert sizes[MAX_PANELS + 3] == sizes[MAX_PANELS]  # the rest are only counted in the title
    assert sizes[MAX_PANELS][0] > sizes[2][0]
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary file left


def test_label_names_leave_region_entries_out():
    assert label_names({"labels": {"background": 0, "L1": 1, "L2": 2, "region": [1, 2], "ignore": 3}}) == \
        {1: "L1", 2: "L2", 3: "ignore"}


def test_postprocess_draws_the_flagged_cases_and_removes_a_sheet_it_overwrites(tmp_path, capsys):
    model = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir()
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w"}, "file_ending": ".nii.gz",
                                                    "labels": {"background": 0, **{f"L{v}": v for v in range(1, 6)}}}))
    (model / "postprocessing.json").write_text(json.dumps({"level_order": None, "applied": False}))
    volumes = {level: 5 * 8 * 3.0 * 1.0 * 1.5 / 1000.0 for level in range(1, 6)}
    ReviewRule("level_anomaly", float(np.log(2.0)), volumes).write(model)
    predictions, images = tmp_path / "pred", tmp_path / "images"
    predictions.mkdir()
    images.mkdir()
    small = spine()
    small[small == 3] = 0  # L3 missing: flagged by its level volume
    for case, array in (("ok", spine()), ("small", small)):
        sitk.WriteImage(image_of(array), str(predictions / f"{case}.nii.gz"))
        sitk.WriteImage(image_of(40.0 * (spine() > 0) + 10.0), str(images / f"{case}_0000.nii.gz"))
    out = tmp_path / "out"
    assert main(["postprocess", "-i", str(predictions), "-o", str(out), "-m", str(model), "--images", str(images)]) == 0
    assert f"the flagged ones drawn in {out / 'review.png'}" in capsys.readouterr().out
    assert (out / "review.png").is_file()
    # a second run into the same folder: refused without --overwrite; with it and nothing flagged, no sheet is left
    (predictions / "small.nii.gz").unlink()
    assert main(["postprocess", "-i", str(predictions), "-o", str(out), "-m", str(model)]) == 2
    assert main(["postprocess", "-i", str(predictions), "-o", str(out), "-m", str(model), "--overwrite"]) == 0
    assert "drawn in" not in capsys.readouterr().out
    assert not (out / "review.png").exists()
