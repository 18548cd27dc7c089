"""The solver protocol: what the sliding-window loop asks of a solver.

Per sample group the loop calls :meth:`Solver.set_timesteps` (a multistep solver forgets its history there), reads
:attr:`Solver.timesteps` and, at each of them, gives :meth:`Solver.step` the blended network output for the whole
volume. When :attr:`needs_x0` is set, or the x0 estimate has to be clipped or projected (segmentation) before the
step, the loop also gives the x0 estimate and the output re-derived from it.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class Solver:
    """One step rule of sampling (a subclass with a ``name`` is found by :func:`spinediff.diffusion.solvers.
    solver_class`).

    Args:
        process: the :class:`~spinediff.diffusion.process.DiffusionProcess` the network was trained with.
        clip_sample: clip the x0 estimate to [-1, 1] at every step (the diffusion data range).
    """

    #: the name in the plans (``solver``), ``--solver`` and sampling.json; empty: not a solver (a base class)
    name: ClassVar[str] = ""
    #: position in listings (``--help``, error messages)
    order: ClassVar[int] = 100
    #: True: samples rectified-flow models (``noise_schedule="rflow"``); False: the DDPM schedules
    rectified_flow: ClassVar[bool] = False
    #: True: the step clips the x0 estimate itself (monai's DDIM), so the loop does not
    clips_x0: ClassVar[bool] = False
    #: True: the step needs the x0 estimate (``x0=``), not only the network's output
    needs_x0: ClassVar[bool] = False

    def __init__(self, process, clip_sample: bool = True) -> None:
        self.process = process
        self.clip_sample = clip_sample
        self.timesteps: list[int] = []

    @classmethod
    def max_inference_steps(cls, num_train_timesteps: int) -> int:
        """The most steps this solver takes for a model of ``num_train_timesteps`` (diffusers' multistep solvers
        space their steps over 0..T-1, so fewer than T)."""
        return num_train_timesteps - 1

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Schedule ``num_inference_steps`` steps (``timesteps``, from the noisiest) and start afresh."""
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, *,
             x0: torch.Tensor | None = None, eta: float = 0.0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The state at the scheduled timestep after ``timestep`` (the data after the last) and the x0 estimate
        the step used (None when the solver does not expose it).

        Args:
            model_output: the network's (blended) output in its prediction type.
            timestep: the current timestep, one of :attr:`timesteps`.
            sample: the current state x_t.
            x0: the (clipped, projected) x0 estimate, given when :attr:`needs_x0` or the loop clipped it.
            eta: DDIM's stochasticity (solvers without it ignore it).
            generator: the random stream of a stochastic step.
        """
        raise NotImplementedError

    def following(self, timestep: int) -> int:
        """The scheduled timestep after ``timestep`` (0 after the last)."""
        index = self.timesteps.index(int(timestep))
        return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else 0


class DiffusersSolver(Solver):
    """A solver that is one of diffusers' schedulers, built on the process's own betas (so its noise levels are
    exactly those the network was trained on). Subclasses give :meth:`make_scheduler`."""

    def __init__(self, process, clip_sample: bool = True) -> None:
        super().__init__(process, clip_sample)
        betas = process.scheduler.betas.double().cpu().numpy()
        self.scheduler = self.make_scheduler(process.num_train_timesteps, betas, process.prediction_type)

    def make_scheduler(self, num_train_timesteps: int, betas, prediction_type: str):
        """The diffusers scheduler (``trained_betas=betas``)."""
        raise NotImplementedError

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]

    def step(self, model_output, timestep, sample, *, x0=None, eta=0.0, generator=None):
        return self.scheduler.step(model_output, timestep, sample).prev_sample, x0
