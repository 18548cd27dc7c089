"""Unpaired diffusion translation by guided re-noising (SDEdit, Meng et al., ICLR 2022): the diffusion baseline that
never sees an MR beside its own CT.

A diffusion model of CT alone (its condition channels held at zero) is trained on the target images only. To
translate an MR, its first channel is mapped onto the CT's intensity distribution by histogram matching — the
distribution of all training CT voxels, gathered while training: a marginal, not a pairing — then noised to
``start`` × T and denoised by the CT model. The MR's anatomy survives the partial noising; the CT model supplies CT
appearance. Graf et al.'s unpaired diffusion baseline was SynDiff (adversarial diffusion with cycle consistency);
this is a simpler unpaired diffusion method, see :class:`~spinediff.training.unpaired.UnpairedDiffusionTrainer`.
"""

from __future__ import annotations

import torch

HISTOGRAM_BINS = 256  # over the network range [-1, 1]


def target_histogram(target: torch.Tensor) -> torch.Tensor:
    """Counts of ``target`` values (network range) in :data:`HISTOGRAM_BINS` bins over [-1, 1]."""
    return torch.histc(target.detach().float().clamp(-1, 1).cpu(), bins=HISTOGRAM_BINS, min=-1.0, max=1.0)


def match_histogram(image: torch.Tensor, histogram: torch.Tensor) -> torch.Tensor:
    """``image`` (any shape) mapped monotonically so that its values follow ``histogram`` (counts over [-1, 1]):
    each voxel's rank quantile is replaced by that quantile of the histogram (linear within a bin)."""
    counts = histogram.double().clamp_min(0)
    if counts.sum() <= 0:
        raise ValueError("the target histogram is empty: the model has not seen any target image")
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(counts, 0) / counts.sum()])
    edges = torch.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1, dtype=torch.float64)
    flat = image.reshape(-1).double().cpu()
    order = torch.argsort(flat, stable=True)
    quantiles = torch.empty_like(flat)
    quantiles[order] = (torch.arange(flat.numel(), dtype=torch.float64) + 0.5) / flat.numel()
    index = torch.searchsorted(cdf, quantiles, right=True).clamp(1, HISTOGRAM_BINS)
    low, high = cdf[index - 1], cdf[index]
    fraction = ((quantiles - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    values = edges[index - 1] + fraction * (edges[index] - edges[index - 1])
    return values.reshape(image.shape).to(image.dtype).to(image.device)


def source_as_estimate(condition: torch.Tensor, histogram: torch.Tensor, target_channels: int) -> torch.Tensor:
    """The condition volume ``(C, *spatial)`` rewritten for SDEdit sampling: its first ``target_channels``
    channels hold the first source channel matched to the target histogram (the initial estimate), the rest are
    zero (the unconditional model's condition)."""
    if condition.shape[0] < target_channels:
        raise ValueError(f"unpaired diffusion needs at least {target_channels} source channel(s), got "
                         f"{condition.shape[0]}")
    out = torch.zeros_like(condition)
    out[:target_channels] = match_histogram(condition[0], histogram)
    return out
