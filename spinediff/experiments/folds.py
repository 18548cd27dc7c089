"""Training and validating the folds of one benchmarked method (alone or side by side in worker processes),
and what each fold's run took: used by the benchmark and by the downstream Dice's CT segmenter."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from spinediff.io import read_json, write_json
from spinediff.paths import model_folder_name
from spinediff.tasks import SEGMENTATION
from spinediff.utilities.in_process import nnunet_validation


@dataclass(frozen=True)
class Method:
    name: str
    trainer: str
    configuration: str
    prediction_type: str | None = None
    baseline: bool = False
    opt_in: bool = False  # trained only when --methods names it

    @property
    def folder_name(self) -> str:
        """The results folder of this method's model (TRAINER__PLANS__CONFIG)."""
        return model_folder_name(self.trainer, self.folder_configuration)

    @property
    def folder_configuration(self) -> str:
        suffix = {"eps": "_eps", "v": "_v"}.get(self.prediction_type or "", "")
        return self.configuration + suffix


@dataclass
class MethodResult:
    method: Method
    folds: list
    train_seconds: float = 0.0
    inference_seconds_per_case: float = float("nan")
    network_evaluations_per_window: int = 1
    epochs: int = 0
    per_case: dict[str, dict[str, float]] = field(default_factory=dict)  # case → metric → value
    set_metrics: dict[str, float] = field(default_factory=dict)  # metrics of all cases together (Fréchet distance)
    per_fold: dict[str, dict] = field(default_factory=dict)  # fold → steps, epochs, final learning rate, minutes
    postprocessing: dict | None = None  # segmentation: the cross-validated level numbering decision


def _network_evaluations(trainer) -> int:
    settings = getattr(trainer, "settings", None)
    if settings is None:  # nnU-Net: one pass per mirroring combination
        axes = trainer.inference_allowed_mirroring_axes or ()
        return 2 ** len(axes)
    if not trainer.denoising:
        return 1
    return int(trainer.num_inference_steps) * max(1, int(getattr(trainer, "final_validation_samples", 1)))


def train_and_validate_fold(method: Method, dataset: str, fold, options, reuse: bool = True) -> dict:
    """Train (or resume, or reuse) one fold of ``method`` with the plans' schedule and validate it; returns
    its timing record (also kept as ``benchmark_timing.json`` in the fold folder). The fold folder's lock is held
    throughout (:mod:`spinediff.utilities.lock`): a `spinediff train` of the same fold is refused meanwhile."""
    import contextlib

    with contextlib.ExitStack() as locks:
        return _train_and_validate_fold(method, dataset, fold, options, reuse, locks)


def _train_and_validate_fold(method: Method, dataset: str, fold, options, reuse: bool, locks) -> dict:
    import sys

    from nnunetv2.run.run_training import maybe_load_checkpoint

    from spinediff.training.api import build_trainer, configure_schedule, run_and_log_schedule
    from spinediff.training.schedule import quiet_console

    trainer = build_trainer(dataset, method.configuration, fold, method.trainer, prediction_type=method.prediction_type,
                            device=options.device, locks=locks)
    budget, grow = configure_schedule(trainer, options)
    if not getattr(options, "console_log", False):
        quiet_console(trainer)  # nnU-Net's log stays in the fold's log file; one line per epoch here

    def report(line: str) -> None:
        print(f"[{method.name}, fold {fold}] {line}", file=sys.stderr, flush=True)

    folder = Path(trainer.output_folder)
    done = (folder / "checkpoint_final.pth").is_file() and (folder / "validation").is_dir()
    if (folder / "checkpoint_final.pth").is_file() and hasattr(trainer, "check_trained_as"):  # spinediff's trainers
        trainer.check_trained_as(folder / "checkpoint_final.pth")  # also when the fold is reused without loading it
    timing_file = folder / "benchmark_timing.json"
    # segmentation keeps the class probabilities: the post-processing may form its foreground from them
    task = getattr(getattr(trainer, "task", None), "task", SEGMENTATION)  # nnU-Net's trainer: segmentation
    # a refinement model's validation settings (how it combines its samples, which answers it starts from)
    settings = trainer.validation_settings() if hasattr(trainer, "validation_settings") else None
    if reuse and done and timing_file.is_file():
        timing = read_json(timing_file)
        before = {k: timing.get(k, trainer.validation_setting_defaults.get(k)) for k in settings or {}}
        if settings is None or before == settings:
            return timing
        # validated with other settings: validate again, keep the training's record
        maybe_load_checkpoint(trainer, False, True)
        changed = ", ".join(f"{k} {settings[k]} (was {before[k]})" for k in settings if before[k] != settings[k])
        report(f"validating again: {changed}")
        start = time.perf_counter()
        nnunet_validation(trainer, task.writes_labels)
        timing.update(inference_seconds_per_case=(time.perf_counter() - start) / max(1, len(trainer.do_split()[1])),
                      network_evaluations_per_window=_network_evaluations(trainer), **settings)
        write_json(timing, timing_file)
        return timing
    schedule = {}
    if not (folder / "checkpoint_final.pth").is_file():
        maybe_load_checkpoint(trainer, (folder / "checkpoint_latest.pth").is_file(), False)
        start = time.perf_counter()
        schedule = run_and_log_schedule(trainer, budget, grow, report).to_dict()
        train_seconds = schedule["seconds"] if schedule.get("seconds") else time.perf_counter() - start
        epochs = trainer.current_epoch
    else:  # trained earlier without the harness: the training time is in the checkpoint's log
        maybe_load_checkpoint(trainer, False, True)
        logging = trainer.logger.get_checkpoint()
        starts, ends = logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", [])
        epochs = len(ends)
        train_seconds = float(ends[-1] - starts[0]) if starts and ends else float("nan")
        lrs = logging.get("lrs", [])
        schedule = {"final_learning_rate": float(lrs[-1]) if lrs else float("nan")}
    start = time.perf_counter()
    nnunet_validation(trainer, task.writes_labels)
    n_val = max(1, len(trainer.do_split()[1]))
    timing = {"train_seconds": train_seconds, "epochs": epochs,
              "steps": int(epochs * trainer.num_iterations_per_epoch),
              "initial_learning_rate": float(trainer.initial_lr),
              "final_learning_rate": schedule.get("final_learning_rate", float("nan")),
              "budget_seconds": budget, "refits": schedule.get("refits", []),
              "inference_seconds_per_case": (time.perf_counter() - start) / n_val,
              "network_evaluations_per_window": _network_evaluations(trainer)}
    if settings is not None:
        timing.update(settings)
    write_json(timing, timing_file)
    return timing


def _fold_in_worker(method: Method, dataset: str, fold, options, reuse: bool) -> dict:
    """One fold in a worker process with one torch thread (folds side by side share the cores fairly)."""
    import torch

    torch.set_num_threads(1)
    return train_and_validate_fold(method, dataset, fold, options, reuse)


def train_folds(jobs: list[tuple[Method, object]], dataset: str, options, reuse: bool = True, workers: int = 1
                ) -> list[dict]:
    """Timing records of (method, fold) jobs, ``workers`` at a time (each worker one process, one thread)."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_fold_in_worker, method, dataset, fold, options, reuse) for method, fold in jobs]
            return [future.result() for future in futures]
    return [train_and_validate_fold(method, dataset, fold, options, reuse) for method, fold in jobs]


def collect_result(method: Method, folds: list, timings: list[dict]) -> MethodResult:
    result = MethodResult(method, list(folds))
    for fold, timing in zip(folds, timings, strict=True):
        result.train_seconds += timing["train_seconds"]
        result.epochs += timing["epochs"]
        result.inference_seconds_per_case = timing["inference_seconds_per_case"]
        result.network_evaluations_per_window = timing["network_evaluations_per_window"]
        result.per_fold[str(fold)] = {key: timing.get(key) for key in (
            "steps", "epochs", "train_seconds", "initial_learning_rate", "final_learning_rate", "refits")}
    return result


def run_method(method: Method, dataset: str, folds: list, options, reuse: bool = True, workers: int = 1
               ) -> MethodResult:
    """Train (or reuse) and validate ``method`` on ``folds`` (``workers`` folds at a time); time it."""
    return collect_result(method, folds, train_folds([(method, f) for f in folds], dataset, options, reuse, workers))
