"""``spinediff evaluate``: score a folder of predictions against a folder of references.

Segmentation (integer label maps): Dice, HD95 and ASD per class. Images (translation/generation):
PSNR, SSIM, MAE overall, in the body and in bone. Writes a per-case CSV and a summary JSON with
mean, standard deviation and a 95% confidence interval (Student t) per metric.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import stats
from tqdm import tqdm

from spinediff.errors import SpineDiffError
from spinediff.evaluation.failure_detection import case_record, failure_summary, has_uncertainty
from spinediff.evaluation.report import csv_text
from spinediff.io import (
    IMAGE_SUFFIXES,
    ensure_writable_folder,
    read_image,
    read_voxels_verified,
    write_json,
    write_text,
)
from spinediff.metrics.challenge_metrics import challenge_metrics
from spinediff.metrics.image_metrics import body_mask_ct, image_metrics
from spinediff.metrics.segmentation_metrics import segmentation_metrics, without_ignored
from spinediff.tasks import IMAGE_KIND, SEGMENTATION_KIND
from spinediff.utilities.geometry import same_geometry
from spinediff.utilities.lock import folder_lock


def dice_per_case(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Segmentation rows of :func:`evaluate_folders` → per case ``dice_<label>`` and their mean ``dice``
    over the labels scored (a label absent from prediction and reference, Dice NaN, is left out)."""
    scores: dict[str, dict[str, float]] = {}
    for row in rows:
        scores.setdefault(row["case"], {})[f"dice_{row['label']}"] = row["dice"]
    for entry in scores.values():
        dices = [v for v in entry.values() if math.isfinite(v)]
        entry["dice"] = float(np.mean(dices)) if dices else float("nan")
    return scores


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Mean, std, n and the 95% confidence interval of the mean over finite values."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = int(finite.size)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "ci95_low": float("nan"),
                "ci95_high": float("nan"), "n_not_finite": len(values)}
    mean = float(finite.mean())
    std = float(finite.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "n": n, "ci95_low": mean - half, "ci95_high": mean + half,
            "n_not_finite": len(values) - n}


def _case_files(folder: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        for suffix in IMAGE_SUFFIXES:
            if path.name.endswith(suffix):
                files[path.name[: -len(suffix)]] = path
                break
    return files


@dataclass
class EvaluationResult:
    rows: list[dict]
    summary: dict


def _body_mask(path: Path | None, reference: sitk.Image, reference_array: np.ndarray) -> np.ndarray:
    """The case's body mask from its file (voxels > 0, on the reference's grid), else the reference > -500 HU."""
    if path is None:
        return body_mask_ct(reference_array)
    mask = read_image(path)
    if (mismatch := same_geometry(reference, mask)) is not None:
        raise SpineDiffError(f"{path}: {mismatch} of the reference; a body mask must lie on its reference's grid.")
    return sitk.GetArrayFromImage(mask) > 0


def _looks_like_labels(image: sitk.Image) -> bool:
    array = sitk.GetArrayViewFromImage(image)
    return np.issubdtype(array.dtype, np.integer) and len(np.unique(array)) <= 64


def evaluate_folders(reference_folder: str | os.PathLike, prediction_folder: str | os.PathLike, *,
                     labels: Sequence[int] | None = None, task: str = "auto",
                     data_range: tuple[float, float] = (-1024.0, 3071.0),
                     output_folder: str | os.PathLike | None = None,
                     progress: bool = True, challenge: bool = False,
                     mask_folder: str | os.PathLike | None = None,
                     ignore_label: int | None = None) -> EvaluationResult:
    """Score every prediction that has a reference of the same name; write CSV + JSON if ``output_folder`` (whose
    lock is held from before the first case is read to the last file written: one run per output folder).

    ``challenge`` (images): also the SynthRAD challenges' metrics (:mod:`spinediff.metrics.challenge_metrics`:
    ``synthrad_mae``, ``synthrad_psnr``, ``synthrad_ssim``, ``synthrad_ms_ssim``) inside the body mask: the file of
    the case's name in ``mask_folder`` (voxels > 0; e.g. a converted dataset's labelsTr), else the reference's
    voxels above -500 HU. A ``mask_folder`` implies ``challenge``.

    ``ignore_label`` (segmentation): nnU-Net's ignore label of the references (``"ignore"`` in dataset.json); its
    voxels count for no label, in the reference nor in the prediction.
    """
    arguments = {"labels": labels, "task": task, "data_range": data_range, "output_folder": output_folder,
                 "progress": progress, "challenge": challenge or mask_folder is not None,
                 "mask_folder": mask_folder, "ignore_label": ignore_label}
    if output_folder is None:
        return _evaluate_folders(reference_folder, prediction_folder, **arguments)
    ensure_writable_folder(output_folder, create=False)
    with folder_lock(output_folder):
        return _evaluate_folders(reference_folder, prediction_folder, **arguments)


def _evaluate_folders(reference_folder: str | os.PathLike, prediction_folder: str | os.PathLike, *,
                      labels: Sequence[int] | None, task: str, data_range: tuple[float, float],
                      output_folder: str | os.PathLike | None, progress: bool, challenge: bool,
                      mask_folder: str | os.PathLike | None, ignore_label: int | None) -> EvaluationResult:
    ref_dir, pred_dir = Path(reference_folder), Path(prediction_folder)
    for folder in (ref_dir, pred_dir, *([Path(mask_folder)] if mask_folder is not None else [])):
        if not folder.is_dir():
            raise SpineDiffError(f"{folder} is not a folder.")
    references, predictions = _case_files(ref_dir), _case_files(pred_dir)
    cases = sorted(set(references) & set(predictions))
    if not cases:
        raise SpineDiffError(f"No prediction in {pred_dir} has a reference of the same name in {ref_dir}.")
    masks = _case_files(Path(mask_folder)) if mask_folder is not None else {}
    if mask_folder is not None and (no_mask := [c for c in cases if c not in masks]):
        raise SpineDiffError(f"--mask {mask_folder} holds no mask for case(s) {', '.join(no_mask[:5])}"
                             f"{' ...' if len(no_mask) > 5 else ''}; give the folder of the body masks named as "
                             "the references (e.g. the dataset's labelsTr), or leave --mask out (body: reference "
                             "> -500 HU).")
    missing = sorted(set(references) - set(predictions))
    rows: list[dict] = []
    failure_records: list[dict] = []
    for case in tqdm(cases, desc="evaluating", disable=not progress, unit="case"):
        ref_image, pred_image = read_image(references[case]), read_image(predictions[case])
        for path, image in ((references[case], ref_image), (predictions[case], pred_image)):
            read_voxels_verified(path, image)
        mismatch = same_geometry(ref_image, pred_image)
        if mismatch:
            raise SpineDiffError(f"{predictions[case]}: {mismatch} of the reference {references[case]}. A prediction "
                                 "must lie on its reference's grid (spacing, origin, direction); predict it from the "
                                 "reference's image, or resample it onto the reference first.")
        kind = task if task != "auto" else (SEGMENTATION_KIND if _looks_like_labels(ref_image) else IMAGE_KIND)
        ref, pred = sitk.GetArrayFromImage(ref_image), sitk.GetArrayFromImage(pred_image)
        if kind == SEGMENTATION_KIND:
            classes = list(labels) if labels else sorted(int(v) for v in np.unique(ref) if v not in (0, ignore_label))
            pred, ref = without_ignored(pred, ref, ignore_label)
            per_class = segmentation_metrics(pred, ref, classes, ref_image.GetSpacing()[::-1])
            for label, metrics in per_class.items():
                rows.append({"case": case, "label": label, **metrics})
            ending = predictions[case].name[len(case):]
            if has_uncertainty(pred_dir, case, ending):  # uncertainty outputs: does it catch the errors?
                failure_records.append(case_record(case, ref, pred, ref_image.GetSpacing()[::-1], pred_dir, ending,
                                                   classes))
        else:
            row = {"case": case, **image_metrics(pred.astype(np.float32), ref.astype(np.float32), data_range)}
            if challenge:
                row.update(challenge_metrics(pred.astype(np.float32), ref.astype(np.float32),
                                             _body_mask(masks.get(case), ref_image, ref)))
            rows.append(row)
    summary = _summary(rows)
    summary["num_cases"] = len(cases)
    summary["missing_predictions"] = missing
    summary["reference_folder"], summary["prediction_folder"] = str(ref_dir.resolve()), str(pred_dir.resolve())
    if failure_records:
        summary["failure_detection"] = failure_summary(failure_records)
    if output_folder is not None:
        out = Path(output_folder)
        write_text(csv_text(rows), out / "per_case.csv")
        write_json(summary, out / "summary.json")
    return EvaluationResult(rows, summary)


def _summary(rows: list[dict]) -> dict:
    metric_names = [k for k in rows[0] if k not in ("case", "label", "n_pred", "n_ref")]
    if "label" in rows[0]:
        per_label = {}
        for label in sorted({r["label"] for r in rows}):
            subset = [r for r in rows if r["label"] == label]
            per_label[str(label)] = {m: summarise([r[m] for r in subset]) for m in metric_names}
        mean_over_labels = {m: float(np.nanmean([per_label[k][m]["mean"] for k in per_label])) for m in metric_names}
        return {"task": SEGMENTATION_KIND, "per_label": per_label, "mean_over_labels": mean_over_labels}
    return {"task": IMAGE_KIND, "metrics": {m: summarise([r[m] for r in rows]) for m in metric_names}}
