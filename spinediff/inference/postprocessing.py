"""Post-processing chosen by cross-validation, as nnU-Net chooses its own (``postprocessing.json``).

nnU-Net's ``find_best_configuration`` tries removing all but the largest component and keeps it only if
the cross-validation Dice improves. spinediff's candidate is the level numbering of
:mod:`spinediff.inference.level_order` (labels with an order in space, such as L1..L5): learnt from the
reference labels, tried on every cross-validation prediction, kept only if the mean Dice over labels
and cases rises. ``spinediff find_best`` writes the decision next to the model
(``TRAINER__PLANS__CONFIG/postprocessing.json``) and ``spinediff predict`` applies it
(``--no-postprocessing`` to skip).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spinediff.errors import SpineDiffError
from spinediff.inference.level_order import LevelOrder, label_centroids, learn_order, renumber_with_report
from spinediff.io import read_json, write_json
from spinediff.metrics.segmentation_metrics import case_dice, pooled_foreground_dice
from spinediff.paths import POSTPROCESSING_FILE

#: How the foreground is formed before the numbering: each voxel's most likely label, or (with class
#: probabilities) the ordered labels taken together, so that a vertebra whose level the network is unsure of
#: (probability split between L4 and L5) is not lost to the background.
FOREGROUNDS = ("argmax", "probabilities")


#: The keys of a postprocessing.json: the decision, then the evidence written by :func:`decide_postprocessing`.
POSTPROCESSING_KEYS = frozenset({"level_order", "foreground", "channel_labels", "candidate", "learnt_order", "cases",
                                 "dice_before", "dice_after", "dice_per_variant", "applied", "rule"})


@dataclass
class Postprocessing:
    """What to apply to a segmentation after prediction (no level order: nothing)."""

    level_order: LevelOrder | None = None
    foreground: str = "argmax"
    channel_labels: tuple[int, ...] | None = None  # label of each probability channel (None: channel i = label i)
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.level_order is not None

    @property
    def needs_probabilities(self) -> bool:
        return self.active and self.foreground == "probabilities"

    def apply(self, segmentation: np.ndarray, geometry, probabilities: np.ndarray | None = None) -> np.ndarray:
        """``segmentation`` (array on the grid of the SimpleITK image ``geometry``) post-processed;
        ``probabilities`` (classes first, channel i = label i) when the decision needs them."""
        return self.apply_with_report(segmentation, geometry, probabilities)[0]

    def apply_with_report(self, segmentation: np.ndarray, geometry, probabilities: np.ndarray | None = None,
                          content_box: list | None = None) -> tuple[np.ndarray, dict[str, Any] | None]:
        """:meth:`apply` and the level numbering's report (vertebrae found, levels missing and at which end of the
        field of view, whether the numbering was changed, its ``confidence``; None without a level order).
        ``content_box``: the part of the grid that holds image data (:func:`image_content_box`), so that planes of
        zeros padded around the scan do not count as field of view."""
        if self.level_order is None:
            return segmentation, None
        if self.needs_probabilities:
            if probabilities is None:
                raise SpineDiffError("This model's post-processing forms the foreground from class probabilities; "
                                     "predict with probabilities (nnUNetv2_predict --save_probabilities).")
            segmentation = grouped_argmax(probabilities, self.level_order.labels, self.channel_labels)
        return renumber_with_report(np.asarray(segmentation), geometry, self.level_order, content_box)

    def apply_to_answer(self, segmentation: np.ndarray, geometry, probabilities: np.ndarray,
                        content_box: list | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
        """:meth:`apply_with_report` for an answer with its class probabilities ``(C, *shape)``, and probabilities
        that agree with the post-processed labels (:func:`renumbered_probabilities`; unchanged where the numbering
        changed no voxel), so that a model that refines the answer (``DiffusionRefinementTrainer``) starts from the
        numbering the post-processing chose rather than the network's."""
        numbered, report = self.apply_with_report(segmentation, geometry, probabilities, content_box)
        if self.level_order is None:
            return numbered, probabilities, report
        before = (grouped_argmax(probabilities, self.level_order.labels, self.channel_labels)
                  if self.needs_probabilities else np.asarray(segmentation))
        if np.array_equal(np.asarray(numbered), before):
            return numbered, probabilities, report
        return numbered, renumbered_probabilities(probabilities, numbered, self.level_order.labels,
                                                  self.channel_labels, geometry.GetSpacing()[::-1]), report

    def to_dict(self) -> dict[str, Any]:
        return {"level_order": self.level_order.to_dict() if self.level_order else None,
                "foreground": self.foreground,
                "channel_labels": list(self.channel_labels) if self.channel_labels else None, **self.evidence}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = POSTPROCESSING_FILE) -> Postprocessing:
        """The decision of a ``postprocessing.json`` (``source`` names it in errors): an object with
        ``level_order`` (null or {labels, direction}), optionally ``foreground`` and ``channel_labels``, and the
        evidence keys :func:`decide_postprocessing` writes; anything else is refused."""
        fix = "run `spinediff find_best` again to rewrite it (or move it aside to predict without post-processing)."
        if not isinstance(data, dict):
            raise SpineDiffError(f"{source} holds a JSON {type(data).__name__}, not an object with 'level_order'; "
                                 f"{fix}")
        unknown = sorted(set(data) - POSTPROCESSING_KEYS)
        if unknown:
            raise SpineDiffError(f"{source} has unknown key(s) {unknown} (known: {sorted(POSTPROCESSING_KEYS)}); {fix}")
        if "level_order" not in data:
            raise SpineDiffError(f"{source} lacks 'level_order' (null when nothing is applied); {fix}")
        order = data["level_order"]
        foreground = data.get("foreground", "argmax")
        if foreground not in FOREGROUNDS:
            raise SpineDiffError(f"{source}: unknown post-processing foreground {foreground!r} (expected one of "
                                 f"{FOREGROUNDS}); {fix}")
        channels = data.get("channel_labels")
        try:
            level_order = LevelOrder.from_dict(order) if order else None
            channel_labels = tuple(int(c) for c in channels) if channels else None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SpineDiffError(f"{source}: 'level_order' or 'channel_labels' is malformed ({type(exc).__name__}: "
                                 f"{exc}); level_order must be null or an object with 'labels' and a 3-number "
                                 f"'direction'; {fix}") from None
        if level_order is not None and len(level_order.direction) != 3:
            raise SpineDiffError(f"{source}: level_order.direction must hold 3 numbers; {fix}")
        return cls(level_order, foreground, channel_labels,
                   {k: v for k, v in data.items() if k not in ("level_order", "foreground", "channel_labels")})

    @classmethod
    def load(cls, model_folder: str | os.PathLike) -> Postprocessing:
        """The model folder's decision; nothing to apply if it has none."""
        path = Path(model_folder) / POSTPROCESSING_FILE
        if not path.exists():
            return cls()
        return cls.from_dict(read_json(path), source=str(path))


def grouped_argmax(probabilities: np.ndarray, group: Sequence[int], channel_labels: Sequence[int] | None = None
                   ) -> np.ndarray:
    """Label map in which the labels of ``group`` compete with the others as one class (their summed
    probability); a voxel won by the group gets the group's most likely label. ``channel_labels``: the label
    of each probability channel (nnU-Net orders them by value; None: channel i is label i)."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    channel_labels = np.asarray(channel_labels if channel_labels is not None else range(probabilities.shape[0]))
    if len(channel_labels) != probabilities.shape[0]:
        raise SpineDiffError(f"The probabilities have {probabilities.shape[0]} channels, the model "
                             f"{len(channel_labels)} labels: they belong to another model.")
    inside = np.isin(channel_labels, list(group))
    summed = probabilities[inside].sum(axis=0)
    best_other = channel_labels[~inside][np.argmax(probabilities[~inside], axis=0)]
    best_in_group = channel_labels[inside][np.argmax(probabilities[inside], axis=0)]
    won = summed > np.max(probabilities[~inside], axis=0)
    return np.where(won, best_in_group, best_other).astype(np.int32)


def renumbered_probabilities(probabilities: np.ndarray, numbered: np.ndarray, group: Sequence[int],
                             channel_labels: Sequence[int] | None = None, spacing: Sequence[float] | None = None
                             ) -> np.ndarray:
    """Class probabilities ``(C, *shape)`` made to agree with the label map ``numbered`` (the level numbering's
    output): in every voxel the summed probability of the ``group`` labels (L1..L5 taken together) is kept and given
    to one of them, the voxel's label in ``numbered`` where it has one of the group, else the label of the nearest
    voxel that has (distances in mm with ``spacing``, the array's axis order); a vertebra the numbering removed
    (its label set to background) gives its share to background. The other channels are left as they are, so the
    probability of "a vertebra here" is the network's and only its level is the numbering's."""
    from scipy import ndimage

    values = np.array(probabilities, dtype=np.float32, copy=True)
    channel_labels = np.asarray(channel_labels if channel_labels is not None else range(values.shape[0]))
    if len(channel_labels) != values.shape[0]:
        raise SpineDiffError(f"The probabilities have {values.shape[0]} channels, the model {len(channel_labels)} "
                             "labels: they belong to another model.")
    numbered = np.asarray(numbered)
    if numbered.shape != values.shape[1:]:
        raise SpineDiffError(f"The label map {numbered.shape} and the probabilities {values.shape[1:]} lie on "
                             "different grids.")
    channel_of = {int(label): index for index, label in enumerate(channel_labels)}
    background = channel_of.get(0, 0)
    inside = np.isin(channel_labels, list(group))
    summed = values[inside].sum(axis=0)
    values[inside] = 0.0
    level = np.isin(numbered, list(group))
    if not level.any():  # every vertebra removed: their share goes to background
        values[background] += summed
        return values
    _, nearest = ndimage.distance_transform_edt(~level, sampling=spacing, return_indices=True)
    target = numbered[tuple(nearest)]  # each voxel's label of the group: its own, else the nearest numbered one's
    removed = (numbered == 0) & (summed > 0.5)  # a vertebra voxel the numbering set to background
    target[removed] = 0
    for label in group:
        if int(label) in channel_of:
            where = target == label
            values[channel_of[int(label)]][where] = summed[where]
    values[background][removed] += summed[removed]
    return values


def load_probabilities(path: Path) -> np.ndarray:
    """Class probabilities of a ``CASE.npz`` written by nnU-Net or spinediff (no pickles: cannot run code)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["probabilities"]
    except (OSError, ValueError, KeyError) as error:
        raise SpineDiffError(f"{path} is not a readable probabilities file ({error}). Predict again with "
                             "probabilities.") from error


def image_content_box(channels: Sequence[np.ndarray]) -> list[list[int]] | None:
    """The part of the grid that holds image data: nnU-Net's bounding box of the nonzero voxels of all channels
    (``create_nonzero_mask``, ``get_bbox_from_mask``: the crop its preprocessing makes, ``bbox_used_for_cropping``),
    ``[[start, end), ...]`` per array axis; None for an empty image."""
    from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
    from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

    mask = create_nonzero_mask(np.stack([np.asarray(c) for c in channels]))
    if not mask.any():
        return None
    return [[int(a), int(b)] for a, b in get_bbox_from_mask(mask)]


def geometry_like(spacing, origin, direction):
    """A SimpleITK image that carries only a grid's geometry (for world coordinates of array indices)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.zeros((1, 1, 1), np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in direction))
    return image


def _read(path: Path):
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise SpineDiffError(f"Cannot read {path}: {error}. Re-run the fold's validation.") from error
    return image, sitk.GetArrayFromImage(image)


def determine_postprocessing(pairs: Sequence[tuple[Path, Path]], labels: Sequence[int], output: Path | None = None,
                             ignore: int | None = None) -> tuple[Postprocessing, dict[str, dict[str, dict]]]:
    """Learn the level order from the references of (prediction, reference) file pairs (the cross-validation)
    and try the numbering on the predictions: on their label maps, and, where every prediction has its class
    probabilities beside it (``CASE.npz``), on the foreground of the ordered labels taken together. The best
    variant is kept if it raises the pooled Dice. Returns the decision and the per-case Dice
    ``{"before"|"argmax"|"probabilities": case → label → Dice}``; writes ``output`` (JSON) when given. ``ignore``:
    nnU-Net's ignore label of the references (not among ``labels``), left out of every Dice."""
    if not pairs:
        raise SpineDiffError("No cross-validation predictions to decide the post-processing on.")
    labels = [int(v) for v in labels if int(v) > 0]
    channels = tuple([0, *sorted(labels)])
    references = [_read(reference) for _, reference in pairs]
    order = learn_order([label_centroids(image, array, labels) for image, array in references])
    with_probabilities = all(_probabilities_file(prediction).is_file() for prediction, _ in pairs)
    variants = ["argmax", "probabilities"] if with_probabilities else ["argmax"]
    dice: dict[str, dict] = {"before": {}, **{v: {} for v in variants}}
    for (prediction, _), (_, truth) in zip(pairs, references, strict=True):
        image, predicted = _read(prediction)
        if predicted.shape != truth.shape:
            raise SpineDiffError(f"{prediction} has shape {predicted.shape}, its reference {truth.shape}.")
        dice["before"][prediction.name] = case_dice(predicted, truth, labels, ignore)
        for variant in variants:
            changed = predicted
            if order is not None:
                probabilities = load_probabilities(_probabilities_file(prediction)) \
                    if variant == "probabilities" else None
                changed = Postprocessing(order, variant, channels).apply(predicted, image, probabilities)
            dice[variant][prediction.name] = case_dice(changed, truth, labels, ignore)
    scores = {name: pooled_foreground_dice(list(per_case.values())) for name, per_case in dice.items()}
    best = max(variants, key=lambda v: -np.inf if math.isnan(scores[v]) else scores[v])
    keep = order is not None and not math.isnan(scores[best]) and scores[best] > scores["before"]
    evidence = {"candidate": "level numbering (spinediff.inference.level_order)",
                "learnt_order": order.to_dict() if order else None, "cases": len(pairs),
                "dice_before": scores["before"], "dice_after": scores[best] if keep else scores["before"],
                "dice_per_variant": {v: scores[v] for v in variants}, "applied": bool(keep),
                "rule": "kept only if the mean Dice over labels and cross-validation cases rises"}
    decision = Postprocessing(order if keep else None, best if keep else "argmax", channels, evidence)
    if output is not None:
        write_json(decision.to_dict(), output)
    dice["after"] = dice[best] if keep else dice["before"]
    return decision, dice


def _probabilities_file(prediction: Path) -> Path:
    name = prediction.name
    for ending in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ending):
            return prediction.with_name(name[: -len(ending)] + ".npz")
    return prediction.with_suffix(".npz")


def write_decision(evidence: dict[str, Any], model_folder: Path, overwrite: bool = False) -> bool:
    """Write a decision next to its model (``postprocessing.json``, where ``spinediff predict`` finds it).
    Returns False, writing nothing, when another decision is there and ``overwrite`` is not set."""
    import json

    target = model_folder / POSTPROCESSING_FILE
    if target.is_file() and not overwrite:
        if json.dumps(read_json(target), sort_keys=True) != json.dumps(evidence, sort_keys=True):
            return False
    write_json(evidence, target)
    return True


def validation_pairs(model_folder: Path, folds: Sequence[str], raw_dataset: Path | None = None
                     ) -> list[tuple[Path, Path]]:
    """(prediction, reference) of every validation case of ``folds`` (references from each fold's
    ``validation/summary.json``, or ``labelsTr`` of ``raw_dataset`` where that file has moved)."""
    pairs = []
    for fold in folds:
        summary = model_folder / f"fold_{fold}" / "validation" / "summary.json"
        if not summary.is_file():
            raise SpineDiffError(f"{summary} is missing: fold {fold} has no finished validation. Run "
                                 "`spinediff train ... --val-only` for it first.")
        for entry in read_json(summary)["metric_per_case"]:
            prediction, reference = Path(entry["prediction_file"]), Path(entry["reference_file"])
            if not prediction.is_file():
                prediction = summary.parent / prediction.name
            if not reference.is_file() and raw_dataset is not None:
                reference = raw_dataset / "labelsTr" / reference.name
            for path in (prediction, reference):
                if not path.is_file():
                    raise SpineDiffError(f"{path} (a validation case of fold {fold} of {model_folder.name}) is "
                                         "missing.")
            pairs.append((prediction, reference))
    return pairs
