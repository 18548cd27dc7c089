"""Trained folds, loaded safely and without a trainer: network + diffusion settings + how to predict.

A results folder ``$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG/`` holds the ``plans.json`` and
``dataset.json`` the folds were trained with and one ``fold_N/`` per fold. Checkpoints are read with
``torch.load(..., weights_only=True)``: only tensors and plain Python values are unpickled, so a
checkpoint file can never run code (spinediff's trainers save nothing else; see
``SpineDiffTrainer.save_checkpoint``). The network is rebuilt by the trainer class's
``build_network_architecture`` from the plans, and its EMA weights (``network_weights``) are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from spinediff.diffusion.process import DiffusionProcess
from spinediff.errors import SpineDiffError
from spinediff.io import read_json
from spinediff.paths import DEFAULT_PLANS, dataset_in, model_folder_name, nnunet_folder, split_model_folder_name
from spinediff.planning.plans import PlannedConfiguration, SpineDiffPlans
from spinediff.prediction.checkpoints import load_checkpoint, network_from_checkpoint
from spinediff.prediction.core import FoldModel

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth",
               "distilled": "checkpoint_distilled.pth"}  # spinediff distill's student


@dataclass(frozen=True)
class ModelFolder:
    """A ``TRAINER__PLANS__CONFIG`` results folder and what its plans say."""

    path: Path
    trainer: str
    plans_identifier: str
    configuration: str
    plans: SpineDiffPlans
    planned: PlannedConfiguration
    dataset_json: dict

    @property
    def plans_manager(self) -> PlansManager:
        return self.plans.manager

    @property
    def configuration_manager(self) -> ConfigurationManager:
        return self.planned.manager

    @property
    def dataset_name(self) -> str:
        return self.path.parent.name

    @classmethod
    def open(cls, path: str | Path) -> ModelFolder:
        path = Path(path)
        parts = split_model_folder_name(path.name)
        if parts is None:
            raise SpineDiffError(f"{path} is not a results folder named TRAINER__PLANS__CONFIGURATION.")
        trainer, plans_identifier, configuration = parts
        plans = SpineDiffPlans.read(path / "plans.json")
        return cls(path, trainer, plans_identifier, configuration, plans, plans.configuration(configuration),
                   read_json(path / "dataset.json"))

    def fold_folder(self, fold: int | str) -> Path:
        return self.path / f"fold_{fold}"

    def available_folds(self) -> list[str]:
        return sorted(p.name[len("fold_"):] for p in self.path.glob("fold_*") if p.is_dir())


def find_dataset_results(dataset: str | int, results_folder: str | Path | None = None) -> Path:
    """``$nnUNet_results/DatasetXXX_Name`` from an ID, a name, or a path."""
    root = nnunet_folder("results", results_folder)
    text = str(dataset)
    found = dataset_in(root, text)
    if found is not None:
        return found
    raise SpineDiffError(f"No trained models for dataset {text!r} in {root} (expected {root}/DatasetXXX_Name/). "
                         "Train first with `spinediff train`.")


def model_folder(dataset: str | int, configuration: str, trainer: str, plans_identifier: str = DEFAULT_PLANS,
                 results_folder: str | Path | None = None) -> ModelFolder:
    """The results folder of one trained trainer/plans/configuration."""
    base = find_dataset_results(dataset, results_folder)
    path = base / model_folder_name(trainer, configuration, plans_identifier)
    if not path.is_dir():
        trained = sorted(p.name for p in base.iterdir() if p.is_dir() and split_model_folder_name(p.name))
        raise SpineDiffError(f"{path} does not exist. Trained here: {', '.join(trained) or 'nothing'}.")
    return ModelFolder.open(path)


def load_fold_model(folder: ModelFolder, fold: int | str, checkpoint: str = "final",
                    device: torch.device | str = "cpu") -> FoldModel:
    """One trained fold of ``folder`` from its checkpoint (EMA weights; see the module docstring)."""
    from spinediff.training.registry import find_trainer, is_spinediff_trainer, trainer_classes

    if not is_spinediff_trainer(folder.trainer):
        names = ", ".join(trainer_classes())
        raise SpineDiffError(f"{folder.trainer} is not a spinediff trainer ({names}). Predict "
                             "nnU-Net's own trainers with nnUNetv2_predict.")
    if checkpoint not in CHECKPOINTS:
        raise SpineDiffError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}.")
    path = folder.fold_folder(fold) / CHECKPOINTS[checkpoint]
    state = load_checkpoint(path)
    trainer_class = find_trainer(folder.trainer)
    network, settings = network_from_checkpoint(state, path, trainer_class, folder.plans_manager,
                                                folder.configuration_manager, folder.path / "plans.json")
    block = state["spinediff"]
    network.to(device).eval()
    axes = state.get("inference_allowed_mirroring_axes") or ()
    return FoldModel(str(fold), network, settings, DiffusionProcess.from_settings(settings),
                     bool(block.get("denoising", trainer_class.denoising)),
                     tuple(int(p) for p in folder.configuration_manager.patch_size),
                     FoldModel.window_batch(folder.configuration_manager.batch_size),
                     tuple(int(a) for a in axes), state.get("sdedit"))
