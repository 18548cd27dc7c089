"""A trained fold's network from its checkpoint, safely: ``torch.load(..., weights_only=True)`` unpickles only tensors
and plain values, so a checkpoint file can never run code (spinediff's trainers save nothing else).

The network is rebuilt by the trainer class's ``build_network_architecture`` from the plans' configuration with the
checkpoint's own diffusion block (the settings the weights were trained with), and its EMA weights
(``network_weights``) are loaded. ``spinediff predict`` (:mod:`spinediff.inference.models`) and a refiner that runs
its initial model on its training patches (:mod:`spinediff.training.refinement`) both load folds through here; the
trainer class is passed in, so this layer needs no trainer registry.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from spinediff.diffusion.settings import DiffusionSettings
from spinediff.errors import SpineDiffError


def load_checkpoint(path: str | Path) -> dict:
    """Unpickle only tensors and plain values (``weights_only=True``); refuse anything else clearly."""
    path = Path(path)
    if not path.is_file():
        raise SpineDiffError(f"{path} does not exist. Train this fold first, or choose other folds with -f.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SpineDiffError(f"{path} holds objects other than tensors and plain values, so it is not loaded (a "
                             f"checkpoint must never run code on load). Was it written by spinediff? ({exc})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise SpineDiffError(f"{path} could not be read as a checkpoint ({exc}); it is corrupt or "
                             "incomplete.") from None


def network_from_checkpoint(state: dict, path: str | Path, trainer_class, plans_manager,
                            configuration_manager, plans_file: str | Path) -> tuple[torch.nn.Module, DiffusionSettings]:
    """The EMA network (in eval mode, on the CPU) and the diffusion settings of a checkpoint ``state`` read from
    ``path`` and written by ``trainer_class`` (its name is checked against the checkpoint's)."""
    block = state.get("spinediff")
    if state.get("trainer_name") != trainer_class.__name__ or not isinstance(block, dict):
        raise SpineDiffError(f"{path} was written by {state.get('trainer_name')!r}, not by spinediff's "
                             f"{trainer_class.__name__}; it does not belong in this folder.")
    settings = DiffusionSettings.from_dict(block["diffusion"], source=str(path))
    configuration = copy.deepcopy(configuration_manager.configuration)
    configuration["diffusion"] = settings.to_dict()
    network = trainer_class.build_network_architecture(plans_manager, ConfigurationManager(configuration), 0, 0,
                                                       False)
    try:
        network.load_state_dict(state["network_weights"])
    except RuntimeError as exc:
        raise SpineDiffError(f"{path} does not fit the network of {plans_file} ({exc}).") from None
    return network.eval(), settings
