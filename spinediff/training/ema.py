"""Exponential moving average of network weights (what validation and prediction use)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """EMA of a network's parameters and buffers, with the usual warm-up.

    The effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that short
    runs (CPU budgets of a few hundred steps) are not dominated by the random initial weights, while
    long runs get the configured decay (0.999 in the plans, as in the reference works).
    """

    def __init__(self, network: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.num_updates = 0
        self.module = copy.deepcopy(network).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    def effective_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        decay = self.effective_decay()
        # named_parameters/named_buffers list every tensor once; state_dict() lists the conv and norm tensors of
        # nnU-Net's conv blocks twice (as `conv`/`norm` and inside `all_modules`), which averaged them twice per step
        source = dict(network.named_parameters())
        source.update(network.named_buffers())
        averaged, current = [], []
        for name, value in [*self.module.named_parameters(), *self.module.named_buffers()]:
            new = source[name].detach()
            if value.dtype.is_floating_point:
                averaged.append(value)
                current.append(new.to(value.dtype))
            else:
                value.copy_(new)
        # One multi-tensor lerp (as torch.optim.swa_utils.get_ema_multi_avg_fn does) instead of two in-place ops
        # per tensor: on small CPU networks the per-tensor calls cost more than the arithmetic (with the single
        # pass above: 7-9 -> ~4 ms per step for the phantom's 2D network, benchmarks/perf_training_step.py).
        # lerp(ema, new, 1 - decay) = decay * ema + (1 - decay) * new.
        if averaged:  # the foreach ops refuse empty lists
            torch._foreach_lerp_(averaged, current, 1 - decay)
        self.num_updates += 1
