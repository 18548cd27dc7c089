"""Fitting the field of view of scans longer than the training scans (spinediff.inference.view_fit; numpy only: fast;
the whole path through `spinediff postprocess` with a trained nnU-Net model is in test_stress_position.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from spinediff.inference.level_order import LevelOrder
from spinediff.inference.view_fit import (
    fit_view,
    foreground_entropy,
    needs_fitting,
    scan_extent,
    spine_axis,
    window_starts,
)

DOWN_Y = (0.0, 1.0, 0.0)  # the spine along world y


def image_of(shape_zyx, spacing_xyz=(1.0, 2.0, 3.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(np.zeros(shape_zyx, np.float32))
    image.SetSpacing(spacing_xyz)
    if direction is not None:
        image.SetDirection(direction)
    return image


def test_the_spine_axis_and_the_scans_length_along_it_follow_the_image_direction():
    plain = image_of((10, 50, 20))
    assert spine_axis(plain, DOWN_Y) == 1 and scan_extent(plain, DOWN_Y) == pytest.approx(100.0)
    # the same world direction in a scan stored with its y and z axes swapped: the array's axis 0 runs along it
    swapped = image_of((50, 10, 20), (1.0, 3.0, 2.0), (1, 0, 0, 0, 0, 1, 0, 1, 0))
    assert spine_axis(swapped, DOWN_Y) == 0 and scan_extent(swapped, DOWN_Y) == pytest.approx(100.0)
    assert needs_fitting(plain, DOWN_Y, 80.0) is True  # 100 mm > 1.2 x 80 mm
    assert needs_fitting(plain, DOWN_Y, 90.0) is False and needs_fitting(plain, DOWN_Y, None) is False


def test_windows_cover_the_axis_and_end_at_its_far_edge():
    assert window_starts(100, 40) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60]
    assert window_starts(103, 40)[-1] == 63  # the last window ends at the edge
    assert window_starts(30, 40) == [0]


def test_foreground_entropy_is_the_mean_over_labelled_voxels():
    segmentation = np.array([0, 1, 1])
    probabilities = np.array([[1.0, 0.5, 1.0], [0.0, 0.5, 0.0]])
    assert foreground_entropy(segmentation, probabilities) == pytest.approx(np.log(2) / 2)
    assert foreground_entropy(np.zeros(3), probabilities) == float("inf")


def test_each_voxel_takes_the_level_most_windows_give_it(monkeypatch):
    # a scan of 100 rows along the spine, trained on 40 (windows start every 5 rows): one vertebra at rows 40-60.
    # Four windows (starting at rows 20-35) agree on its level, 3; each other window is wrong in its own way.
    # Each window is numbered on its own grid first (recorded here; the numbering is tested in test_position_contrast)
    from spinediff.inference import level_order

    numbered_on = []

    def numbering(segmentation, geometry, order):
        numbered_on.append((geometry.GetOrigin()[1], geometry.GetSize()[1]))
        return segmentation, {"labels": sorted({int(v) for v in np.unique(segmentation) if v})}

    monkeypatch.setattr(level_order, "renumber_with_report", numbering)
    image = image_of((4, 100, 6), (1.0, 1.0, 1.0))
    data = np.zeros((1, 4, 100, 6), np.float32)
    data[0] += np.arange(100, dtype=np.float32)[None, :, None]  # each row holds its index: a crop knows its start
    wrong = {15: 1, 40: 2, 45: 4, 50: 5, 10: 1, 55: 2}

    def predict(crop, properties):
        start = int(crop[0, 0, 0, 0])
        rows = np.arange(start, start + crop.shape[2])
        segmentation = np.zeros(crop.shape[1:], np.uint8)
        segmentation[:, (rows >= 40) & (rows < 60)] = 3 if 20 <= start <= 35 else wrong.get(start, 1)
        probabilities = np.stack([(segmentation == v) * 0.88 + 0.02 for v in range(6)]).astype(np.float32)  # sums to 1
        return segmentation, probabilities

    order = LevelOrder((1, 2, 3, 4, 5), DOWN_Y, 40.0)
    fitted = fit_view(image, data, {"spacing": [1.0, 1.0, 1.0]}, predict, order)
    assert fitted.segmentation.shape == (4, 100, 6)
    assert (fitted.segmentation[:, 42:58] == 3).all()  # the level the agreeing windows give
    assert not fitted.segmentation[:, :40].any() and not fitted.segmentation[:, 60:].any()
    assert fitted.report["fitted"] and fitted.report["windows"] == len(window_starts(100, 40)) == 13
    assert [t["window_mm"] for t in fitted.report["tried"]][:2] == [[0.0, 40.0], [5.0, 45.0]]
    assert numbered_on == [(float(start), 40) for start in window_starts(100, 40)]  # each window on its own grid
    assert fitted.report["tried"][4]["levels"] == [3] and fitted.report["tried"][-1]["entropy"] is None  # none found
    # the probabilities are the windows' mean where they overlap: still a distribution over the classes
    assert fitted.probabilities.shape == (6, 4, 100, 6)
    assert np.allclose(fitted.probabilities.sum(axis=0), 1.0, atol=1e-5)


def test_the_level_order_records_the_training_field_of_view_and_reads_older_decisions(tmp_path):
    order = LevelOrder((1, 2, 3), (0.0, 1.0, 0.0), 224.0)
    assert LevelOrder.from_dict(order.to_dict()) == order
    older = {"labels": [1, 2, 3], "direction": [0.0, 1.0, 0.0]}
    assert LevelOrder.from_dict(older).view_mm is None and "view_mm" not in LevelOrder.from_dict(older).to_dict()
    # find_best completes an older decision instead of refusing it as another one
    from spinediff.inference.postprocessing import POSTPROCESSING_FILE, write_decision

    decision = {"level_order": older, "foreground": "argmax", "channel_labels": None, "learnt_order": older}
    (tmp_path / POSTPROCESSING_FILE).write_text(json.dumps(decision))
    completed = {**decision, "level_order": order.to_dict(), "learnt_order": order.to_dict()}
    assert write_decision(completed, tmp_path)
    assert json.loads((tmp_path / POSTPROCESSING_FILE).read_text())["level_order"]["view_mm"] == 224.0
    other = {**completed, "level_order": {**order.to_dict(), "labels": [1, 2]}}
    assert not write_decision(other, tmp_path)  # a decision that differs otherwise is still not replaced
