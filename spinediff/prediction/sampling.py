"""``SamplingSettings``: how a trained model samples, resolved once and passed whole.

Three sources, later ones win: the plans' diffusion block the model was trained with (``DiffusionSettings``), the
model folder's ``sampling.json`` (chosen on the cross-validation by ``spinediff tune_sampling``; only when no flag
names the solver, the steps or the warm start) and the flags of the run. :func:`resolve_sampling` is the one place
that combines them, for ``spinediff predict``, ``tune_sampling`` and the trainers' final validation alike, so the
cross-validation samples as ``spinediff predict`` does with the same settings.

The warm start has two states once resolved: ``None`` (sampling starts from pure noise) or a fraction in (0, 1).
A flag of ``0`` turns a planned warm start off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from spinediff.diffusion.settings import DiffusionSettings
from spinediff.diffusion.solvers import check_solver
from spinediff.errors import SpineDiffError
from spinediff.utilities.device import PRECISIONS


@dataclass(frozen=True)
class SamplingRequest:
    """What a run asks for (the flags of ``spinediff predict``, keywords of ``spinediff.predict``); ``None`` takes the
    model's value. ``tuned_sampling`` False ignores the model folder's ``sampling.json``."""

    num_samples: int | None = None
    num_inference_steps: int | None = None
    eta: float | None = None
    solver: str | None = None
    warm_start: float | None = None  # 0: no warm start even if the plans have one
    precision: str = "auto"
    tta: bool | None = None  # None: on for a GPU, off on the CPU
    tuned_sampling: bool = True

    @property
    def names_sampling(self) -> bool:
        """True when the solver, the steps or the warm start is given (then sampling.json is not read)."""
        return (self.solver, self.num_inference_steps, self.warm_start) != (None, None, None)

    @classmethod
    def from_keywords(cls, request: SamplingRequest | None = None, **keywords: Any) -> SamplingRequest:
        """The one builder from keywords (``spinediff.predict(..., num_samples=3, solver="ddim")``), on top of
        ``request``; an unknown keyword is a TypeError naming the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise TypeError(f"unknown sampling keyword(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(request or cls(), **{k: v for k, v in keywords.items() if v is not None})


@dataclass(frozen=True)
class SamplingSettings:
    """Fully resolved sampling of one run (no ``None`` meaning "the model's"; ``warm_start`` None is "off").

    ``tta``: mirroring test-time augmentation over the model's allowed axes (2^axes network calls per window and
    step). ``precision``: the network's autocast type (:mod:`spinediff.utilities.precision`). ``source``: where the
    solver, steps and warm start came from (``plans``, ``command line``, a ``sampling.json`` path, ...).
    """

    solver: str
    num_inference_steps: int
    num_samples: int
    eta: float
    warm_start: float | None
    precision: str = "auto"
    tta: bool = False
    source: str = "plans"

    def to_dict(self) -> dict[str, Any]:
        """The record written to prediction.json and validation_metrics.json (the same field names)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SamplingSettings:
        return dataclasses.replace(self, **changes)


def resolve_sampling(plans: DiffusionSettings, request: SamplingRequest | None = None, *, tuned: Any = None,
                     tuned_source: str = "sampling.json", device: torch.device | str = "cpu", denoising: bool = True,
                     plans_source: str = "plans") -> SamplingSettings:
    """Plans ← ``tuned`` (a ``sampling.json`` choice with ``solver``, ``num_inference_steps`` and ``warm_start``, read
    from ``tuned_source``; used only when the request names none of them) ← ``request``, checked; the one builder of
    :class:`SamplingSettings`. A one-step model (``denoising`` False) draws one member."""
    request = request or SamplingRequest()
    total = plans.num_train_timesteps
    if request.num_samples is not None and int(request.num_samples) < 1:
        raise SpineDiffError(f"--samples must be at least 1, got {request.num_samples}.")
    if request.num_inference_steps is not None and not 1 <= int(request.num_inference_steps) <= total:
        raise SpineDiffError(f"--steps must be in [1, {total}], got {request.num_inference_steps}.")
    if request.eta is not None and not 0 <= request.eta <= 1:
        raise SpineDiffError(f"--eta must be in [0, 1], got {request.eta}.")
    if request.warm_start is not None and not 0 <= request.warm_start < 1:
        raise SpineDiffError(f"--warm-start must be in [0, 1) (0: from pure noise), got {request.warm_start}.")
    precision = request.precision or "auto"
    if precision not in PRECISIONS:
        raise SpineDiffError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    solver, steps, warm_start, source = request.solver, request.num_inference_steps, request.warm_start, plans_source
    if request.names_sampling:
        source = "command line"
    elif tuned is not None and request.tuned_sampling:
        solver, steps = tuned.solver, tuned.num_inference_steps
        warm_start, source = tuned.warm_start or 0.0, str(tuned_source)
    check_solver(solver or plans.solver, plans.noise_schedule, total, steps, option="--solver")
    device = torch.device(device)
    return SamplingSettings(
        solver=solver or plans.solver,
        num_inference_steps=int(steps or plans.num_inference_steps),
        num_samples=int(request.num_samples or plans.num_samples) if denoising else 1,
        eta=float(plans.eta if request.eta is None else request.eta),
        warm_start=plans.warm_start if warm_start is None else (float(warm_start) or None),
        precision=precision,
        tta=device.type != "cpu" if request.tta is None else bool(request.tta),
        source=source)
