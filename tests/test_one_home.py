"""The facts with one home (issue 32, point 4) give the numbers their former copies gave: nnU-Net's Dice from counts,
metric directions, model folder names and dataset-ID resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spinediff.errors import SpineDiffError


def _hand_dice(prediction: np.ndarray, reference: np.ndarray, label: int) -> float:
    p, r = prediction == label, reference == label
    tp, fp, fn = np.sum(p & r), np.sum(p & ~r), np.sum(~p & r)
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn > 0 else float("nan")


def test_case_dice_is_nnunets_dice_per_label():
    from spinediff.metrics.segmentation_metrics import case_dice

    rng = np.random.default_rng(3)
    prediction, reference = rng.integers(0, 4, (7, 9, 11)), rng.integers(0, 3, (7, 9, 11))
    dice = case_dice(prediction, reference, [1, 2, 3, 5])
    for label in (1, 2, 3):
        assert dice[str(label)] == _hand_dice(prediction, reference, label)
    assert math.isnan(dice["5"])  # absent from both: not scored


def test_epoch_counts_and_dice_match_the_per_class_counts():
    from spinediff.metrics.segmentation_metrics import dice_from_counts
    from spinediff.training.validation import batch_segmentation_counts

    rng = np.random.default_rng(4)
    estimate, target = torch.from_numpy(rng.normal(size=(2, 4, 6, 5))), torch.from_numpy(rng.normal(size=(2, 4, 6, 5)))
    counts = batch_segmentation_counts(estimate, target)
    predicted, truth = estimate.argmax(1).numpy(), target.argmax(1).numpy()
    for c in range(1, 4):
        p, t = predicted == c, truth == c
        assert (counts["tp_hard"][c - 1], counts["fp_hard"][c - 1], counts["fn_hard"][c - 1]) == (
            (p & t).sum(), (p & ~t).sum(), (~p & t).sum())
    dice = dice_from_counts(counts["tp_hard"], counts["fp_hard"], counts["fn_hard"])
    assert np.allclose(dice, [_hand_dice(predicted, truth, c) for c in range(1, 4)], equal_nan=True)
    assert math.isnan(dice_from_counts([0], [0], [0])[0])


def test_metric_directions_have_one_table():
    from spinediff.inference.candidates import better
    from spinediff.metrics.direction import direction, higher_is_better
    from spinediff.tasks import get_task

    assert direction("dice") == "higher" and direction("mae_body") == "lower" and direction("psnr") == "higher"
    assert get_task("segmentation").higher_is_better and not get_task("translation").higher_is_better
    assert better(0.9, 0.8, "dice") and better(10.0, 20.0, "mae_body") and not better(float("nan"), 1.0, "psnr")
    assert higher_is_better("unknown_metric", default=True)
    with pytest.raises(KeyError, match="unknown_metric"):
        higher_is_better("unknown_metric")


def test_model_folder_name_and_dataset_ids(tmp_path):
    from spinediff.paths import dataset_in, model_folder_name, split_model_folder_name

    assert model_folder_name("T", "2d", "P") == "T__P__2d" and split_model_folder_name("T__P__2d") == ("T", "P", "2d")
    (tmp_path / "Dataset007_A").mkdir()
    assert dataset_in(tmp_path, 7) == tmp_path / "Dataset007_A" == dataset_in(tmp_path, "Dataset007_A")
    assert dataset_in(tmp_path, 8) is None and dataset_in(tmp_path / "missing", 7) is None
    (tmp_path / "Dataset007_B").mkdir()
    with pytest.raises(SpineDiffError, match="ambiguous"):
        dataset_in(tmp_path, "7")


def test_to_builtin_gives_plain_values_for_json_and_checkpoints(tmp_path):
    import json
    from pathlib import Path

    from spinediff.io import to_builtin, write_json

    value = {np.int64(2): (np.float32(0.5), np.arange(2)), "device": torch.device("cpu"), "path": Path("a/b"),
             "nested": [{"x": np.bool_(True)}]}
    plain = to_builtin(value)
    assert plain == {2: [0.5, [0, 1]], "device": "cpu", "path": "a/b", "nested": [{"x": True}]}
    assert type(next(iter(plain))) is int and type(plain[2][0]) is float
    write_json(value, tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text()) == {"2": [0.5, [0, 1]], "device": "cpu", "path": "a/b",
                                                              "nested": [{"x": True}]}
