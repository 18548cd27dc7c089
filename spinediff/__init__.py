"""spinediff: self-configuring diffusion models for spine imaging, in nnU-Net's workflow.

The main functions are importable from here (loaded on first use, so ``import spinediff`` stays light):

>>> import spinediff                                                        # doctest: +SKIP
>>> spinediff.write_phantom_datasets("raw", num_cases=6)                    # doctest: +SKIP
>>> spinediff.plan_dataset(901, configurations=["2d_diffusion"], budget="10m")  # doctest: +SKIP
>>> spinediff.train(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer")     # doctest: +SKIP
>>> spinediff.predict("imagesTs", "out", 901, "2d_diffusion",
...                   "DiffusionSegmentationTrainer", folds=[0])              # doctest: +SKIP

Each takes the same settings as its command (``spinediff COMMAND --help``), as keyword arguments.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from spinediff.paths import NNUNET_TRAINER_ENTRY
from spinediff.version import __version__

# nnU-Net finds trainers outside its own package through nnUNet_extTrainer (its predictor loads a model folder's
# trainer class by name): point it at spinediff's entry folder too, so that a model of a spinediff trainer based on
# nnU-Net's (nnUNetTrainerLevelContext) loads wherever nnU-Net's predictor runs in this process.
if NNUNET_TRAINER_ENTRY not in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep):
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(
        p for p in (os.environ.get("nnUNet_extTrainer"), NNUNET_TRAINER_ENTRY) if p)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from spinediff.datasets.phantom_writer import write_phantom_datasets
    from spinediff.datasets.validate import validate_dataset
    from spinediff.errors import SpineDiffError
    from spinediff.evaluation.evaluate import evaluate_folders
    from spinediff.experiments.benchmark import run_benchmark
    from spinediff.experiments.demo import run_demo
    from spinediff.experiments.sampling import tune_sampling
    from spinediff.inference.api import predict
    from spinediff.inference.ensemble import ensemble_folders
    from spinediff.inference.find_best import find_best
    from spinediff.planning.api import plan_dataset
    from spinediff.planning.plans import SpineDiffPlans
    from spinediff.registration.api import register_dataset
    from spinediff.training.api import train
    from spinediff.training.options import TrainingOptions

#: public name → the module that defines it
API = {
    "SpineDiffError": "spinediff.errors",
    "write_phantom_datasets": "spinediff.datasets.phantom_writer",
    "validate_dataset": "spinediff.datasets.validate",
    "register_dataset": "spinediff.registration.api",
    "plan_dataset": "spinediff.planning.api",
    "SpineDiffPlans": "spinediff.planning.plans",
    "TrainingOptions": "spinediff.training.options",
    "train": "spinediff.training.api",
    "predict": "spinediff.inference.api",
    "ensemble_folders": "spinediff.inference.ensemble",
    "find_best": "spinediff.inference.find_best",
    "evaluate_folders": "spinediff.evaluation.evaluate",
    "run_benchmark": "spinediff.experiments.benchmark",
    "run_demo": "spinediff.experiments.demo",
    "tune_sampling": "spinediff.experiments.sampling",
}

__all__ = ["__version__", "SpineDiffError", "write_phantom_datasets", "validate_dataset", "register_dataset",
           "plan_dataset", "SpineDiffPlans", "TrainingOptions", "train", "predict", "ensemble_folders", "find_best",
           "evaluate_folders", "run_benchmark", "run_demo", "tune_sampling"]


def __getattr__(name: str) -> Any:
    if name not in API:
        raise AttributeError(f"module 'spinediff' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
