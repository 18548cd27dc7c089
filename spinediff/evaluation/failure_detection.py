"""Does a segmentation's uncertainty catch its errors? Scored against the references, per case and pooled.

For each case of a prediction folder that has uncertainty outputs (``CASE.npz`` class probabilities, as
``--save-probabilities`` / nnU-Net's ``--npz`` write them; ``CASE_uncertainty`` maps and ``CASE_uncertainty.json``
from ``spinediff predict --save-uncertainty``), :func:`case_record` reads the truth, the prediction and what the
model said of it; :func:`failure_summary` pools the cases:

- voxel level, within :data:`NEAR_VOXELS` voxels of the predicted or true foreground (the far background is
  right and sure, and would inflate the AUROC): the AUROC of each voxel map (``entropy`` of the probabilities,
  ``mutual_information`` of the samples) for wrong voxels, and the ECE of the predicted class's probability;
- case level, with 1 - the case's mean Dice as its risk: AURC and e-AURC of each case score
  (:mod:`spinediff.metrics.case_uncertainty`), and the *wrong-level* cases (mean Dice < 0.5 while the merged
  foreground Dice is >= 0.5: the right vertebrae with the wrong numbers) flagged at the threshold with the best
  Youden index on these cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinediff.io import read_json
from spinediff.metrics.case_uncertainty import SCORES, case_scores
from spinediff.metrics.failure_detection import (
    aurc,
    error_auroc,
    expected_calibration_error,
    optimal_aurc,
    review_threshold,
)
from spinediff.metrics.segmentation_metrics import case_dice

NEAR_VOXELS = 5
VOXEL_MAPS = ("entropy", "mutual_information")


def has_uncertainty(folder: Path, case: str, ending: str) -> bool:
    return (folder / f"{case}.npz").is_file() or (folder / f"{case}_uncertainty{ending}").is_file()


def case_record(case: str, reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float], folder: Path,
                ending: str, labels: Sequence[int], expected: Mapping[int, float] | None = None) -> dict:
    """Dice, failure, case scores and the voxels near the foreground (for the pooled voxel metrics) of one case.

    ``reference``/``prediction``: label maps on one grid (numpy order); ``spacing`` in the same order."""
    from scipy.ndimage import binary_dilation

    near = binary_dilation((prediction > 0) | (reference > 0), iterations=NEAR_VOXELS)
    wrong = prediction != reference
    voxels: dict[str, np.ndarray] = {"wrong": wrong[near]}
    scores: dict = {}
    map_path = folder / f"{case}_uncertainty{ending}"
    uncertainty = sitk.GetArrayFromImage(sitk.ReadImage(str(map_path))) if map_path.is_file() else None
    if (folder / f"{case}.npz").is_file():
        with np.load(folder / f"{case}.npz") as data:
            probabilities = data["probabilities"].astype(np.float32)
        scores = case_scores(probabilities, spacing, labels, expected=expected, uncertainty=uncertainty)
        voxels["confidence"] = probabilities.max(0)[near]
        voxels["entropy"] = -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(0)[near]
    elif uncertainty is not None:
        foreground = prediction > 0
        scores["mutual_information"] = float(uncertainty[foreground].mean()) if foreground.any() else 0.0
    if uncertainty is not None:
        voxels["mutual_information"] = uncertainty[near]
    summary = folder / f"{case}_uncertainty.json"
    if summary.is_file():  # what only the predictor saw: the members (sample disagreement), its review flag
        said = read_json(summary)
        for name, value in said.get("scores", {}).items():
            if name in SCORES and name not in scores:
                scores[name] = value
    dice = case_dice(prediction, reference, list(labels))
    present = [v for v in dice.values() if not np.isnan(v)]
    mean_dice = float(np.mean(present)) if present else 1.0
    merged = case_dice((prediction > 0).astype(np.int8), (reference > 0).astype(np.int8), [1])["1"]
    merged = 1.0 if np.isnan(merged) else merged
    return {"case": case, "dice": dice, "mean_dice": mean_dice, "merged_dice": merged,
            "wrong_level": bool(mean_dice < 0.5 <= merged),
            "scores": {k: v for k, v in scores.items() if k in SCORES}, "voxels": voxels}


def failure_summary(records: list[dict]) -> dict:
    """Pooled voxel AUROC per map and ECE, and per case score: AURC, e-AURC and the wrong-level cases flagged
    at the Youden threshold (chosen on these same cases: an optimistic estimate of the catch rate)."""
    wrong = np.concatenate([r["voxels"]["wrong"] for r in records])
    voxel = {}
    for name in VOXEL_MAPS:
        if all(name in r["voxels"] for r in records):
            voxel[f"auroc_{name}"] = error_auroc(np.concatenate([r["voxels"][name] for r in records]), wrong)
    if all("confidence" in r["voxels"] for r in records):
        voxel["ece"] = expected_calibration_error(np.concatenate([r["voxels"]["confidence"] for r in records]),
                                                  ~wrong)
    risks = [1.0 - r["mean_dice"] for r in records]
    failures = np.array([r["wrong_level"] for r in records], dtype=bool)
    rows = []
    for score in SCORES:
        if not all(score in r["scores"] for r in records):
            continue
        values = np.array([r["scores"][score] for r in records], dtype=np.float64)
        chosen = review_threshold(values, failures)
        flagged = values > chosen["threshold"]
        rows.append({"score": score, "voxel_auroc": voxel.get(f"auroc_{score}"), "aurc": aurc(values, risks),
                     "e_aurc": aurc(values, risks) - optimal_aurc(risks), "threshold": chosen["threshold"],
                     "wrong_level_flagged": int(flagged[failures].sum()), "good_flagged": int(flagged[~failures].sum()),
                     # every wrong-level case ranked above every other case
                     "separates_wrong_levels": bool(values[failures].min() > values[~failures].max())
                     if failures.any() and (~failures).any() else None})
    return {"cases": len(records), "near_voxels": NEAR_VOXELS, "wrong_level_cases": int(failures.sum()),
            "wrong_level": [r["case"] for r in records if r["wrong_level"]], "optimal_aurc": optimal_aurc(risks),
            "mean_dice": float(np.mean([r["mean_dice"] for r in records])), **voxel, "scores": rows,
            "per_case": [{k: v for k, v in r.items() if k != "voxels"} for r in records]}
