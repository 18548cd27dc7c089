"""nnUNetTrainerGlobalContext (issue 34): nnU-Net's network with self-attention at its bottleneck, starting as nnU-Net's
network, reading every bottleneck position, offered by the benchmark on request, found by nnU-Net's predictor."""

from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from spinediff.errors import SpineDiffError
from spinediff.tasks import get_task
from spinediff.training.global_context import BottleneckAttention, with_bottleneck_attention


def plain_unet() -> PlainConvUNet:
    """A small 2D U-Net as nnU-Net's planner builds them (2d_cpu's shape: last stride along one axis only)."""
    return PlainConvUNet(1, 4, [8, 16, 32, 32], torch.nn.Conv2d, 3, [1, 2, 2, (2, 1)], 2, 6, 2,
                         conv_bias=True, norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"affine": True},
                         nonlin=torch.nn.LeakyReLU, deep_supervision=True)


def test_the_network_starts_as_nnunets_and_gains_only_the_attention_block():
    torch.manual_seed(0)
    plain = plain_unet().eval()
    attended = with_bottleneck_attention(plain_unet()).eval()
    renamed = {k.replace("stages.3.", "stages.3.0."): v for k, v in plain.state_dict().items()}
    missing = attended.load_state_dict(renamed, strict=False).missing_keys
    assert missing and all(".3.1." in k for k in missing)  # only the attention block is new
    x = torch.randn(2, 1, 32, 24)
    with torch.no_grad():
        for a, b in zip(plain(x), attended(x), strict=True):
            assert torch.allclose(a, b, atol=1e-6)


def test_the_block_reads_every_bottleneck_position_once_trained():
    """With its output projection no longer zero, a change at one corner of the feature map moves the output at
    the opposite corner (a 3 x 3 convolution would not)."""
    torch.manual_seed(0)
    block = BottleneckAttention(16)
    x = torch.randn(1, 16, 6, 4)
    assert torch.equal(block(x), x)  # the identity at initialisation
    torch.nn.init.normal_(block.attention.out_proj.weight)
    y = x.clone()
    y[0, :, 0, 0] += 3.0
    out_x, out_y = block(x), block(y)
    assert not torch.allclose(out_x[0, :, 5, 3], out_y[0, :, 5, 3])


def test_a_bottleneck_the_heads_do_not_divide_and_a_foreign_network_are_refused():
    with pytest.raises(SpineDiffError, match="attention heads"):
        BottleneckAttention(30)
    with pytest.raises(SpineDiffError, match="nnUNetTrainer"):
        with_bottleneck_attention(torch.nn.Conv2d(1, 1, 3))


def test_the_benchmark_offers_the_trainer_on_request_only():
    from spinediff.experiments.benchmark import methods_for, select_methods

    methods = methods_for(get_task("segmentation"), ["2d_diffusion", "2d_cpu"], ("2d",), ())
    assert "nnUNetTrainerGlobalContext" in [m.trainer for m in methods]
    assert "nnUNetTrainerGlobalContext" not in [m.trainer for m in select_methods(methods, None)]
    assert [m.trainer for m in select_methods(methods, ["nnUNetTrainerGlobalContext"])] == [
        "nnUNetTrainerGlobalContext"]


def test_nnunets_predictor_finds_the_trainer_through_spinediffs_entry():
    """nnU-Net's predictor loads the trainer by name through spinediff's entry (find_best's command for the model:
    tests/test_level_context.py::test_find_bests_command_points_nnunet_at_the_trainer)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import spinediff  # noqa: F401 (sets nnUNet_extTrainer)
    from spinediff.training.global_context import nnUNetTrainerGlobalContext

    assert recursive_find_trainer_class_by_name("nnUNetTrainerGlobalContext") is nnUNetTrainerGlobalContext
