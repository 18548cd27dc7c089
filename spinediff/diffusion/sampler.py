"""DDIM (and multistep-solver) sampling of whole volumes with sliding windows over one global noise tensor.

At every DDIM step the noisy state x_t of the *whole* (padded) volume is cut into overlapping
windows, all windows (of all samples being drawn together) are denoised in batches, and their
outputs are blended with Gaussian weights into one estimate for the whole volume; monai's
``DDIMScheduler`` then steps the whole volume. Windows therefore always read the same x_t where
they overlap and can never drift apart: there is one sample, not one per window, and no seams.

Blending happens in the network's output space (x0, epsilon or v). For a fixed voxel and timestep
all windows share x_t, and each conversion to x0 is affine with the same coefficients, so with
weights normalised to sum to 1 the blended output implies exactly the blended x0 estimate; the
scheduler derives that x0 (and clips it) itself. Normalising the weights before the sum (instead
of dividing afterwards) makes a voxel covered by one window get weight exactly 1.0, so a volume
that fits in one window samples bit-identically to plain whole-volume DDIM.

The step rule is a solver (:mod:`spinediff.diffusion.solvers`, found by its name: the diffusion block's
``solver``, ``spinediff predict --solver``): ``ddim`` is monai's DDIM scheduler with "trailing" timesteps
(T - 1, T - 1 - T/n, ..., T/n - 1) and every step landing on the next scheduled timestep
(:class:`StableDDIMScheduler`; monai's own spacing does not). ``dpm++2m`` (DPM-Solver++ 2M, Lu et al. 2022)
and ``unipc`` (UniPC-bh2, Zhao et al. 2023) are diffusers' reference multistep solvers, built on the process's
own betas, with diffusers' timestep spacing (``linspace``: from T - 1 down). They reuse the previous steps' x0
estimates for a higher-order update: the same network calls per step as DDIM, fewer steps for the same quality.
For a solver that does not clip x0 in its step (all but DDIM) this loop clips (and, for segmentation, projects)
the x0 estimate itself before each step. ``euler`` is the sampler of rectified flow
(``noise_schedule="rflow"``, monai's ``RFlowScheduler``): Euler steps along the flow's velocity from t = T to 0,
the velocity taken from the (clipped, projected) x0. This loop knows no solver by name.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from torch import nn
from tqdm import tqdm

from spinediff.diffusion.process import DiffusionProcess
from spinediff.diffusion.settings import DiffusionSettings
from spinediff.diffusion.solvers import Solver, make_solver
from spinediff.diffusion.solvers.ddim import StableDDIMScheduler, trailing_timesteps
from spinediff.errors import SpineDiffError

__all__ = ["SlidingWindowSampler", "StableDDIMScheduler", "ensemble_seeds", "initial_noise", "make_generator",
           "mirrored", "trailing_timesteps"]


def make_generator(seed_or_generator: int | torch.Generator) -> torch.Generator:
    """A CPU ``torch.Generator`` from a seed, or the generator itself."""
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator().manual_seed(int(seed_or_generator))


def ensemble_seeds(generator: int | torch.Generator, num_samples: int) -> list[int]:
    """One seed per ensemble member, drawn from ``generator`` in order.

    Member k's initial noise depends only on its seed, so it does not change with the ensemble size
    or with how members are batched: the first member of a 5-sample ensemble equals a 1-sample draw.
    """
    draws = torch.randint(0, 2**62, (num_samples,), generator=make_generator(generator))
    return [int(seed) for seed in draws]


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of ``shape`` (channels, *spatial) from ``seed``, drawn on the CPU."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def mirrored(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             mirror_axes: Sequence[int]) -> torch.Tensor:
    """``function(x)`` averaged over every combination of flips of ``mirror_axes`` (spatial, 0-based, of a
    ``(B, C, *spatial)`` batch), as nnU-Net's mirroring: 2^len(axes) calls; no axes: one plain call."""
    output = function(x)
    combinations = [c for n in range(1, len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, n)]
    for axes in combinations:
        dims = [a + 2 for a in axes]
        output = output + torch.flip(function(torch.flip(x, dims)), dims)
    return output / (len(combinations) + 1) if combinations else output


class SlidingWindowSampler:
    """DDIM (or multistep-solver) sampler for volumes of any size, ensembles and warm starts.

    Args:
        network: denoiser ``network(x, timesteps)`` with ``x = cat([condition, x_t], dim=1)``.
        process: the diffusion process the network was trained with (schedule, prediction type).
        patch_size: spatial window size, the plans' patch size.
        eta: DDIM stochasticity (0 = deterministic given the initial noise).
        tile_step_size: window step as a fraction of the patch; nnU-Net's 0.5 so every voxel away
            from the border is seen by several windows and blending can hide window-edge effects.
        window_batch_size: windows per network call (every call has this batch size, or the number of
            windows if fewer); with ``sample_batch_size`` this bounds memory.
        sample_batch_size: ensemble members denoised together (their state is volume-sized each).
        mirror_axes: spatial axes (0-based) for mirroring test-time augmentation; all combinations
            are averaged, as in nnU-Net (costs 2^len(axes) network calls per window).
        guidance_scale: classifier-free guidance weight w: ``uncond + w (cond - uncond)``; 1 disables
            it (no extra network call). Only meaningful for networks trained with condition dropout.
        use_gaussian: Gaussian window weights (nnU-Net's sigma = patch/8); False gives uniform weights.
        clip_sample: clip the x0 estimate to [-1, 1] at every step (monai), the diffusion data range.
        device: where to sample; default the network's device.
        progress: show a tqdm bar over steps.
        solver: the name of a solver (:func:`spinediff.diffusion.solvers.solver_names`).
    """

    def __init__(
        self,
        network: nn.Module,
        process: DiffusionProcess,
        patch_size: Sequence[int],
        eta: float = 0.0,
        tile_step_size: float = 0.5,
        window_batch_size: int = 4,
        sample_batch_size: int = 1,
        mirror_axes: Sequence[int] = (),
        guidance_scale: float = 1.0,
        use_gaussian: bool = True,
        clip_sample: bool = True,
        device: torch.device | str | None = None,
        progress: bool = False,
        solver: str = "ddim",
    ) -> None:
        if not 0 < tile_step_size <= 1:
            raise SpineDiffError(f"tile_step_size must be in (0, 1], got {tile_step_size}")
        if window_batch_size < 1 or sample_batch_size < 1:
            raise SpineDiffError("window_batch_size and sample_batch_size must be at least 1")
        if not 0 <= eta <= 1:
            raise SpineDiffError(f"eta must be in [0, 1], got {eta}")
        self.network = network
        self.process = process
        self.patch_size = tuple(int(p) for p in patch_size)
        bad_axes = [a for a in mirror_axes if not 0 <= a < len(self.patch_size)]
        if bad_axes:
            raise SpineDiffError(f"mirror_axes {bad_axes} outside the {len(self.patch_size)} spatial axes")
        self.eta = eta
        self.tile_step_size = tile_step_size
        self.window_batch_size = window_batch_size
        self.sample_batch_size = sample_batch_size
        self.mirror_axes = tuple(mirror_axes)
        self.guidance_scale = guidance_scale
        self.use_gaussian = use_gaussian
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.progress = progress
        self.clip_sample = clip_sample
        self.solver: Solver = make_solver(solver, process, clip_sample)

    @classmethod
    def from_settings(
        cls, network: nn.Module, settings: DiffusionSettings, patch_size: Sequence[int], **options
    ) -> SlidingWindowSampler:
        """Sampler with the plans' eta and solver; ``options`` override any other argument. The step count is given
        to :meth:`sample` (the plans' is ``settings.num_inference_steps``)."""
        options.setdefault("eta", settings.eta)
        options.setdefault("solver", settings.solver)
        return cls(network, DiffusionProcess.from_settings(settings), patch_size, **options)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()  # not inference_mode: samples may later meet autograd (e.g. as training inputs)
    def sample(
        self,
        condition: torch.Tensor,
        num_samples: int = 1,
        generator: int | torch.Generator = 0,
        *,
        num_inference_steps: int,
        initial_estimate: torch.Tensor | None = None,
        start_timestep: int | None = None,
    ) -> torch.Tensor:
        """Draw ``num_samples`` targets for one conditioning volume.

        Args:
            condition: ``(condition_channels, *spatial)``; 0 channels for unconditional generation.
            num_samples: ensemble size K.
            generator: seed or CPU ``torch.Generator``; all randomness (initial noise, eta noise)
                comes from it (see :func:`ensemble_seeds`), so the same seed gives the same samples.
                With eta > 0 the step noise is drawn per batch of members, so results then also
                depend on ``sample_batch_size``.
            num_inference_steps: solver steps (network calls per member and window) from t = T-1 to 0, in [1, T].
            initial_estimate: warm start ("presegmentation"): ``(target_channels, *spatial)`` estimate
                of x0 in the diffusion range (e.g. a one-hot nnU-Net prediction scaled to [-1, 1]).
            start_timestep: with ``initial_estimate``, the timestep to start from; sampling begins at
                the first scheduled DDIM timestep at or below it, from the estimate noised to that
                timestep, and skips the steps above. Smaller values trust the estimate more.

        Returns:
            ``(num_samples, target_channels, *spatial)`` float tensor on the CPU.
        """
        if not 1 <= num_inference_steps <= self.process.num_train_timesteps:
            raise SpineDiffError(f"num_inference_steps must be in [1, {self.process.num_train_timesteps}], got "
                                 f"{num_inference_steps}")
        seeds = ensemble_seeds(generator, num_samples)
        spatial = tuple(condition.shape[1:])
        if len(spatial) != len(self.patch_size):
            raise SpineDiffError(
                f"condition has spatial shape {spatial}; the patch {self.patch_size} needs "
                f"{len(self.patch_size)} spatial axes (give (channels, *spatial))"
            )
        self.solver.set_timesteps(num_inference_steps, self.device)
        timesteps = list(self.solver.timesteps)
        if initial_estimate is not None:
            if start_timestep is None:
                raise SpineDiffError("a warm start needs start_timestep as well as initial_estimate")
            if tuple(initial_estimate.shape[1:]) != spatial:
                raise SpineDiffError(f"initial_estimate spatial shape {tuple(initial_estimate.shape[1:])} != {spatial}")
            timesteps = [t for t in timesteps if t <= start_timestep]
            if not timesteps:
                raise SpineDiffError(f"start_timestep {start_timestep} is below every scheduled timestep")
        target_channels = self._target_channels(condition, initial_estimate)

        condition_padded, crop = pad_nd_image(condition.float(), self.patch_size, "constant", {"value": 0}, True)
        condition_padded = condition_padded.to(self.device)
        crop = tuple(slice(int(c.start), int(c.stop)) for c in crop[1:])  # drop the channel axis
        padded = tuple(condition_padded.shape[1:])
        windows = self.windows(padded)
        weight_total = self._weight_total(padded, windows)
        estimate = None
        if initial_estimate is not None:
            estimate = pad_nd_image(initial_estimate.float(), self.patch_size, "constant", {"value": 0})
            estimate = estimate.to(self.device)

        self.network.eval()
        samples = []
        groups = [
            range(i, min(i + self.sample_batch_size, num_samples))
            for i in range(0, num_samples, self.sample_batch_size)
        ]
        bar = tqdm(total=len(groups) * len(timesteps), desc="DDIM", disable=not self.progress, leave=False)
        for group in groups:
            # noise from per-member seeds on the CPU: the same on every device and for every grouping
            noise = torch.stack([initial_noise(seeds[k], (target_channels, *padded)) for k in group])
            # eta > 0 draws fresh noise at each step for the whole group (monai), from its own stream
            step_generator = torch.Generator(device=self.device).manual_seed(seeds[group[0]] + 1)
            state = noise.to(self.device)
            self.solver.set_timesteps(num_inference_steps, self.device)  # a multistep solver starts afresh
            if estimate is not None:
                start = torch.full((len(group),), timesteps[0], dtype=torch.long, device=self.device)
                state = self.process.add_noise(estimate.expand_as(state), state, start)
            for t in timesteps:
                blended = self._blended_output(state, condition_padded, t, windows, weight_total)
                clip = self.clip_sample and not self.solver.clips_x0
                x0 = None
                if self.process.projects_x0 or clip or self.solver.needs_x0:
                    at = torch.full((len(group),), t, dtype=torch.long, device=self.device)
                    x0 = self.process.to_x0(blended, state, at)
                    # segmentation: class probabilities in [-1, 1] from the free-scale estimate (clipping it first
                    # would tie every class above 1 and flip argmaxes); images: clipped to the data range
                    x0 = self.process.project_x0(x0) if self.process.projects_x0 else (
                        x0.clamp(-1, 1) if clip else x0)
                    blended = self.process.from_x0(x0, state, at)
                state, _ = self.solver.step(blended, t, state, x0=x0, eta=self.eta, generator=step_generator)
                bar.update(1)
            samples.append(state[(slice(None), slice(None), *crop)].float().cpu())
        bar.close()
        return torch.cat(samples)

    # ------------------------------------------------------------------ internals
    def _target_channels(self, condition: torch.Tensor, initial_estimate: torch.Tensor | None) -> int:
        if initial_estimate is not None:
            return int(initial_estimate.shape[0])
        channels = getattr(self.network, "num_classes", None)
        if channels is None:
            raise SpineDiffError("the network has no num_classes; pass initial_estimate or use TimeConditionedUNet")
        return int(channels)

    def windows(self, padded: tuple[int, ...]) -> list[tuple[slice, ...]]:
        """Window slicers (nnU-Net step positions) covering a volume of at least the patch size."""
        starts = compute_steps_for_sliding_window(padded, self.patch_size, self.tile_step_size)
        return [
            tuple(slice(s, s + p) for s, p in zip(corner, self.patch_size, strict=True))
            for corner in itertools.product(*starts)
        ]

    def _window_weight(self) -> torch.Tensor:
        if not self.use_gaussian:
            return torch.ones(self.patch_size, device=self.device)
        # nnU-Net's Gaussian (sigma = patch/8); its positive floor keeps every voxel's total weight > 0
        return compute_gaussian(
            self.patch_size,
            sigma_scale=1.0 / 8,
            value_scaling_factor=1.0,
            dtype=torch.float32,
            device=self.device,
        )

    def _weight_total(self, padded: tuple[int, ...], windows: list[tuple[slice, ...]]) -> torch.Tensor:
        weight = self._window_weight()
        total = torch.zeros(padded, device=self.device)
        for window in windows:
            total[window] += weight
        return total

    def _blended_output(
        self,
        state: torch.Tensor,
        condition: torch.Tensor,
        timestep: int,
        windows: list[tuple[slice, ...]],
        weight_total: torch.Tensor,
    ) -> torch.Tensor:
        """Network output for the whole volume: all windows of all samples, normalised Gaussian blend."""
        weight = self._window_weight()
        blended = torch.zeros_like(state)
        jobs = [(sample, window) for sample in range(state.shape[0]) for window in windows]
        batch = min(self.window_batch_size, len(jobs))
        for first in range(0, len(jobs), batch):
            chunk = jobs[first : first + batch]
            # Every call gets the same batch shape: a short last batch is filled up with copies of its
            # last window (outputs discarded). oneDNN and cuDNN cache kernels and scratch buffers per
            # input shape; a second shape per step doubled the process memory in our CPU benchmark.
            filled = chunk + [chunk[-1]] * (batch - len(chunk))
            network_input = torch.stack(
                [
                    torch.cat([condition[(slice(None), *window)], state[(sample, slice(None), *window)]])
                    for sample, window in filled
                ]
            )
            output = self.denoise(network_input, timestep, condition.shape[0])[: len(chunk)]
            for (sample, window), window_output in zip(chunk, output, strict=True):
                # weight / total is exactly 1.0 where a single window covers a voxel
                blended[(sample, slice(None), *window)] += window_output * (weight / weight_total[window])
        return blended

    def denoise(self, network_input: torch.Tensor, timestep: int, condition_channels: int) -> torch.Tensor:
        """Network output for a batch of windows, with mirroring TTA and classifier-free guidance.

        Args:
            network_input: ``(B, condition_channels + target_channels, *patch)``.
            timestep: the current timestep (the same for the whole batch).
            condition_channels: leading channels that guidance replaces by zeros.
        """
        timesteps = torch.full((network_input.shape[0],), timestep, dtype=torch.long, device=self.device)

        def run(x: torch.Tensor) -> torch.Tensor:
            output = self.network(x, timesteps)
            # a network built with deep supervision returns all resolutions, full resolution first
            return output[0] if isinstance(output, (list, tuple)) else output

        def guided(x: torch.Tensor) -> torch.Tensor:
            output = run(x)
            if self.guidance_scale != 1.0 and condition_channels > 0:
                unconditional = run(self.process.drop_condition(x, condition_channels))
                output = unconditional + self.guidance_scale * (output - unconditional)
            return output

        return mirrored(guided, network_input, self.mirror_axes)
