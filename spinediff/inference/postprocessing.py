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
from spinediff.inference.level_order import LevelOrder, label_centroids, learn_order, renumber
from spinediff.io import read_json, write_json

POSTPROCESSING_FILE = "postprocessing.json"


@dataclass
class Postprocessing:
    """What to apply to a segmentation after prediction (None: nothing)."""

    level_order: LevelOrder | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.level_order is not None

    def apply(self, segmentation: np.ndarray, geometry) -> np.ndarray:
        """``segmentation`` (array on the grid of the SimpleITK image ``geometry``) post-processed."""
        if self.level_order is None:
            return segmentation
        return renumber(np.asarray(segmentation), geometry, self.level_order)

    def to_dict(self) -> dict[str, Any]:
        return {"level_order": self.level_order.to_dict() if self.level_order else None, **self.evidence}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Postprocessing:
        order = data.get("level_order")
        return cls(LevelOrder.from_dict(order) if order else None,
                   {k: v for k, v in data.items() if k != "level_order"})

    @classmethod
    def load(cls, model_folder: str | os.PathLike) -> Postprocessing:
        """The model folder's decision; nothing to apply if it has none."""
        path = Path(model_folder) / POSTPROCESSING_FILE
        if not path.is_file():
            return cls()
        return cls.from_dict(read_json(path))


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


def determine_postprocessing(pairs: Sequence[tuple[Path, Path]], labels: Sequence[int], output: Path | None = None
                             ) -> tuple[Postprocessing, dict[str, dict[str, dict]]]:
    """Learn the level order from the references of (prediction, reference) file pairs (the cross-validation),
    try it on the predictions, keep it if the mean Dice rises. Returns the decision and the per-case Dice
    ``{"before"|"after": case → label → Dice}``; writes ``output`` (JSON) when given."""
    from spinediff.inference.find_best import pooled_foreground_dice
    from spinediff.inference.find_best_ensemble import case_dice

    if not pairs:
        raise SpineDiffError("No cross-validation predictions to decide the post-processing on.")
    labels = [int(v) for v in labels if int(v) > 0]
    references = [_read(reference) for _, reference in pairs]
    order = learn_order([label_centroids(image, array, labels) for image, array in references])
    before: dict[str, dict] = {}
    after: dict[str, dict] = {}
    for (prediction, _), (_, truth) in zip(pairs, references, strict=True):
        image, predicted = _read(prediction)
        if predicted.shape != truth.shape:
            raise SpineDiffError(f"{prediction} has shape {predicted.shape}, its reference {truth.shape}.")
        before[prediction.name] = case_dice(predicted, truth, labels)
        changed = renumber(predicted, image, order) if order else predicted
        after[prediction.name] = case_dice(changed, truth, labels)
    dice_before = pooled_foreground_dice(list(before.values()))
    dice_after = pooled_foreground_dice(list(after.values()))
    keep = order is not None and not math.isnan(dice_after) and dice_after > dice_before
    evidence = {"candidate": "level numbering (spinediff.inference.level_order)",
                "learnt_order": order.to_dict() if order else None, "cases": len(pairs),
                "dice_before": dice_before, "dice_after": dice_after, "applied": bool(keep),
                "rule": "kept only if the mean Dice over labels and cross-validation cases rises"}
    decision = Postprocessing(order if keep else None, evidence)
    if output is not None:
        write_json(decision.to_dict(), output)
    return decision, {"before": before, "after": after}


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
