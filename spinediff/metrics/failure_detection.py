"""Failure detection, as that literature scores it (Jaeger et al., ICLR 2023; Zenk et al., MedIA 2025).

- **Voxel level**: the AUROC of an uncertainty map as a detector of wrong voxels (:func:`error_auroc`, monai's
  ROC AUC), and the expected calibration error of the predicted probabilities (:func:`expected_calibration_error`).
- **Case level**: the risk-coverage curve of a case score (higher = more doubtful) with a risk per case, e.g.
  1 - Dice: cases are accepted from the most to the least confident and the selective risk is the mean risk of
  the accepted ones; :func:`aurc` is its area (lower is better), :func:`optimal_aurc` the area of a score that
  orders the cases by their risk itself, so ``aurc - optimal_aurc`` (e-AURC) is 0 for a perfect ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def error_auroc(uncertainty: np.ndarray, error: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """AUROC of ``uncertainty`` for telling wrong voxels (``error`` True) from right ones, within ``region``
    (e.g. near the spine: far background is right and sure, and would inflate the AUROC). None when the region
    holds only right or only wrong voxels (the AUROC is undefined)."""
    from monai.metrics import compute_roc_auc

    values = np.asarray(uncertainty, dtype=np.float32)
    wrong = np.asarray(error, dtype=bool)
    if region is not None:
        values, wrong = values[np.asarray(region, dtype=bool)], wrong[np.asarray(region, dtype=bool)]
    if wrong.all() or not wrong.any():
        return None
    return float(compute_roc_auc(torch.from_numpy(values.ravel()), torch.from_numpy(wrong.ravel().astype(np.int64))))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float | None:
    """ECE: the voxel-weighted mean over ``bins`` equal-width confidence bins of |accuracy - mean confidence|.
    ``confidence``: the probability of the predicted class; ``correct``: whether that class is right. None for
    no voxels."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    if confidence.size == 0:
        return None
    index = np.clip((confidence * bins).astype(np.int64), 0, bins - 1)  # confidence 1.0 falls in the last bin
    count = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, correct, bins) - np.bincount(index, confidence, bins))
    return float(gap.sum() / count.sum())


def risk_coverage(scores: Sequence[float], risks: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Coverage ``k / n`` and selective risk (mean risk of the ``k`` cases with the lowest scores), k = 1..n.
    Cases with equal scores are accepted together (each gets the group's mean risk), so ties cost what a random
    order among them would."""
    scores = np.asarray(scores, dtype=np.float64)
    risks = np.asarray(risks, dtype=np.float64)
    if scores.shape != risks.shape or scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores and risks must be two non-empty lists of one length, got {scores.shape}, "
                         f"{risks.shape}")
    order = np.argsort(scores, kind="stable")
    ordered_scores, ordered_risks = scores[order], risks[order].copy()
    for value in np.unique(ordered_scores):
        tied = ordered_scores == value
        ordered_risks[tied] = ordered_risks[tied].mean()
    k = np.arange(1, scores.size + 1)
    return k / scores.size, np.cumsum(ordered_risks) / k


def aurc(scores: Sequence[float], risks: Sequence[float]) -> float:
    """Area under the risk-coverage curve (the mean selective risk over the n coverages; lower is better)."""
    return float(risk_coverage(scores, risks)[1].mean())


def optimal_aurc(risks: Sequence[float]) -> float:
    """The AURC of the best possible score: cases accepted in the order of their own risk."""
    return aurc(list(risks), risks)


def review_threshold(scores: Sequence[float], failures: Sequence[bool]) -> dict:
    """The case score above which a case is flagged for review, chosen on cross-validation cases whose failure
    is known: the threshold with the largest Youden index (share of failures flagged minus share of good cases
    flagged), midway between two neighbouring scores; with no failure (or only failures) among them, the
    largest score seen, so that only cases more doubtful than all of them are flagged."""
    scores = np.asarray(scores, dtype=np.float64)
    failed = np.asarray(failures, dtype=bool)
    if scores.size == 0:
        raise ValueError("no cases to choose a review threshold on")
    if failed.all() or not failed.any():
        return {"threshold": float(scores.max()), "rule": "largest cross-validation score (no failure to separate)",
                "failures": int(failed.sum()), "cases": int(scores.size)}
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2])
    best, best_j = candidates[0], -np.inf
    for threshold in candidates:
        flagged = scores > threshold
        j = flagged[failed].mean() - flagged[~failed].mean()
        if j > best_j + 1e-12:
            best, best_j = threshold, j
    flagged = scores > best
    return {"threshold": float(best), "rule": "largest Youden index on the cross-validation cases",
            "failures": int(failed.sum()), "cases": int(scores.size),
            "failures_flagged": int(flagged[failed].sum()), "good_flagged": int(flagged[~failed].sum())}
