"""UniPC-bh2 (Zhao et al. 2023): diffusers' unified predictor-corrector multistep solver, second order."""

from __future__ import annotations

from spinediff.diffusion.solvers.base import DiffusersSolver


class UniPC(DiffusersSolver):
    name = "unipc"
    order = 2

    def make_scheduler(self, num_train_timesteps, betas, prediction_type):
        import diffusers

        return diffusers.UniPCMultistepScheduler(num_train_timesteps, trained_betas=betas, solver_order=2,
                                                 prediction_type=prediction_type, lower_order_final=True)
