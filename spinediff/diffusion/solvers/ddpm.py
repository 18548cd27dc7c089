"""Ancestral DDPM sampling (Ho et al. 2020) at any step count: diffusers' ``DDPMScheduler`` on the process's own
betas, stepping between "trailing" timesteps (T - 1 first, as DDIM here) and adding fresh noise at each step, drawn
from the sampler's seeded stream. Stochastic, unlike the ODE solvers: members differ by their step noise as well
as by their initial noise. The worked example of ``documentation/extending.md``: a solver in one file."""

from __future__ import annotations

from spinediff.diffusion.solvers.base import DiffusersSolver


class AncestralDDPM(DiffusersSolver):
    name = "ddpm"
    order = 4

    @classmethod
    def max_inference_steps(cls, num_train_timesteps: int) -> int:
        return num_train_timesteps

    def make_scheduler(self, num_train_timesteps, betas, prediction_type):
        import diffusers

        # x0 is clipped (and, for segmentation, projected) by the sampling loop before each step
        return diffusers.DDPMScheduler(num_train_timesteps, trained_betas=betas, prediction_type=prediction_type,
                                       clip_sample=False, timestep_spacing="trailing")

    def step(self, model_output, timestep, sample, *, x0=None, eta=0.0, generator=None):
        return self.scheduler.step(model_output, timestep, sample, generator=generator).prev_sample, x0
