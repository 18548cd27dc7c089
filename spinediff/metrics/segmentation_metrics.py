"""Segmentation metrics per class (monai.metrics): Dice, 95th-percentile Hausdorff distance and
average symmetric surface distance, in millimetres using the image spacing.

The one home of nnU-Net's Dice from counts (:func:`dice_counts` on nnunetv2's ``get_tp_fp_fn_tn``,
:func:`dice_from_counts`): the trainers' epoch metric, ``case_dice`` and the benchmark's merged Dice use it;
``tests/test_architecture.py`` fails on a second ``2 * tp / (...)``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn


def _one_hot(labels: np.ndarray, classes: Sequence[int]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(labels == c) for c in classes])[None].float()


def segmentation_metrics(prediction: np.ndarray, reference: np.ndarray, classes: Sequence[int],
                         spacing: Sequence[float]) -> dict[int, dict[str, float]]:
    """Per class: Dice, HD95 (mm), ASD (mm), and voxel counts.

    Conventions for empty structures: both empty → Dice NaN (not scored, as nnU-Net does) and
    distances NaN; only one empty → Dice 0 and distances infinite (reported as ``inf``).

    Args:
        prediction, reference: integer label maps of one case (same shape, numpy axis order).
        classes: the foreground label values to score.
        spacing: voxel spacing in numpy axis order (mm).
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} != reference shape {reference.shape}")
    p, r = _one_hot(prediction, classes), _one_hot(reference, classes)
    dice = compute_dice(p, r, include_background=True, ignore_empty=True)[0]
    spacing = [float(s) for s in spacing]
    out: dict[int, dict[str, float]] = {}
    for i, c in enumerate(classes):
        n_pred, n_ref = int(p[0, i].sum()), int(r[0, i].sum())
        if n_pred and n_ref:
            hd95 = float(compute_hausdorff_distance(p[:, i:i + 1], r[:, i:i + 1], include_background=True,
                                                    percentile=95, spacing=spacing)[0, 0])
            asd = float(compute_average_surface_distance(p[:, i:i + 1], r[:, i:i + 1], include_background=True,
                                                         symmetric=True, spacing=spacing)[0, 0])
        elif n_pred or n_ref:
            hd95 = asd = float("inf")
        else:
            hd95 = asd = float("nan")
        value = float(dice[i])
        if n_ref == 0 and n_pred > 0:
            value = 0.0
        out[int(c)] = {"dice": value, "hd95": hd95, "asd": asd, "n_pred": n_pred, "n_ref": n_ref}
    return out


def dice_counts(prediction: torch.Tensor, reference: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP and FN per channel of one-hot masks ``(B, C, *spatial)``, summed over the batch and space: nnunetv2's
    ``get_tp_fp_fn_tn`` per voxel, summed in float64 so that the counts are exact for any volume."""
    tp, fp, fn, _ = get_tp_fp_fn_tn(prediction.float(), reference.float(), axes=())
    dims = (0, *range(2, tp.ndim))
    return tuple(t.double().sum(dims).cpu().numpy() for t in (tp, fp, fn))


def dice_from_counts(tp, fp, fn) -> np.ndarray:
    """nnU-Net's Dice ``2 TP / (2 TP + FP + FN)`` per entry; NaN where the class is absent from both."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)


def without_ignored(prediction: np.ndarray, reference: np.ndarray, ignore: int | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``prediction`` and ``reference`` with background where the reference holds nnU-Net's ignore label
    (``ignore``; unchanged when None): those voxels count for no label, as in nnU-Net's evaluation."""
    if ignore is None:
        return prediction, reference
    unlabelled = np.asarray(reference) == ignore
    if not unlabelled.any():
        return prediction, reference
    return np.where(unlabelled, 0, prediction), np.where(unlabelled, 0, reference)


def case_dice(prediction: np.ndarray, reference: np.ndarray, labels: list[int], ignore: int | None = None
              ) -> dict[str, float]:
    """nnU-Net's Dice per label (NaN when the label is absent from both); voxels of the ``ignore`` label in the
    reference are left out."""
    prediction, reference = without_ignored(prediction, reference, ignore)
    out = {}
    for label in labels:
        p = torch.from_numpy(np.asarray(prediction == label))[None, None]
        r = torch.from_numpy(np.asarray(reference == label))[None, None]
        out[str(label)] = float(dice_from_counts(*dice_counts(p, r))[0])
    return out


def pooled_foreground_dice(per_case: Sequence[dict[str, float]]) -> float:
    """Mean over classes of the mean over cases (NaN = class absent in both: not counted), as nnU-Net."""
    if not per_case:
        return float("nan")
    classes = sorted({c for case in per_case for c in case})
    means = []
    for c in classes:
        values = [case[c] for case in per_case if c in case and not math.isnan(case[c])]
        if values:
            means.append(float(np.mean(values)))
    return float(np.mean(means)) if means else float("nan")
