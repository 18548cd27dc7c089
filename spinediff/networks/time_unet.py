"""A time-conditioned U-Net built from an nnU-Net plans topology.

``TimeConditionedUNet`` takes the keyword arguments of ``dynamic_network_architectures``'
``PlainConvUNet`` (so ``nnunetv2.utilities.get_network_from_plans`` builds it from the plans'
``arch_kwargs``) plus ``time_embedding_dim``, ``attention_stages`` and ``coordinate_channels``. Its
stages, features, kernel sizes and (anisotropic) strides are exactly the plan's; each stage's
convolutions are nnU-Net's ``StackedConvBlocks``, wrapped by a FiLM layer reading the timestep.
"""

from __future__ import annotations

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import (
    convert_conv_op_to_dim,
    get_matching_convtransp,
    maybe_convert_scalar_to_list,
)
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from spinediff.networks.blocks import (
    FiLMConvStack,
    GroupNorm,
    SpatialSelfAttention,
    TimestepEmbedding,
    coordinate_grid,
)


def _per_stage(value: int | list | tuple, n: int, name: str) -> list:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n:
        raise ValueError(f"{name} must have {n} entries (one per stage), got {len(values)}: {value}")
    return values


class TimeConditionedUNet(nn.Module):
    """U-Net denoiser ``f(x_t, t)`` with FiLM timestep conditioning in every encoder and decoder stage.

    Args:
        input_channels: channels of ``x`` = condition channels + target channels (contract).
        n_stages: resolution stages of the encoder.
        features_per_stage: features of each stage.
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        kernel_sizes: per-stage kernel sizes (int or per-axis lists; anisotropic allowed).
        strides: per-stage strides (the first is usually 1).
        n_conv_per_stage: convolutions per encoder stage.
        num_classes: output channels = target channels (contract).
        n_conv_per_stage_decoder: convolutions per decoder stage (``n_stages - 1`` entries).
        conv_bias: bias in the convolutions.
        norm_op: normalisation class; default :class:`GroupNorm` (see there why).
        norm_op_kwargs: its keyword arguments.
        dropout_op: dropout class or None.
        dropout_op_kwargs: its keyword arguments.
        nonlin: nonlinearity class; default SiLU, the usual choice for diffusion U-Nets.
        nonlin_kwargs: its keyword arguments.
        deep_supervision: also return lower-resolution outputs (list, full resolution first), as
            ``PlainConvUNet`` does; diffusion training normally leaves it off.
        nonlin_first: conv -> nonlin -> norm instead of conv -> norm -> nonlin.
        time_embedding_dim: width of the sinusoidal timestep embedding (the MLP widens it 4x).
        attention_stages: encoder stage indices (0 = full resolution) that get self-attention, in
            the encoder and in the decoder stage of the same resolution. Attention costs N^2 in the
            voxels N of the stage, so the planner should only list the coarsest stages.
        coordinate_channels: append one channel per spatial axis with patch coordinates in [-1, 1].
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: int | list[int] | tuple[int, ...],
        conv_op: type[_ConvNd],
        kernel_sizes: int | list | tuple,
        strides: int | list | tuple,
        n_conv_per_stage: int | list[int] | tuple[int, ...],
        num_classes: int,
        n_conv_per_stage_decoder: int | list[int] | tuple[int, ...],
        conv_bias: bool = False,
        norm_op: type[nn.Module] | None = GroupNorm,
        norm_op_kwargs: dict | None = None,
        dropout_op: type[_DropoutNd] | None = None,
        dropout_op_kwargs: dict | None = None,
        nonlin: type[nn.Module] | None = nn.SiLU,
        nonlin_kwargs: dict | None = None,
        deep_supervision: bool = False,
        nonlin_first: bool = False,
        time_embedding_dim: int = 64,
        attention_stages: list[int] | tuple[int, ...] = (),
        coordinate_channels: bool = False,
    ) -> None:
        super().__init__()
        self.conv_op = conv_op
        self.ndim = convert_conv_op_to_dim(conv_op)
        features = _per_stage(features_per_stage, n_stages, "features_per_stage")
        kernels = [
            maybe_convert_scalar_to_list(conv_op, k)
            for k in _per_stage(kernel_sizes, n_stages, "kernel_sizes")
        ]
        self.strides = [
            maybe_convert_scalar_to_list(conv_op, s) for s in _per_stage(strides, n_stages, "strides")
        ]
        convs_encoder = _per_stage(n_conv_per_stage, n_stages, "n_conv_per_stage")
        convs_decoder = _per_stage(n_conv_per_stage_decoder, n_stages - 1, "n_conv_per_stage_decoder")
        bad_stages = [s for s in attention_stages if not 0 <= s < n_stages]
        if bad_stages:
            raise ValueError(f"attention_stages {bad_stages} outside 0..{n_stages - 1}")
        self.features = features
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.coordinate_channels = coordinate_channels
        self.attention_stages = sorted(set(attention_stages))
        self.input_channels = input_channels

        self.time_embedding = TimestepEmbedding(time_embedding_dim)
        embedding_dim = self.time_embedding.output_dim
        common = dict(
            conv_bias=conv_bias,
            norm_op=norm_op,
            norm_op_kwargs=norm_op_kwargs,
            dropout_op=dropout_op,
            dropout_op_kwargs=dropout_op_kwargs,
            nonlin=nonlin,
            nonlin_kwargs=nonlin_kwargs,
            nonlin_first=nonlin_first,
        )

        def attention_or_identity(stage: int) -> nn.Module:
            if stage in self.attention_stages:
                return SpatialSelfAttention(features[stage], norm_op, norm_op_kwargs)
            return nn.Identity()

        channels = input_channels + (self.ndim if coordinate_channels else 0)
        encoder, encoder_attention = [], []
        for s in range(n_stages):
            convs = StackedConvBlocks(
                convs_encoder[s], conv_op, channels, features[s], kernels[s], self.strides[s], **common
            )
            encoder.append(FiLMConvStack(convs, embedding_dim))
            encoder_attention.append(attention_or_identity(s))
            channels = features[s]
        self.encoder_stages = nn.ModuleList(encoder)
        self.encoder_attention = nn.ModuleList(encoder_attention)

        # decoder stage d works at encoder resolution s = n_stages - 2 - d (coarse to fine)
        transpconv_op = get_matching_convtransp(conv_op=conv_op)
        transpconvs, decoder, decoder_attention, output_layers = [], [], [], []
        for d in range(n_stages - 1):
            s = n_stages - 2 - d
            transpconvs.append(
                transpconv_op(
                    features[s + 1], features[s], self.strides[s + 1], self.strides[s + 1], bias=conv_bias
                )
            )
            convs = StackedConvBlocks(
                convs_decoder[d], conv_op, 2 * features[s], features[s], kernels[s], 1, **common
            )
            decoder.append(FiLMConvStack(convs, embedding_dim))
            decoder_attention.append(attention_or_identity(s))
            # like PlainConvUNet, always build every output layer so that weights load with or
            # without deep supervision
            output_layers.append(conv_op(features[s], num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.decoder_stages = nn.ModuleList(decoder)
        self.decoder_attention = nn.ModuleList(decoder_attention)
        self.output_layers = nn.ModuleList(output_layers)

    def _encode(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape ({x.shape[0]},), got {tuple(timesteps.shape)}")
        if self.coordinate_channels:
            x = torch.cat([x, coordinate_grid(x.shape[0], tuple(x.shape[2:]), x.device, x.dtype)], dim=1)
        embedding = self.time_embedding(timesteps.to(x.device))
        skips = []
        for stage, attention in zip(self.encoder_stages, self.encoder_attention, strict=True):
            x = attention(stage(x, embedding))
            skips.append(x)
        return skips, embedding

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps, full resolution first (what contrastive losses such as CUT's PatchNCE
        compare between an input and its translation)."""
        return self._encode(x, timesteps)[0]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Predict from ``x = cat([condition, noisy_target], dim=1)`` at integer ``timesteps`` ``(B,)``.

        Returns:
            ``(B, num_classes, *spatial)``; with deep supervision a list, full resolution first.
        """
        skips, embedding = self._encode(x, timesteps)
        outputs = []
        x = skips[-1]
        for d, (transpconv, stage, attention) in enumerate(
            zip(self.transpconvs, self.decoder_stages, self.decoder_attention, strict=True)
        ):
            x = torch.cat([transpconv(x), skips[-(d + 2)]], dim=1)
            x = attention(stage(x, embedding))
            if self.deep_supervision or d == len(self.decoder_stages) - 1:
                outputs.append(self.output_layers[d](x))
        outputs = outputs[::-1]
        return outputs if self.deep_supervision else outputs[0]

    def compute_conv_feature_map_size(self, input_size: list[int] | tuple[int, ...]) -> np.int64:
        """Voxels x channels of all feature maps kept for a forward/backward pass of one sample.

        Counts what ``PlainConvUNet`` counts (conv outputs, transposed-conv outputs, output layers),
        plus the FiLM-modulated maps and the attention maps, so the planner's memory model (which
        calibrates this count against a reference network) sees the extra cost of conditioning.

        Args:
            input_size: spatial size of the patch, without batch or channel axes.
        """
        if len(input_size) != self.ndim:
            raise ValueError(f"give the spatial patch size ({self.ndim} values), got {input_size}")
        total = np.int64(0)
        sizes = []
        size = list(input_size)
        encoder = zip(self.encoder_stages, self.encoder_attention, strict=True)
        for s, (stage, attention) in enumerate(encoder):
            total += stage.compute_conv_feature_map_size(size)
            size = [i // j for i, j in zip(size, self.strides[s], strict=True)]
            if isinstance(attention, SpatialSelfAttention):
                total += attention.compute_conv_feature_map_size(size)
            sizes.append(size)
        decoder = zip(self.decoder_stages, self.decoder_attention, strict=True)
        for d, (stage, attention) in enumerate(decoder):
            s = len(self.encoder_stages) - 2 - d
            total += stage.compute_conv_feature_map_size(sizes[s])
            total += np.prod([self.features[s], *sizes[s]], dtype=np.int64)  # transposed conv output
            if isinstance(attention, SpatialSelfAttention):
                total += attention.compute_conv_feature_map_size(sizes[s])
            if self.deep_supervision or d == len(self.decoder_stages) - 1:
                total += np.prod([self.num_classes, *sizes[s]], dtype=np.int64)
        return total

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's He initialisation of the convolutions (called by ``get_network_from_plans``).

        Linear layers (timestep MLP, FiLM, attention) keep PyTorch's default initialisation, which is
        what the DDPM reference implementations use for them.
        """
        InitWeights_He(1e-2)(module)
