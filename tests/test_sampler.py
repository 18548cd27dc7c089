"""Tests of the sliding-window DDIM sampler (spinediff.diffusion.sampler), incl. an overfitting run, and of the
prediction core on top of it (spinediff.diffusion.volume)."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from spinediff.diffusion import (
    DiffusionProcess,
    SlidingWindowSampler,
    VolumePredictor,
    ensemble_seeds,
    initial_noise,
    mirrored,
)
from spinediff.diffusion.sampler import StableDDIMScheduler, trailing_timesteps
from spinediff.errors import SpineDiffError
from spinediff.networks import TimeConditionedUNet

torch.set_num_threads(1)


def tiny_network(ndim: int, condition_channels: int = 1, target_channels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    if ndim == 2:
        kernels, strides = [[3, 3], [3, 3], [3, 3]], [[1, 1], [2, 2], [2, 2]]
    else:  # anisotropic: no pooling of the first axis at the first downsampling
        kernels, strides = [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    network = TimeConditionedUNet(
        condition_channels + target_channels,
        3,
        [8, 16, 32],
        getattr(nn, f"Conv{ndim}d"),
        kernels,
        strides,
        2,
        target_channels,
        1,
        conv_bias=True,
        time_embedding_dim=16,
    )
    network.apply(network.initialize)
    return network.eval()


class CallRecorder(nn.Module):
    """Wraps a network and records the batch size of every call."""

    def __init__(self, network: TimeConditionedUNet) -> None:
        super().__init__()
        self.network = network
        self.num_classes = network.num_classes
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.network(x, timesteps)


def reference_ddim(network, process, condition, noise, steps):
    """Plain whole-volume DDIM with monai's scheduler: no windows, no blending."""
    scheduler = StableDDIMScheduler(
        process.num_train_timesteps, process.schedule_name, prediction_type=process.prediction_type
    )
    scheduler.set_timesteps(steps)
    state = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            network_input = torch.cat([condition.expand(len(state), *condition.shape), state], dim=1)
            output = network(network_input, torch.full((len(state),), int(t)))
            state, _ = scheduler.step(output, int(t), state)
    return state


def psnr(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR for data in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / float(((estimate - reference) ** 2).mean()))


SPATIAL = {2: (16, 16), 3: (8, 16, 16)}


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_ddim_steps_land_on_the_next_scheduled_timestep(steps: int, prediction_type: str) -> None:
    """With an oracle output (the true x0 / noise / velocity), deterministic DDIM stays on the forward process:
    after the step from t the state is x0 noised to the *next scheduled* timestep, and the last step gives x0.
    monai's own DDIM steps to t - T // n instead (two steps: 999 → 499, then asked at 0)."""
    process = DiffusionProcess(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(steps)
    x0 = torch.rand((1, 1, 6, 6), generator=generator) * 1.6 - 0.8
    noise = torch.randn((1, 1, 6, 6), generator=generator)
    scheduler = StableDDIMScheduler(1000, process.schedule_name, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == trailing_timesteps(1000, steps) and timesteps[0] == 999
    assert len(set(timesteps)) == steps and timesteps == sorted(timesteps, reverse=True)
    state = process.add_noise(x0, noise, torch.tensor([999]))
    for index, t in enumerate(timesteps):
        output = process.training_target(x0, noise, torch.tensor([t]))
        state, _ = scheduler.step(output, t, state)
        if index + 1 < steps:
            expected = process.add_noise(x0, noise, torch.tensor([timesteps[index + 1]]))
        else:
            expected = x0
        torch.testing.assert_close(state, expected, atol=5e-3, rtol=0)  # float32 epsilon at t = 999


# --------------------------------------------------------------------------- exactness and determinism
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_one_window_equals_whole_volume_sampling_exactly(ndim: int, prediction_type: str) -> None:
    network = tiny_network(ndim)
    process = DiffusionProcess(prediction_type=prediction_type)
    condition = torch.randn((1, *SPATIAL[ndim]), generator=torch.Generator().manual_seed(5))
    sampler = SlidingWindowSampler(network, process, SPATIAL[ndim], sample_batch_size=2)
    samples = sampler.sample(condition, num_samples=2, generator=11, num_inference_steps=4)
    noise = torch.stack([initial_noise(seed, (1, *SPATIAL[ndim])) for seed in ensemble_seeds(11, 2)])
    expected = reference_ddim(network, process, condition, noise, steps=4)
    assert samples.shape == (2, 1, *SPATIAL[ndim])
    assert torch.equal(samples, expected)


def test_same_seed_same_samples_different_seed_different_samples() -> None:
    network = tiny_network(2)
    condition = torch.randn((1, 24, 20), generator=torch.Generator().manual_seed(0))
    for eta in (0.0, 1.0):
        sampler = SlidingWindowSampler(network, DiffusionProcess(), (16, 16), eta=eta)
        first = sampler.sample(condition, num_samples=2, generator=1, num_inference_steps=3)
        assert torch.isfinite(first).all()  # eta = 1: monai's sqrt(1 - a_prev - sigma^2) once rounded to NaN
        again = sampler.sample(condition, 2, generator=torch.Generator().manual_seed(1), num_inference_steps=3)
        assert torch.equal(first, again)
        assert (first - sampler.sample(condition, 2, generator=2, num_inference_steps=3)).abs().mean() > 1e-3
        assert (first[0] - first[1]).abs().mean() > 1e-3  # ensemble members differ
    # the step count is the call's: one sampler used with 2 then 3 steps equals fresh ones
    sampler = SlidingWindowSampler(network, DiffusionProcess(), (16, 16))
    two = sampler.sample(condition, 1, generator=5, num_inference_steps=2)
    assert torch.equal(sampler.sample(condition, 1, generator=5, num_inference_steps=3),
                       SlidingWindowSampler(network, DiffusionProcess(), (16, 16)).sample(condition, 1, generator=5,
                                                                                          num_inference_steps=3))
    assert torch.equal(two, sampler.sample(condition, 1, generator=5, num_inference_steps=2))
    # with eta = 0 a member depends only on its seed: not on the ensemble size or the batching
    sampler = SlidingWindowSampler(network, DiffusionProcess(), (16, 16), sample_batch_size=3)
    alone = SlidingWindowSampler(network, DiffusionProcess(), (16, 16))
    torch.testing.assert_close(sampler.sample(condition, 3, generator=4, num_inference_steps=3)[:1],
                               alone.sample(condition, 1, generator=4, num_inference_steps=3))


def test_memory_is_bounded_by_window_batches() -> None:
    recorder = CallRecorder(tiny_network(2))
    sampler = SlidingWindowSampler(recorder, DiffusionProcess(), (16, 16), window_batch_size=3, sample_batch_size=2)
    samples = sampler.sample(torch.zeros(1, 32, 16), num_samples=5, generator=0, num_inference_steps=2)
    assert samples.shape == (5, 1, 32, 16)
    windows = 3  # starts 0, 8, 16 along the first axis with step 0.5
    groups = [2, 2, 1]
    expected_calls = sum(math.ceil(g * windows / 3) for g in groups) * 2
    assert len(recorder.batch_sizes) == expected_calls
    assert set(recorder.batch_sizes) == {3}  # constant batch shape, the short last batch is filled up


def test_volume_smaller_than_the_patch_is_padded_and_cropped() -> None:
    network = tiny_network(2, condition_channels=2)
    sampler = SlidingWindowSampler(network, DiffusionProcess(), (16, 16))
    samples = sampler.sample(torch.randn(2, 11, 20), num_samples=1, generator=0, num_inference_steps=2)
    assert samples.shape == (1, 1, 11, 20) and torch.isfinite(samples).all()
    assert samples.abs().max() <= 1.0  # clipped x0 at the last step


def test_invalid_calls_raise_spinediff_errors() -> None:
    network = tiny_network(2)
    sampler = SlidingWindowSampler(network, DiffusionProcess(), (16, 16))
    with pytest.raises(SpineDiffError, match="spatial"):
        sampler.sample(torch.zeros(16, 16), num_inference_steps=2)
    with pytest.raises(SpineDiffError, match="start_timestep"):
        sampler.sample(torch.zeros(1, 16, 16), initial_estimate=torch.zeros(1, 16, 16), num_inference_steps=2)
    for steps in (0, 1001):  # checked at call time, against the process's 1000 training timesteps
        with pytest.raises(SpineDiffError, match="num_inference_steps"):
            sampler.sample(torch.zeros(1, 16, 16), num_inference_steps=steps)
    for kwargs in ({"tile_step_size": 0.0}, {"eta": 2.0}, {"mirror_axes": (2,)}):
        with pytest.raises(SpineDiffError):
            SlidingWindowSampler(network, DiffusionProcess(), (16, 16), **kwargs)


# --------------------------------------------------------------------------- TTA, guidance, progress
def test_mirroring_makes_the_denoiser_mirror_equivariant() -> None:
    network = tiny_network(2)
    x = torch.randn((2, 2, 16, 16), generator=torch.Generator().manual_seed(0))
    plain = SlidingWindowSampler(network, DiffusionProcess(), (16, 16))
    mirrored = SlidingWindowSampler(network, DiffusionProcess(), (16, 16), mirror_axes=(0, 1))
    with torch.no_grad():
        for axes in ([2], [3], [2, 3]):
            out = mirrored.denoise(x, 500, condition_channels=1)
            flipped_out = mirrored.denoise(torch.flip(x, axes), 500, condition_channels=1)
            torch.testing.assert_close(torch.flip(flipped_out, axes), out, atol=1e-5, rtol=1e-5)
        raw = plain.denoise(x, 500, condition_channels=1)
        assert (torch.flip(plain.denoise(torch.flip(x, [2]), 500, 1), [2]) - raw).abs().max() > 1e-3


def test_classifier_free_guidance_extrapolates_from_the_unconditional_output() -> None:
    network = tiny_network(2)
    x = torch.randn((1, 2, 16, 16), generator=torch.Generator().manual_seed(0))
    guided = SlidingWindowSampler(network, DiffusionProcess(), (16, 16), guidance_scale=3.0)
    with torch.no_grad():
        conditional = network(x, torch.tensor([400]))
        unconditional = network(torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:]], 1), torch.tensor([400]))
        torch.testing.assert_close(guided.denoise(x, 400, 1), unconditional + 3.0 * (conditional - unconditional))


def test_progress_bar_over_steps(capsys: pytest.CaptureFixture[str]) -> None:
    sampler = SlidingWindowSampler(tiny_network(2), DiffusionProcess(), (16, 16), progress=True)
    sampler.sample(torch.zeros(1, 16, 16), generator=0, num_inference_steps=3)
    assert "DDIM" in capsys.readouterr().err


# --------------------------------------------------------------------------- a trained network
PATCH = 32


def pattern_pair(size: int, shift: tuple[float, float] = (0.0, 0.0), period: float = 13.7):
    """A smooth "MR" condition and a "CT" target with inverted, sharpened contrast.

    The period is incommensurate with the patch so window borders do not fall on one phase.
    """
    rows = torch.arange(size, dtype=torch.float32) + shift[0]
    cols = torch.arange(size, dtype=torch.float32) + shift[1]
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    condition = 0.7 * torch.sin(2 * math.pi * yy / period + 0.5) * torch.cos(2 * math.pi * xx / (1.5 * period))
    condition = condition + 0.2 * torch.cos(2 * math.pi * (xx + yy) / (0.7 * period))
    return condition[None], (-0.9 * torch.tanh(3 * condition))[None]


@pytest.fixture(scope="module")
def trained():
    """A tiny 2D network trained for 300 steps on random patch crops of one fixed 64x64 pair."""
    network = tiny_network(2)
    network.train()
    process = DiffusionProcess(prediction_type="sample", loss="l1")
    condition, target = pattern_pair(2 * PATCH)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(300):
        corners = torch.randint(0, PATCH + 1, (8, 2), generator=generator).tolist()
        crops = [(slice(None), slice(y, y + PATCH), slice(x, x + PATCH)) for y, x in corners]
        batch = process.prepare_training_batch(
            torch.stack([condition[c] for c in crops]), torch.stack([target[c] for c in crops]), generator
        )
        loss = process.loss(network(batch.network_input, batch.timesteps), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"\ntrained 300 steps in {time.perf_counter() - start:.1f} s, final L1 {loss.item():.4f}")
    return network.eval(), process


def test_overfitted_network_reconstructs_the_target(trained) -> None:
    network, process = trained
    condition, target = pattern_pair(2 * PATCH)
    sampler = SlidingWindowSampler(network, process, (PATCH, PATCH), window_batch_size=9)
    window = (slice(None), slice(0, PATCH), slice(0, PATCH))
    one_window = sampler.sample(condition[window], num_samples=2, generator=0, num_inference_steps=10)
    whole = sampler.sample(condition, num_samples=1, generator=0, num_inference_steps=10)[0]
    figures = {
        "condition": psnr(condition[window], target[window]),
        "one window": min(psnr(s, target[window]) for s in one_window),
        "2x volume": psnr(whole, target),
    }
    print("PSNR [dB]: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    assert figures["condition"] < 10
    assert figures["one window"] > figures["condition"] + 20
    assert figures["2x volume"] > figures["condition"] + 20


def border_and_inside_differences(error: torch.Tensor, windows, size: int) -> tuple[float, float]:
    """Mean |e[i+1] - e[i]| over neighbour pairs that straddle a window border vs all other pairs."""
    border, inside = [], []
    for axis in (0, 1):
        differences = (error.narrow(axis + 1, 1, size - 1) - error.narrow(axis + 1, 0, size - 1)).abs()
        per_pair = differences.mean(dim=tuple(d for d in range(3) if d != axis + 1))
        edges = {b for w in windows for b in (w[axis].start, w[axis].stop) if 0 < b < size}
        border += [per_pair[b - 1] for b in edges]
        inside += [per_pair[i] for i in range(size - 1) if i + 1 not in edges]
    return float(torch.stack(border).mean()), float(torch.stack(inside).mean())


def test_volume_twice_the_patch_samples_without_seams(trained) -> None:
    network, process = trained
    size = 2 * PATCH
    results = {}
    # Gaussian blending vs. a control that stitches non-overlapping windows (a seam detector check)
    for name, options in (("blended", {}), ("hard stitched", {"tile_step_size": 1.0, "use_gaussian": False})):
        sampler = SlidingWindowSampler(network, process, (PATCH, PATCH), window_batch_size=9, **options)
        windows = sampler.windows((size, size))
        border, inside = [], []
        # several phase shifts so that borders meet every part of the pattern; the error image
        # (sample - target) removes the content's own gradients from the comparison
        for k in range(6):
            condition, target = pattern_pair(size, shift=(3.1 * k, 5.3 * k))
            sample = sampler.sample(condition, num_samples=1, generator=k, num_inference_steps=10)[0]
            b, i = border_and_inside_differences(sample - target, windows, size)
            border.append(b)
            inside.append(i)
        results[name] = (sum(border) / len(border), sum(inside) / len(inside))
    print(
        "mean |difference| across window borders vs inside: "
        + ", ".join(f"{k} {b:.4f} vs {i:.4f}" for k, (b, i) in results.items())
    )
    border, inside = results["blended"]
    assert border <= inside
    control_border, control_inside = results["hard stitched"]
    assert control_border > 2 * control_inside


def test_warm_start_from_an_estimate_skips_steps(trained) -> None:
    network, process = trained
    recorder = CallRecorder(network)
    condition, target = pattern_pair(PATCH)
    sampler = SlidingWindowSampler(recorder, process, (PATCH, PATCH))
    # a coarse "presegmentation": the target blurred and biased
    estimate = torch.nn.functional.avg_pool2d(target[None], 5, stride=1, padding=2)[0] * 0.8 + 0.05
    warm = sampler.sample(condition, num_samples=1, generator=0, num_inference_steps=10, initial_estimate=estimate,
                          start_timestep=300)
    assert len(recorder.batch_sizes) == 3  # scheduled timesteps 999, 899, ..., 99: only 299, 199, 99 run
    assert psnr(warm[0], target) > psnr(estimate, target) + 5
    assert psnr(warm[0], target) > psnr(condition, target) + 20
    with pytest.raises(SpineDiffError, match="below every"):
        sampler.sample(condition, num_inference_steps=10, initial_estimate=estimate, start_timestep=-1)


@pytest.mark.parametrize("solver", ["ddim", "dpm++2m"])
def test_self_warm_start_costs_one_call_plus_the_steps_below_its_level(trained, solver: str) -> None:
    """VolumePredictor(warm_start=0.3): one call from pure noise, then exactly ``steps`` calls at or below
    t = 0.3 (T - 1) for each solver; the result reconstructs the target as a cold start with more calls does."""
    network, process = trained
    recorder = CallRecorder(network)
    condition, target = pattern_pair(PATCH)
    warm = VolumePredictor(recorder, process=process, patch_size=(PATCH, PATCH), window_batch_size=4,
                           warm_start=0.3, solver=solver, sample_batch_size=2)
    sample = warm.predict(condition, num_inference_steps=3, num_samples=2, seed=0)
    assert len(recorder.batch_sizes) == 1 + 3  # the one-window volume: one call per step (2 members together)
    cold = VolumePredictor(network, process=process, patch_size=(PATCH, PATCH), window_batch_size=4, solver=solver)
    reference = cold.predict(condition, num_inference_steps=10, num_samples=1, seed=0)
    assert psnr(sample[0], target) > psnr(reference[0], target) - 3
    assert psnr(sample[0], target) > psnr(condition, target) + 20


def test_segmentation_sampling_continues_from_class_probabilities() -> None:
    """dice_ce (segmentation): every DDIM step continues from 2 softmax(x0 / T) - 1, so the sample is a
    probability map in the one-hot scale (channels sum to one after (x + 1) / 2), whatever the network's
    output scale; without the projection the free logit scale drifted over the steps."""
    class Scaled(CallRecorder):
        def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return 20 * super().forward(x, timesteps)  # logits far outside [-1, 1]

    scaled = Scaled(tiny_network(2, condition_channels=1, target_channels=3))
    condition = torch.randn((1, 16, 16), generator=torch.Generator().manual_seed(0))
    process = DiffusionProcess(loss="dice_ce")
    samples = SlidingWindowSampler(scaled, process, (16, 16)).sample(condition, 2, generator=3, num_inference_steps=4)
    probabilities = (samples + 1) / 2
    assert probabilities.min() >= 0 and torch.allclose(probabilities.sum(1), torch.ones(2, 16, 16), atol=1e-5)
    plain = SlidingWindowSampler(scaled, DiffusionProcess(loss="l1"), (16, 16))
    assert not torch.allclose(((plain.sample(condition, 2, generator=3, num_inference_steps=4) + 1) / 2).sum(1),
                              torch.ones(2, 16, 16), atol=1e-2)


@pytest.mark.parametrize("solver,schedule", [("ddim", "cosine"), ("dpm++2m", "cosine"), ("unipc", "cosine"),
                                             ("euler", "rflow")])
def test_every_solver_reads_segmentation_classes_before_clipping(solver: str, schedule: str) -> None:
    """x0 estimates of 2 and 3 for two classes (the dice_ce loss reads them as logits x0 / T): every solver must keep
    class 1 ahead. Clipping to [-1, 1] before the projection tied them at 1 (argmax: class 0), which cost the
    multistep solvers and rectified flow 12-19 % Dice on the phantom (2026-12-04)."""
    class Fixed(nn.Module):
        num_classes = 3

        def __init__(self) -> None:
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            logits = torch.tensor([2.0, 3.0, -5.0]).reshape(1, 3, 1, 1)
            return logits.expand(x.shape[0], 3, *x.shape[2:]) + 0 * self.anchor

    process = DiffusionProcess(loss="dice_ce", noise_schedule=schedule)
    sampler = SlidingWindowSampler(Fixed(), process, (8, 8), solver=solver)
    for steps in (1, 3):
        sample = sampler.sample(torch.zeros((1, 8, 8)), 1, generator=0, num_inference_steps=steps)
        assert (sample[0].argmax(0) == 1).all(), (solver, steps)


# --------------------------------------------------------------------------- the prediction core
def test_mirrored_averages_every_flip_combination() -> None:
    x = torch.randn((2, 1, 4, 5), generator=torch.Generator().manual_seed(0))
    weights = torch.randn((4, 5), generator=torch.Generator().manual_seed(1))

    def function(y: torch.Tensor) -> torch.Tensor:  # not mirror-equivariant
        return y * weights

    assert torch.equal(mirrored(function, x, ()), function(x))
    flips = ([2], [3], [2, 3])
    expected = (function(x) + sum(torch.flip(function(torch.flip(x, dims)), dims) for dims in flips)) / 4
    torch.testing.assert_close(mirrored(function, x, (0, 1)), expected)


def test_diffusion_volume_is_sampled_slice_by_slice_with_seed_plus_z() -> None:
    network = tiny_network(2)
    condition = torch.randn((1, 3, 20, 18), generator=torch.Generator().manual_seed(0))
    predictor = VolumePredictor(network, process=DiffusionProcess(), patch_size=(16, 16), window_batch_size=4,
                                sample_batch_size=2)
    calls = []
    samples = predictor.predict(condition, num_inference_steps=2, num_samples=2, seed=7,
                                on_slice=lambda: calls.append(1))
    sampler = SlidingWindowSampler(network, DiffusionProcess(), (16, 16), window_batch_size=4)
    expected = torch.stack([sampler.sample(condition[:, z], 2, generator=7 + z, num_inference_steps=2)
                            for z in range(3)], dim=2)
    assert samples.shape == (2, 1, 3, 20, 18) and len(calls) == 3
    assert torch.equal(samples, expected)
    # epoch validation: one sample per patch, seeded seed + i
    patches = condition.movedim(1, 0)[:, :, :16, :16]
    torch.testing.assert_close(predictor.predict_patches(patches, num_inference_steps=2, seed=7),
                               torch.cat([sampler.sample(p, 1, generator=7 + i, num_inference_steps=2)
                                          for i, p in enumerate(patches)]), rtol=0, atol=0)


def test_diffusion_3d_volume_is_sampled_whole() -> None:
    network = tiny_network(3)
    condition = torch.randn((1, 10, 20, 18), generator=torch.Generator().manual_seed(0))
    calls = []
    predictor = VolumePredictor(network, process=DiffusionProcess(), patch_size=(8, 16, 16), window_batch_size=4)
    samples = predictor.predict(condition, num_inference_steps=2, num_samples=2, seed=3,
                                on_slice=lambda: calls.append(1))
    sampler = SlidingWindowSampler(network, DiffusionProcess(), (8, 16, 16), window_batch_size=4)
    assert torch.equal(samples, sampler.sample(condition, 2, generator=3, num_inference_steps=2)) and calls == [1]


def test_one_step_model_predicts_through_the_same_slice_loop() -> None:
    """process None: network(condition, 0) in Gaussian-blended windows, clamped, the same output for all K."""
    class Scaled(nn.Module):  # outputs beyond [-1, 1] show the clamp
        def __init__(self) -> None:
            super().__init__()
            self.network = tiny_network(2, condition_channels=0)  # reads the condition only

        def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return 20 * self.network(x, timesteps)

    network = Scaled().eval()
    condition = torch.randn((1, 3, 20, 18), generator=torch.Generator().manual_seed(0))
    calls = []
    plain = VolumePredictor(network, process=None, patch_size=(16, 16), window_batch_size=4)
    volume = plain.predict(condition, num_inference_steps=1, num_samples=3, on_slice=lambda: calls.append(1))
    assert volume.shape == (3, 1, 3, 20, 18) and len(calls) == 3 and not plain.denoising
    assert torch.equal(volume[0], volume[2]) and volume.abs().max() == 1.0
    assert torch.equal(volume[:, :, 1], plain.predict(condition[:, 1], num_inference_steps=1, num_samples=3))
    patches = condition.movedim(1, 0)[:, :, :16, :16]
    with torch.no_grad():
        direct = network(patches, torch.zeros(3, dtype=torch.long)).clamp(-1, 1)
    assert torch.equal(plain.predict_patches(patches, num_inference_steps=1), direct)
    # mirroring through the shared helper makes the one-step model mirror-equivariant
    flipping = VolumePredictor(network, process=None, patch_size=(16, 16), window_batch_size=4, mirror_axes=(0, 1))
    flipped = flipping.predict(torch.flip(condition, [3]), num_inference_steps=1)
    torch.testing.assert_close(torch.flip(flipped, [4]), flipping.predict(condition, num_inference_steps=1),
                               atol=1e-5, rtol=1e-5)
    assert (flipping.predict(condition, num_inference_steps=1) - volume[:1]).abs().max() > 1e-3


# ---------------------------------------------------------------------- multistep solvers
class GaussianDenoiser(nn.Module):
    """The exact optimal denoiser when every voxel of x0 is N(mu, s^2) independently: E[x0 | x_t] in closed form,
    returned as the process's prediction type. Sampling with it follows the true probability-flow ODE, so a
    solver's error is its discretisation error alone."""

    def __init__(self, process: DiffusionProcess, mu: float = 0.3, s: float = 0.5) -> None:
        super().__init__()
        self.process, self.mu, self.s = process, mu, s
        self.num_classes = 1
        self.anchor = nn.Parameter(torch.zeros(1))  # a parameter, so the sampler finds the device

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        noisy = x[:, -1:]
        a = self.process._alpha_bar(timesteps, noisy)
        x0 = self.mu + a.sqrt() * self.s**2 / (a * self.s**2 + 1 - a) * (noisy - a.sqrt() * self.mu)
        return self.process.from_x0(x0, noisy, timesteps)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_multistep_solvers_converge_to_the_ode_solution_at_higher_order(prediction_type: str) -> None:
    """With the exact denoiser of Gaussian data, DPM-Solver++ 2M and UniPC reach the converged sample (DDIM with
    every timestep) as DDIM does, for every prediction type (so each reads the network's output as the right
    type), and at 50 steps they are far nearer to it than DDIM: the higher order of the multistep solvers."""
    process = DiffusionProcess(prediction_type=prediction_type)
    network = GaussianDenoiser(process)
    condition = torch.zeros(0, 8, 8)

    def draw(solver: str, steps: int) -> torch.Tensor:
        sampler = SlidingWindowSampler(network, process, (8, 8), solver=solver, clip_sample=False)
        return sampler.sample(condition, 4, generator=3, num_inference_steps=steps)

    converged = draw("ddim", 1000)
    assert abs(converged.mean().item() - 0.3) < 0.1 and abs(converged.std().item() - 0.5) < 0.1
    for solver in ("dpm++2m", "unipc"):
        assert (draw(solver, 250) - converged).abs().max().item() < 5e-3
    errors = {solver: (draw(solver, 50) - converged).abs().mean().item() for solver in ("ddim", "dpm++2m", "unipc")}
    assert errors["dpm++2m"] < 0.3 * errors["ddim"], errors
    assert errors["unipc"] < 0.3 * errors["ddim"], errors
    with pytest.raises(SpineDiffError, match="solver must be one of"):
        SlidingWindowSampler(network, process, (8, 8), solver="heun")
    with pytest.raises(SpineDiffError, match="samples with ddim, dpm"):
        SlidingWindowSampler(network, process, (8, 8), solver="euler")


class GaussianFlowDenoiser(nn.Module):
    """The exact E[x0 | x_t] of Gaussian data N(mu, s^2) under rectified flow (x_t = (1 - u) x0 + u noise, u = t / T),
    returned as the process's prediction type (x0, or the flow velocity x0 - noise)."""

    def __init__(self, process: DiffusionProcess, mu: float = 0.3, s: float = 0.5) -> None:
        super().__init__()
        self.process, self.mu, self.s = process, mu, s
        self.num_classes = 1
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        noisy = x[:, -1:]
        u = (timesteps.float() / self.process.num_train_timesteps).reshape(-1, 1, 1, 1)
        x0 = self.mu + (1 - u) * self.s**2 / ((1 - u) ** 2 * self.s**2 + u**2) * (noisy - (1 - u) * self.mu)
        return self.process.from_x0(x0, noisy, timesteps)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_rectified_flow_noises_along_a_line_and_euler_sampling_reaches_the_data(prediction_type: str) -> None:
    """Rectified flow (monai's RFlowScheduler): x_t runs in a straight line from x0 (t = 0) to the noise (t = T), the
    training target of v_prediction is x0 - noise, and Euler sampling with the exact denoiser of Gaussian data draws
    that Gaussian (mean, spread), for x0 and velocity networks alike; one step reads x0 off the network once."""
    process = DiffusionProcess(noise_schedule="rflow", prediction_type=prediction_type)
    x0, noise = torch.full((2, 1, 4, 4), 0.7), torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    times = torch.tensor([0, 1000])
    noisy = process.add_noise(x0, noise, times)
    assert torch.allclose(noisy[0], x0[0]) and torch.allclose(noisy[1], noise[1])
    quarter = process.add_noise(x0, noise, torch.tensor([250, 250]))
    assert torch.allclose(quarter, 0.75 * x0 + 0.25 * noise, atol=1e-6)
    target = process.training_target(x0, noise, torch.tensor([250, 250]))
    assert torch.allclose(target, x0 - noise if prediction_type == "v_prediction" else x0)
    assert torch.allclose(process.to_x0(process.from_x0(x0, quarter, torch.tensor([250, 250])), quarter,
                                        torch.tensor([250, 250])), x0, atol=1e-5)
    drawn = process.sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert drawn.min() >= 1 and drawn.max() == 1000  # the flow's pure-noise end is trained, t = 0 (the data) is not
    network = GaussianFlowDenoiser(process)
    sampler = SlidingWindowSampler(network, process, (16, 16), solver="euler", clip_sample=False)
    samples = sampler.sample(torch.zeros(0, 16, 16), 4, generator=1, num_inference_steps=200)
    assert abs(samples.mean().item() - 0.3) < 0.05 and abs(samples.std().item() - 0.5) < 0.05
    with pytest.raises(SpineDiffError, match="samples with euler"):
        SlidingWindowSampler(network, process, (16, 16), solver="ddim")
    with pytest.raises(SpineDiffError, match="epsilon"):
        DiffusionProcess(noise_schedule="rflow", prediction_type="epsilon")


# --------------------------------------------------------------------------- progressive distillation
def test_distillation_target_is_where_two_teacher_steps_land(trained) -> None:
    """For a 1-step student the target x0 from pure noise is the teacher's own 2-step DDIM sample (trailing grid
    999 → 499 → data), as the sampler draws it; a 2-step student's target at t = 999 moves one DDIM step onto the
    teacher's 2-step landing at its next timestep (499)."""
    from spinediff.diffusion.sampler import initial_noise
    from spinediff.training.distillation import ProgressiveDistiller

    network, process = trained
    condition, _ = pattern_pair(PATCH)
    noise = initial_noise(ensemble_seeds(3, 1)[0], (1, PATCH, PATCH))
    two_steps = SlidingWindowSampler(network, process, (PATCH, PATCH)).sample(condition, 1, generator=3,
                                                                              num_inference_steps=2)
    one = ProgressiveDistiller(network, copy_of(network), process, student_steps=1)
    target = one.student_target(condition[None], noise[None], torch.tensor([0]))
    torch.testing.assert_close(target, two_steps, atol=1e-5, rtol=0)
    two = ProgressiveDistiller(network, copy_of(network), process, student_steps=2)
    assert two.starts.tolist() == [999, 499] and two.middles.tolist() == [749, 249] and two.ends.tolist() == [499, -1]
    x0 = two.student_target(condition[None], noise[None], torch.tensor([0]))
    start = torch.tensor([999])
    landing = two.ddim_step(x0, process.epsilon_from_x0(noise[None], x0, start), torch.tensor([499]))
    teacher_x0, teacher_eps = two.estimate(network, condition[None], noise[None], start)
    halfway = two.ddim_step(teacher_x0, teacher_eps, torch.tensor([749]))
    teacher_x0, teacher_eps = two.estimate(network, condition[None], halfway, torch.tensor([749]))
    torch.testing.assert_close(landing, two.ddim_step(teacher_x0, teacher_eps, torch.tensor([499])), atol=1e-4,
                               rtol=0)


def copy_of(network: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(network)


def test_distilled_one_step_student_samples_like_the_many_step_teacher(trained) -> None:
    """Rounds 4 → 2 → 1 steps on the training crops: the 1-step student's sample is much closer to the teacher's
    4-step sample than the teacher's own 1-step sample is (same seeds)."""
    from spinediff.training.distillation import ProgressiveDistiller, distillation_rounds

    network, process = trained
    condition, target = pattern_pair(2 * PATCH)
    generator = torch.Generator().manual_seed(7)

    def crops(n: int):
        corners = torch.randint(0, PATCH + 1, (n, 2), generator=generator).tolist()
        cut = [(slice(None), slice(y, y + PATCH), slice(x, x + PATCH)) for y, x in corners]
        return torch.stack([condition[c] for c in cut]), torch.stack([target[c] for c in cut])

    def sample(net, steps):
        sampler = SlidingWindowSampler(net, process, (PATCH, PATCH))
        return torch.cat([sampler.sample(condition, 1, generator=k, num_inference_steps=steps) for k in range(3)])

    reference, teacher_one = sample(network, 4), sample(network, 1)
    teacher = network
    for steps in distillation_rounds(1, 4):
        student = copy_of(teacher)
        distiller = ProgressiveDistiller(teacher, student, process, steps, 1e-3, torch.Generator().manual_seed(steps))
        losses = [distiller.train_step(*crops(8)) for _ in range(60)]
        assert sum(losses[-10:]) < sum(losses[:10])
        teacher = student.eval()
    student_error = float(((sample(teacher, 1) - reference) ** 2).mean())
    teacher_error = float(((teacher_one - reference) ** 2).mean())
    assert student_error < 0.3 * teacher_error, (student_error, teacher_error)


def test_distillation_refuses_what_it_cannot_do() -> None:
    from spinediff.training.distillation import ProgressiveDistiller, distillation_rounds

    assert distillation_rounds(1, 8) == [4, 2, 1] and distillation_rounds(2, 8) == [4, 2]
    for steps, teacher in ((1, 6), (2, 2), (2, 12)):
        with pytest.raises(SpineDiffError, match="power of two"):
            distillation_rounds(steps, teacher)
    network = tiny_network(2)
    with pytest.raises(SpineDiffError, match="epsilon"):
        ProgressiveDistiller(network, network, DiffusionProcess(prediction_type="epsilon"), 1)
    with pytest.raises(SpineDiffError, match="rectified"):
        ProgressiveDistiller(network, network, DiffusionProcess(noise_schedule="rflow"), 1)
