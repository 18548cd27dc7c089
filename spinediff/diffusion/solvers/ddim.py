"""DDIM (Song et al. 2021) with monai's scheduler: "trailing" timesteps, every step landing on the next one."""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler

from spinediff.diffusion.solvers.base import Solver


def trailing_timesteps(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """DDIM's timesteps with "trailing" spacing (Lin et al., WACV 2024): T - 1, then every T/n down to T/n - 1,
    e.g. 999, 499 for two steps of T = 1000. Every step starts at a level the network was trained on, the first
    at pure noise, and the last lands on the data (the step after it is the final one, to alpha = 1)."""
    spacing = num_train_timesteps / num_inference_steps
    return [int(round(num_train_timesteps - k * spacing)) - 1 for k in range(num_inference_steps)]


class StableDDIMScheduler(DDIMScheduler):
    """monai's DDIM scheduler with consistent timesteps and the step variance kept inside its bound.

    Timesteps: monai spaces them ``linspace(T - 1, 0, n)`` but steps each one to ``t - T // n``, which is not
    the next scheduled timestep (two steps: 999 goes to 499, and the network is then asked at t = 0 with an
    x_t that still holds half the noise; four steps: 999 → 749, asked at 666). Here the timesteps are
    :func:`trailing_timesteps` and each step goes exactly to the next scheduled timestep (the last to the
    data), so the network always sees an x_t at the level it is told.

    Variance: DDIM's sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev) never exceeds 1 - a_prev, and
    monai takes ``sqrt(1 - a_prev - (eta * sigma_t)^2)``. In float32 the two can round past each other (eta = 1
    with the cosine schedule: the square root of a tiny negative number), and one NaN voxel spreads through
    the network to the whole sample. Capping sigma_t^2 just below 1 - a_prev changes nothing else.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)  # its argument checks
        self.timesteps = torch.tensor(trailing_timesteps(self.num_train_timesteps, num_inference_steps),
                                      dtype=torch.long, device=device)
        following = self.timesteps.tolist()[1:] + [-1]
        self._following = dict(zip(self.timesteps.tolist(), following, strict=True))

    def previous_timestep(self, timestep: int) -> int:
        """The scheduled timestep after ``timestep`` (-1: the data)."""
        return self._following[int(timestep)]

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # monai steps to timestep - T // n: right when n divides T (1, 2, 4, 5, 10, 20, 25, 50 of 1000 steps)
        if int(timestep) - self.previous_timestep(timestep) == self.num_train_timesteps // self.num_inference_steps:
            return super().step(model_output, timestep, sample, eta, generator)
        return self._exact_step(model_output, int(timestep), sample, eta, generator)

    def _exact_step(self, model_output, timestep, sample, eta, generator):
        """DDIM's update (Song et al. 2021, eq. 12) to the next scheduled timestep, for step sizes monai's
        integer ratio cannot express."""
        previous = self.previous_timestep(timestep)
        alpha = self.alphas_cumprod[timestep]
        alpha_prev = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        if self.prediction_type == "epsilon":
            x0 = (sample - (1 - alpha) ** 0.5 * model_output) / alpha**0.5
        elif self.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = alpha**0.5 * sample - (1 - alpha) ** 0.5 * model_output
        epsilon = (sample - alpha**0.5 * x0) / (1 - alpha) ** 0.5  # before clipping, as monai's step
        if self.clip_sample:
            x0 = torch.clamp(x0, self.clip_sample_values[0], self.clip_sample_values[1])
        std = eta * self._get_variance(timestep, previous) ** 0.5
        prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * epsilon
        if eta > 0:
            noise = torch.randn(model_output.shape, dtype=model_output.dtype, generator=generator,
                                device=model_output.device)
            prev = prev + std * noise
        return prev, x0

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        variance = super()._get_variance(timestep, prev_timestep)
        alpha_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return torch.clamp(variance, min=0.0, max=float(1 - alpha_prev) * (1 - 1e-6))


class DDIMSolver(Solver):
    """DDIM, deterministic at eta 0 (:class:`StableDDIMScheduler`); it clips x0 inside its step."""

    name = "ddim"
    order = 0
    clips_x0 = True

    def __init__(self, process, clip_sample: bool = True) -> None:
        super().__init__(process, clip_sample)
        self.scheduler = StableDDIMScheduler(process.num_train_timesteps, process.schedule_name,
                                             clip_sample=clip_sample, prediction_type=process.prediction_type)

    @classmethod
    def max_inference_steps(cls, num_train_timesteps: int) -> int:
        return num_train_timesteps

    def set_timesteps(self, num_inference_steps, device=None):
        self.scheduler.set_timesteps(num_inference_steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]

    def step(self, model_output, timestep, sample, *, x0=None, eta=0.0, generator=None):
        return self.scheduler.step(model_output, timestep, sample, eta=eta, generator=generator)
