"""Case-level uncertainty scores of a segmentation, from the model's own outputs (higher = more doubtful).

A reviewer wants to know which scans to open. On lumbar MRI the typical failure of a good model is a wrong
level number (L2 labelled L3, two levels mixed in one vertebra): every voxel may look sure, so the voxel maps
average it away. Besides the mean voxel uncertainty the scores therefore look at the levels themselves:

- ``entropy``: mean entropy (nats) of the predicted class probabilities in the predicted foreground;
- ``mutual_information``: mean of a sample-disagreement map (diffusion samples) in the predicted foreground;
- ``sample_disagreement``: 1 - the mean Dice between the label maps of pairs of members (samples or folds);
- ``level_confidence``: 1 - the lowest mean confidence (probability of the predicted class) of any
  predicted level;
- ``level_anomaly``: the largest |log(volume / expected volume)| over the labels, a missing label counting
  as :data:`MISSING_LEVEL` (expected volumes: medians of the training labels, :func:`expected_volumes`). The review
  flag scores it within the field of view (:func:`most_anomalous_level`): a level missing beyond an open end of the
  scan, or smaller because the scan's edge cuts it, is what the scan shows, not a failure.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

#: |log(volume ratio)| given to a label that is absent from the prediction (a volume ratio of 1/20).
MISSING_LEVEL = math.log(20.0)
ENTROPY_FLOOR = 1e-12
SCORES = ("entropy", "mutual_information", "sample_disagreement", "level_confidence", "level_anomaly")


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    return float(np.prod(spacing)) / 1000.0


def expected_volumes(label_maps: Sequence[np.ndarray], spacings: Sequence[Sequence[float]],
                     labels: Sequence[int]) -> dict[int, float]:
    """Median volume (ml) of each label over the (training) label maps in which it occurs."""
    volumes: dict[int, list[float]] = {int(label): [] for label in labels}
    for label_map, spacing in zip(label_maps, spacings, strict=True):
        counts = np.bincount(np.asarray(label_map, dtype=np.int64).ravel())
        for label in volumes:
            if label < counts.size and counts[label] > 0:
                volumes[label].append(counts[label] * voxel_volume_ml(spacing))
    return {label: float(np.median(v)) for label, v in volumes.items() if v}


def level_statistics(label_map: np.ndarray, confidence: np.ndarray | None, spacing: Sequence[float],
                     labels: Sequence[int]) -> dict[int, dict[str, float]]:
    """Per foreground label: volume (ml) and, with ``confidence``, the mean confidence in it (absent labels:
    volume 0, no confidence)."""
    label_map = np.asarray(label_map)
    stats: dict[int, dict[str, float]] = {}
    for label in labels:
        inside = label_map == label
        count = int(inside.sum())
        entry = {"volume_ml": count * voxel_volume_ml(spacing)}
        if confidence is not None and count:
            entry["mean_confidence"] = float(np.asarray(confidence)[inside].mean())
        stats[int(label)] = entry
    return stats


def most_anomalous_level(stats: Mapping[int, Mapping[str, float]], expected: Mapping[int, float],
                         beyond_view: Sequence[int] = (), at_view_edge: Sequence[int] = ()) -> tuple[int | None, float]:
    """The label with an expected volume whose volume lies furthest from it, and that |log(volume / expected)|
    (missing: MISSING_LEVEL; the first such label wins a tie); (None, 0.0) without expected volumes.

    The field of view may explain some levels (:func:`spinediff.inference.level_order.view_explained`): a label in
    ``beyond_view`` (missing beyond an open end of the scan, or only a sliver of it found there) or in
    ``at_view_edge`` (the outermost level found at an open end, which the scan's edge may cut) is scored only when
    it is larger than expected."""
    worst, worst_label = 0.0, None
    explained = {int(v) for v in beyond_view} | {int(v) for v in at_view_edge}
    for label, volume in expected.items():
        predicted = stats.get(int(label), {}).get("volume_ml", 0.0)
        if int(label) in explained and predicted < volume:
            continue
        deviation = MISSING_LEVEL if predicted <= 0 else min(abs(math.log(predicted / volume)), MISSING_LEVEL)
        if worst_label is None or deviation > worst:
            worst, worst_label = deviation, int(label)
    return worst_label, worst


def level_anomaly(stats: Mapping[int, Mapping[str, float]], expected: Mapping[int, float]) -> float:
    """The largest |log(volume / expected)| over the labels with an expected volume (missing: MISSING_LEVEL)."""
    return most_anomalous_level(stats, expected)[1]


def pairwise_dice(member_labels: Sequence[np.ndarray], labels: Sequence[int]) -> float | None:
    """Mean over pairs of members of the mean Dice over ``labels`` present in either map of the pair."""
    if len(member_labels) < 2:
        return None
    pair_scores = []
    for a, b in itertools.combinations(member_labels, 2):
        dices = []
        for label in labels:
            in_a, in_b = a == label, b == label
            total = int(in_a.sum()) + int(in_b.sum())
            if total:
                dices.append(2.0 * int((in_a & in_b).sum()) / total)
        pair_scores.append(float(np.mean(dices)) if dices else 1.0)
    return float(np.mean(pair_scores))


def case_scores(probabilities: np.ndarray, spacing: Sequence[float], labels: Sequence[int], *,
                expected: Mapping[int, float] | None = None, uncertainty: np.ndarray | None = None,
                member_labels: Sequence[np.ndarray] | None = None) -> dict:
    """Every case score that the outputs allow (see the module docstring), and the per-level statistics.

    ``probabilities``: class probabilities ``(C, *spatial)`` (an ensemble's mean); ``labels``: the foreground
    labels (class indices); ``uncertainty``: a voxel map (e.g. mutual information) on the same grid;
    ``member_labels``: the label map of each member (samples x folds)."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    label_map = probabilities.argmax(0)
    confidence = probabilities.max(0)
    foreground = label_map > 0
    entropy = -(probabilities * np.log(np.clip(probabilities, ENTROPY_FLOOR, None))).sum(0)
    stats = level_statistics(label_map, confidence, spacing, labels)
    present = [s["mean_confidence"] for s in stats.values() if "mean_confidence" in s]
    scores: dict = {"entropy": float(entropy[foreground].mean()) if foreground.any() else 0.0,
                    "level_confidence": 1.0 - min(present) if present else 1.0}
    if uncertainty is not None:
        values = np.asarray(uncertainty, dtype=np.float32)
        scores["mutual_information"] = float(values[foreground].mean()) if foreground.any() else 0.0
    if member_labels is not None and len(member_labels) > 1:
        scores["sample_disagreement"] = 1.0 - pairwise_dice(member_labels, labels)
    if expected:
        scores["level_anomaly"] = level_anomaly(stats, expected)
    scores["levels"] = {str(k): v for k, v in stats.items()}
    return scores
