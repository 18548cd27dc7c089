"""Training that follows the plans' schedule and ends with its time budget.

``spinediff plan --budget`` stores a ``schedule`` in each configuration (epochs x iterations from a step
time measured on the planning machine, :mod:`spinediff.planning.budget`). :func:`run_scheduled_training`
runs nnU-Net's training loop (for our trainers and nnU-Net's own alike) with that schedule and, when the
speed measured here differs from the plan (a busy machine, data loading, validation), **refits the number
of epochs** so that the run still ends at the budget. The poly learning-rate schedule is stretched or
shrunk with it (``lr_scheduler.max_steps``), so the learning rate always reaches the end of its schedule:
nothing stops mid-schedule.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spinediff.planning.plans import PlannedConfiguration
from spinediff.tasks import SEGMENTATION

#: Refit when the predicted end of training is off the budget by more than this share.
REFIT_TOLERANCE = 0.10
#: Epochs measured before the first refit (the first epoch also warms up data loading).
EPOCHS_BEFORE_REFIT = 2


@dataclass
class ScheduleLog:
    """What happened to the schedule during one run."""

    planned_epochs: int
    budget_seconds: float | None
    epochs_run: int = 0
    seconds: float = 0.0
    refits: list[dict[str, Any]] = field(default_factory=list)
    final_learning_rate: float = float("nan")
    initial_learning_rate: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"planned_epochs": self.planned_epochs, "budget_seconds": self.budget_seconds,
                "epochs_run": self.epochs_run, "seconds": round(self.seconds, 1), "refits": self.refits,
                "initial_learning_rate": self.initial_learning_rate,
                "final_learning_rate": self.final_learning_rate}


def schedule_of(trainer) -> dict[str, Any] | None:
    """The plans' ``schedule`` block of the trainer's configuration (None for plans made without a budget)."""
    return PlannedConfiguration("", trainer.configuration_manager, "plans").schedule


def apply_schedule(trainer, schedule: dict[str, Any]) -> None:
    """Epochs, iterations and validation batches of a plans schedule (before the trainer is initialised)."""
    trainer.num_epochs = int(schedule["epochs"])
    trainer.num_iterations_per_epoch = int(schedule["iterations_per_epoch"])
    trainer.num_val_iterations_per_epoch = int(schedule.get("val_iterations_per_epoch", 2))
    # a checkpoint every epoch: an interrupted budget run resumes where it stopped (nnU-Net: every 50)
    trainer.save_every = 1


def seconds_already_trained(trainer) -> float:
    """Training time of the epochs done before a resume (from nnU-Net's logged epoch timestamps)."""
    logging = trainer.logger.get_checkpoint() if hasattr(trainer.logger, "get_checkpoint") else {}
    starts = logging.get("epoch_start_timestamps", [])[: trainer.current_epoch]
    ends = logging.get("epoch_end_timestamps", [])[: trainer.current_epoch]
    return float(sum(max(0.0, e - s) for s, e in zip(starts, ends, strict=False)))


def refit_epochs(current_epoch: int, planned_epochs: int, elapsed: float, epoch_seconds: float,
                 budget_seconds: float, grow: bool = True) -> int:
    """Total epochs so that the remaining ones end at the budget at ``epoch_seconds`` each; unchanged while the
    plan's end is within :data:`REFIT_TOLERANCE` of the budget. Never more than planned when ``grow`` is False
    (the budget is a cap). While planned epochs remain, at least one more: the learning rate is set at the start of an
    epoch, so only an epoch run after the refit ends the rescaled schedule (stopping at once would leave the last
    epoch at the learning rate of a longer schedule; the budget is then overrun by at most about half an epoch)."""
    predicted = elapsed + (planned_epochs - current_epoch) * epoch_seconds
    if abs(predicted - budget_seconds) <= REFIT_TOLERANCE * budget_seconds:
        return planned_epochs
    remaining = max(0.0, budget_seconds - elapsed)
    total = int(current_epoch + max(0, math.floor(remaining / max(epoch_seconds, 1e-9) + 0.5)))
    if planned_epochs > current_epoch:
        total = max(total, current_epoch + 1)
    return total if grow else min(total, planned_epochs)


def _agreed(value: float) -> float:
    """Under DDP every rank must use the same number of epochs: the slowest rank's value."""
    from spinediff.training.distributed import gather_lists, is_distributed

    return float(max(gather_lists([value]))) if is_distributed() else value


def epoch_line(trainer, epoch_seconds: list[float], elapsed: float) -> str:
    """One line per epoch for the console: progress, loss, the validation metric by its name, time and ETA."""
    done, total = trainer.current_epoch, trainer.num_epochs
    logged = trainer.logger.get_checkpoint() if hasattr(trainer.logger, "get_checkpoint") else {}

    def last(key: str) -> float | None:
        values = logged.get(key) or []
        return float(values[-1]) if values else None

    parts = [f"epoch {done}/{total}", f"{done * trainer.num_iterations_per_epoch} steps"]
    loss = last("train_losses")
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    task = getattr(getattr(trainer, "task", None), "task", SEGMENTATION)  # nnU-Net's trainer: segmentation
    if task.writes_labels:
        dice = last("mean_fg_dice")
        if dice is not None:
            parts.append(f"val Dice {dice:.3f} (patches)")
    else:
        psnr, ssim = last("val_psnr"), last("val_ssim")
        if psnr is not None and ssim is not None:
            parts.append(f"val PSNR {psnr:.1f} dB, SSIM {ssim:.3f} (patches)")
    parts.append(f"lr {trainer.optimizer.param_groups[0]['lr']:.2g}")
    recent = epoch_seconds[1:][-5:] or epoch_seconds
    eta = max(0, total - done) * float(np.mean(recent))
    parts.append(f"{elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")
    return " | ".join(parts)


def quiet_console(trainer) -> None:
    """nnU-Net's log goes to its log file only (the console gets :func:`epoch_line` instead)."""
    original = trainer.print_to_log_file

    def to_file_only(*args, also_print_to_console: bool = True, add_timestamp: bool = True) -> None:
        original(*args, also_print_to_console=False, add_timestamp=add_timestamp)

    trainer.print_to_log_file = to_file_only


def _refit(trainer, log: ScheduleLog, budget_seconds: float, grow: bool, elapsed: float,
           epoch_seconds: list[float]) -> None:
    """Refit the remaining epochs (and the poly schedule's length) to the measured speed."""
    recent = epoch_seconds[1:][-5:]  # the first epoch of a run also starts the data loaders
    per_epoch = _agreed(float(np.mean(recent)))
    elapsed = _agreed(elapsed)
    total = refit_epochs(trainer.current_epoch, trainer.num_epochs, elapsed, per_epoch, budget_seconds, grow)
    if total == trainer.num_epochs:
        return
    log.refits.append({"after_epoch": trainer.current_epoch, "from": trainer.num_epochs, "to": total,
                       "epoch_seconds": round(per_epoch, 2), "elapsed_seconds": round(elapsed, 1)})
    trainer.print_to_log_file(
        f"Schedule refit after epoch {trainer.current_epoch}: {per_epoch:.1f} s per epoch here, so {total} instead "
        f"of {trainer.num_epochs} epochs end at the budget of {budget_seconds / 60:.1f} min (the learning-rate "
        "schedule is rescaled to match).")
    trainer.num_epochs = total
    if hasattr(trainer.lr_scheduler, "max_steps"):
        trainer.lr_scheduler.max_steps = max(total, 1)


class _BudgetReached(Exception):
    """Raised by :class:`BudgetHook` at the start of an epoch past the (refitted) schedule's end."""


class BudgetHook:
    """The refitted schedule as hooks on a trainer, around nnU-Net's own loop (``nnUNetTrainer.run_training``).

    nnU-Net's loop is ``for epoch in range(self.current_epoch, self.num_epochs)``, its bound taken once after
    ``on_train_start``. The hook lets that bound be large and ends training itself: ``on_epoch_start`` stops
    the loop once the refitted number of epochs is done, ``on_epoch_end`` times the epoch, refits the remaining
    epochs to the budget and reports one line. :meth:`run` then calls ``on_train_end`` (final checkpoint) as
    nnU-Net's loop would have. Works for any nnU-Net trainer; the trainer's methods are wrapped on the instance.
    """

    _LOOP_BOUND = 2**31 - 1

    def __init__(self, budget_seconds: float | None = None, grow: bool = True, report=None) -> None:
        self.budget_seconds = budget_seconds
        self.grow = grow
        self.report = report
        self.log: ScheduleLog | None = None
        self._epochs = 0
        self._before = 0.0
        self._start = 0.0
        self._epoch_start = 0.0
        self._epoch_seconds: list[float] = []

    def attach(self, trainer) -> None:
        on_train_start, on_epoch_start = trainer.on_train_start, trainer.on_epoch_start
        on_epoch_end = trainer.on_epoch_end

        def train_start() -> None:
            on_train_start()
            self.log = ScheduleLog(int(trainer.num_epochs), self.budget_seconds)
            self.log.initial_learning_rate = float(trainer.initial_lr)
            self._before = seconds_already_trained(trainer)
            self._start = time.perf_counter()
            self._epochs, trainer.num_epochs = int(trainer.num_epochs), self._LOOP_BOUND  # nnU-Net's range bound

        def epoch_start() -> None:
            trainer.num_epochs = self._epochs  # the loop's range is built; nnU-Net's hooks see the real length
            if trainer.current_epoch >= trainer.num_epochs:
                raise _BudgetReached
            self._epoch_start = time.perf_counter()
            on_epoch_start()

        def epoch_end() -> None:
            self.log.final_learning_rate = float(trainer.optimizer.param_groups[0]["lr"])
            on_epoch_end()  # current_epoch += 1
            self._epoch_seconds.append(time.perf_counter() - self._epoch_start)
            self.log.epochs_run += 1
            elapsed = self._before + time.perf_counter() - self._start
            if self.budget_seconds is not None and len(self._epoch_seconds) >= EPOCHS_BEFORE_REFIT:
                _refit(trainer, self.log, self.budget_seconds, self.grow, elapsed, self._epoch_seconds)
            self._epochs = int(trainer.num_epochs)
            if self.report is not None:
                self.report(epoch_line(trainer, self._epoch_seconds, self._before + time.perf_counter() - self._start))

        trainer.on_train_start, trainer.on_epoch_start, trainer.on_epoch_end = train_start, epoch_start, epoch_end

    def run(self, trainer) -> ScheduleLog:
        """Train with nnU-Net's ``run_training``; returns the :class:`ScheduleLog`."""
        self.attach(trainer)
        finished = trainer.on_train_end

        def train_end() -> None:
            trainer.num_epochs = self._epochs
            self.log.seconds = self._before + time.perf_counter() - self._start
            trainer.print_to_log_file(
                f"Training schedule: {self.log.epochs_run} epoch(s) in this run, {trainer.current_epoch} in all, "
                f"{self.log.seconds / 60:.2f} min, final learning rate {self.log.final_learning_rate:.3g}.")
            finished()

        trainer.on_train_end = train_end
        try:
            trainer.run_training()
        except _BudgetReached:
            train_end()
        return self.log


def run_scheduled_training(trainer, budget_seconds: float | None = None, grow: bool = True,
                           report=None) -> ScheduleLog:
    """nnU-Net's training loop (``nnUNetTrainer.run_training``) with the :class:`BudgetHook`'s refitted schedule.

    ``budget_seconds``: training time to end at (None: run the trainer's epochs as they are); ``grow``: whether
    the schedule may get longer than planned to fill the budget (False: the budget is only a cap); ``report``:
    called with one line per epoch (:func:`epoch_line`), e.g. ``print`` for the console. Works for any
    nnU-Net trainer. Returns a :class:`ScheduleLog` (also written to the trainer's log file).
    """
    return BudgetHook(budget_seconds, grow, report).run(trainer)
