"""Check a raw dataset before anything runs on it (``spinediff validate``).

Every problem is collected (not just the first), each naming the file, what is wrong and how to
fix it. Nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from spinediff.datasets.dataset_json import label_values
from spinediff.errors import SpineDiffError
from spinediff.io import read_image, read_json, read_voxels_verified
from spinediff.tasks import SEGMENTATION, TASKS
from spinediff.utilities.geometry import orientation_code, same_geometry

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")


@dataclass
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class ValidationReport:
    dataset: Path
    task: str = SEGMENTATION.name
    num_cases: int = 0
    num_channels: int = 0
    problems: list[Problem] = field(default_factory=list)
    #: what is not wrong but worth knowing before training (e.g. images stored in several orientations)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            lines = [f"{self.dataset.name}: OK ({self.num_cases} cases, {self.num_channels} channels, "
                     f"task {self.task})"]
        else:
            lines = [f"{self.dataset.name}: {len(self.problems)} problem(s) found:"]
            lines += [f"  - {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _check_dataset_json(data: Any, path: Path, problems: list[Problem]) -> tuple[int, dict[str, int], str, str]:
    """Schema checks; returns (number of channels, labels, file ending, task)."""
    where = str(path)
    if not isinstance(data, dict):
        problems.append(Problem(where, "must hold a JSON object with channel_names, labels, numTraining and "
                                       "file_ending (see nnU-Net's dataset format)."))
        return 0, {}, ".nii.gz", SEGMENTATION.name
    channels = data.get("channel_names", data.get("modality"))
    n_channels = 0
    if not isinstance(channels, dict) or not channels:
        problems.append(Problem(where, "'channel_names' is missing or empty; it must map '0', '1', ... to "
                                       "channel names, e.g. {\"0\": \"T2w\"}."))
    else:
        keys = sorted(channels)
        expected = [str(i) for i in range(len(channels))]
        if sorted(keys, key=lambda k: (len(k), k)) != expected:
            problems.append(Problem(where, f"'channel_names' keys must be '0'..'{len(channels) - 1}' without gaps; "
                                           f"got {keys}."))
        elif not all(isinstance(v, str) and v for v in channels.values()):
            problems.append(Problem(where, "every 'channel_names' value must be a non-empty string."))
        else:
            n_channels = len(channels)
    labels_raw = data.get("labels")
    labels: dict[str, int] = {}
    if not isinstance(labels_raw, dict) or not labels_raw:
        problems.append(Problem(where, "'labels' is missing or empty; it must map names to integer values, "
                                       "starting with \"background\": 0."))
    else:
        try:
            if not all(isinstance(v, int) and not isinstance(v, bool) or
                       (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
                       for v in labels_raw.values()):
                raise TypeError
            labels = label_values(data)
        except (TypeError, ValueError):
            problems.append(Problem(where, "every 'labels' value must be an integer (or a list of integers "
                                           "for a region)."))
        if labels and labels_raw.get("background") != 0:
            problems.append(Problem(where, "'labels' must contain \"background\": 0."))
        plain = [v for v in labels_raw.values() if isinstance(v, int)]
        if len(plain) != len(set(plain)):
            problems.append(Problem(where, "two label names share one value in 'labels'; values must be unique."))
        if any(v < 0 for v in labels.values()):
            problems.append(Problem(where, "label values must not be negative."))
    ending = data.get("file_ending")
    if not isinstance(ending, str) or ending not in SUPPORTED_ENDINGS:
        allowed_endings = ", ".join(SUPPORTED_ENDINGS)
        problems.append(Problem(where, f"'file_ending' is {ending!r}; it must be one of {allowed_endings}."))
        ending = ".nii.gz"
    num_training = data.get("numTraining")
    if not isinstance(num_training, int) or isinstance(num_training, bool) or num_training < 1:
        problems.append(Problem(where, f"'numTraining' is {num_training!r}; it must be a positive integer."))
    task = SEGMENTATION.name
    block = data.get("spinediff")
    if block is not None:
        task = _check_spinediff_block(block, n_channels, where, problems)
    return n_channels, labels, ending, task


def _check_spinediff_block(block: Any, n_channels: int, where: str, problems: list[Problem]) -> str:
    if not isinstance(block, dict):
        problems.append(Problem(where, "'spinediff' must be an object like {\"task\": \"translation\", "
                                       "\"source_channels\": [0, 1], \"target_channels\": [2]}."))
        return SEGMENTATION.name
    name = block.get("task", SEGMENTATION.name)
    if name not in TASKS:
        problems.append(Problem(where, f"spinediff.task is {name!r}; expected one of {', '.join(TASKS)}."))
        return SEGMENTATION.name
    task = TASKS[name]
    lists = {}
    for key in ("source_channels", "target_channels"):
        value = block.get(key, [])
        if not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
            problems.append(Problem(where, f"spinediff.{key} must be a list of channel indices."))
            value = []
        bad = [c for c in value if n_channels and not 0 <= c < n_channels]
        if bad:
            problems.append(Problem(where, f"spinediff.{key} names channel(s) {bad}, but channel_names has only "
                                           f"{n_channels} channel(s) (0..{n_channels - 1})."))
        lists[key] = value
    overlap = set(lists["source_channels"]) & set(lists["target_channels"])
    if overlap:
        problems.append(Problem(where, f"channel(s) {sorted(overlap)} are both source and target."))
    problems += [Problem(where, message)
                 for message in task.block_problems(lists["source_channels"], lists["target_channels"], block)]
    return task.name


def validate_dataset(dataset: str | os.PathLike, progress: bool = False) -> ValidationReport:
    """Check a raw dataset folder; returns a report listing every problem found."""
    folder = Path(dataset)
    report = ValidationReport(folder)
    problems = report.problems
    if not folder.is_dir():
        raise SpineDiffError(f"Dataset folder {folder} does not exist.")
    json_path = folder / "dataset.json"
    if json_path.is_dir():
        problems.append(Problem(str(json_path), "is a folder, not a file: it must be nnU-Net's dataset.json."))
        return report
    try:
        data = read_json(json_path)
    except SpineDiffError as exc:
        problems.append(Problem(str(json_path), str(exc).replace(f"{json_path} ", "", 1)))
        return report
    n_channels, labels, ending, task = _check_dataset_json(data, json_path, problems)
    if not isinstance(data, dict):
        return report
    report.task, report.num_channels = task, n_channels
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            problems.append(Problem(str(d), "folder is missing (nnU-Net raw layout needs imagesTr/ and labelsTr/)."))
    if problems and (not images_dir.is_dir() or not labels_dir.is_dir()):
        return report

    cases = sorted(p.name[: -len(ending)] for p in labels_dir.iterdir() if p.name.endswith(ending))
    report.num_cases = len(cases)
    if not cases:
        problems.append(Problem(str(labels_dir), f"no label files ending in {ending}."))
    if isinstance(data.get("numTraining"), int) and cases and data["numTraining"] != len(cases):
        problems.append(Problem(str(json_path), f"numTraining is {data['numTraining']} but labelsTr holds "
                                                f"{len(cases)} cases; update numTraining."))
    expected_images = {f"{c}_{i:04d}{ending}" for c in cases for i in range(n_channels)}
    for p in sorted(images_dir.iterdir()):
        if p.name.endswith(ending) and p.name not in expected_images:
            problems.append(Problem(str(p), "image without a matching label file or channel outside channel_names "
                                            f"(expected CASE_0000..CASE_{max(n_channels - 1, 0):04d}{ending})."))
    allowed = set(labels.values())
    orientations: dict[str, str] = {}
    for case in tqdm(cases, desc="validating", disable=not progress, unit="case"):
        _check_case(case, images_dir, labels_dir, ending, n_channels, allowed, problems, orientations)
    if (note := orientation_note(orientations)) is not None:
        report.notes.append(note)
    return report


def orientation_note(orientations: dict[str, str]) -> str | None:
    """A note when the cases' images (``{case: orientation code}``) are stored in more than one orientation: nnU-Net
    reads voxels as stored and does not reorient them, so a network would learn the anatomy turned or mirrored in
    some cases; None when they share one."""
    codes: dict[str, list[str]] = {}
    for case, code in sorted(orientations.items()):
        codes.setdefault(code, []).append(case)
    if len(codes) < 2:
        return None
    common = max(codes, key=lambda c: len(codes[c]))
    others = "; ".join(f"{code}: {', '.join(cases[:5])}{' ...' if len(cases) > 5 else ''}"
                       for code, cases in sorted(codes.items()) if code != common)
    return (f"the images are stored in {len(codes)} orientations ({len(codes[common])} case(s) {common}; {others}). "
            "nnU-Net reads voxels as stored and does not reorient them, so a network learns those cases turned or "
            f"mirrored: unless their headers are known to be wrong, reorient them to {common} (SimpleITK: "
            f"DICOMOrient(image, '{common}'), the label maps too) before planning.")


def read_channel_image(path: Path, problems: list[Problem]) -> tuple[sitk.Image, np.ndarray] | None:
    """One channel file read and checked: None (and a problem) if it cannot be read or is not a 2D/3D scalar
    image; the image and its voxels otherwise, with a problem added if it holds NaN/Inf."""
    loaded = read_or_report(path, problems)
    if loaded is None:
        return None
    image, array = loaded
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        problems.append(Problem(str(path), f"has {image.GetDimension()} dimensions and "
                                           f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel; "
                                           "each channel must be its own 3D scalar image."))
        return None
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        problems.append(Problem(str(path), f"contains {count} NaN/Inf voxel(s); fix or re-export the image."))
    return image, array


COMPLEX_PIXELS = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)
#: How far a direction matrix may be from orthonormal (|D^T D - I|, headers store about 6 digits).
ORTHONORMAL_TOLERANCE = 1e-4


def header_problem(image: sitk.Image, path: Path) -> str | None:
    """What is wrong with an image's header, or None: 3D (spinediff's 2D configurations slice 3D volumes; a 2D
    image crashes nnU-Net's planning), real-valued scalar voxels, spacing finite and > 0 (for NIfTI also in the
    header itself, where SimpleITK silently replaces a NaN), direction finite and orthonormal."""
    dimension = image.GetDimension()
    if dimension == 2:
        return ("is a 2D image; spinediff works on 3D volumes (its 2d configurations slice them), and every image "
                "of a dataset must be 3D. Stack the slices into one 3D image per case.")
    if image.GetPixelID() in COMPLEX_PIXELS:
        return (f"holds complex voxels ({image.GetPixelIDTypeAsString()}); channels must be real-valued. Save the "
                "magnitude (or each part as its own channel).")
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel

        try:
            zooms = np.asarray(nibabel.load(str(path)).header.get_zooms()[:dimension], dtype=float)
        except Exception:  # noqa: BLE001 - the voxel reader reports an unreadable header with its own message
            zooms = spacing
        spacing = zooms if zooms.shape == spacing.shape and not np.all(np.isfinite(zooms) & (zooms > 0)) \
            else spacing
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        return (f"has spacing {tuple(float(s) for s in spacing)} in its header; every spacing must be a finite "
                "number greater than 0 (mm). Re-export the image with its real voxel size.")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dimension, dimension)
    if not np.all(np.isfinite(direction)) or \
            np.abs(direction.T @ direction - np.eye(dimension)).max() > ORTHONORMAL_TOLERANCE:
        return (f"has direction {tuple(round(float(d), 6) for d in direction.ravel())} in its header, which is not "
                "a rotation (its axes must be unit length and perpendicular); re-export the image with a valid "
                "orientation.")
    return None


def read_or_report(path: Path, problems: list[Problem]) -> tuple[sitk.Image, np.ndarray] | None:
    """The image (for its geometry) and its voxel array as stored on disk.

    NIfTI voxels are read with nibabel: SimpleITK's NIfTI reader turns NaN into 0, which would hide
    NaNs from this check but not from tools that read with nibabel.
    """
    if path.is_dir():
        problems.append(Problem(str(path), "is a folder, not a file: each channel and label map is one image file."))
        return None
    try:
        image = read_image(path)
    except SpineDiffError as exc:
        problems.append(Problem(str(path), str(exc).replace(f"{path} ", "", 1)))
        return None
    if (why := header_problem(image, path)) is not None:
        problems.append(Problem(str(path), why))
        return None
    try:
        array = read_voxels_verified(path, image)
    except SpineDiffError as exc:
        problems.append(Problem(str(path), str(exc).replace(f"{path} ", "", 1)))
        return None
    return image, array


def _check_case(case: str, images_dir: Path, labels_dir: Path, ending: str, n_channels: int,
                allowed: set[int], problems: list[Problem], orientations: dict[str, str] | None = None) -> None:
    """One case's files; its images' orientation code goes to ``orientations`` (3D images)."""
    reference: sitk.Image | None = None
    for channel in range(n_channels):
        path = images_dir / f"{case}_{channel:04d}{ending}"
        if not path.exists():
            problems.append(Problem(str(path), f"missing: case {case} needs {n_channels} channel files "
                                               f"(_0000 .. _{n_channels - 1:04d})."))
            continue
        loaded = read_channel_image(path, problems)
        if loaded is None:
            continue
        image, array = loaded
        if reference is None:
            reference = image
        elif (why := same_geometry(reference, image)) is not None:
            problems.append(Problem(str(path), f"geometry does not match channel 0 of {case}: {why}. Resample "
                                               "all channels of a case onto one grid."))
    if orientations is not None and reference is not None and reference.GetDimension() == 3:
        orientations[case] = orientation_code(reference.GetDirection())
    label_path = labels_dir / f"{case}{ending}"
    loaded = read_or_report(label_path, problems)
    if loaded is None:
        return
    label, array = loaded
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            problems.append(Problem(str(label_path), "contains NaN/Inf; a label map must hold integers."))
            return
        if not np.all(array == np.round(array)):
            problems.append(Problem(str(label_path), "holds non-integer values; a label map must hold integers."))
            return
    values = set(np.unique(array).astype(int).tolist())
    undeclared = sorted(values - allowed)
    if undeclared:
        problems.append(Problem(str(label_path), f"holds label value(s) {undeclared} not declared in dataset.json "
                                                 f"'labels' (declared: {sorted(allowed)})."))
    if values <= {0}:
        problems.append(Problem(str(label_path), "is empty (background only); every training case needs "
                                                 "foreground."))
    if reference is not None and (why := same_geometry(reference, label)) is not None:
        problems.append(Problem(str(label_path), f"geometry does not match the images of {case}: {why}."))
