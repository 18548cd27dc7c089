"""DPM-Solver++ 2M (Lu et al. 2022): diffusers' multistep solver, the previous step's x0 reused for a second-order
update (the same network calls per step as DDIM, fewer steps for the same quality)."""

from __future__ import annotations

from spinediff.diffusion.solvers.base import DiffusersSolver


class DPMSolverPlusPlus2M(DiffusersSolver):
    name = "dpm++2m"
    order = 1

    def make_scheduler(self, num_train_timesteps, betas, prediction_type):
        import diffusers

        return diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps, trained_betas=betas, solver_order=2, algorithm_type="dpmsolver++",
            prediction_type=prediction_type, lower_order_final=True)
