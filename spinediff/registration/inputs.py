"""Inputs of ``spinediff register``: the files of one case, found in a phantom-style ``unaligned/`` folder."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from spinediff.errors import SpineDiffError
from spinediff.io import read_json


@dataclass
class CaseFiles:
    """Input files of one case. ``mr_channels`` maps channel names (e.g. T1w, T2w) to files, in order."""

    case_id: str
    mr_channels: dict[str, Path]
    ct: Path
    mr_vertebrae: Path | None = None
    ct_vertebrae: Path | None = None
    mr_subregions: Path | None = None
    ct_subregions: Path | None = None
    mr_labels: Path | None = None
    ct_labels: Path | None = None
    mr_landmarks: Path | None = None
    ct_landmarks: Path | None = None
    true_transform: Path | None = None


_UNALIGNED_ROLES = {
    "ct": "ct",
    "ct_vertebrae": "ct_vertebrae",
    "ct_labels": "ct_labels",
    "ct_subregions": "ct_subregions",
    "mr_vertebrae": "mr_vertebrae",
    "mr_labels": "mr_labels",
    "mr_subregions": "mr_subregions",
}


def find_unaligned_cases(folder: str | os.PathLike, case_ids: Iterable[str] | None = None) -> list[CaseFiles]:
    """Cases of a phantom-style ``unaligned/`` folder (see documentation/dataset_format.md).

    ``CASE_mr_<channel>.nii.gz`` are MR channels (sorted by name, e.g. T1w, T2w); ``CASE_ct.nii.gz``,
    ``CASE_{mr,ct}_{vertebrae,labels,subregions}.nii.gz``, ``CASE_{mr,ct}_landmarks.json`` and
    ``CASE_true_transform.tfm`` are picked up when present.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SpineDiffError(f"{folder} is not a folder; give an unaligned/ folder or explicit case files.")
    found: dict[str, dict[str, Path]] = {}
    channels: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.endswith("_true_transform.tfm"):
            found.setdefault(name[: -len("_true_transform.tfm")], {})["true_transform"] = path
            continue
        match = re.match(r"^(.+?)_(mr|ct)_landmarks\.json$", name)
        if match:
            found.setdefault(match.group(1), {})[f"{match.group(2)}_landmarks"] = path
            continue
        match = re.match(r"^(.+?)_(ct|mr)(?:_([A-Za-z0-9]+))?\.nii\.gz$", name)
        if not match:
            continue
        case, modality, role = match.group(1), match.group(2), match.group(3)
        key = f"{modality}_{role}" if role else modality
        if key in _UNALIGNED_ROLES:
            found.setdefault(case, {})[_UNALIGNED_ROLES[key]] = path
        elif modality == "mr" and role:
            channels.setdefault(case, {})[role] = path
            found.setdefault(case, {})
    wanted = None if case_ids is None else set(case_ids)
    cases = []
    for case in sorted(found):
        if wanted is not None and case not in wanted:
            continue
        files = found[case]
        if "ct" not in files or not channels.get(case):
            raise SpineDiffError(
                f"{folder}: case {case} lacks {'its CT' if 'ct' not in files else 'MR channels'} "
                f"({case}_ct.nii.gz, {case}_mr_<channel>.nii.gz)."
            )
        cases.append(CaseFiles(case_id=case, mr_channels=dict(sorted(channels[case].items())), **files))
    if wanted is not None and wanted - {c.case_id for c in cases}:
        raise SpineDiffError(f"{folder}: no such case(s): {sorted(wanted - {c.case_id for c in cases})}.")
    if not cases:
        raise SpineDiffError(f"{folder} holds no cases (expected CASE_ct.nii.gz and CASE_mr_<channel>.nii.gz).")
    return cases


def labels_from_parent_dataset(unaligned: str | os.PathLike) -> dict[str, int] | None:
    """Label names of the dataset holding an ``unaligned/`` folder (the phantom layout), if any."""
    parent_json = Path(unaligned).resolve().parent / "dataset.json"
    if parent_json.is_file():
        labels = read_json(parent_json).get("labels")
        if isinstance(labels, dict) and all(isinstance(v, int) for v in labels.values()):
            return labels
    return None
