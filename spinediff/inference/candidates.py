"""A trained model as a candidate of ``find_best``, and how candidates' cross-validation scores compare."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spinediff.metrics.direction import higher_is_better
from spinediff.metrics.segmentation_metrics import pooled_foreground_dice
from spinediff.tasks import Task
from spinediff.training.registry import is_spinediff_trainer


@dataclass
class Candidate:
    """One trained ``TRAINER__PLANS__CONFIG`` with its pooled cross-validation results."""

    folder: Path
    trainer: str
    plans: str
    configuration: str
    folds: list[str]
    per_case: dict[str, dict] = field(default_factory=dict)  # case file → metrics (segmentation: class → Dice)
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def is_spinediff(self) -> bool:
        return is_spinediff_trainer(self.trainer)


def primary_metric(task: Task, candidates: Sequence[Candidate]) -> str:
    if task.writes_labels:
        return "dice"
    has_body = all(all("mae_body" in m for m in c.per_case.values()) for c in candidates)
    return "mae_body" if has_body else "psnr"


def score(per_case: dict[str, dict], task: Task) -> dict[str, float]:
    """Pooled scores of per-case metrics (segmentation: foreground Dice; images: mean of each metric)."""
    if task.writes_labels:
        return {"dice": pooled_foreground_dice(list(per_case.values()))}
    names = sorted({m for metrics in per_case.values() for m in metrics})
    return {m: float(np.nanmean([metrics.get(m, np.nan) for metrics in per_case.values()])) for m in names}


def better(a: float, b: float, metric: str) -> bool:
    """Is score ``a`` better than ``b``? NaN is never better."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if higher_is_better(metric) else a < b
