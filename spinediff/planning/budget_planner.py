"""The planner's budget mode: spacing and patch chosen for the field of view and the time at hand.

Used by :class:`~spinediff.planning.planner.SpineDiffPlanner` when ``spinediff plan --budget`` is given
(see :mod:`spinediff.planning.budget` for the rules and their constants).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from spinediff.errors import SpineDiffError
from spinediff.planning.budget import (
    SPACING_FACTORS,
    STEP_SHARE,
    TARGET_STEPS,
    Schedule,
    coarser_spacing,
    format_duration,
    measure_step_seconds,
    required_field_of_view,
    schedule_for_budget,
)
from spinediff.planning.memory import Budget, FittedConfiguration, fit_patch_and_batch

#: Minimum batch of a budget plan: 8 in 2D (nnU-Net trains 2D with 12 or more; a diffusion step also draws
#: one noise level per sample, so fewer samples make the loss over noise levels too noisy), 2 in 3D.
BUDGET_MIN_BATCH = {2: 8, 3: 2}
#: Nominal throughput used only when planning for a GPU that this machine does not have.
NOMINAL_GPU_FLOPS = 20e12
#: Tolerated disagreement between the calibrated estimate and the measurement before fitting again.
CALIBRATION_TOLERANCE = 0.25


@dataclass(frozen=True)
class BudgetedFit:
    """What the budget mode decided for one configuration."""

    spacing: np.ndarray
    median_shape: np.ndarray
    fitted: FittedConfiguration
    spacing_factor: float
    required_fov_mm: np.ndarray
    extent_mm: np.ndarray | None
    step_seconds: float
    step_seconds_source: str
    time_scale: float

    @property
    def patch_mm(self) -> np.ndarray:
        return np.asarray(self.fitted.patch_size, dtype=float) * self.spacing

    def coverage(self) -> list[float]:
        """Share of the foreground extent (per axis) that one patch covers, capped at 1."""
        if self.extent_mm is None:
            return [1.0] * len(self.spacing)
        return [round(float(min(1.0, p / max(e, 1e-6))), 3) for p, e in zip(self.patch_mm, self.extent_mm,
                                                                               strict=True)]


def step_budget_seconds(budget_seconds: float) -> float:
    """Seconds one step may take so that :data:`TARGET_STEPS` fit into the budget's training share."""
    return budget_seconds * STEP_SHARE / TARGET_STEPS


def measure_or_estimate(fitted: FittedConfiguration, device: str, input_channels: int, output_channels: int,
                        arch: dict[str, Any], *, measure: bool, time_scale: float = 1.0,
                        deep_supervision: bool = False, time_conditioned: bool = True) -> tuple[float, str]:
    """Step seconds of ``fitted``: measured on this machine when possible, else the cost model's estimate."""
    import torch

    can_measure = measure and (device == "cpu" or torch.cuda.is_available())
    if can_measure:
        return measure_step_seconds(arch, fitted.patch_size, fitted.batch_size, input_channels, output_channels,
                                    device=device, deep_supervision=deep_supervision,
                                    time_conditioned=time_conditioned), "measured"
    if device == "cuda":
        flops = 3.0 * fitted.cost.forward_flops * fitted.batch_size
        return flops / NOMINAL_GPU_FLOPS, "estimated (no GPU here; spinediff train refits on the GPU)"
    return fitted.cost.step_seconds(fitted.batch_size) * time_scale, "estimated (cost model)"


def fit_for_budget(planner, base: dict[str, Any], n_voxels_dataset: float, input_channels: int,
                   output_channels: int, extent_mm: np.ndarray | None) -> BudgetedFit:
    """Finest spacing whose patch covers the required field of view within the step budget; calibrated by
    a measurement of the chosen network, and fitted again when the measurement disagrees."""
    fine = np.asarray(base["spacing"], dtype=float)
    dim = len(fine)
    median_mm = np.asarray(base["median_image_size_in_voxels"], dtype=float) * fine
    axes_extent = None if extent_mm is None else np.asarray(extent_mm, dtype=float)[-dim:]
    fov = required_field_of_view(axes_extent, median_mm)
    profile = planner.profile
    min_batch = dict(profile.min_batch_size)
    min_batch[dim] = max(min_batch[dim], BUDGET_MIN_BATCH[dim])
    step_budget = dict(profile.step_budget_seconds or {})
    step_budget[dim] = step_budget_seconds(planner.budget_seconds)
    profile = replace(profile, min_batch_size=min_batch,
                      step_budget_seconds=step_budget if profile.device == "cpu" else profile.step_budget_seconds)
    architecture_for = planner.architecture_for(dim)

    def choose(scale: float) -> tuple[float, np.ndarray, np.ndarray, FittedConfiguration]:
        budget = Budget(profile, dim, time_scale=scale)
        last = None
        for factor in SPACING_FACTORS:
            spacing = coarser_spacing(fine, factor)
            median = median_mm / spacing
            floor = np.ceil(fov / spacing)
            voxels = n_voxels_dataset / float(np.prod(spacing / fine))
            fitted = fit_patch_and_batch(spacing, median, voxels, input_channels, output_channels, budget,
                                         architecture_for, planner.UNet_featuremap_min_edge_length,
                                         planner.max_dataset_covered, min_patch=floor)
            if fitted.arch_kwargs["n_stages"] < 2 and last is not None:
                break  # a patch without one downsampling is no U-Net: keep the coarsest one that has it
            last = (factor, spacing, median, fitted)
            if fitted.fits:
                break
        if last[3].arch_kwargs["n_stages"] < 2:
            raise SpineDiffError(f"The budget of {format_duration(planner.budget_seconds)} is too short for this "
                                 "dataset: even at the finest spacing the patch that fits it has no downsampling. "
                                 "Give --budget a longer time (e.g. 10m).")
        return last

    scale = 1.0
    factor, spacing, median, fitted = choose(scale)
    arch = planner.diffusion_architecture(fitted.arch_kwargs)
    seconds, source = measure_or_estimate(fitted, profile.device, input_channels, output_channels, arch,
                                          measure=planner.measure)
    if profile.device == "cpu" and source == "measured":
        measured_scale = seconds / max(fitted.cost.step_seconds(fitted.batch_size), 1e-9)
        if abs(measured_scale / scale - 1) > CALIBRATION_TOLERANCE:
            scale = measured_scale
            factor, spacing, median, fitted = choose(scale)
            arch = planner.diffusion_architecture(fitted.arch_kwargs)
            seconds, source = measure_or_estimate(fitted, profile.device, input_channels, output_channels, arch,
                                                  measure=planner.measure)
    return BudgetedFit(spacing, median, fitted, factor, fov, axes_extent, seconds, source, scale)


def schedule_from(budget_seconds: float, step_seconds: float, source: str, device: str, val_iterations: int
                  ) -> Schedule:
    import torch

    threads = torch.get_num_threads() if device == "cpu" else 0
    return schedule_for_budget(budget_seconds, step_seconds, source=source, device=device, threads=threads,
                               val_iterations_per_epoch=val_iterations)


def budget_notes(fit: BudgetedFit, schedule: Schedule, budget_seconds: float) -> list[str]:
    spacing = "x".join(f"{s:.3g}" for s in fit.spacing)
    patch = "x".join(str(p) for p in fit.fitted.patch_size)
    patch_mm = "x".join(f"{p:.0f}" for p in fit.patch_mm)
    fov = "x".join(f"{f:.0f}" for f in fit.required_fov_mm)
    coverage = "x".join(f"{100 * c:.0f}%" for c in fit.coverage())
    notes = []
    if fit.extent_mm is not None:
        extent = "x".join(f"{e:.0f}" for e in fit.extent_mm)
        notes.append(f"Field of view first: the foreground spans {extent} mm (95th percentile over cases); with "
                     f"a margin that asks for {fov} mm. The patch {patch} at {spacing} mm spans {patch_mm} mm "
                     f"(covers {coverage} of the foreground extent).")
    if fit.spacing_factor > 1:
        notes.append(f"Resolution traded for context: {fit.spacing_factor:g}x nnU-Net's spacing, because at finer "
                     f"spacings a patch that covers the field of view does not train {TARGET_STEPS} steps "
                     f"within the budget of {format_duration(budget_seconds)} (as nnU-Net's 3d_lowres, also in 2D).")
    elif not fit.fitted.fits:
        notes.append("Even the coarsest spacing tried cannot fit the field of view into the budget: the "
                     "schedule has fewer steps than the planner aims for.")
    notes.append(f"Schedule for {format_duration(budget_seconds)}: {schedule.epochs} epochs x "
                 f"{schedule.iterations_per_epoch} iterations = {schedule.steps} steps at "
                 f"{schedule.step_seconds:.3g} s/step ({schedule.step_seconds_source}), about "
                 f"{schedule.expected_seconds / 60:.1f} min; the poly learning rate ends with the budget.")
    return notes
