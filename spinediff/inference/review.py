"""Which predicted cases a person should open: out-of-distribution and uncertain cases, with the rule that says so.

``MODEL_FOLDER/review.json`` holds the rule. The cross-validation writes it with every model
(:func:`write_cross_validation_rule`, called where ``spinediff find_best`` and ``spinediff benchmark`` decide the
post-processing), and an uncertainty analysis (``studies/uncertainty_cv501.py``) may calibrate its score on the
cross-validation's failures. ``spinediff predict`` reads it for every segmentation (no flag to turn on), adds each
case's flag and reasons to ``prediction.json`` (and ``CASE_uncertainty.json``), writes ``review.csv`` (most
doubtful first) and names the flagged cases at the end of the run. A case is flagged when any of these holds:

- **uncertain**: its case score (one of :data:`spinediff.metrics.case_uncertainty.SCORES`; by default
  ``level_anomaly``, the largest |log(volume / expected volume)| of a level) is above the rule's threshold; with a
  level numbering report, ``level_anomaly`` is scored within the field of view: a level missing beyond an open end
  of the scan, or smaller because the scan's edge cuts it, does not count (``value_whole_scan`` keeps the score
  over the whole scan);
- **intensities out of distribution**: the quantiles of its z-scored intensities (what the network sees after
  nnU-Net's normalisation) lie further from the training cases' than any training case does from the others
  (:func:`intensity_signature`, :func:`intensity_distance`): an inverted contrast (T1w for a model trained on T2w)
  moves them by many training spreads;
- **oriented unlike the training scans**: the axes of its image grid point other ways than the training scans' (its
  orientation code, e.g. ``PIR``, differs from theirs, e.g. ``LPS``; :func:`orientation_code`). nnU-Net reads the
  voxels as they are stored and does not reorient them, so the network sees the scan turned or mirrored; the reason
  names the code to reorient the scan to;
- **level numbering uncertain**: the level numbering's confidence (:mod:`spinediff.inference.level_order`) is
  below ``numbering_threshold``;
- **uncertain probabilities**: the mean entropy of its class probabilities in the predicted foreground is above
  ``entropy_threshold`` (1.5 x the largest of the cross-validation's cases, when their probabilities were saved;
  checked wherever the prediction has probabilities). A level shift that every volume and the numbering miss (the
  network counting from the wrong edge of a cut field of view) still makes the network less sure of its levels.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from spinediff.errors import SpineDiffError
from spinediff.io import read_json, write_json, write_text
from spinediff.metrics.case_uncertainty import SCORES, expected_volumes, most_anomalous_level
from spinediff.utilities.geometry import orientation_code

REVIEW_FILE = "review.json"
REVIEW_TABLE = "review.csv"
#: Quantiles of the z-scored intensities that describe a scan's contrast.
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
#: Smallest spread (z units) of a training quantile, so that a few alike training cases do not flag every scan.
MIN_SPREAD = 0.1
#: A scan is out of distribution when its distance exceeds the largest leave-one-out distance of a training case
#: times this factor (and at least MIN_INTENSITY_THRESHOLD spreads).
INTENSITY_MARGIN = 1.5
MIN_INTENSITY_THRESHOLD = 4.0
#: Level volumes: flagged beyond this factor of the largest training deviation (|log ratio|), and at least log(2).
VOLUME_MARGIN = 1.5
MIN_VOLUME_THRESHOLD = math.log(2.0)
#: Cases whose level numbering confidence is below this are flagged.
NUMBERING_THRESHOLD = 0.5
#: Foreground entropy: flagged beyond this factor of the largest cross-validation case's.
ENTROPY_MARGIN = 1.5
#: How a rule says that no raw 3D training image was read for the orientation.
NO_RAW_ORIENTATION = "none (no 3D raw images found)"


def intensity_signature(image: np.ndarray) -> list[float]:
    """Quantiles (:data:`QUANTILES`) of one channel's intensities after z-scoring over the whole image."""
    values = np.asarray(image, dtype=np.float64).ravel()
    if values.size > 2_000_000:
        values = values[:: values.size // 1_000_000]
    std = values.std()
    z = (values - values.mean()) / (std if std > 0 else 1.0)
    return [float(q) for q in np.quantile(z, QUANTILES)]


def intensity_distance(signature: Sequence[float], mean: Sequence[float], spread: Sequence[float]) -> float:
    """The largest |quantile - training mean| in training spreads."""
    return float(np.max(np.abs(np.asarray(signature) - np.asarray(mean)) / np.maximum(spread, MIN_SPREAD)))


def intensity_reference(signatures: Sequence[Sequence[Sequence[float]]]) -> dict:
    """The training reference from each training case's per-channel signatures: mean and spread per channel and
    quantile, and a threshold above every training case's leave-one-out distance."""
    data = np.asarray(signatures, dtype=np.float64)  # cases x channels x quantiles
    if data.ndim != 3 or data.shape[0] < 2:
        raise SpineDiffError("An intensity reference needs at least two training cases.")
    loo = []
    for i in range(data.shape[0]):
        rest = np.delete(data, i, axis=0)
        loo.append(max(intensity_distance(data[i, c], rest[:, c].mean(0), rest[:, c].std(0))
                       for c in range(data.shape[1])))
    threshold = max(MIN_INTENSITY_THRESHOLD, INTENSITY_MARGIN * max(loo))
    return {"quantiles": list(QUANTILES), "mean": data.mean(0).round(4).tolist(),
            "spread": data.std(0).round(4).tolist(), "threshold": round(float(threshold), 4),
            "leave_one_out_max": round(float(max(loo)), 4), "cases": int(data.shape[0])}


def _valid_orientation(code: object) -> bool:
    return (isinstance(code, str) and len(code) == 3
            and all(sum(letter in pair for letter in code) == 1 for pair in ("LR", "AP", "SI")))


#: The keys of a review.json.
REVIEW_KEYS = frozenset({"score", "threshold", "expected_volumes_ml", "chosen", "intensity", "numbering_threshold",
                         "entropy_threshold", "orientation"})
#: The keys of its intensity reference (:func:`intensity_reference`).
INTENSITY_KEYS = frozenset({"quantiles", "mean", "spread", "threshold", "leave_one_out_max", "cases"})


def _finite(value: object, path, key: str, fix: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        kind = "a finite number > 0" if positive else "a finite number"
        raise SpineDiffError(f"{path}: '{key}' must be {kind}, got {value!r}; {fix}")
    return float(value)


def _check_intensity(intensity: object, path, fix: str) -> None:
    """The intensity reference: known keys, ``mean`` and ``spread`` channels x quantiles of finite numbers."""
    if not isinstance(intensity, dict):
        raise SpineDiffError(f"{path}: 'intensity' must be an object (or null); {fix}")
    unknown = sorted(set(intensity) - INTENSITY_KEYS)
    missing = sorted({"mean", "spread", "threshold"} - set(intensity))
    if unknown or missing:
        raise SpineDiffError(f"{path}: 'intensity' has unknown key(s) {unknown} or lacks {missing}; {fix}")
    _finite(intensity["threshold"], path, "intensity/threshold", fix)
    shapes = []
    for key in ("mean", "spread"):
        try:
            array = np.asarray(intensity[key], dtype=np.float64)
        except (TypeError, ValueError):
            array = np.full(0, np.nan)
        if array.ndim != 2 or array.shape[1] != len(QUANTILES) or not np.all(np.isfinite(array)):
            raise SpineDiffError(f"{path}: 'intensity/{key}' must be one list of {len(QUANTILES)} finite numbers "
                                 f"per channel; {fix}")
        shapes.append(array.shape)
    if shapes[0] != shapes[1]:
        raise SpineDiffError(f"{path}: 'intensity/mean' and 'intensity/spread' differ in shape; {fix}")


@dataclass(frozen=True)
class ReviewRule:
    score: str
    threshold: float
    expected_volumes_ml: dict[int, float] = field(default_factory=dict)
    chosen: dict = field(default_factory=dict)  # how: rule, cases, failures, the cross-validation it came from
    intensity: dict | None = None  # intensity_reference(...) of the training cases
    numbering_threshold: float | None = None  # flag a level numbering confidence below this
    entropy_threshold: float | None = None  # flag a mean foreground entropy above this (when probabilities are there)
    orientation: str | None = None  # the training scans' :func:`orientation_code`, when they share one

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise SpineDiffError(f"review score {self.score!r} is not one of {', '.join(SCORES)}.")

    @classmethod
    def read(cls, model_folder: str | Path) -> ReviewRule | None:
        """The model's rule, or None when it has none (no flag is then given). The file is read through a schema:
        an object with :data:`REVIEW_KEYS` only, ``score`` and ``threshold`` given, every value of its type."""
        path = Path(model_folder) / REVIEW_FILE
        if not path.exists():
            return None
        data = read_json(path)  # a folder in its place is refused there
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: object, path: str | Path = REVIEW_FILE) -> ReviewRule:
        fix = ("write it again (`spinediff find_best` writes it from the cross-validation) or move it aside to "
               "predict without review flags.")
        if not isinstance(data, dict):
            raise SpineDiffError(f"{path} holds a JSON {type(data).__name__}, not a review rule object; {fix}")
        unknown = sorted(set(data) - REVIEW_KEYS)
        if unknown:
            raise SpineDiffError(f"{path} has unknown key(s) {unknown} (known: {sorted(REVIEW_KEYS)}); {fix}")
        missing = [key for key in ("score", "threshold") if key not in data]
        if missing:
            raise SpineDiffError(f"{path} lacks {missing}: a review rule needs a 'score' (one of "
                                 f"{', '.join(SCORES)}) and its 'threshold'; {fix}")
        if data["score"] not in SCORES:
            raise SpineDiffError(f"{path}: 'score' {data['score']!r} is not one of {', '.join(SCORES)}; {fix}")
        threshold = _finite(data["threshold"], path, "threshold", fix)
        volumes = data.get("expected_volumes_ml", {})
        if not isinstance(volumes, dict):
            raise SpineDiffError(f"{path}: 'expected_volumes_ml' must map labels to volumes in ml; {fix}")
        expected = {}
        for key, value in volumes.items():
            if not str(key).isdigit() or int(key) < 1:
                raise SpineDiffError(f"{path}: 'expected_volumes_ml' key {key!r} is not a label >= 1; {fix}")
            expected[int(key)] = _finite(value, path, f"expected_volumes_ml/{key}", fix, positive=True)
        chosen = data.get("chosen", {})
        if not isinstance(chosen, dict):
            raise SpineDiffError(f"{path}: 'chosen' must be an object; {fix}")
        intensity = data.get("intensity")
        if intensity is not None:
            _check_intensity(intensity, path, fix)
        numbering = data.get("numbering_threshold")
        if numbering is not None:
            numbering = _finite(numbering, path, "numbering_threshold", fix)
            if not 0 <= numbering <= 1:
                raise SpineDiffError(f"{path}: 'numbering_threshold' must be from 0 to 1, got {numbering}; {fix}")
        entropy = data.get("entropy_threshold")
        if entropy is not None:
            entropy = _finite(entropy, path, "entropy_threshold", fix, positive=True)
        orientation = data.get("orientation")
        if orientation is not None and not _valid_orientation(orientation):
            raise SpineDiffError(f"{path}: 'orientation' must be a three-letter orientation code with one of R/L, A/P "
                                 f"and S/I each (e.g. 'LPS'), got {orientation!r}; {fix}")
        return cls(str(data["score"]), threshold, expected, dict(chosen), intensity, numbering, entropy, orientation)

    def write(self, model_folder: str | Path) -> Path:
        path = Path(model_folder) / REVIEW_FILE
        data = {"score": self.score, "threshold": self.threshold,
                "expected_volumes_ml": {str(k): v for k, v in self.expected_volumes_ml.items()},
                "chosen": self.chosen}
        if self.intensity is not None:
            data["intensity"] = self.intensity
        if self.numbering_threshold is not None:
            data["numbering_threshold"] = self.numbering_threshold
        if self.entropy_threshold is not None:
            data["entropy_threshold"] = self.entropy_threshold
        if self.orientation is not None:
            data["orientation"] = self.orientation
        write_json(data, path)
        return path

    def flag(self, scores: dict, intensity: Sequence[Sequence[float]] | None = None,
             numbering: dict | None = None, orientation: str | None = None) -> dict:
        """``{"score", "value", "threshold", "review", "reasons", ...}`` for one case: its case ``scores``, the
        per-channel :func:`intensity_signature` of its input, its level numbering report and the
        :func:`orientation_code` of its grid (``review`` True: open it; ``reasons`` say why)."""
        value = scores.get(self.score)
        if value is None:
            raise SpineDiffError(f"the review rule asks for {self.score!r}, which this prediction did not give "
                                 f"(it gave {', '.join(k for k in scores if k in SCORES)}); predict with more "
                                 "than one sample, or choose another score.")
        flag = {"score": self.score, "value": float(value), "threshold": self.threshold}
        note = ""
        if self.score == "level_anomaly" and self.expected_volumes_ml:
            # the level furthest from its expected volume; the levels the scan's field of view explains (missing
            # beyond an open end, cut at its edge) count only when they are larger than expected
            explained, stats = _view_explained(numbering), _level_stats(scores)
            worst, within = most_anomalous_level(stats, self.expected_volumes_ml, **explained)
            if explained and stats:
                value = within
                flag.update(value=float(value), value_whole_scan=flag["value"], **explained)
            note = self._level_note(stats, worst)
        reasons = []
        if value > self.threshold:
            reasons.append(f"{self.score} {value:.3g} > {self.threshold:.3g}{note}")
        if self.intensity is not None and intensity is not None:
            reference = self.intensity
            if len(intensity) != len(reference["mean"]):
                raise SpineDiffError(f"the review rule's intensity reference has {len(reference['mean'])} channel(s), "
                                     f"the case {len(intensity)}.")
            distance = max(intensity_distance(s, m, sp) for s, m, sp in
                           zip(intensity, reference["mean"], reference["spread"], strict=True))
            flag["intensity_distance"] = round(distance, 4)
            if distance > reference["threshold"]:
                reasons.append(f"intensities out of distribution ({distance:.3g} > {reference['threshold']:.3g} "
                               "training spreads)")
        if orientation is not None:
            flag["orientation"] = orientation
            if self.orientation is not None and orientation != self.orientation:
                reasons.append(f"oriented unlike the training scans (its axes {orientation}, theirs "
                               f"{self.orientation}: nnU-Net does not reorient, so the network saw it turned or "
                               f"mirrored): reorient it to {self.orientation}, e.g. SimpleITK's DICOMOrient(image, "
                               f"'{self.orientation}'), and predict it again")
        if numbering is not None:
            flag["numbering_confidence"] = numbering.get("confidence")
            threshold = NUMBERING_THRESHOLD if self.numbering_threshold is None else self.numbering_threshold
            if numbering.get("confidence", 1.0) < threshold:
                reasons.append(f"level numbering confidence {numbering.get('confidence', 0):.2f} < {threshold:.2g} "
                               f"({numbering.get('basis', '')})")
        entropy = scores.get("entropy")
        if self.entropy_threshold is not None and entropy is not None and self.score != "entropy":
            flag["entropy"] = round(float(entropy), 4)
            if entropy > self.entropy_threshold:
                reasons.append(f"entropy {entropy:.3g} > {self.entropy_threshold:.3g} (less sure than the "
                               "cross-validation's cases)")
        return {**flag, "review": bool(reasons), "reasons": reasons}

    def _level_note(self, stats: dict[int, dict], label: int) -> str:
        """`` (level L missing)`` or `` (level L at 0.4 x its expected volume)`` for a level_anomaly flag: the level
        furthest from its expected volume, which a person should look at first."""
        volume = float(stats.get(label, {}).get("volume_ml", 0.0))
        if volume <= 0:
            return f" (level {label} missing)"
        return f" (level {label} at {volume / self.expected_volumes_ml[label]:.2g} x its expected volume)"


def reads_probabilities(model_folder: str | Path) -> bool:
    """Does the model's review rule flag by the class probabilities' entropy (so that its predictions should be
    saved with them: ``nnUNetv2_predict --save_probabilities``)?"""
    rule = ReviewRule.read(model_folder)
    return rule is not None and rule.entropy_threshold is not None


def _level_stats(scores: dict) -> dict[int, dict]:
    return {int(k): v for k, v in (scores.get("levels") or {}).items()}


def _view_explained(numbering: dict | None) -> dict[str, list[int]]:
    """The levels a level numbering report says the field of view explains (reports written before it said so:
    none)."""
    if not numbering or ("beyond_view" not in numbering and "at_view_edge" not in numbering):
        return {}
    return {"beyond_view": [int(v) for v in numbering.get("beyond_view", [])],
            "at_view_edge": [int(v) for v in numbering.get("at_view_edge", [])]}


def flagged_cases(flags: dict[str, dict]) -> list[str]:
    """The flagged cases of ``{case: flag}``, most doubtful (highest score) first."""
    return [case for case, flag in sorted(flags.items(), key=lambda item: -item[1]["value"]) if flag["review"]]


def review_table(flags: dict[str, dict]) -> str:
    """CSV text of the cases' flags, flagged first, then the most doubtful."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "score", "value", "threshold", "review", "intensity_distance", "numbering_confidence",
                     "entropy", "reasons"])
    for case, flag in sorted(flags.items(), key=lambda item: (not item[1]["review"], -item[1]["value"])):
        writer.writerow([case, flag["score"], f"{flag['value']:.6g}", f"{flag['threshold']:.6g}",
                         "yes" if flag["review"] else "no", _number(flag.get("intensity_distance")),
                         _number(flag.get("numbering_confidence")), _number(flag.get("entropy")),
                         "; ".join(flag.get("reasons", []))])
    return buffer.getvalue()


def _number(value) -> str:
    return "" if value is None else f"{float(value):.4g}"


def write_review_table(flags: dict[str, dict], path: str | Path) -> Path:
    """Write :func:`review_table` to ``path`` (``OUTPUT/review.csv``)."""
    write_text(review_table(flags), path)
    return Path(path)


def read_review_table(path: str | Path) -> dict[str, dict]:
    """Each case's ``review`` (bool) and ``reasons`` from a ``review.csv`` that :func:`write_review_table` wrote;
    {} when there is none."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {row["case"]: {"review": row["review"] == "yes", "reasons": [r for r in row["reasons"].split("; ") if r]}
            for row in rows}


# ---------------------------------------------------------------------- the rule written by the cross-validation
def _image_files(raw_dataset: Path, case: str) -> list[Path]:
    dataset_json = read_json(raw_dataset / "dataset.json")
    ending = dataset_json.get("file_ending", ".nii.gz")
    return [raw_dataset / "imagesTr" / f"{case}_{int(c):04d}{ending}" for c in sorted(dataset_json["channel_names"],
                                                                                    key=int)]


def rule_from_cross_validation(pairs: Sequence[tuple[Path, Path]], labels: Sequence[int],
                               raw_dataset: Path | None) -> ReviewRule:
    """The default rule of a model from its cross-validation ``(prediction, reference)`` files: expected level
    volumes and their threshold from the references, the intensity reference from the cases' raw images (when
    ``raw_dataset`` is there), the numbering threshold :data:`NUMBERING_THRESHOLD`, and the entropy threshold from
    the cases' class probabilities (``CASE.npz`` beside the predictions, when at least two have one)."""
    import SimpleITK as sitk

    labels = [int(v) for v in labels if int(v) > 0]
    maps, spacings, signatures, missing, orientations = [], [], [], [], set()
    for _, reference in pairs:
        image = sitk.ReadImage(str(reference))
        maps.append(sitk.GetArrayFromImage(image))
        spacings.append(image.GetSpacing())
        if raw_dataset is not None:
            case = reference.name.split(".")[0]
            files = _image_files(raw_dataset, case)
            if all(f.is_file() for f in files):
                images = [sitk.ReadImage(str(f)) for f in files]
                signatures.append([intensity_signature(sitk.GetArrayFromImage(image)) for image in images])
                orientations.add(orientation_code(images[0].GetDirection()))
            else:
                missing.append(case)
    volumes = expected_volumes(maps, spacings, labels)
    deviations = [abs(math.log(float((m == label).sum()) * float(np.prod(s)) / 1000.0 / volumes[label]))
                  for m, s in zip(maps, spacings, strict=True) for label in volumes if (m == label).any()]
    threshold = max(MIN_VOLUME_THRESHOLD, VOLUME_MARGIN * max(deviations, default=0.0))
    intensity = intensity_reference(signatures) if len(signatures) >= 2 else None
    entropies = _cross_validation_entropies([prediction for prediction, _ in pairs], labels)
    entropy_threshold = round(ENTROPY_MARGIN * max(entropies), 4) if len(entropies) >= 2 else None
    chosen = {"rule": "written by the cross-validation: level volumes beyond the training spread (level_anomaly), "
                      "intensities out of the training distribution, or a level numbering of low confidence",
              "cases": len(pairs), "volume_threshold_from": "1.5 x the largest training |log(volume/median)|, "
                                                            "at least log 2",
              "intensity_reference": "none (raw images not found)" if intensity is None else
              f"{len(signatures)} training case(s)"}
    orientations.discard(None)  # 2D images have no orientation code
    orientation = next(iter(orientations)) if len(orientations) == 1 else None
    if orientation is not None:
        chosen["orientation_from"] = f"{len(signatures)} training case(s), all {orientation}"
    elif orientations:
        chosen["orientation_from"] = f"none (training scans in several orientations: {', '.join(sorted(orientations))})"
    else:
        chosen["orientation_from"] = NO_RAW_ORIENTATION
    if missing:
        chosen["cases_without_images"] = missing
    chosen["entropy_threshold_from"] = (f"1.5 x the largest mean foreground entropy of {len(entropies)} "
                                        "cross-validation case(s)" if entropy_threshold is not None else
                                        "none (the cross-validation saved no class probabilities)")
    return ReviewRule("level_anomaly", round(float(threshold), 4), volumes, chosen, intensity, NUMBERING_THRESHOLD,
                      entropy_threshold, orientation)


def _cross_validation_entropies(predictions: Sequence[Path], labels: Sequence[int]) -> list[float]:
    """The mean foreground entropy of each cross-validation prediction with its class probabilities beside it
    (``CASE.npz``, as nnU-Net's validation writes them with ``--npz``)."""
    from spinediff.inference.postprocessing import load_probabilities
    from spinediff.metrics.case_uncertainty import case_scores

    values = []
    for prediction in predictions:
        npz = Path(prediction).with_name(Path(prediction).name.split(".")[0] + ".npz")
        if npz.is_file():
            probabilities = load_probabilities(npz)
            values.append(float(case_scores(probabilities, (1.0, 1.0, 1.0), labels)["entropy"]))
    return values


def write_cross_validation_rule(model_folder: Path, pairs: Sequence[tuple[Path, Path]], labels: Sequence[int],
                                raw_dataset: Path | None) -> ReviewRule:
    """Write (or complete) ``model_folder/review.json``: a rule calibrated before (e.g. an uncertainty score chosen
    on the failures of the cross-validation) keeps its score and threshold and gains what it lacks. The training
    scans' orientation is a fact of the data, not a calibration: it is taken afresh whenever their raw images were
    read (a dataset reoriented since is then checked as it is now)."""
    rule = fresh = rule_from_cross_validation(pairs, labels, raw_dataset)
    existing = ReviewRule.read(model_folder)
    if existing is not None:
        rule = replace(existing, expected_volumes_ml=existing.expected_volumes_ml or rule.expected_volumes_ml,
                       intensity=existing.intensity or rule.intensity,
                       numbering_threshold=existing.numbering_threshold if existing.numbering_threshold is not None
                       else rule.numbering_threshold,
                       entropy_threshold=existing.entropy_threshold if existing.entropy_threshold is not None
                       else rule.entropy_threshold,
                       chosen=existing.chosen if existing.entropy_threshold is not None else
                       {**existing.chosen, "entropy_threshold_from": rule.chosen["entropy_threshold_from"]})
        if fresh.chosen["orientation_from"] != NO_RAW_ORIENTATION:  # the raw images were read: their orientation now
            rule = replace(rule, orientation=fresh.orientation,
                           chosen={**rule.chosen, "orientation_from": fresh.chosen["orientation_from"]})
    rule.write(model_folder)
    return rule
