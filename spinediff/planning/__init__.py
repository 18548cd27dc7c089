"""Self-configuring planning: nnU-Net's planner plus diffusion configurations (``spinediff plan``).

Public API:

- :func:`plan_dataset` (``spinediff.planning.api``): fingerprint, plan and preprocess a dataset.
- :class:`SpineDiffPlanner` (``spinediff.planning.planner``): the ``ExperimentPlanner`` subclass.
- :class:`TargetIntensity` (``spinediff.planning.target_intensity``): the invertible target <-> [-1, 1]
  mapping stored in ``diffusion.target_intensity``.

Imports are lazy so that ``import spinediff.planning`` does not pull in nnunetv2 and torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["plan_dataset", "SpineDiffPlanner", "TargetIntensity", "summarize_plans"]


def __getattr__(name: str) -> Any:
    if name in ("plan_dataset", "summarize_plans"):
        from spinediff.planning import api

        return getattr(api, name)
    if name == "SpineDiffPlanner":
        from spinediff.planning.planner import SpineDiffPlanner

        return SpineDiffPlanner
    if name == "TargetIntensity":
        from spinediff.planning.target_intensity import TargetIntensity

        return TargetIntensity
    raise AttributeError(f"module 'spinediff.planning' has no attribute {name!r}")
