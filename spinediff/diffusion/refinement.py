"""Refinement of a given answer (SpineSegDiff's presegmentation start; SDEdit-like for images): the initial estimate
is noised to ``refine_from`` x (T - 1) and denoised in a few solver steps below that level.

``refine_from`` 0 returns the initial estimate itself (no network call); near 1 the answer is nearly erased and the
model samples as from pure noise. Every member of the ensemble starts from the same estimate with its own noise, so
the samples spread where the model doubts the answer.

:class:`StepCombination` forms SpineSegDiff's combination of the samples (``LumbarSpineSegDiffInference.forward``,
``pred_type="ddim_sample"``, and the paper's Fig. 1): the members' x0 estimates of the last ``Ts`` steps (Ts = 10
of the paper) are averaged over members per step, and the steps are summed with weights
``w_t = exp(-alpha (Ts - t + 1) / Ts)``, alpha = Ts // 2, growing towards the last step; the uncertainty map is
the maximum over those steps of the entropy of the members' mean estimate (their ``maximum_entropy_aggregation``).
They take ``sigmoid`` per channel of unnormalised weighted sums and threshold at 0.5; here the estimates are class
probabilities (softmax, ``project_x0``), the weights are normalised to sum 1 and the entropy is the Shannon
entropy of the mean class probabilities (nats), so that the result is a probability map again.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image

from spinediff.diffusion.sampler import SlidingWindowSampler
from spinediff.errors import SpineDiffError

#: SpineSegDiff's steps whose estimates are combined (Ts) and its sample count (S, ``-e 15``).
SPINESEGDIFF_LAST_STEPS = 10
SPINESEGDIFF_SAMPLES = 15
COMBINATIONS = ("mean", "spinesegdiff")


def check_fraction(fraction: float, name: str = "--init-noise") -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise SpineDiffError(f"{name} must be a fraction of the schedule in [0, 1), got {fraction!r}.")
    return float(fraction)


def _scheduled_timesteps(sampler: SlidingWindowSampler, steps: int) -> list[int]:
    solver = sampler.solver
    if isinstance(solver, str):  # a sampler that keeps a monai/diffusers scheduler and the solver's name
        sampler._set_timesteps(steps)
        return [int(t) for t in sampler.scheduler.timesteps]
    solver.set_timesteps(steps, sampler.device)
    return [int(t) for t in solver.timesteps]


def schedule_below(sampler: SlidingWindowSampler, fraction: float, num_inference_steps: int) -> tuple[int, int]:
    """The start timestep ``fraction`` x (T - 1) and the length of the solver's schedule that has
    ``num_inference_steps`` timesteps at or below it (so that the refinement takes exactly that many steps)."""
    total = sampler.process.num_train_timesteps
    start = int(round(fraction * (total - 1)))
    scheduled = num_inference_steps
    while scheduled < total - 1:
        if sum(t <= start for t in _scheduled_timesteps(sampler, scheduled)) >= num_inference_steps:
            break
        scheduled += 1
    return start, scheduled


class _WatchedProcess:
    """The sampler's diffusion process, reporting every projected x0 estimate ``(members, C, *padded)`` (one call per
    solver step and group of members) to ``on_x0``; everything else is the process itself."""

    def __init__(self, process, on_x0: Callable[[torch.Tensor], None]) -> None:
        self._process, self._on_x0 = process, on_x0

    def __getattr__(self, name: str):
        return getattr(self._process, name)

    def project_x0(self, x0: torch.Tensor) -> torch.Tensor:
        projected = self._process.project_x0(x0)
        self._on_x0(projected)
        return projected


class StepCombination:
    """SpineSegDiff's weighting of the last steps' estimates and their maximum entropy (module docstring).

    Called by :func:`refine` once per solver step and group of members with the step's index and the members' x0
    estimates ``(members, C, *spatial)`` (class probabilities as ``2 p - 1``); :meth:`result` combines the last
    ``last_steps`` steps (all of them when there are fewer).
    """

    def __init__(self, last_steps: int = SPINESEGDIFF_LAST_STEPS) -> None:
        self.last_steps = int(last_steps)
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def __call__(self, index: int, x0: torch.Tensor) -> None:
        probabilities = ((x0.float().cpu() + 1) / 2).clamp_min(0)
        self.sums[index] = self.sums.get(index, 0) + probabilities.sum(0)
        self.counts[index] = self.counts.get(index, 0) + x0.shape[0]

    def weights(self, count: int) -> list[float]:
        """``exp(-alpha (Ts - t + 1) / Ts)``, alpha = Ts // 2, t = 0..Ts-1 (SpineSegDiff), normalised to sum 1."""
        alpha = count // 2
        raw = [math.exp(-alpha * (count - t + 1) / count) for t in range(count)]
        return [w / sum(raw) for w in raw]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The combined estimate ``(C, *spatial)`` in [-1, 1] and the max-entropy map ``(*spatial)`` (nats)."""
        if not self.sums:
            raise SpineDiffError("the combination saw no step")
        steps = sorted(self.sums)[-self.last_steps:]
        combined, entropy = 0, None
        for weight, index in zip(self.weights(len(steps)), steps, strict=True):
            mean = self.sums[index] / self.counts[index]
            mean = mean / mean.sum(0, keepdim=True).clamp_min(1e-6)
            combined = combined + weight * mean
            step_entropy = -(mean * mean.clamp_min(1e-8).log()).sum(0)
            entropy = step_entropy if entropy is None else torch.maximum(entropy, step_entropy)
        return 2 * combined - 1, entropy


def refine(sampler: SlidingWindowSampler, condition: torch.Tensor, estimate: torch.Tensor, *, fraction: float,
           num_inference_steps: int, num_samples: int, seed: int,
           on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """``(K, C, *spatial)`` refinements of ``estimate`` ``(C, *spatial)`` (in [-1, 1]) for one window-sized or larger
    condition ``(C_cond, *spatial)`` whose spatial axes match the patch's. ``on_step(index, x0)`` sees every step's
    x0 estimates of the members (see :class:`StepCombination`)."""
    fraction = check_fraction(fraction)
    if tuple(estimate.shape[1:]) != tuple(condition.shape[1:]):
        raise SpineDiffError(f"the initial estimate's grid {tuple(estimate.shape[1:])} differs from the case's "
                             f"{tuple(condition.shape[1:])}")
    start = int(round(fraction * (sampler.process.num_train_timesteps - 1)))
    if start <= 0:  # nothing to denoise: the answer itself
        members = estimate.float().cpu()[None].expand(num_samples, *estimate.shape).clone()
        if on_step is not None:
            on_step(0, members)
        return members
    start, scheduled = schedule_below(sampler, fraction, num_inference_steps)
    if on_step is None:
        return sampler.sample(condition, num_samples, generator=seed, num_inference_steps=scheduled,
                              initial_estimate=estimate, start_timestep=start)
    if not sampler.process.projects_x0:
        raise SpineDiffError("SpineSegDiff's combination of the last steps needs a segmentation model whose x0 "
                             "estimates are class probabilities (loss dice_ce); use --combine mean")
    _, crop = pad_nd_image(condition.float(), sampler.patch_size, "constant", {"value": 0}, True)
    crop = (slice(None), slice(None), *[slice(int(c.start), int(c.stop)) for c in crop[1:]])
    steps = sum(t <= start for t in _scheduled_timesteps(sampler, scheduled))
    calls = [0]

    def seen(x0: torch.Tensor) -> None:
        on_step(calls[0] % steps, x0[crop])
        calls[0] += 1

    process, sampler.process = sampler.process, _WatchedProcess(sampler.process, seen)
    try:
        return sampler.sample(condition, num_samples, generator=seed, num_inference_steps=scheduled,
                              initial_estimate=estimate, start_timestep=start)
    finally:
        sampler.process = process


def refine_volume(sampler: SlidingWindowSampler, condition: torch.Tensor, estimate: torch.Tensor, *,
                  fraction: float, num_inference_steps: int, num_samples: int, seed: int,
                  on_slice: Callable[[], object] | None = None, combination: str = "mean"
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`refine` for a whole preprocessed volume: a 2D patch on a 3D volume refines every slice of the first
    axis on its own, seeded ``seed + z`` (as :class:`~spinediff.diffusion.volume.VolumePredictor`).

    Returns the members ``(K, C, *spatial)`` and, with ``combination="spinesegdiff"``, instead one member (the
    combined estimate, ``(1, C, *spatial)``) and the max-entropy map ``(*spatial)``; ``mean``: no map (None).
    """
    if combination not in COMBINATIONS:
        raise SpineDiffError(f"--combine must be one of {', '.join(COMBINATIONS)}, got {combination!r}.")
    def one(cond: torch.Tensor, est: torch.Tensor, slice_seed: int):
        if combination == "mean":
            return refine(sampler, cond, est, fraction=fraction, num_inference_steps=num_inference_steps,
                          num_samples=num_samples, seed=slice_seed), None
        combiner = StepCombination()
        refine(sampler, cond, est, fraction=fraction, num_inference_steps=num_inference_steps,
               num_samples=num_samples, seed=slice_seed, on_step=combiner)
        combined, entropy = combiner.result()
        return combined[None], entropy

    if len(sampler.patch_size) == 2 and condition.ndim == 4:
        members, maps = [], []
        for z in range(condition.shape[1]):
            result, entropy = one(condition[:, z], estimate[:, z], seed + z)
            members.append(result)
            maps.append(entropy)
            if on_slice is not None:
                on_slice()
        volume = torch.stack(members, dim=2)
        return volume, (torch.stack(maps) if maps[0] is not None else None)
    result, entropy = one(condition, estimate, seed)
    if on_slice is not None:
        on_slice()
    return result, entropy
