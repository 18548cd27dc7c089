"""Preprocessing that is complete or known to be incomplete.

``spinediff plan`` writes ``preprocessing_complete.json`` in the preprocessed dataset folder: before any work it
records the run (``running``: PID, plans, start); when every case of every preprocessed configuration is written it
records the cases and the size of each of their files (``data``) and drops ``running``. A run killed half-way
(``kill -9``, a full disk) thus leaves ``running`` behind; the next ``spinediff plan`` says what is incomplete and
redoes it, and ``spinediff train`` (and the benchmark) refuse the folder before they start, naming the cases.

Folders preprocessed before this file existed (or by ``nnUNetv2_plan_and_preprocess``) have no record; their case
files are checked directly (every case has all of its files, none empty) and counted against ``dataset.json``.
"""

from __future__ import annotations

import datetime
import os
import pickle
from pathlib import Path
from typing import Any

from spinediff.errors import SpineDiffError
from spinediff.io import read_json, write_json
from spinediff.paths import DEFAULT_PLANS

RECORD = "preprocessing_complete.json"
_DATA_ENDINGS = (".b2nd", ".npz")  # nnunetv2's blosc2 dataset (current) and numpy dataset (older versions)


def _case_files(folder: Path, case: str) -> list[Path]:
    """The files nnunetv2 writes for ``case`` in a data folder (blosc2: data, segmentation, properties)."""
    if (folder / f"{case}.npz").exists():
        return [folder / f"{case}.npz", folder / f"{case}.pkl"]
    return [folder / f"{case}.b2nd", folder / f"{case}_seg.b2nd", folder / f"{case}.pkl"]


def found_cases(folder: Path) -> list[str]:
    """Every case with any file in the data folder ``folder`` (a properties file or a data file)."""
    cases = set()
    for path in folder.iterdir() if folder.is_dir() else ():
        name = path.name
        if name.startswith("."):
            continue
        for ending in (".pkl", "_seg.b2nd", *_DATA_ENDINGS):
            if name.endswith(ending):
                cases.add(name[: -len(ending)])
                break
    return sorted(cases)


def _file_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size == 0:
        return f"{path.name} is empty (0 bytes)"
    if path.suffix == ".pkl":
        try:
            with open(path, "rb") as handle:
                pickle.load(handle)  # noqa: S301 - nnunetv2's own properties file, written by this machine's run
        except Exception:  # noqa: BLE001 - any failure to unpickle means a truncated file
            return f"{path.name} is truncated"
    return None


def scan(folder: Path, cases: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """({case: {file name: size}} of the complete cases, {case: what is wrong} of the others)."""
    complete, problems = {}, {}
    for case in cases:
        files = _case_files(folder, case)
        wrong = [problem for problem in map(_file_problem, files) if problem]
        if wrong:
            problems[case] = ", ".join(wrong)
        else:
            complete[case] = {path.name: path.stat().st_size for path in files}
    return complete, problems


def read_record(dataset_folder: Path) -> dict[str, Any] | None:
    path = dataset_folder / RECORD
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except SpineDiffError:
        return {"running": {"damaged": True}, "data": {}}  # a damaged record: treat as an interrupted run
    return record if isinstance(record, dict) else {"running": {"damaged": True}, "data": {}}


def start_run(dataset_folder: Path, plans_identifier: str, identifiers: list[str] | None) -> None:
    """Record, before any file is written, that a plan run is under way and which data it will replace."""
    record = read_record(dataset_folder) or {"data": {}}
    data = record.get("data") or {}
    for identifier in identifiers if identifiers is not None else list(data):
        data.pop(identifier, None)
    record.update(data=data, running={"pid": os.getpid(), "plans": plans_identifier,
                                      "started": datetime.datetime.now().isoformat(timespec="seconds")})
    write_json(record, dataset_folder / RECORD)


def finish_run(dataset_folder: Path, cases: list[str], identifiers: list[str]) -> None:
    """Check every case file of ``identifiers`` and record them as complete; raise if any is missing or damaged."""
    record = read_record(dataset_folder) or {"data": {}}
    data = record.get("data") or {}
    for identifier in identifiers:
        complete, problems = scan(dataset_folder / identifier, cases)
        if problems:
            shown = "; ".join(f"{case}: {why}" for case, why in list(problems.items())[:5])
            raise SpineDiffError(f"Preprocessing wrote incomplete files in {dataset_folder / identifier} ({shown}). "
                                 f"Check the free space of the device holding {dataset_folder}, then run `spinediff "
                                 "plan` again (it redoes the incomplete preprocessing).")
        data[identifier] = complete
    record.pop("running", None)
    if cases:
        record["cases"] = sorted(cases)
    record.update(data=data, finished=datetime.datetime.now().isoformat(timespec="seconds"))
    write_json(record, dataset_folder / RECORD)


def _expected_count(dataset_folder: Path) -> int | None:
    try:
        count = read_json(dataset_folder / "dataset.json").get("numTraining")
    except (SpineDiffError, AttributeError):
        return None
    return count if isinstance(count, int) else None


def _ground_truth_cases(dataset_folder: Path) -> list[str]:
    try:
        ending = read_json(dataset_folder / "dataset.json").get("file_ending", ".nii.gz")
    except (SpineDiffError, AttributeError):
        return []
    folder = dataset_folder / "gt_segmentations"
    return sorted(p.name[: -len(ending)] for p in folder.glob(f"*{ending}")) if folder.is_dir() else []


def incomplete(dataset_folder: Path, identifier: str | None = None) -> str | None:
    """Why the preprocessed dataset (one data folder ``identifier``, or every recorded/present one) is incomplete,
    or None when it is complete."""
    record = read_record(dataset_folder)
    if record is not None and record.get("running"):
        run = record["running"]
        started = f" (PID {run.get('pid', '?')}, started {run.get('started', '?')})" if "pid" in run else ""
        return f"a `spinediff plan` run{started} was interrupted before every case was preprocessed"
    data = (record or {}).get("data") or {}
    if identifier is not None:
        identifiers = [identifier]
    else:
        identifiers = sorted(set(data) | {p.name for p in dataset_folder.iterdir() if p.is_dir()
                                          and p.name != "gt_segmentations" and found_cases(p)})
    for name in identifiers:
        folder = dataset_folder / name
        if not folder.is_dir():
            return f"{folder} does not exist (not preprocessed)"
        if name in data:
            expected = sorted(data[name])
            _, problems = scan(folder, expected)
            changed = [case for case, files in data[name].items() if case not in problems
                       and any((folder / f).is_file() and (folder / f).stat().st_size != size
                               for f, size in files.items())]
            problems.update({case: "a file changed size since preprocessing" for case in changed})
        else:  # no record (older folders, nnUNetv2_preprocess): the files themselves, and their number
            present = found_cases(folder)
            _, problems = scan(folder, present)
            labelled = _ground_truth_cases(dataset_folder)  # nnU-Net copies every case's label there
            problems.update({case: "not preprocessed" for case in labelled if case not in present})
            count = _expected_count(dataset_folder)
            if count is not None and len(present) < count and not problems:
                return f"{folder} holds {len(present)} of the {count} cases dataset.json lists"
        if problems:
            shown = "; ".join(f"{case}: {why}" for case, why in list(problems.items())[:5])
            more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
            return f"{len(problems)} case(s) in {folder} are incomplete ({shown}{more})"
    return None


def complete_cases(dataset_folder: Path, identifier: str) -> list[str]:
    """The cases of a complete data folder (the record's list, else the cases found)."""
    record = read_record(dataset_folder) or {}
    if identifier in (record.get("data") or {}):
        return sorted(record["data"][identifier])
    return found_cases(dataset_folder / identifier)


def verify_for_training(dataset_folder: Path, identifier: str, dataset: str | int, configuration: str,
                        plans_identifier: str = DEFAULT_PLANS) -> None:
    """Refuse, before a trainer is built, a preprocessed folder that is incomplete or lacks cases of the split."""
    direction = plans_identifier.split("_", 1)[1] if plans_identifier.startswith(f"{DEFAULT_PLANS}_") else None
    fix = f"`spinediff plan -d {dataset}" + (f" --slice-direction {direction}" if direction else "") + " --overwrite`"
    why = incomplete(dataset_folder, identifier)
    if why is not None:
        raise SpineDiffError(f"The preprocessed data of {dataset_folder.name} ({configuration}) is incomplete: {why}. "
                             f"Training on it would fail or silently use a subset of the cases. Run {fix} to "
                             "preprocess it again.")
    splits_file = dataset_folder / "splits_final.json"
    if not splits_file.is_file():
        return
    splits = read_json(splits_file)
    try:
        wanted = sorted({case for split in splits for part in ("train", "val") for case in split[part]})
    except (TypeError, KeyError):
        raise SpineDiffError(f"{splits_file} is not a list of {{'train': [...], 'val': [...]}} folds (nnU-Net's "
                             "splits_final.json). Delete it to have the default split written again.") from None
    missing = sorted(set(wanted) - set(complete_cases(dataset_folder, identifier)))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise SpineDiffError(f"{splits_file} names {len(missing)} case(s) that are not preprocessed in "
                             f"{dataset_folder / identifier}: {shown}. Run {fix} (or fix the split) before training.")
