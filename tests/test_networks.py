"""Tests of the time-conditioned U-Net (spinediff.networks)."""

from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from spinediff.networks import GroupNorm, TimeConditionedUNet, sinusoidal_timestep_embedding
from spinediff.networks.blocks import SpatialSelfAttention

torch.set_num_threads(1)

ARCH_CLASS = "spinediff.networks.time_unet.TimeConditionedUNet"
REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def contract_arch_kwargs(ndim: int, **overrides) -> dict:
    """The ``arch_kwargs`` block of the plans contract, for tiny anisotropic 2D or 3D topologies."""
    if ndim == 2:
        kernels = [[3, 1], [3, 3], [3, 3]]
        strides = [[1, 1], [2, 1], [2, 2]]
    else:
        kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
        strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    kwargs = {
        "n_stages": 3,
        "features_per_stage": [8, 16, 24],
        "conv_op": f"torch.nn.modules.conv.Conv{ndim}d",
        "kernel_sizes": kernels,
        "strides": strides,
        "n_conv_per_stage": [2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2],
        "conv_bias": True,
        "norm_op": "spinediff.networks.blocks.GroupNorm",
        "norm_op_kwargs": {"num_groups": 8, "eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.SiLU",
        "nonlin_kwargs": {"inplace": True},
        "time_embedding_dim": 16,
        "attention_stages": [],
    }
    kwargs.update(overrides)
    return kwargs


def build(ndim: int, condition_channels: int = 2, target_channels: int = 1, deep_supervision=False, **overrides):
    torch.manual_seed(0)
    return get_network_from_plans(
        ARCH_CLASS,
        contract_arch_kwargs(ndim, **overrides),
        REQUIRES_IMPORT,
        input_channels=condition_channels + target_channels,
        output_channels=target_channels,
        deep_supervision=deep_supervision,
    )


SHAPES = {2: (12, 8), 3: (4, 8, 8)}


@pytest.mark.parametrize("ndim", [2, 3])
def test_builds_from_plans_with_anisotropic_topology(ndim: int) -> None:
    network = build(ndim)
    assert isinstance(network, TimeConditionedUNet)
    norms = [m for m in network.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNorm) for m in norms)
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in network.modules())
    kernels = [tuple(s.blocks.convs[0].conv.kernel_size) for s in network.encoder_stages]
    expected = contract_arch_kwargs(ndim)["kernel_sizes"]
    assert kernels == [tuple(k) for k in expected]
    x = torch.randn(2, 3, *SHAPES[ndim])
    out = network(x, torch.tensor([0, 999]))
    assert out.shape == (2, 1, *SHAPES[ndim])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_deep_supervision_outputs_follow_the_strides(ndim: int) -> None:
    network = build(ndim, deep_supervision=True, target_channels=3)
    outputs = network(torch.randn(1, 5, *SHAPES[ndim]), torch.tensor([10]))
    strides = contract_arch_kwargs(ndim)["strides"]
    size = list(SHAPES[ndim])
    expected = [tuple(size)]
    for stride in strides[1:-1]:
        size = [i // s for i, s in zip(size, stride, strict=True)]
        expected.append(tuple(size))
    assert [tuple(o.shape[2:]) for o in outputs] == expected
    assert all(o.shape[:2] == (1, 3) for o in outputs)
    # the same weights load into a network without deep supervision
    plain = build(ndim, deep_supervision=False, target_channels=3)
    plain.load_state_dict(network.state_dict())


@pytest.mark.parametrize("ndim", [2, 3])
def test_time_embedding_changes_the_output(ndim: int) -> None:
    network = build(ndim)
    x = torch.randn(2, 3, *SHAPES[ndim])
    early = network(x, torch.tensor([5, 5]))
    late = network(x, torch.tensor([900, 900]))
    assert (early - late).abs().mean() > 1e-3
    # both samples of one batch use their own timestep
    mixed = network(x, torch.tensor([5, 900]))
    torch.testing.assert_close(mixed[0], early[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], late[1], rtol=1e-5, atol=1e-5)


def test_every_stage_is_time_conditioned() -> None:
    network = build(2)
    x = torch.randn(2, 3, *SHAPES[2])
    network(x, torch.tensor([3, 700])).square().mean().backward()
    films = [stage.film[1] for stage in [*network.encoder_stages, *network.decoder_stages]]
    assert len(films) == 3 + 2
    assert all(film.weight.grad is not None and film.weight.grad.abs().sum() > 0 for film in films)


def test_group_norm_has_the_nnunet_norm_op_signature() -> None:
    norm = GroupNorm(16, **{"num_groups": 8, "eps": 1e-5, "affine": True})
    assert norm.num_groups == 8 and norm.num_channels == 16
    assert GroupNorm(10).num_groups == 5  # 8 does not divide 10
    assert GroupNorm(12).num_groups == 6
    assert GroupNorm(3).num_groups == 3
    assert GroupNorm(7, num_groups=4).num_groups == 1
    assert GroupNorm(32, affine=False).weight is None
    x = torch.randn(2, 10, 4, 4)
    assert GroupNorm(10)(x).shape == x.shape


def test_group_norm_keeps_intensity_differences_that_instance_norm_removes() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 6)
    x[:, :2] += 3.0  # channels 0-1 brighter than channels 2-3 of the same group
    group = GroupNorm(8, num_groups=2, affine=False)(x)
    instance = nn.InstanceNorm2d(8)(x)
    assert abs(instance[:, :2].mean() - instance[:, 2:4].mean()) < 1e-5
    assert group[:, :2].mean() - group[:, 2:4].mean() > 1.0


def test_sinusoidal_embedding() -> None:
    timesteps = torch.tensor([0, 1, 500, 999])
    embedding = sinusoidal_timestep_embedding(timesteps, 16)
    assert embedding.shape == (4, 16)
    torch.testing.assert_close(embedding[0, :8], torch.ones(8))  # cos(0)
    torch.testing.assert_close(embedding[0, 8:], torch.zeros(8))  # sin(0)
    distances = torch.cdist(embedding, embedding) + torch.eye(4) * 10
    assert distances.min() > 0.1
    assert sinusoidal_timestep_embedding(timesteps, 7).shape == (4, 7)
    with pytest.raises(ValueError):
        sinusoidal_timestep_embedding(torch.zeros(2, 2), 8)


@pytest.mark.parametrize("ndim", [2, 3])
def test_feature_map_size_extends_plain_conv_unet(ndim: int) -> None:
    kwargs = contract_arch_kwargs(ndim)
    network = build(ndim)
    plain = get_network_from_plans(
        "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        {k: v for k, v in kwargs.items() if k not in ("time_embedding_dim", "attention_stages")},
        REQUIRES_IMPORT,
        3,
        1,
    )
    assert isinstance(plain, PlainConvUNet)
    patch = SHAPES[ndim]
    # PlainConvUNet's count plus one FiLM-modulated map per stage (encoder and decoder)
    film_maps = 0
    size = list(patch)
    sizes = []
    for stride, features in zip(kwargs["strides"], kwargs["features_per_stage"], strict=True):
        size = [i // s for i, s in zip(size, stride, strict=True)]
        sizes.append((features, size))
        film_maps += features * int(torch.tensor(size).prod())
    film_maps += sum(f * int(torch.tensor(s).prod()) for f, s in sizes[:-1])
    assert network.compute_conv_feature_map_size(patch) == plain.compute_conv_feature_map_size(patch) + film_maps
    with_attention = build(ndim, attention_stages=[2])
    assert with_attention.compute_conv_feature_map_size(patch) > network.compute_conv_feature_map_size(patch)
    with pytest.raises(ValueError):
        network.compute_conv_feature_map_size((8,) * (ndim + 1))


@pytest.mark.parametrize("ndim", [2, 3])
def test_attention_and_coordinate_channels(ndim: int) -> None:
    network = build(ndim, attention_stages=[1, 2], coordinate_channels=True)
    attention = [m for m in network.modules() if isinstance(m, SpatialSelfAttention)]
    assert len(attention) == 3  # encoder stages 1 and 2, decoder stage at resolution 1
    assert network.encoder_stages[0].blocks.convs[0].conv.in_channels == 3 + ndim
    out = network(torch.randn(2, 3, *SHAPES[ndim]), torch.tensor([1, 2]))
    assert out.shape == (2, 1, *SHAPES[ndim])
    with pytest.raises(ValueError):
        build(ndim, attention_stages=[3])


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        build(2, features_per_stage=[8, 16])
    network = build(2)
    with pytest.raises(ValueError):
        network(torch.randn(2, 3, *SHAPES[2]), torch.tensor([1, 2, 3]))
