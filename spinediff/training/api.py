"""``spinediff train`` as a typed function: build a trainer, maybe resume, train, validate."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from spinediff.errors import SpineDiffError
from spinediff.io import read_json, write_json
from spinediff.paths import nnunet_folder

PREDICTION_TYPE_ALIASES = {"x0": "sample", "image": "sample", "sample": "sample", "eps": "epsilon",
                           "noise": "epsilon", "epsilon": "epsilon", "v": "v_prediction",
                           "v_prediction": "v_prediction"}
PREDICTION_TYPE_SUFFIX = {"sample": "x0", "epsilon": "eps", "v_prediction": "v"}


@dataclass
class TrainingOptions:
    """Schedule overrides; ``None`` keeps the trainer's default."""

    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    learning_rate: float | None = None
    sampling_steps: int | None = None  # DDIM steps of the final validation
    mask_ablation_probability: float | None = None
    budget_minutes: float | None = None  # stop after the epoch that exhausts this wall-clock budget


def _setup_environment(preprocessed_folder: str | None, results_folder: str | None) -> tuple[Path, Path]:
    preprocessed = nnunet_folder("preprocessed", preprocessed_folder)
    results = nnunet_folder("results", results_folder)
    # nnunetv2 reads these lazily from the environment.
    os.environ["nnUNet_preprocessed"] = str(preprocessed)
    os.environ["nnUNet_results"] = str(results)
    return preprocessed, results


def resolve_preprocessed_dataset(dataset: str | int, preprocessed: Path) -> str:
    text = str(dataset)
    if text.startswith("Dataset") and (preprocessed / text).is_dir():
        return text
    if text.isdigit():
        matches = sorted(p.name for p in preprocessed.glob(f"Dataset{int(text):03d}_*") if p.is_dir())
        if len(matches) == 1:
            return matches[0]
    raise SpineDiffError(f"No preprocessed dataset {text!r} in {preprocessed}. Run `spinediff plan -d {text}` first.")


def derive_configuration(plans_file: Path, configuration: str, prediction_type: str | None) -> str:
    """The configuration to train: ``configuration`` itself, or a derived one with another prediction type.

    A derived configuration (e.g. ``2d_diffusion_eps``) is added to the plans file once: it inherits
    everything and overrides the diffusion block, so nnU-Net's results folder
    (``TRAINER__PLANS__CONFIG``) keeps image-mode and noise-mode models apart.
    """
    plans = read_json(plans_file)
    configurations = plans.get("configurations", {})
    if configuration not in configurations:
        raise SpineDiffError(f"{plans_file} has no configuration {configuration!r}; available: "
                             f"{', '.join(configurations)}.")
    if prediction_type is None:
        return configuration
    wanted = PREDICTION_TYPE_ALIASES.get(prediction_type)
    if wanted is None:
        raise SpineDiffError(f"Unknown prediction type {prediction_type!r}; use x0 (image mode), eps (noise mode) "
                             "or v.")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved = PlansManager(copy.deepcopy(plans)).get_configuration(configuration).configuration
    if "diffusion" not in resolved:
        raise SpineDiffError(f"--prediction-type applies to diffusion configurations; {configuration!r} is not one.")
    if resolved["diffusion"].get("prediction_type") == wanted:
        return configuration
    name = f"{configuration}_{PREDICTION_TYPE_SUFFIX[wanted]}"
    if name not in configurations:
        diffusion = dict(resolved["diffusion"], prediction_type=wanted)
        configurations[name] = {"inherits_from": configuration, "diffusion": diffusion}
        write_json(plans, plans_file)
    return name


def ensure_splits(preprocessed_dataset: Path, seed: int = 12345) -> None:
    """nnU-Net's 5-fold split, or one fold per case for datasets with fewer than 5 cases (nnU-Net would fail)."""
    splits_file = preprocessed_dataset / "splits_final.json"
    if splits_file.exists():
        return
    cases = sorted(p.name[: -len(".pkl")] for p in preprocessed_dataset.glob("*/*.pkl"))
    cases = sorted(set(cases))
    if len(cases) >= 5 or len(cases) < 2:
        return  # nnU-Net's own do_split handles (and reports) these
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    write_json(generate_crossval_split(cases, seed=seed, n_splits=len(cases)), splits_file)


def build_trainer(dataset: str | int, configuration: str, fold: int | str, trainer: str,
                  plans_identifier: str = "nnUNetPlans", device: str = "cpu", continue_training: bool = False,
                  prediction_type: str | None = None, preprocessed_folder: str | None = None,
                  results_folder: str | None = None):
    """Instantiate a spinediff or nnU-Net trainer for one fold (nothing is trained yet)."""
    from spinediff.training import TRAINERS

    preprocessed, _ = _setup_environment(preprocessed_folder, results_folder)
    name = resolve_preprocessed_dataset(dataset, preprocessed)
    plans_file = preprocessed / name / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise SpineDiffError(f"{plans_file} does not exist. Run `spinediff plan -d {dataset}` first.")
    configuration = derive_configuration(plans_file, configuration, prediction_type)
    ensure_splits(preprocessed / name)
    if fold != "all":
        try:
            fold = int(fold)
        except ValueError:
            raise SpineDiffError(f"Fold must be 0-4 or 'all', got {fold!r}.") from None
    torch_device = torch.device(device)
    if trainer in TRAINERS:
        plans = read_json(plans_file)
        plans["continue_training"] = continue_training  # nnU-Net's constructor pops it
        dataset_json = read_json(preprocessed / name / "dataset.json")
        return TRAINERS[trainer](plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                                 device=torch_device)
    from nnunetv2.run.run_training import get_trainer_from_args

    try:
        return get_trainer_from_args(name, configuration, fold, trainer, plans_identifier, continue_training,
                                     torch_device)
    except RuntimeError as exc:
        raise SpineDiffError(f"Unknown trainer {trainer!r}: not a spinediff trainer ({', '.join(TRAINERS)}) and "
                             f"not found by nnU-Net ({exc}).") from None


def apply_options(trainer, options: TrainingOptions) -> None:
    if options.epochs is not None:
        trainer.num_epochs = int(options.epochs)
    if options.iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = int(options.iterations_per_epoch)
    if options.val_iterations_per_epoch is not None:
        trainer.num_val_iterations_per_epoch = int(options.val_iterations_per_epoch)
    if options.learning_rate is not None:
        trainer.initial_lr = float(options.learning_rate)
    if options.sampling_steps is not None and hasattr(trainer, "final_validation_steps"):
        trainer.final_validation_steps = int(options.sampling_steps)
    if options.mask_ablation_probability is not None and hasattr(trainer, "mask_ablation_probability"):
        trainer.mask_ablation_probability = float(options.mask_ablation_probability)


def train(dataset: str | int, configuration: str, fold: int | str, trainer: str = "DiffusionTranslationTrainer",
          options: TrainingOptions | None = None, plans_identifier: str = "nnUNetPlans", device: str = "cpu",
          continue_training: bool = False, validation_only: bool = False, prediction_type: str | None = None,
          preprocessed_folder: str | None = None, results_folder: str | None = None) -> Path:
    """Train (or resume, or only validate) one fold; returns the fold's output folder."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    instance = build_trainer(dataset, configuration, fold, trainer, plans_identifier, device, continue_training,
                             prediction_type, preprocessed_folder, results_folder)
    apply_options(instance, options or TrainingOptions())
    if validation_only and not (Path(instance.output_folder) / "checkpoint_final.pth").is_file():
        raise SpineDiffError(f"No finished training in {instance.output_folder} to validate (checkpoint_final.pth is "
                             "missing). Train first, or resume with --c.")
    maybe_load_checkpoint(instance, continue_training, validation_only)
    if not validation_only:
        budget = options.budget_minutes if options else None
        if budget is None:
            instance.run_training()
        else:
            run_training_with_budget(instance, budget * 60.0)
    instance.perform_actual_validation(False)
    return Path(instance.output_folder)


def run_training_with_budget(trainer, budget_seconds: float) -> int:
    """nnU-Net's training loop (``nnUNetTrainer.run_training``), stopped after the epoch in which the
    wall-clock budget runs out, so competing methods can be given the same CPU time. Works for any
    nnU-Net trainer, ours or nnU-Net's own. Returns the number of epochs run."""
    import time

    from spinediff.training.distributed import any_rank

    start = time.perf_counter()
    trainer.on_train_start()
    epochs = 0
    for _ in range(trainer.current_epoch, trainer.num_epochs):
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            val_outputs = [trainer.validation_step(next(trainer.dataloader_val))
                           for _ in range(trainer.num_val_iterations_per_epoch)]
            trainer.on_validation_epoch_end(val_outputs)
        trainer.on_epoch_end()
        epochs += 1
        # Under DDP the ranks must agree to stop (any rank over budget), or the others wait for them forever.
        if any_rank(time.perf_counter() - start > budget_seconds):
            trainer.print_to_log_file(f"Time budget of {budget_seconds / 60:.1f} min used up after {epochs} epoch(s).")
            break
    trainer.on_train_end()
    return epochs
