"""Mixed precision on the CPU (bfloat16 / float16 autocast), torch.compile, and noise drawn on the training
device's generator."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import nnunet_folders

from spinediff.errors import SpineDiffError
from spinediff.training.api import TrainingOptions, build_trainer
from spinediff.utilities.precision import AutocastNetwork, autocast_dtype

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


def _trainer(precision: str, tmp_path: Path):
    from spinediff.training.api import apply_options

    trainer = build_trainer(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer", device="cpu",
                            results_folder=str(tmp_path / precision))
    apply_options(trainer, replace(RUN, precision=precision))
    trainer.initialize()
    return trainer


def test_bfloat16_training_follows_the_float32_loss_curve(planned, tmp_path):
    """Same seed, same batches and noise: the bfloat16-autocast losses of four steps stay within 5 % of
    float32's; weights and a sampled validation output stay finite."""
    from spinediff.training.distributed import seed_global_generators

    curves, batches = {}, None
    for precision in ("fp32", "bf16"):
        trainer = _trainer(precision, tmp_path)
        if batches is None:
            loader, _ = trainer.get_dataloaders()
            batches = [next(loader) for _ in range(4)]
        seed_global_generators(0)
        trainer.generator.manual_seed(0)
        curves[precision] = np.array([float(trainer.train_step(b)["loss"]) for b in batches])
        assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
        assert trainer.grad_scaler is None  # bfloat16 and float32 need no loss scaling
        with torch.no_grad():
            output = trainer.validation_step(batches[0])
        assert np.isfinite(output["loss"])
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], rtol=0.05)
    assert not np.array_equal(curves["bf16"], curves["fp32"])  # bfloat16 did run


def test_float16_checkpoints_and_restores_the_gradient_scaler(planned, tmp_path):
    trainer = _trainer("fp16", tmp_path)
    loader, _ = trainer.get_dataloaders()
    trainer.train_step(next(loader))
    assert trainer.grad_scaler is not None
    Path(trainer.output_folder).mkdir(parents=True, exist_ok=True)
    path = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(path))
    saved = torch.load(path, map_location="cpu", weights_only=True)["grad_scaler_state"]
    assert saved is not None and saved["scale"] > 0
    resumed = _trainer("fp16", tmp_path)
    resumed.load_checkpoint(str(path))
    assert resumed.grad_scaler.state_dict() == saved
    assert _trainer("fp32", tmp_path).grad_scaler is None


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
