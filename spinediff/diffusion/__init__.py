"""Diffusion core: settings from the plans, noising process and losses, sliding-window DDIM sampler.

See ``documentation/diffusion.md``.
"""

from __future__ import annotations

from spinediff.diffusion.process import DiffusionProcess, TrainingBatch
from spinediff.diffusion.sampler import SlidingWindowSampler, ensemble_seeds, initial_noise, make_generator
from spinediff.diffusion.settings import DiffusionSettings

__all__ = [
    "DiffusionProcess",
    "DiffusionSettings",
    "SlidingWindowSampler",
    "TrainingBatch",
    "ensemble_seeds",
    "initial_noise",
    "make_generator",
]
