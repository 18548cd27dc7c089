"""Progressive distillation (Salimans & Ho, ICLR 2022): a trained diffusion model becomes a 1- or 2-step student.

Round by round, a student (initialised from its teacher) learns to do in one DDIM step what the teacher does in
two: for a training target x0 noised to a student timestep t (x_t), the teacher takes two deterministic DDIM steps,
t → the midpoint → the student's next timestep t' (its own clipped / projected x0 estimates, exactly as the
sampler steps), and the student is trained so that *its* one DDIM step from x_t lands on the same x_t'. The x0
that does so is solved in closed form (:meth:`ProgressiveDistiller.student_target`), and the student's x0 estimate
is regressed onto it (mean squared error). The student of one round is the teacher of the next: 8 → 4 → 2 → 1
steps. Timesteps are the sampler's own trailing DDIM grid, so the student samples with ``spinediff predict`` at
exactly the grid it was trained on.

The data are the fold's training patches through nnU-Net's loader and augmentation (the trainer's own), so a
student never sees the fold's validation cases. The student is written as ``fold_N/checkpoint_distilled.pth``,
a normal checkpoint whose diffusion block says ``ddim`` with the distilled step count; ``spinediff predict
--checkpoint distilled`` samples with it. The teacher's checkpoint is not touched.

Noise-prediction (``epsilon``) models are refused: at the first timestep (pure noise) an x0 read off a predicted
noise is divided by sqrt(alpha_bar) ≈ 0.006, and Salimans & Ho found they must change the parametrisation first.
x0 (``sample``) and ``v_prediction`` models distil as they are.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from spinediff.diffusion.process import DiffusionProcess
from spinediff.diffusion.sampler import trailing_timesteps
from spinediff.diffusion.settings import LEGACY_SOLVER_KEY
from spinediff.errors import SpineDiffError
from spinediff.io import atomic_path, write_json
from spinediff.paths import DEFAULT_PLANS

DISTILLED_CHECKPOINT = "checkpoint_distilled.pth"
DISTILLATION_LOG = "distillation.json"


def distillation_rounds(steps: int, teacher_steps: int) -> list[int]:
    """The step counts of the students, one per round: 8 → 2 gives [4, 2]; the teacher steps must be
    ``steps`` times a power of two."""
    if steps < 1:
        raise SpineDiffError(f"--steps must be at least 1, got {steps}.")
    rounds, current = [], teacher_steps
    while current > steps:
        if current % 2:
            break
        current //= 2
        rounds.append(current)
    if current != steps or not rounds:
        raise SpineDiffError(f"--teacher-steps {teacher_steps} must be {steps} times a power of two (at least 2x), "
                             f"e.g. {steps * 8}: each round halves the steps.")
    return rounds


@dataclass
class RoundLog:
    """One round: the student's step count, its iterations, and its loss at the start and at the end."""

    steps: int
    iterations: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        tenth = max(1, len(self.losses) // 10)
        return {"student_steps": self.steps, "iterations": self.iterations, "seconds": round(self.seconds, 1),
                "loss_first_tenth": float(np.mean(self.losses[:tenth])) if self.losses else None,
                "loss_last_tenth": float(np.mean(self.losses[-tenth:])) if self.losses else None}


class ProgressiveDistiller:
    """One round of progressive distillation: teacher (frozen) → student with half the DDIM steps.

    Args:
        teacher: denoiser ``network(cat([condition, x_t]), timesteps)`` of ``process``.
        student: a network of the same kind (usually a copy of the teacher), trained in place.
        process: the diffusion process both were trained with (cosine or linear schedule).
        student_steps: the student's DDIM step count n (its timesteps: the trailing grid of n).
        learning_rate: AdamW's learning rate for the student.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, process: DiffusionProcess, student_steps: int,
                 learning_rate: float = 1e-4, generator: torch.Generator | None = None) -> None:
        if process.rectified_flow:
            raise SpineDiffError("distillation is written for DDIM (cosine or linear noise schedules); a rectified-"
                                 "flow model samples with euler steps and is not distilled here.")
        if process.prediction_type == "epsilon":
            raise SpineDiffError("a noise-prediction (epsilon) model cannot be distilled to 1-2 steps as it is: at "
                                 "pure noise its x0 estimate divides by sqrt(alpha_bar) ~ 0.006 (Salimans & Ho). "
                                 "Distil an x0 (sample) or v_prediction model (spinediff train --prediction-type).")
        self.teacher, self.student, self.process = teacher.eval(), student.train(), process
        for parameter in self.student.parameters():  # a copy of an EMA module (or a frozen teacher) is frozen too
            parameter.requires_grad_(True)
        self.student_steps = int(student_steps)
        grid = trailing_timesteps(process.num_train_timesteps, self.student_steps)
        self.starts = torch.tensor(grid, dtype=torch.long)
        self.ends = torch.tensor(grid[1:] + [-1], dtype=torch.long)  # -1: the data (alpha_bar = 1)
        self.middles = torch.div(self.starts + self.ends, 2, rounding_mode="floor")
        alphas = process.scheduler.alphas_cumprod.double()
        self._alpha = torch.cat([alphas, torch.ones(1, dtype=torch.float64)])  # index -1 → 1.0
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=learning_rate, weight_decay=0.0)
        self.generator = generator or torch.Generator().manual_seed(0)

    def alpha(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at ``timesteps`` (-1: 1.0), broadcastable to ``like``."""
        values = self._alpha[timesteps.long().cpu()].to(device=like.device, dtype=like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def estimate(self, network: nn.Module, condition: torch.Tensor, state: torch.Tensor,
                 timesteps: torch.Tensor, clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, epsilon) of one network call, as the sampler uses them: segmentation's x0 projected on class
        probabilities (epsilon from it), images' x0 clipped to [-1, 1] (epsilon from the unclipped x0, as monai)."""
        timesteps = timesteps.to(state.device)
        output = network(torch.cat([condition, state], dim=1), timesteps)
        output = output[0] if isinstance(output, (list, tuple)) else output
        x0 = self.process.to_x0(output, state, timesteps)
        if self.process.projects_x0:
            x0 = self.process.project_x0(x0)
            return x0, self.process.epsilon_from_x0(state, x0, timesteps)
        epsilon = self.process.epsilon_from_x0(state, x0, timesteps)
        return (x0.clamp(-1, 1) if clip else x0), epsilon

    def ddim_step(self, x0: torch.Tensor, epsilon: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM to timestep ``to`` (-1: the data)."""
        alpha = self.alpha(to, x0)
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * epsilon

    @torch.no_grad()
    def student_target(self, condition: torch.Tensor, state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The x0 for which one DDIM step from ``state`` (at the student's timestep ``index``) lands where the
        teacher's two steps land: with r = sqrt(1 - a') / sqrt(1 - a), x_t' = (sqrt(a') - r sqrt(a)) x0 + r x_t."""
        start, middle, end = self.starts[index], self.middles[index], self.ends[index]
        x0, epsilon = self.estimate(self.teacher, condition, state, start)
        halfway = self.ddim_step(x0, epsilon, middle)
        x0, epsilon = self.estimate(self.teacher, condition, halfway, middle)
        landing = self.ddim_step(x0, epsilon, end)
        alpha_start, alpha_end = self.alpha(start, state), self.alpha(end, state)
        ratio = (1 - alpha_end).sqrt() / (1 - alpha_start).sqrt()
        target = (landing - ratio * state) / (alpha_end.sqrt() - ratio * alpha_start.sqrt())
        return target.clamp(-1, 1)  # the data range: where the student's x0 is clipped to when it samples

    def train_step(self, condition: torch.Tensor, target: torch.Tensor) -> float:
        """One student update on a batch of (condition, clean target) patches; returns the loss."""
        batch = target.shape[0]
        index = torch.randint(0, self.student_steps, (batch,), generator=self.generator)
        noise = torch.randn(target.shape, generator=self.generator).to(target.device, target.dtype)
        state = self.process.add_noise(target, noise, self.starts[index].to(target.device))
        wanted = self.student_target(condition, state, index)
        x0, _ = self.estimate(self.student, condition, state, self.starts[index], clip=False)
        loss = torch.nn.functional.mse_loss(x0, wanted)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        return float(loss.detach())


def distill(dataset: str | int, configuration: str, fold: int | str, trainer: str, *, steps: int = 1,
            teacher_steps: int = 8, iterations: int = 200, budget_minutes: float | None = None,
            learning_rate: float | None = None, plans_identifier: str = DEFAULT_PLANS, device: str = "auto",
            seed: int = 0, overwrite: bool = False, progress: bool = True, preprocessed_folder: str | None = None,
            results_folder: str | None = None) -> Path:
    """Distil a trained fold into a ``steps``-step student (see the module docstring); returns the checkpoint.

    ``iterations`` per round, or with ``budget_minutes`` the whole budget split evenly over the rounds (each round
    stops when its share is spent). The learning rate defaults to a fifth of the trainer's.
    """
    from spinediff.training.api import build_trainer

    rounds = distillation_rounds(steps, teacher_steps)
    # the fold's lock (as spinediff train takes it), before the checks below and held to the end: no training
    # replaces the teacher and no second distillation writes the student meanwhile
    with contextlib.ExitStack() as locks:
        instance = build_trainer(dataset, configuration, fold, trainer, plans_identifier=plans_identifier,
                                 device=device, preprocessed_folder=preprocessed_folder,
                                 results_folder=results_folder, locks=locks)
        return _distill_fold(instance, fold, trainer, rounds, steps, teacher_steps, iterations, budget_minutes,
                             learning_rate, seed, overwrite, progress)


def _distill_fold(instance, fold, trainer: str, rounds: list[int], steps: int, teacher_steps: int, iterations: int,
                  budget_minutes: float | None, learning_rate: float | None, seed: int, overwrite: bool,
                  progress: bool) -> Path:
    if not getattr(instance, "denoising", False):
        raise SpineDiffError(f"{trainer} is not a diffusion trainer: there are no steps to distil.")
    fold_folder = Path(instance.output_folder)
    teacher_file, output = fold_folder / "checkpoint_final.pth", fold_folder / DISTILLED_CHECKPOINT
    if not teacher_file.is_file():
        raise SpineDiffError(f"{teacher_file} does not exist: train fold {fold} to the end first (spinediff train).")
    if output.exists() and not overwrite:
        raise SpineDiffError(f"{output} already exists. Pass --overwrite to replace it.")
    try:  # tensors and plain values only: a checkpoint never runs code on load
        state = torch.load(teacher_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (unpickling, truncation and I/O errors alike)
        raise SpineDiffError(f"{teacher_file} could not be read as a spinediff checkpoint ({exc}).") from None
    instance.initialize()
    instance.load_checkpoint(state)
    torch.manual_seed(seed)
    loader, validation_loader = instance.get_dataloaders()
    teacher = instance.inference_network
    logs, started = [], time.perf_counter()
    share = None if budget_minutes is None else budget_minutes * 60.0 / len(rounds)
    try:
        for student_steps in rounds:
            student = copy.deepcopy(teacher)
            distiller = ProgressiveDistiller(teacher, student, instance.process, student_steps,
                                             learning_rate or instance.initial_lr / 5,
                                             torch.Generator().manual_seed(seed + student_steps))
            log, round_start = RoundLog(student_steps), time.perf_counter()
            total = None if share is not None else iterations
            bar = tqdm(total=total, desc=f"distil fold {fold}: {2 * student_steps} → {student_steps} steps",
                       disable=not progress, unit="it")
            while (log.iterations < iterations) if share is None else (time.perf_counter() - round_start < share):
                condition, target = instance.split_batch(next(loader))
                log.losses.append(distiller.train_step(condition, target))
                log.iterations += 1
                bar.update(1)
                bar.set_postfix_str(f"loss {np.mean(log.losses[-20:]):.4f}")
            bar.close()
            log.seconds = time.perf_counter() - round_start
            logs.append(log)
            teacher = student.eval()
    finally:
        for augmenter in (loader, validation_loader):
            if hasattr(augmenter, "_finish"):  # nnU-Net's background augmenters (nnUNet_n_proc_DA > 0)
                augmenter._finish()
    diffusion = {k: v for k, v in state["spinediff"]["diffusion"].items() if k != LEGACY_SOLVER_KEY}
    diffusion.update(num_inference_steps=steps, solver="ddim", warm_start=None)
    checkpoint = {key: state[key] for key in ("trainer_name", "init_args", "inference_allowed_mirroring_axes")
                  if key in state}
    checkpoint.update({
        "network_weights": teacher.state_dict(),
        "current_epoch": state.get("current_epoch"),
        "spinediff": dict(state["spinediff"], diffusion=diffusion, distillation={
            "method": "progressive distillation (Salimans & Ho 2022), DDIM trailing grid",
            "teacher": str(teacher_file), "teacher_steps": teacher_steps, "steps": steps,
            "rounds": [log.to_dict() for log in logs], "seconds": round(time.perf_counter() - started, 1)}),
    })
    with atomic_path(output) as tmp:
        torch.save(checkpoint, tmp)
    write_json(checkpoint["spinediff"]["distillation"], fold_folder / DISTILLATION_LOG)
    return output
