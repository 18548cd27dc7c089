"""nnU-Net's trainer whose network sees the whole patch at its bottleneck (issue 34).

To number a vertebra the network has to know what lies at the ends of the spine: whether the sacrum is in view,
and whether the body at the top edge is the one above L1. nnU-Net's plain U-Net mixes its features only through
3 x 3 convolutions; at the bottleneck of ``2d_cpu`` (stride 16) the theoretical receptive field covers the patch,
but a convolution's influence decays from the centre of that field (not measured here).
:class:`nnUNetTrainerGlobalContext` adds one **self-attention block at the bottleneck** (as the diffusion networks
of this package have, ``TimeConditionedUNet``): every bottleneck position reads every other, so the features at L1
can depend on the presence or absence of a sacrum 180 mm away.

- The block is pre-norm multi-head attention over the bottleneck positions with a residual connection, no
  positional encoding (what it adds depends on what is in view, not where), and its output projection starts at
  zero: at initialisation the network is exactly nnU-Net's.
- Everything else (plans, loss, schedule, planned augmentation, exports, ``nnUNetv2_predict`` through
  ``nnUNet_extTrainer``) is nnU-Net's trainer's.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from spinediff.errors import SpineDiffError

#: Attention heads of the bottleneck block (the bottleneck's channels must divide by it).
HEADS = 4


class BottleneckAttention(nn.Module):
    """``x + attention(norm(x))`` over the spatial positions of a ``(B, C, *spatial)`` feature map; the output
    projection is zero at initialisation (the block starts as the identity)."""

    def __init__(self, channels: int, heads: int = HEADS) -> None:
        super().__init__()
        if channels % heads:
            raise SpineDiffError(f"The bottleneck has {channels} channels, which {heads} attention heads do not "
                                 "divide. Use nnUNetTrainer for this configuration.")
        self.norm = nn.GroupNorm(1, channels)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        nn.init.zeros_(self.attention.out_proj.weight)
        nn.init.zeros_(self.attention.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, positions, C)
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return x + mixed.transpose(1, 2).reshape(x.shape)


def with_bottleneck_attention(network: nn.Module) -> nn.Module:
    """nnU-Net's ``PlainConvUNet``/``ResidualEncoderUNet`` with :class:`BottleneckAttention` after the encoder's last
    stage (in place; returned for convenience)."""
    encoder = getattr(network, "encoder", None)
    stages = getattr(encoder, "stages", None)
    if not isinstance(stages, nn.Sequential) or not hasattr(encoder, "output_channels"):
        raise SpineDiffError(f"{type(network).__name__} has no encoder stages to add attention to (nnU-Net's "
                             "PlainConvUNet or ResidualEncoderUNet expected). Use nnUNetTrainer.")
    channels = int(encoder.output_channels[-1])
    stages[-1] = nn.Sequential(stages[-1], BottleneckAttention(channels))
    return network


class nnUNetTrainerGlobalContext(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming of its trainer variants)
    """nnU-Net's trainer with one self-attention block at the network's bottleneck (see the module docstring)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's network from the plans, with the bottleneck attention (also what nnU-Net's predictor calls)."""
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        return with_bottleneck_attention(network)
