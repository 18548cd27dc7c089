"""Time-conditioned U-Net built from the plans' topology (see ``documentation/diffusion.md``)."""

from __future__ import annotations

from spinediff.networks.blocks import GroupNorm, TimestepEmbedding, sinusoidal_timestep_embedding
from spinediff.networks.time_unet import TimeConditionedUNet

__all__ = ["GroupNorm", "TimeConditionedUNet", "TimestepEmbedding", "sinusoidal_timestep_embedding"]
