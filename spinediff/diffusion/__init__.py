"""Diffusion core: settings from the plans, noising process and losses, sliding-window DDIM sampler, and the
one prediction core of whole volumes (``VolumePredictor``).

See ``documentation/diffusion.md``.
"""

from __future__ import annotations

from spinediff.diffusion.process import DiffusionProcess, TrainingBatch
from spinediff.diffusion.sampler import SlidingWindowSampler, ensemble_seeds, initial_noise, make_generator, mirrored
from spinediff.diffusion.settings import DiffusionSettings
from spinediff.diffusion.volume import VolumePredictor

__all__ = [
    "DiffusionProcess",
    "DiffusionSettings",
    "SlidingWindowSampler",
    "TrainingBatch",
    "VolumePredictor",
    "ensemble_seeds",
    "initial_noise",
    "make_generator",
    "mirrored",
]
