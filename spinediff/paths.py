"""nnU-Net's folder variables, read lazily, overridable by explicit arguments.

``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` are read only when a command needs
them, so that ``spinediff --help`` or ``spinediff phantom -o DIR`` work without them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from spinediff.errors import SpineDiffError

#: The folder nnU-Net's ``nnUNet_extTrainer`` must name for nnU-Net to find spinediff's trainers by class name (its
#: predictor loads a model folder's trainer class so); ``import spinediff`` adds it to the variable.
NNUNET_TRAINER_ENTRY = str(Path(__file__).resolve().parent / "training" / "nnunet_entry")

_VARIABLES = {
    "raw": "nnUNet_raw",
    "preprocessed": "nnUNet_preprocessed",
    "results": "nnUNet_results",
}


def nnunet_folder(kind: str, override: str | os.PathLike | None = None) -> Path:
    """Return the nnU-Net folder of ``kind`` ('raw', 'preprocessed' or 'results').

    ``override`` (e.g. from a CLI flag) wins over the environment variable.
    """
    if kind not in _VARIABLES:
        raise ValueError(f"unknown folder kind {kind!r}; expected one of {sorted(_VARIABLES)}")
    if override is not None:
        return Path(override).expanduser().resolve()
    variable = _VARIABLES[kind]
    value = os.environ.get(variable)
    if not value:
        raise SpineDiffError(
            f"The environment variable {variable} is not set, and no folder was given on the command "
            f"line. Either `export {variable}=/path/to/{variable}` (as for nnU-Net) or pass the folder "
            f"explicitly (see `spinediff <command> --help`)."
        )
    return Path(value).expanduser().resolve()


_DATASET_NAME = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_\-]+$")


def resolve_raw_dataset(dataset: str | int | os.PathLike, raw_folder: str | os.PathLike | None = None) -> Path:
    """Find a raw dataset folder from a path, a dataset ID (``501``) or a name (``Dataset501_X``)."""
    text = str(dataset)
    candidate = Path(text).expanduser()
    if candidate.is_dir() and (candidate / "dataset.json").exists():
        return candidate.resolve()
    if candidate.is_dir() or os.sep in text:
        if not candidate.exists():
            raise SpineDiffError(f"Dataset folder {candidate} does not exist.")
        raise SpineDiffError(f"{candidate} has no dataset.json: it is not a dataset in nnU-Net raw layout.")
    root = nnunet_folder("raw", raw_folder)
    if not root.is_dir():
        raise SpineDiffError(f"The nnU-Net raw folder {root} does not exist.")
    found = dataset_in(root, text)
    if found is None and text.isdigit():
        raise SpineDiffError(f"No dataset with ID {int(text)} ({dataset_name_from_id(int(text), '*')}) in {root}.")
    if found is None:
        raise SpineDiffError(f"No dataset named {text} in {root}.")
    return found


def dataset_in(root: Path, dataset: str | int) -> Path | None:
    """The folder of ``dataset`` (an ID such as ``501`` or a name ``Dataset501_X``) directly inside ``root`` (raw,
    preprocessed or results); None when absent; an ID held by two folders is an error. The one resolver of dataset
    IDs: an ID names the folder ``DatasetXXX_*`` as nnU-Net's ``find_candidate_datasets`` matches it, in the given
    folder (spinediff's commands take folder overrides, which nnU-Net's environment-only lookup would miss)."""
    text = str(dataset)
    if (root / text).is_dir():
        return root / text
    if not text.isdigit() or not root.is_dir():
        return None
    prefix = dataset_name_from_id(int(text), "")
    matches = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)
                     and _DATASET_NAME.match(p.name))
    if len(matches) > 1:
        raise SpineDiffError(f"Dataset ID {int(text)} is ambiguous in {root}: {[m.name for m in matches]}.")
    return matches[0] if matches else None


def dataset_name_from_id(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset: ``Dataset{ID:03d}_{name}``."""
    return f"Dataset{int(dataset_id):03d}_{name}"


#: nnU-Net's default plans identifier.
DEFAULT_PLANS = "nnUNetPlans"
#: A model folder's post-processing decision, kept by its cross-validation (spinediff find_best / benchmark).
POSTPROCESSING_FILE = "postprocessing.json"


def model_folder_name(trainer: str, configuration: str, plans: str = DEFAULT_PLANS) -> str:
    """The results folder of a trained model, ``TRAINER__PLANS__CONFIGURATION`` (as nnU-Net's
    ``get_output_folder``, through its ``convert_trainer_plans_config_to_identifier``); the one place that builds
    the name."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    return convert_trainer_plans_config_to_identifier(trainer, plans, configuration)


def split_model_folder_name(name: str) -> tuple[str, str, str] | None:
    """(trainer, plans, configuration) of a results folder's name, or None if it is not one."""
    parts = name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None

