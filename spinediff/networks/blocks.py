"""Building blocks of the time-conditioned U-Net: normalisation, timestep embedding, FiLM, attention.

The convolutions themselves come from ``dynamic_network_architectures`` (``StackedConvBlocks``), so a
stage of our network has the same parameters, names and feature-map count as a stage of nnU-Net's
``PlainConvUNet``; what this module adds is the time conditioning around them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from torch import nn


def _largest_divisor_at_most(n: int, limit: int) -> int:
    """Largest divisor of ``n`` that is at most ``limit`` (at least 1)."""
    for candidate in range(max(1, min(n, limit)), 0, -1):
        if n % candidate == 0:
            return candidate
    return 1


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` with nnU-Net's ``norm_op(num_channels, **norm_op_kwargs)`` signature.

    GroupNorm rather than nnU-Net's InstanceNorm: instance normalisation removes each channel's mean
    and variance per image, so the first layer would discard the global intensity level of the noisy
    target, which is exactly what a denoiser must read to know how much signal is left (and, for
    translation, which absolute intensity to produce). Groups of channels keep that information in
    the ratios between channels.

    Args:
        num_channels: number of channels of the input.
        num_groups: wanted number of groups; reduced to the largest divisor of ``num_channels`` not
            above it, so any feature count of a plan works (8 groups for 16 features, 5 for 10).
        eps: added to the variance for numerical stability.
        affine: learn a per-channel scale and shift.
    """

    def __init__(
        self, num_channels: int, num_groups: int = 8, eps: float = 1e-5, affine: bool = True
    ) -> None:
        super().__init__(
            _largest_divisor_at_most(num_channels, num_groups), num_channels, eps=eps, affine=affine
        )


def sinusoidal_timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps.

    Args:
        timesteps: ``(B,)`` tensor of timesteps (integers or floats).
        dim: embedding width (an odd width is padded with one zero column).
        max_period: longest wavelength; 10000 as in the Transformer and DDPM, which spreads the
            frequencies over the 0..1000 timestep range.

    Returns:
        ``(B, dim)`` float tensor: ``[cos(t f_0), ..., cos(t f_k), sin(t f_0), ..., sin(t f_k)]``.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1D (B,) tensor, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        embedding = nn.functional.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP, as in DDPM.

    Args:
        dim: width of the sinusoidal embedding.
        hidden_dim: width of the MLP output, the vector every FiLM layer reads. DDPM uses 4x the
            sinusoidal width; we keep that ratio because the MLP is cheap and one vector feeds all stages.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.output_dim = hidden_dim or 4 * dim
        self.mlp = nn.Sequential(
            nn.Linear(dim, self.output_dim), nn.SiLU(), nn.Linear(self.output_dim, self.output_dim)
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_timestep_embedding(timesteps, self.dim))


class FiLMConvStack(nn.Module):
    """nnU-Net's ``StackedConvBlocks`` with a FiLM scale-and-shift from the timestep embedding.

    The first convolution's ``conv -> norm -> nonlin`` becomes ``conv -> norm -> x*(1+scale)+shift ->
    nonlin`` (the "scale-shift norm" of improved DDPM): modulating right after the normalisation lets
    the timestep set the operating point of every stage, and the following convolutions process the
    modulated features. ``1 + scale`` keeps the unmodulated block as the starting point.

    Args:
        convs: the wrapped conv stack (its first block must be a ``ConvDropoutNormReLU``).
        embedding_dim: width of the timestep embedding vector.
    """

    def __init__(self, convs: StackedConvBlocks, embedding_dim: int) -> None:
        super().__init__()
        self.blocks = convs
        self.output_channels = convs.output_channels
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, 2 * self.output_channels))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(embedding).chunk(2, dim=1)
        shape = (*scale.shape, *([1] * (x.ndim - 2)))
        scale, shift = scale.reshape(shape), shift.reshape(shape)
        first = self.blocks.convs[0]
        modules = list(first.all_modules)
        # FiLM goes right after the norm; without a norm, right before the nonlinearity (or last).
        anchor = getattr(first, "norm", None)
        if anchor is None:
            nonlin = getattr(first, "nonlin", None)
            anchor_index = modules.index(nonlin) - 1 if nonlin is not None else len(modules) - 1
        else:
            anchor_index = modules.index(anchor)
        for index, module in enumerate(modules):
            x = module(x)
            if index == anchor_index:
                x = x * (1 + scale) + shift
        for block in self.blocks.convs[1:]:
            x = block(x)
        return x

    def compute_conv_feature_map_size(self, input_size: list[int] | tuple[int, ...]) -> np.int64:
        """Feature-map voxels of the conv stack plus the one modulated map FiLM keeps for backward."""
        size_after_stride = [i // s for i, s in zip(input_size, self.blocks.initial_stride, strict=True)]
        return self.blocks.compute_conv_feature_map_size(input_size) + np.prod(
            [self.output_channels, *size_after_stride], dtype=np.int64
        )


def _attention_heads(channels: int) -> int:
    # 32 channels per head as in DDPM's attention blocks; fewer heads when channels are few.
    return _largest_divisor_at_most(channels, max(1, channels // 32))


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over all voxels of a (coarse) feature map, with a residual.

    Args:
        channels: feature channels.
        norm_op: normalisation class called as ``norm_op(channels, **norm_op_kwargs)``.
        norm_op_kwargs: its keyword arguments.
    """

    def __init__(
        self, channels: int, norm_op: type[nn.Module] | None = None, norm_op_kwargs: dict | None = None
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = _attention_heads(channels)
        self.norm = (norm_op or GroupNorm)(channels, **(norm_op_kwargs or {}))
        self.attention = nn.MultiheadAttention(channels, self.num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        tokens = self.norm(x).reshape(batch, channels, -1).transpose(1, 2)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return x + attended.transpose(1, 2).reshape(batch, channels, *spatial)

    def compute_conv_feature_map_size(self, input_size: list[int] | tuple[int, ...]) -> np.int64:
        """Normed input, q/k/v, output (5 maps of ``channels``) and the ``heads x N x N`` attention."""
        voxels = int(np.prod(input_size, dtype=np.int64))
        return np.int64(5 * self.channels * voxels + self.num_heads * voxels * voxels)


def coordinate_grid(
    batch: int, spatial_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``(batch, ndim, *spatial_shape)`` grid of coordinates in [-1, 1], one channel per axis.

    The coordinates are relative to the network input (the patch), like CoordConv: they tell the
    network where in its field of view a voxel lies, not where in the volume.
    """
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) for n in spatial_shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    return grid.unsqueeze(0).expand(batch, *grid.shape)
