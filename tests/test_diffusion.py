"""Tests of the diffusion settings and the diffusion process (spinediff.diffusion)."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from spinediff.diffusion import DiffusionProcess, DiffusionSettings
from spinediff.errors import SpineDiffError

torch.set_num_threads(1)

CONTRACT_BLOCK = {
    "task": "translation",
    "condition_channels": 2,
    "target_channels": 1,
    "num_train_timesteps": 1000,
    "noise_schedule": "cosine",
    "prediction_type": "sample",
    "solver": "ddim",
    "num_inference_steps": 10,
    "eta": 0.0,
    "num_samples": 5,
    "ema_decay": 0.999,
    "loss": "l1",
    "condition_dropout": 0.0,
    "target_intensity": {"lower": -1000.0, "upper": 1500.0},
    "timestep_power": 1.0,
    "deep_supervision": False,
    "warm_start": None,
}


# ---------------------------------------------------------------------------------------------- settings
def test_settings_read_the_contract_block() -> None:
    settings = DiffusionSettings.from_dict(CONTRACT_BLOCK)
    assert settings.task == "translation"
    assert settings.input_channels == 3 and settings.output_channels == 1
    assert DiffusionProcess.from_settings(settings).schedule_name == "cosine"
    assert settings.to_dict() == CONTRACT_BLOCK
    assert DiffusionSettings.from_dict(settings.to_dict()) == settings
    minimal = DiffusionSettings.from_dict({"task": "segmentation", "condition_channels": 1, "target_channels": 4})
    assert (minimal.noise_schedule, minimal.prediction_type, minimal.num_inference_steps) == ("cosine", "sample", 10)
    with pytest.raises(dataclasses_frozen_error()):
        settings.eta = 0.5  # type: ignore[misc]


def dataclasses_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize(
    "key, value",
    [
        ("task", "registration"),
        ("noise_schedule", "sigmoid"),
        ("prediction_type", "x0"),
        ("solver", "heun"),
        ("loss", "dice_ce"),  # only for segmentation
        ("condition_channels", -1),
        ("target_channels", 0),
        ("num_train_timesteps", 1),
        ("num_inference_steps", 0),
        ("num_inference_steps", 1001),
        ("num_inference_steps", 2.5),
        ("eta", 1.5),
        ("eta", "0"),
        ("num_samples", 0),
        ("ema_decay", 1.0),
        ("condition_dropout", 1.0),
        ("condition_dropout", -0.1),
        ("target_intensity", [1, 2]),
        ("num_samples", True),
        ("deep_supervision", "yes"),
        ("deep_supervision", True),  # the contract block's l1 loss has no mask to supervise at low resolution
        ("warm_start", 0.0),
        ("warm_start", 1.0),
        ("warm_start", "half"),
        ("noise_schedule", "rflow"),  # rectified flow needs its own solver (euler)
        ("solver", "euler"),  # and euler needs rectified flow
    ],
)
def test_settings_reject_invalid_values(key: str, value) -> None:
    block = dict(CONTRACT_BLOCK, **{key: value})
    with pytest.raises(SpineDiffError, match=key if key != "loss" else "dice_ce"):
        DiffusionSettings.from_dict(block, source="plans.json")


def test_settings_read_the_solver_under_its_old_name() -> None:
    """Plans and checkpoints written before the solver registry call the solver ``sampler``: still read."""
    old = {k: v for k, v in CONTRACT_BLOCK.items() if k != "solver"}
    settings = DiffusionSettings.from_dict(dict(old, sampler="dpm++2m"))
    assert settings.solver == "dpm++2m" and "sampler" not in settings.to_dict()
    with pytest.raises(SpineDiffError, match="solver must be one of"):
        DiffusionSettings.from_dict(dict(old, sampler="heun"))


def test_settings_reject_unknown_and_missing_keys() -> None:
    with pytest.raises(SpineDiffError, match="num_inference_step"):
        DiffusionSettings.from_dict(dict(CONTRACT_BLOCK, num_inference_step=5))
    with pytest.raises(SpineDiffError, match="target_channels"):
        DiffusionSettings.from_dict({"task": "translation", "condition_channels": 2})
    with pytest.raises(SpineDiffError, match="JSON object"):
        DiffusionSettings.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(SpineDiffError, match="plans.json"):
        DiffusionSettings.from_dict(dict(CONTRACT_BLOCK, eta=-1), source="plans.json")


# ---------------------------------------------------------------------------------------------- process
def test_process_uses_monai_schedules() -> None:
    for name, monai_name in (("cosine", "cosine"), ("linear", "linear_beta")):
        process = DiffusionProcess(noise_schedule=name)
        reference = DDPMScheduler(1000, monai_name)
        torch.testing.assert_close(process.scheduler.alphas_cumprod, reference.alphas_cumprod)
    cosine, linear = DiffusionProcess(noise_schedule="cosine"), DiffusionProcess(noise_schedule="linear")
    assert not torch.allclose(cosine.scheduler.alphas_cumprod, linear.scheduler.alphas_cumprod)
    for kwargs in (
        {"noise_schedule": "quadratic"},
        {"prediction_type": "x0"},
        {"loss": "l2"},
        {"condition_dropout": 1.0},
    ):
        with pytest.raises(SpineDiffError):
            DiffusionProcess(**kwargs)


def _random_state(dtype: torch.dtype, timesteps: torch.Tensor):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand((len(timesteps), 2, 5, 4), generator=generator, dtype=dtype) * 2 - 1
    noise = torch.randn((len(timesteps), 2, 5, 4), generator=generator, dtype=dtype)
    return x0, noise


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_prediction_conversions_are_exact_inverses(prediction_type: str, schedule: str) -> None:
    process = DiffusionProcess(noise_schedule=schedule, prediction_type=prediction_type)
    # float64 over every timestep; float32 where alpha_bar >= 1e-3: near t = T the schedules reach
    # alpha_bar ~ 1e-5 (linear) and 2e-9 (cosine), and eps -> x0 divides by sqrt(alpha_bar), which
    # float32 rounding cannot survive to 1e-5 (the conversions are exact, the number format is not)
    float32_steps = torch.nonzero(process.scheduler.alphas_cumprod >= 1e-3).flatten()
    cases = [(torch.float64, torch.arange(1000)), (torch.float32, float32_steps)]
    for dtype, timesteps in cases:
        x0, noise = _random_state(dtype, timesteps)
        noisy = process.add_noise(x0, noise, timesteps)
        eps_from_x0 = process.epsilon_from_x0(noisy, x0, timesteps)
        torch.testing.assert_close(eps_from_x0, noise, atol=1e-5, rtol=0)
        torch.testing.assert_close(process.x0_from_epsilon(noisy, noise, timesteps), x0, atol=1e-5, rtol=0)
        velocity = process.velocity_from_x0(noisy, x0, timesteps)
        torch.testing.assert_close(velocity, process.scheduler.get_velocity(x0, noise, timesteps), atol=1e-5, rtol=0)
        torch.testing.assert_close(process.x0_from_velocity(noisy, velocity, timesteps), x0, atol=1e-5, rtol=0)
        target = process.training_target(x0, noise, timesteps)
        torch.testing.assert_close(process.to_x0(target, noisy, timesteps), x0, atol=1e-5, rtol=0)
        torch.testing.assert_close(process.from_x0(x0, noisy, timesteps), target, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_to_x0_agrees_with_monai_ddim(prediction_type: str) -> None:
    process = DiffusionProcess(prediction_type=prediction_type)
    ddim = DDIMScheduler(1000, "cosine", clip_sample=False, prediction_type=prediction_type)
    ddim.set_timesteps(10)
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn((1, 1, 6, 6), generator=generator)
    output = torch.randn((1, 1, 6, 6), generator=generator)
    for t in ddim.timesteps[:-1]:
        _, monai_x0 = ddim.step(output, int(t), noisy)
        torch.testing.assert_close(process.to_x0(output, noisy, torch.tensor([int(t)])), monai_x0)


def test_training_batch_is_seeded_and_drops_conditions() -> None:
    process = DiffusionProcess(prediction_type="epsilon", condition_dropout=0.5)
    condition = torch.ones(64, 2, 4, 4)
    target = torch.zeros(64, 1, 4, 4)
    first = process.prepare_training_batch(condition, target, torch.Generator().manual_seed(3))
    again = process.prepare_training_batch(condition, target, torch.Generator().manual_seed(3))
    other = process.prepare_training_batch(condition, target, torch.Generator().manual_seed(4))
    assert torch.equal(first.network_input, again.network_input)
    assert not torch.equal(first.network_input, other.network_input)
    assert first.network_input.shape == (64, 3, 4, 4)
    assert 0 <= int(first.timesteps.min()) and int(first.timesteps.max()) < 1000
    torch.testing.assert_close(first.noisy_target, process.add_noise(target, first.noise, first.timesteps))
    dropped = ~first.condition_kept
    assert 16 < int(dropped.sum()) < 48
    assert (first.network_input[dropped, :2] == 0).all()
    assert (first.network_input[~dropped, :2] == 1).all()
    no_dropout = DiffusionProcess().prepare_training_batch(condition, target, torch.Generator().manual_seed(3))
    assert no_dropout.condition_kept.all()


@pytest.mark.parametrize("loss", ["l1", "mse"])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_regression_losses_compare_with_the_right_target(loss: str, prediction_type: str) -> None:
    process = DiffusionProcess(prediction_type=prediction_type, loss=loss)
    target = torch.rand(4, 1, 6, 6) * 2 - 1
    batch = process.prepare_training_batch(torch.zeros(4, 1, 6, 6), target, torch.Generator().manual_seed(0))
    perfect = process.training_target(batch.target, batch.noise, batch.timesteps)
    assert process.loss(perfect, batch).item() == pytest.approx(0.0, abs=1e-7)
    off = process.loss(perfect + 0.5, batch).item()
    assert off == pytest.approx(0.5 if loss == "l1" else 0.25, rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_dice_ce_scores_the_predicted_one_hot(prediction_type: str) -> None:
    process = DiffusionProcess(prediction_type=prediction_type, loss="dice_ce")
    labels = torch.randint(0, 3, (4, 8, 8), generator=torch.Generator().manual_seed(0))
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 2 - 1
    batch = process.prepare_training_batch(torch.zeros(4, 1, 8, 8), one_hot, torch.Generator().manual_seed(1))
    timesteps = batch.timesteps
    perfect = process.from_x0(one_hot, batch.noisy_target, timesteps)
    wrong = process.from_x0(one_hot.roll(1, dims=1), batch.noisy_target, timesteps)
    perfect_loss, wrong_loss = process.loss(perfect, batch), process.loss(wrong, batch)
    assert perfect_loss < 0.05 < 1.0 < wrong_loss
    output = perfect.clone().requires_grad_(True)
    process.loss(output, batch).backward()
    assert output.grad is not None and output.grad.abs().sum() > 0


def test_from_settings_copies_the_settings() -> None:
    block = copy.deepcopy(CONTRACT_BLOCK)
    block.update(prediction_type="v_prediction", noise_schedule="linear", loss="mse", condition_dropout=0.1)
    process = DiffusionProcess.from_settings(DiffusionSettings.from_dict(block))
    assert (process.prediction_type, process.noise_schedule, process.loss_name) == ("v_prediction", "linear", "mse")
    assert process.condition_dropout == 0.1 and process.schedule_name == "linear_beta"


def test_deep_supervision_scores_every_resolution_against_the_downsampled_mask() -> None:
    """The lower-resolution outputs are scored against the area-downsampled one-hot target (weights 1/2^k, the
    coarsest 0): a correct coarse output lowers the loss, a wrong one raises it, and the coarsest is ignored."""
    process = DiffusionProcess(1000, "cosine", "sample", "dice_ce", timestep_power=3.0)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 8:24, 4:20] = 1
    labels[:, 12:20, 20:28] = 2
    target = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 2 - 1
    batch = process.prepare_training_batch(torch.randn(2, 1, 32, 32), target, torch.Generator().manual_seed(0))

    def logits(resolution: int, wrong: bool = False) -> torch.Tensor:
        mask = torch.nn.functional.adaptive_avg_pool2d((target + 1) / 2, (resolution, resolution))
        if wrong:
            mask = mask.flip(1)
        return (mask * 2 - 1) * 5.0

    right = process.deep_supervision_loss([logits(32), logits(16), logits(8)], batch)
    wrong_middle = process.deep_supervision_loss([logits(32), logits(16, wrong=True), logits(8)], batch)
    wrong_coarsest = process.deep_supervision_loss([logits(32), logits(16), logits(8, wrong=True)], batch)
    assert wrong_middle > right + 0.1
    assert torch.isclose(wrong_coarsest, right)  # the coarsest output has weight 0, as in nnU-Net
    # one output: the plain loss
    assert torch.isclose(process.deep_supervision_loss([logits(32)], batch), process.loss(logits(32), batch))
    with pytest.raises(SpineDiffError, match="dice_ce"):
        DiffusionProcess(1000, "cosine", "sample", "l1").deep_supervision_loss([logits(32)], batch)
