"""``spinediff train`` as a typed function: build a trainer, maybe resume, train, validate."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from spinediff.errors import SpineDiffError
from spinediff.io import read_json, write_json
from spinediff.paths import DEFAULT_PLANS, dataset_in, model_folder_name, nnunet_folder
from spinediff.planning.completion import verify_for_training
from spinediff.planning.plans import SpineDiffPlans
from spinediff.training.base import SpineDiffTrainer
from spinediff.training.options import TrainingOptions
from spinediff.utilities.device import parse_device
from spinediff.utilities.in_process import nnunet_validation
from spinediff.utilities.lock import folder_lock

__all__ = ["TrainingOptions", "build_trainer", "train"]


def setup_environment(preprocessed_folder: str | None, results_folder: str | None) -> tuple[Path, Path]:
    preprocessed = nnunet_folder("preprocessed", preprocessed_folder)
    results = nnunet_folder("results", results_folder)
    # nnunetv2 reads these lazily from the environment.
    os.environ["nnUNet_preprocessed"] = str(preprocessed)
    os.environ["nnUNet_results"] = str(results)
    return preprocessed, results


def resolve_preprocessed_dataset(dataset: str | int, preprocessed: Path) -> str:
    text = str(dataset)
    found = dataset_in(preprocessed, text) if text.startswith("Dataset") or text.isdigit() else None
    if found is not None:
        return found.name
    raise SpineDiffError(f"No preprocessed dataset {text!r} in {preprocessed}. Run `spinediff plan -d {text}` first.")


def ensure_splits(preprocessed_dataset: Path, seed: int = 12345, write_five_folds: bool = False) -> None:
    """One fold per case for datasets with fewer than 5 cases (nnU-Net would fail); with ``write_five_folds`` also
    nnU-Net's own 5-fold split (its ``do_split``: sorted case keys, seed 12345) before any training writes it."""
    splits_file = preprocessed_dataset / "splits_final.json"
    if splits_file.exists():
        return
    cases = sorted(p.name[: -len(".pkl")] for p in preprocessed_dataset.glob("*/*.pkl"))
    cases = sorted(set(cases))
    if (len(cases) >= 5 and not write_five_folds) or len(cases) < 2:
        return  # nnU-Net's own do_split handles (and reports) these
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    write_json(generate_crossval_split(cases, seed=seed, n_splits=min(5, len(cases))), splits_file)


def build_trainer(dataset: str | int, configuration: str, fold: int | str, trainer: str, *,
                  plans_identifier: str = DEFAULT_PLANS, device: str | torch.device = "auto",
                  continue_training: bool = False,
                  prediction_type: str | None = None, preprocessed_folder: str | None = None,
                  results_folder: str | None = None, refuse_existing: bool = False,
                  locks: contextlib.ExitStack | None = None):
    """Instantiate a spinediff or nnU-Net trainer for one fold (nothing is trained yet).

    ``locks``: take the fold folder's lock (:mod:`spinediff.utilities.lock`) into this stack, held until it closes.

    ``refuse_existing``: raise before anything is written when the fold's results folder already holds a
    started or finished training (``spinediff train`` without ``--c`` / ``--overwrite``).
    """
    from spinediff.training.registry import find_trainer, is_spinediff_trainer, trainer_classes

    preprocessed, results = setup_environment(preprocessed_folder, results_folder)
    name = resolve_preprocessed_dataset(dataset, preprocessed)
    plans_file = preprocessed / name / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise SpineDiffError(f"{plans_file} does not exist. Run `spinediff plan -d {dataset}` first.")
    plans = SpineDiffPlans.read(plans_file)
    planned_for = plans.plans.get("dataset_name")
    if planned_for != name:
        raise SpineDiffError(f"{plans_file} was made for {planned_for!r}, not {name!r}: training on it would write "
                             f"into {planned_for}'s results. Plan this dataset with `spinediff plan -d {dataset}`.")
    if prediction_type is not None and is_spinediff_trainer(trainer):
        from spinediff.planning.plans import prediction_type_of

        trainer_class = find_trainer(trainer)
        if prediction_type_of(prediction_type) in trainer_class.refused_prediction_types:
            raise SpineDiffError(f"--prediction-type {prediction_type} is not offered for {trainer}: "
                                 f"{trainer_class.refused_prediction_types_reason} Leave it out, or ask for v or eps.")
    configuration = plans.for_prediction_type(configuration, prediction_type)
    if fold != "all":
        try:
            fold = int(fold)
        except ValueError:
            raise SpineDiffError(f"Fold must be 0-4 or 'all', got {fold!r}.") from None
        splits_file = preprocessed / name / "splits_final.json"
        folds = len(read_json(splits_file)) if splits_file.is_file() else 5
        if not 0 <= fold < folds:
            where = splits_file if splits_file.is_file() else "nnU-Net's default split"
            raise SpineDiffError(f"Fold {fold} does not exist: {where} has folds 0-{folds - 1}. Choose one of them "
                                 "(or 'all' to train on every case).")
    # incomplete preprocessing (an interrupted plan, a full disk) is refused before a split is drawn from it
    identifier = plans.configuration(configuration).manager.data_identifier
    verify_for_training(preprocessed / name, identifier, dataset, configuration, plans_identifier)
    fold_folder = results / name / model_folder_name(trainer, configuration, plans_identifier) / f"fold_{fold}"
    if locks is not None:  # one run per fold folder, taken before the check that the fold is new
        locks.enter_context(folder_lock(fold_folder))
    if refuse_existing:
        started = [f for f in ("checkpoint_final.pth", "checkpoint_latest.pth") if (fold_folder / f).is_file()]
        if started:
            raise SpineDiffError(f"{fold_folder} already holds a training ({', '.join(started)}). Resume it with "
                                 "--c, re-run only its validation with --val-only, or start again with --overwrite.")
    ensure_splits(preprocessed / name)
    verify_for_training(preprocessed / name, identifier, dataset, configuration, plans_identifier)  # the split's cases
    torch_device = parse_device(device)
    from spinediff.training.augmentation import apply_planned_augmentation

    if is_spinediff_trainer(trainer):
        plans_dict = dict(plans.plans, continue_training=continue_training)  # nnU-Net's constructor pops it
        dataset_json = read_json(preprocessed / name / "dataset.json")
        # nnU-Net's constructor writes the fold's log before a spinediff trainer checks the dataset: a refusal there
        # takes back what it wrote (and the fold's lock, the folders it made)
        before = set(fold_folder.iterdir()) if fold_folder.is_dir() else set()
        try:
            instance = find_trainer(trainer)(plans=plans_dict, configuration=configuration, fold=fold,
                                             dataset_json=dataset_json, device=torch_device)
        except SpineDiffError:
            _remove_written(fold_folder, before, locks is None)
            raise
    else:
        from nnunetv2.run.run_training import get_trainer_from_args

        try:
            instance = get_trainer_from_args(name, configuration, fold, trainer, plans_identifier, continue_training,
                                             torch_device)
        except RuntimeError as exc:
            names = ", ".join(trainer_classes())
            raise SpineDiffError(f"Unknown trainer {trainer!r}: not a spinediff trainer ({names}) "
                                 f"and not found by nnU-Net ({exc}).") from None
    apply_planned_augmentation(instance)
    return instance


def _remove_written(fold_folder: Path, before: set[Path], remove_folders: bool) -> None:
    """Remove what a refused trainer's construction wrote into ``fold_folder`` (nnU-Net's log), and, when no lock
    does it (``remove_folders``), the fold and model folders it left empty."""
    if not fold_folder.is_dir():
        return
    for path in set(fold_folder.iterdir()) - before:
        if path.is_file() and path.name.startswith("training_log_"):
            path.unlink()
    if remove_folders:
        for folder in (fold_folder, fold_folder.parent):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def apply_options(trainer, options: TrainingOptions) -> None:
    if options.epochs is not None:
        trainer.num_epochs = int(options.epochs)
    if options.iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = int(options.iterations_per_epoch)
    if options.val_iterations_per_epoch is not None:
        trainer.num_val_iterations_per_epoch = int(options.val_iterations_per_epoch)
    if options.learning_rate is not None:
        trainer.initial_lr = float(options.learning_rate)
    if isinstance(trainer, SpineDiffTrainer):  # nnU-Net's own trainers have none of spinediff's options
        trainer.apply_options(options)
    if options.seed is not None:
        seed_run(trainer, int(options.seed))


def seed_run(trainer, seed: int) -> None:
    """Seed what a run draws from: numpy, ``random`` and torch (network initialisation, nnU-Net's data loading
    and augmentation in the main process) and a spinediff trainer's diffusion-noise generator; per fold
    (:func:`spinediff.utilities.seeds.fold_seed`, as prediction), so that folds differ. Call before the trainer is
    initialised. Augmentation worker processes (``nnUNet_n_proc_DA`` > 0) and GPU kernels are not made
    deterministic by this."""
    from spinediff.training.distributed import seed_global_generators
    from spinediff.utilities.seeds import fold_seed

    seed_global_generators(fold_seed(seed, trainer.fold))
    if isinstance(trainer, SpineDiffTrainer):
        trainer.seed = seed  # its diffusion-noise generator is seeded from it once, in initialize()


def configure_schedule(trainer, options: TrainingOptions) -> tuple[float | None, bool]:
    """Apply the plans' schedule and the options; return (budget in seconds or None, whether the schedule may
    grow to fill the budget).

    - Plans made with ``--budget`` carry a schedule: its epochs x iterations, refitted to end at its budget.
    - ``budget_minutes`` overrides the budget; a planned schedule is scaled to it, otherwise the trainer's
      epochs are refitted to it after the first epochs (either way the learning rate anneals fully).
    - ``epochs`` with a budget: the budget is a cap (fewer epochs on a slow machine, never more).
    - ``epochs`` without a budget: exactly that many epochs, no refit.
    """
    from spinediff.training.schedule import apply_schedule, schedule_of

    schedule = schedule_of(trainer)
    budget = None
    if schedule is not None:
        if not isinstance(trainer, SpineDiffTrainer):  # a spinediff trainer applied it in its __init__
            apply_schedule(trainer, schedule)
        budget = float(schedule["budget_seconds"])
    if options.budget_minutes is not None:
        wanted = float(options.budget_minutes) * 60.0
        if schedule is not None:
            trainer.num_epochs = max(1, int(round(trainer.num_epochs * wanted / budget)))
        budget = wanted
    elif options.epochs is not None:
        budget = None  # the user asked for an exact number of epochs
    apply_options(trainer, options)
    return budget, options.epochs is None


def train(dataset: str | int, configuration: str, fold: int | str, trainer: str = "DiffusionTranslationTrainer",
          options: TrainingOptions | None = None, *, plans_identifier: str = DEFAULT_PLANS,
          device: str | torch.device | None = None,
          continue_training: bool = False, validation_only: bool = False, prediction_type: str | None = None,
          preprocessed_folder: str | None = None, results_folder: str | None = None, overwrite: bool = False,
          verbose: bool = True) -> Path:
    """Train (or resume, or only validate) one fold; returns the fold's output folder. A fold that was already
    started or finished is refused unless ``continue_training``, ``validation_only`` or ``overwrite``.
    ``verbose`` False: nnU-Net's log goes to its file only and the console gets one line per epoch."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    options = options or TrainingOptions()
    device = options.device if device is None else device  # one source: --device fills TrainingOptions.device
    from spinediff.training.registry import is_refiner

    if options.init_noise is not None and not is_refiner(trainer):  # refused before the fold folder is made
        raise SpineDiffError(f"--init-noise: only a refinement model (DiffusionRefinementTrainer, "
                             f"ResidualRefinementTrainer) starts from another model's answer; {trainer} does not.")
    if options.combine not in (None, "mean"):  # refused before the fold folder is made
        if not is_refiner(trainer):
            raise SpineDiffError(f"--combine {options.combine}: only a refinement model (DiffusionRefinementTrainer) "
                                 f"combines its samples otherwise than by their mean; {trainer} does not.")
        from spinediff.tasks import task_spec

        preprocessed = nnunet_folder("preprocessed", preprocessed_folder)
        name = resolve_preprocessed_dataset(dataset, preprocessed)
        task = task_spec(read_json(preprocessed / name / "dataset.json")).task
        if not task.writes_labels:
            raise SpineDiffError(f"--combine {options.combine} combines class probabilities: segmentation only; "
                                 f"{name} is a {task.name} dataset.")
    from spinediff.training.distributed import LaunchEnvironment

    launch = LaunchEnvironment.read()
    writer = launch is None or launch.rank == 0  # in a torchrun job only rank 0 writes, so only it takes the lock
    with contextlib.ExitStack() as locks:  # the fold folder's lock, held to the end
        instance = build_trainer(dataset, configuration, fold, trainer, plans_identifier=plans_identifier,
                                 device=device, continue_training=continue_training, prediction_type=prediction_type,
                                 preprocessed_folder=preprocessed_folder, results_folder=results_folder,
                                 refuse_existing=not (continue_training or validation_only or overwrite),
                                 locks=locks if writer else None)
        budget, grow = configure_schedule(instance, options or TrainingOptions())
        report = None
        if not verbose:
            import sys

            from spinediff.training.schedule import quiet_console

            quiet_console(instance)
            report = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        if validation_only and not (Path(instance.output_folder) / "checkpoint_final.pth").is_file():
            raise SpineDiffError(f"No finished training in {instance.output_folder} to validate (checkpoint_final.pth "
                                 "is missing). Train first, or resume with --c.")
        try:
            maybe_load_checkpoint(instance, continue_training, validation_only)
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            folder = Path(instance.output_folder)
            present = sorted(p.name for p in folder.glob("checkpoint_*.pth"))
            raise SpineDiffError(f"A checkpoint in {folder} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); "
                                 f"it is probably truncated (a run killed while writing it, or a full disk). "
                                 f"Checkpoints there: {', '.join(present) or 'none'}. Move the damaged one aside to "
                                 "resume from another (nnU-Net resumes from checkpoint_final, then _latest, then "
                                 "_best), or start again with --overwrite.") from None
        if instance.inference_allowed_mirroring_axes == ():  # older checkpoints; nnU-Net's predictor wants None
            instance.inference_allowed_mirroring_axes = None
        if not validation_only:
            run_and_log_schedule(instance, budget, grow, report)
        nnunet_validation(instance, bool(options and options.save_probabilities))
        return Path(instance.output_folder)


def run_and_log_schedule(trainer, budget_seconds: float | None, grow: bool = True, report=None):
    """:func:`~spinediff.training.schedule.run_scheduled_training`, its log kept as ``schedule_log.json``."""
    from spinediff.training.schedule import run_scheduled_training

    log = run_scheduled_training(trainer, budget_seconds, grow=grow, report=report)
    if getattr(trainer, "local_rank", 0) == 0:
        write_json(log.to_dict(), Path(trainer.output_folder) / "schedule_log.json")
    return log
