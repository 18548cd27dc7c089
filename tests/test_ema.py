"""EMA of weights: every tensor is averaged exactly once per update, even where nnU-Net's blocks list
the same tensor twice in state_dict() (as conv/norm and inside all_modules)."""

from __future__ import annotations

import copy

import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU

from spinediff.training.ema import WeightAverage


def test_each_tensor_is_averaged_once_with_the_effective_decay():
    torch.manual_seed(0)
    block = ConvDropoutNormReLU(torch.nn.Conv2d, 2, 4, 3, 1, True, torch.nn.InstanceNorm2d, {"affine": True},
                                None, None, torch.nn.LeakyReLU, {})
    assert len(block.state_dict()) > len(dict(block.named_parameters())) + len(dict(block.named_buffers()))
    ema = WeightAverage(block, decay=0.999)
    old = copy.deepcopy(dict(ema.module.named_parameters()))
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(torch.randn_like(parameter))
    decay = ema.effective_decay()
    assert decay == 0.1  # warm-up: min(0.999, (1 + 0) / (10 + 0))
    ema.update(block)
    for name, parameter in block.named_parameters():
        expected = decay * old[name] + (1 - decay) * parameter
        assert torch.allclose(dict(ema.module.named_parameters())[name], expected, atol=1e-6), name
    assert ema.num_updates == 1 and ema.effective_decay() == 2 / 11
