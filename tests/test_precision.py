"""Mixed precision on the CPU (bfloat16 / float16 autocast), torch.compile, and noise drawn on the training
device's generator."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import nnunet_folders

from spinediff.errors import SpineDiffError
from spinediff.training.api import TrainingOptions, build_trainer, train
from spinediff.training.precision import AutocastNetwork, autocast_dtype

RUN = TrainingOptions(epochs=2, iterations_per_epoch=3, val_iterations_per_epoch=1, num_inference_steps=2,
                      validation_samples=1, seed=3)
SEG = "Dataset901_SpinePhantomSeg"


@pytest.fixture(scope="module")
def planned(phantom_root, tmp_path_factory):
    from spinediff.planning.api import plan_dataset

    with nnunet_folders(phantom_root, tmp_path_factory.mktemp("precision")) as env:
        plan_dataset(901, configurations=["2d_diffusion"], device="cpu", num_processes=1, show_progress_bar=False)
        yield env


def test_auto_precision_is_float32_on_the_cpu_and_reduced_on_cuda(monkeypatch):
    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16 and autocast_dtype("fp16", "cpu") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("auto", "cuda") == torch.float16  # older GPUs: float16 with the gradient scaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(SpineDiffError, match="--precision must be one of"):
        autocast_dtype("half", "cpu")


def test_bfloat16_training_follows_the_float32_loss_curve(planned, tmp_path):
    """Same seed, same batches and noise: the bfloat16-autocast losses stay within 5 % of float32's, and the
    weights and the validation outputs are finite."""
    curves = {}
    for precision in ("fp32", "bf16"):
        folder = train(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer", replace(RUN, precision=precision),
                       results_folder=str(tmp_path / precision))
        checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
        curves[precision] = np.array(checkpoint["logging"]["train_losses"])
        assert all(torch.isfinite(w).all() for w in checkpoint["network_weights"].values())
        assert checkpoint["grad_scaler_state"] is None  # bfloat16 needs no loss scaling
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], rtol=0.05)
    assert not np.array_equal(curves["bf16"], curves["fp32"])  # bfloat16 did run


def test_float16_checkpoints_and_restores_the_gradient_scaler(planned, tmp_path):
    folder = train(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer", replace(RUN, precision="fp16", epochs=1),
                   results_folder=str(tmp_path))
    saved = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)["grad_scaler_state"]
    assert saved is not None and saved["scale"] > 0
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from spinediff.training.api import apply_options

    trainer = build_trainer(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer", continue_training=True,
                            results_folder=str(tmp_path))
    apply_options(trainer, replace(RUN, precision="fp16"))
    maybe_load_checkpoint(trainer, True, False)
    assert trainer.grad_scaler is not None and trainer.grad_scaler.state_dict() == saved


def test_sampling_under_autocast_returns_float32_close_to_float32_sampling():
    from spinediff.networks.time_unet import TimeConditionedUNet

    torch.manual_seed(0)
    network = TimeConditionedUNet(input_channels=2, num_classes=1, n_stages=2, features_per_stage=[8, 16],
                                  conv_op=torch.nn.Conv2d, kernel_sizes=3, strides=[1, 2], n_conv_per_stage=1,
                                  n_conv_per_stage_decoder=1, time_embedding_dim=16).eval()
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([3, 500])
    with torch.no_grad():
        eager = network(x, t)
        amp = AutocastNetwork(network, torch.bfloat16, "cpu")(x, t)
    assert amp.dtype == torch.float32 and torch.isfinite(amp).all()
    assert torch.allclose(amp, eager, atol=0.1)


def test_a_compiled_network_gives_the_eager_output():
    from spinediff.networks.time_unet import TimeConditionedUNet

    torch.manual_seed(0)
    network = TimeConditionedUNet(input_channels=2, num_classes=1, n_stages=2, features_per_stage=[8, 16],
                                  conv_op=torch.nn.Conv2d, kernel_sizes=3, strides=[1, 2], n_conv_per_stage=1,
                                  n_conv_per_stage_decoder=1, time_embedding_dim=16).eval()
    x, t = torch.randn(1, 2, 16, 16), torch.tensor([10])
    try:
        compiled = torch.compile(network)
        with torch.no_grad():
            out = compiled(x, t)
    except Exception as exc:  # noqa: BLE001 (no compiler toolchain on this platform)
        pytest.skip(f"torch.compile is not available here: {type(exc).__name__}: {str(exc)[:200]}")
    with torch.no_grad():
        assert torch.allclose(out, network(x, t), atol=1e-4)


def test_trainers_compile_only_on_cuda_and_draw_noise_on_their_device(planned, monkeypatch):
    trainer = build_trainer(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer", device="cpu")
    monkeypatch.setenv("nnUNet_compile", "true")
    assert trainer._do_i_compile() is False  # never on the CPU
    assert trainer.generator.device == trainer.device == torch.device("cpu")
