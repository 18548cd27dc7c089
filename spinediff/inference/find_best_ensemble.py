"""The ensembles of ``find_best`` (the top two; the 2.5D fusion of one model trained in the three slice directions),
scored on the cross-validation cases (see :mod:`.find_best`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinediff.datasets.dataset_json import foreground_labels, ignore_label
from spinediff.errors import SpineDiffError
from spinediff.inference.candidates import Candidate, score
from spinediff.inference.inputs import split_ending
from spinediff.io import read_image, read_json
from spinediff.metrics.image_metrics import image_metrics
from spinediff.metrics.segmentation_metrics import case_dice, pooled_foreground_dice
from spinediff.paths import nnunet_folder
from spinediff.planning.plans import SpineDiffPlans
from spinediff.tasks import Task, task_spec


def evaluate_ensemble(members: list[Candidate], task: Task, metric: str, dataset_folder: Path,
                      repredict: bool, raw_folder: str | os.PathLike | None, device: str) -> dict:
    """Scores of the ensemble of ``members`` (the mean of their predictions), or ``{"skipped": reason}``."""
    names = [m.name for m in members]
    try:
        raw = nnunet_folder("raw", raw_folder) / dataset_folder.name
    except Exception as exc:  # noqa: BLE001 - the ensemble is optional; say why it was not tried
        return {"members": names, "skipped": f"needs the raw dataset for the references ({exc})"}
    if task.writes_labels:
        result = _segmentation(members, dataset_folder, raw, repredict, device)
    else:
        result = _images(members, raw, task, metric)
    return {"members": names, **result}


def _validation_files(candidate: Candidate, fold: str, ending: str) -> list[Path]:
    folder = candidate.folder / f"fold_{fold}" / "validation"
    return sorted(p for p in folder.glob(f"*{ending}") if p.name in candidate.per_case)


# ---------------------------------------------------------------------- images: average the HU predictions
def _images(members: list[Candidate], raw: Path, task: Task, metric: str) -> dict:
    first = members[0]
    dataset_json = read_json(first.folder / "dataset.json")
    ending = dataset_json["file_ending"]
    targets = list(task_spec(dataset_json).target_channels)
    intensity = SpineDiffPlans.read(first.folder / "plans.json").configuration(first.configuration).target_intensity
    if intensity is None:
        raise SpineDiffError(f"{first.folder / 'plans.json'}: {first.configuration} has no target intensity map.")
    mappings = intensity.mappings
    per_case = {}
    for fold in first.folds:
        for path in _validation_files(first, fold, ending):
            others = [m.folder / f"fold_{fold}" / "validation" / path.name for m in members[1:]]
            stem = split_ending(path.name)[0]
            channel = targets[0] if len(targets) == 1 else int(stem[-4:])
            reference = raw / "imagesTr" / (f"{stem}_{channel:04d}{ending}" if len(targets) == 1 else path.name)
            missing = [f for f in (*others, reference) if not f.is_file()]
            if missing:
                return {"skipped": f"{missing[0]} is missing"}
            mean = sum((_array(f) for f in others), _array(path)) / len(members)
            mapping = mappings[targets.index(channel)]
            per_case[path.name] = image_metrics(mean, _array(reference), mapping.clip_range,
                                                is_ct=mapping.units == "HU")
    return {"method": f"voxel-wise mean of the {len(members)} validation predictions", "cases": len(per_case),
            "scores": score(per_case, task), "best_single": first.scores[metric]}


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(read_image(path)).astype(np.float64)


# ---------------------------------------------------------------------- segmentation: average probabilities
def _references(candidate: Candidate, fold: str, raw: Path, ending: str) -> dict[str, Path]:
    summary = read_json(candidate.folder / f"fold_{fold}" / "validation" / "summary.json")
    found = {Path(e["prediction_file"]).name: Path(e["reference_file"]) for e in summary["metric_per_case"]}
    return {name: path if path.is_file() else raw / "labelsTr" / name for name, path in found.items()}


def _load_probabilities(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:  # no pickles: cannot run code
        return data["probabilities"].astype(np.float64)


def _segmentation(members: list[Candidate], dataset_folder: Path, raw: Path, repredict: bool, device: str) -> dict:
    first = members[0]
    dataset_json = read_json(first.folder / "dataset.json")
    ending = dataset_json["file_ending"]
    saved = all((c.folder / f"fold_{f}" / "validation" / f"{split_ending(p.name)[0]}.npz").is_file()
                for c in members for f in first.folds for p in _validation_files(c, f, ending))
    if saved:
        return _score_probabilities(members, {c.name: c.folder for c in members}, raw, ending,
                                    "mean of the saved validation probabilities")
    if not repredict:
        return {"skipped": "the final validations kept no class probabilities (validation/CASE.npz); pass "
                           "--repredict to predict the validation cases again with probabilities"}
    if not all(c.is_spinediff for c in members):
        return {"skipped": "re-prediction works for spinediff trainers; run nnU-Net's validation with --npz"}
    with tempfile.TemporaryDirectory(prefix="spinediff_find_best_") as tmp:
        for candidate in members:
            failure = _repredict(candidate, dataset_folder, raw, Path(tmp) / candidate.name, ending, device)
            if failure:
                return {"skipped": failure}
        return _score_probabilities(members, {c.name: Path(tmp) / c.name for c in members}, raw, ending,
                                    "validation cases re-predicted with probabilities (1 sample, the final "
                                    f"validation's steps), mean of the {len(members)}; singles re-predicted alike")


def _repredict(candidate: Candidate, dataset_folder: Path, raw: Path, work: Path, ending: str,
               device: str) -> str | None:
    from spinediff.inference.api import predict

    channels = len(read_json(candidate.folder / "dataset.json")["channel_names"])
    for fold in candidate.folds:
        inputs = work / f"inputs_{fold}"
        inputs.mkdir(parents=True)
        for path in _validation_files(candidate, fold, ending):
            stem = split_ending(path.name)[0]
            for c in range(channels):
                os.symlink(raw / "imagesTr" / f"{stem}_{c:04d}{ending}", inputs / f"{stem}_{c:04d}{ending}")
        metrics = read_json(candidate.folder / f"fold_{fold}" / "validation_metrics.json")
        report = predict(inputs, work / f"fold_{fold}" / "validation", dataset_folder.name, candidate.configuration,
                         candidate.trainer, folds=[fold], plans_identifier=candidate.plans, num_samples=1,
                         num_inference_steps=metrics.get("num_inference_steps", metrics.get("sampling_steps")),
                         seed=0, save_probabilities=True, results_folder=dataset_folder.parent, progress=False,
                         device=device)
        if report.failed:
            return f"re-prediction of {candidate.name} failed: {report.failed[0].message}"
    return None


def _score_probabilities(members: list[Candidate], roots: dict[str, Path], raw: Path, ending: str,
                         method: str) -> dict:
    first = members[0]
    dataset_json = read_json(first.folder / "dataset.json")
    labels, ignore = foreground_labels(dataset_json), ignore_label(dataset_json)
    per_case: dict[str, list[dict]] = {"ensemble": [], **{c.name: [] for c in members}}
    for fold, name, reference in _cases(first, raw, ending):
        reference_labels = sitk.GetArrayFromImage(read_image(reference))
        probabilities = [_load_probabilities(roots[c.name] / f"fold_{fold}" / "validation" /
                                             f"{split_ending(name)[0]}.npz") for c in members]
        for key, p in (*zip([c.name for c in members], probabilities, strict=True),
                       ("ensemble", sum(probabilities) / len(probabilities))):
            labels_of = np.argmax(p, axis=0).reshape(reference_labels.shape)
            per_case[key].append(case_dice(labels_of, reference_labels, labels, ignore))
    singles = {c.name: pooled_foreground_dice(per_case[c.name]) for c in members}
    return {"method": method, "cases": len(per_case["ensemble"]),
            "scores": {"dice": pooled_foreground_dice(per_case["ensemble"])}, "singles": singles,
            "best_single": max(singles.values())}


def _cases(candidate: Candidate, raw: Path, ending: str) -> Iterator[tuple[str, str, Path]]:
    for fold in candidate.folds:
        references = _references(candidate, fold, raw, ending)
        for path in _validation_files(candidate, fold, ending):
            yield fold, path.name, references.get(path.name, raw / "labelsTr" / path.name)
