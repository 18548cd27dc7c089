"""Finding and checking the raw input files of a prediction, one case at a time.

Inputs follow nnU-Net's naming: ``CASE_XXXX.nii.gz`` per image channel (``XXXX`` = the channel
index in ``dataset.json``), or, for generation, one label map ``CASE.nii.gz`` per case. Any
supported ending works (NIfTI, MHA, NRRD); all files of one case must share it, and the outputs are
written with it. Every problem of a case is reported as a :class:`SpineDiffError` naming the file,
so that the caller can skip the case and go on with the others.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinediff.datasets.validate import Problem, read_channel_image
from spinediff.errors import SpineDiffError
from spinediff.io import IMAGE_SUFFIXES, read_json
from spinediff.tasks import TASKS, Task
from spinediff.utilities.geometry import same_geometry

# Written beside every prediction folder: settings, task and per-case status (`spinediff ensemble` reads the task).
RUN_SUMMARY = "prediction.json"
#: The keys of a prediction.json: written by `spinediff predict` (its settings, sampling and cases), by `spinediff
#: ensemble` (ensemble_of, written, problems) and beside reused validation exports (source); older files named the
#: solver ``sampler`` and the steps ``steps``.
RUN_SUMMARY_KEYS = frozenset({
    "model", "task", "trainer", "configuration", "plans", "folds", "checkpoint", "device", "solver",
    "num_inference_steps", "num_samples", "eta", "warm_start", "precision", "tta", "sampling_from", "seed",
    "denoising", "input_folder", "postprocessing", "part", "refinement", "num_cases", "num_failed",
    "review_flagged", "review_sheet", "cases", "ensemble_of", "written", "problems", "source", "sampler", "steps"})
#: key → the JSON types it may hold (None allowed where a run may leave it unset).
_RUN_SUMMARY_TYPES: dict[str, tuple[type, ...]] = {
    "task": (str,), "folds": (list,), "num_inference_steps": (int, type(None)), "num_samples": (int, type(None)),
    "cases": (dict,), "ensemble_of": (list,), "written": (list,), "problems": (list,), "review_flagged": (list,),
    "review_sheet": (str, type(None)),
    "part": (dict, type(None)), "postprocessing": (dict, type(None)), "refinement": (dict, type(None)),
    "num_cases": (int,), "num_failed": (int,)}

_KIND_NAMES = {str: "a string", list: "a list", dict: "an object", int: "a whole number", type(None): "null"}


def read_run_summary(path: str | Path) -> dict:
    """A prediction folder's ``prediction.json`` read through its schema: an object with :data:`RUN_SUMMARY_KEYS`
    only, ``task`` a known task, counts whole numbers >= 0 (samples and steps >= 1), lists and objects where they
    belong; anything else is a SpineDiffError naming the file and the fix."""
    path = Path(path)
    data = read_json(path)  # missing, a folder, not JSON: named there
    fix = ("predict into this folder again (spinediff predict --overwrite, or spinediff ensemble) or restore the "
           "file spinediff wrote.")
    if not isinstance(data, dict):
        raise SpineDiffError(f"{path} holds a JSON {type(data).__name__}, not a prediction summary object; {fix}")
    unknown = sorted(set(data) - RUN_SUMMARY_KEYS)
    if unknown:
        raise SpineDiffError(f"{path} has unknown key(s) {unknown}; it was not written by spinediff or was edited "
                             f"(known: {sorted(RUN_SUMMARY_KEYS)}); {fix}")
    if "task" not in data:
        raise SpineDiffError(f"{path} lacks 'task' (segmentation, translation or generation); {fix}")
    for key, kinds in _RUN_SUMMARY_TYPES.items():
        if key in data and (not isinstance(data[key], kinds) or isinstance(data[key], bool)):
            names = " or ".join(_KIND_NAMES[k] for k in kinds)
            raise SpineDiffError(f"{path}: '{key}' must be {names}, got {data[key]!r}; {fix}")
    for key in ("num_samples", "num_inference_steps", "num_cases", "num_failed"):
        least = 1 if key in ("num_samples", "num_inference_steps") else 0
        if isinstance(data.get(key), int) and data[key] < least:
            raise SpineDiffError(f"{path}: '{key}' must be at least {least}, got {data[key]}; {fix}")
    if any(not isinstance(case, dict) for case in data.get("cases", {}).values()):
        raise SpineDiffError(f"{path}: 'cases' must map each case to an object; {fix}")
    if data["task"] not in TASKS:
        raise SpineDiffError(f"{path}: 'task' is {data['task']!r}; expected one of {', '.join(TASKS)}; {fix}")
    return data


def part_name(name: str, num_parts: int, part_id: int) -> str:
    """A run-level file of one part of a split prediction (``prediction.json`` -> ``prediction_part1of4.json``),
    so that parts written by different processes into one folder never collide; unchanged for one part."""
    if num_parts == 1:
        return name
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}_part{part_id}of{num_parts}{dot}{suffix}"


def select_part(identifiers: list[str], num_parts: int, part_id: int) -> set[str]:
    """The cases of part ``part_id`` of ``num_parts`` (nnU-Net's ``-num_parts/-part_id``): every
    ``num_parts``-th case in sorted order from ``part_id`` on, so the parts are disjoint and together all cases."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SpineDiffError(f"--part-id must be in 0..{num_parts - 1} and --num-parts at least 1; got part "
                             f"{part_id} of {num_parts}.")
    return set(sorted(identifiers)[part_id::num_parts])
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its identifier, its files (channels in order, or the label map) and their ending."""

    identifier: str
    files: tuple[Path, ...]
    ending: str


@dataclass(frozen=True)
class InputProblem:
    """A case (or stray file) that cannot be predicted, with the reason."""

    identifier: str
    message: str


@dataclass(frozen=True)
class InputLayout:
    """What a model reads: the image channels (indices and names) or, for generation, the label map."""

    task: Task
    channels: tuple[int, ...]
    channel_names: dict[int, str]
    label_values: tuple[int, ...] = ()

    @property
    def reads_label_map(self) -> bool:
        return self.task.labels_are_condition

    def describe(self) -> str:
        if self.reads_label_map:
            return "one label map per case, CASE.nii.gz"
        return ", ".join(f"CASE_{c:04d} ({self.channel_names.get(c, '?')})" for c in self.channels)


def split_ending(name: str) -> tuple[str, str] | None:
    """``'a_0000.nii.gz'`` → ``('a_0000', '.nii.gz')``; None for unsupported endings."""
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return None


def discover_cases(folder: str | Path, layout: InputLayout) -> tuple[list[InputCase], list[InputProblem]]:
    """Group the image files of ``folder`` into cases; cases with missing or extra channels are problems."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SpineDiffError(f"Input folder {folder} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and split_ending(p.name) is not None)
    if layout.reads_label_map:
        cases = [InputCase(stem, (p,), ending) for p in files for stem, ending in [split_ending(p.name)]]
        return cases, []
    grouped: dict[str, dict[int, Path]] = {}
    problems = []
    for path in files:
        stem, _ = split_ending(path.name)
        match = _CHANNEL_FILE.match(stem)
        if match is None:
            problems.append(InputProblem(stem, f"{path}: not named CASE_XXXX{_ending_of(path)} (XXXX = channel "
                                               f"index); this model reads {layout.describe()}."))
            continue
        grouped.setdefault(match["case"], {})[int(match["channel"])] = path
    cases = []
    for identifier, channels in sorted(grouped.items()):
        missing = [c for c in layout.channels if c not in channels]
        extra = sorted(set(channels) - set(layout.channels))
        if missing or extra:
            parts = []
            if missing:
                names = ", ".join(f"{identifier}_{c:04d} ({layout.channel_names.get(c, '?')})" for c in missing)
                parts.append(f"missing channel file(s) {names}")
            if extra:
                parts.append(f"unexpected channel file(s) {', '.join(str(channels[c]) for c in extra)}")
            problems.append(InputProblem(identifier, f"case {identifier} in {folder}: {'; '.join(parts)}. This "
                                                     f"{layout.task.name} model reads exactly {len(layout.channels)} "
                                                     f"channel(s): {layout.describe()}."))
            continue
        paths = tuple(channels[c] for c in layout.channels)
        endings = {_ending_of(p) for p in paths}
        if len(endings) > 1:
            problems.append(InputProblem(identifier, f"case {identifier}: its channel files mix the endings "
                                                     f"{sorted(endings)}; use one format per case."))
            continue
        cases.append(InputCase(identifier, paths, endings.pop()))
    return cases, problems


def _ending_of(path: Path) -> str:
    split = split_ending(path.name)
    return split[1] if split else path.suffix


def check_case_files(case: InputCase, layout: InputLayout) -> None:
    """Read every file of ``case`` once: unreadable, NaN/Inf, non-scalar, channel geometry mismatch, or
    label values the model does not know raise :class:`SpineDiffError` naming the file."""
    problems: list[Problem] = []
    reference = None
    for path in case.files:
        loaded = read_channel_image(path, problems)
        if loaded is None or problems:
            break
        image, array = loaded
        if layout.reads_label_map:
            _check_labels(path, np.asarray(array), layout.label_values, problems)
        if reference is None:
            reference = image
        elif (why := same_geometry(reference, image)) is not None:
            problems.append(Problem(str(path), f"geometry does not match {case.files[0].name}: {why}. All channels "
                                               "of a case must share one grid (resample them first)."))
            break
    if problems:
        raise SpineDiffError(str(problems[0]))


def _check_labels(path: Path, array: np.ndarray, allowed: Sequence[int], problems: list[Problem]) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.all(array == np.round(array)):
        problems.append(Problem(str(path), "holds non-integer values; the generation model needs a label map."))
        return
    unknown = sorted(set(np.unique(array).astype(int).tolist()) - set(allowed))
    if unknown:
        problems.append(Problem(str(path), f"holds label value(s) {unknown} the model was not trained on "
                                           f"(known: {sorted(allowed)})."))
