"""Euler steps of rectified flow (monai's ``RFlowScheduler``): along the flow's velocity from t = T to 0, the
velocity taken from the (clipped, projected) x0 estimate."""

from __future__ import annotations

import torch
from monai.networks.schedulers import RFlowScheduler

from spinediff.diffusion.solvers.base import Solver


class RectifiedFlowEuler(Solver):
    name = "euler"
    order = 3
    rectified_flow = True
    needs_x0 = True

    def __init__(self, process, clip_sample: bool = True) -> None:
        super().__init__(process, clip_sample)
        self.scheduler = RFlowScheduler(process.num_train_timesteps, use_discrete_timesteps=True)

    def set_timesteps(self, num_inference_steps, device=None):
        self.scheduler.set_timesteps(num_inference_steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]

    def step(self, model_output, timestep, sample, *, x0=None, eta=0.0, generator=None):
        at = torch.full((sample.shape[0],), timestep, dtype=torch.long, device=sample.device)
        velocity = self.process.flow_velocity(x0, sample, at)
        state, _ = self.scheduler.step(velocity, timestep, sample, self.following(timestep))
        return state, x0
