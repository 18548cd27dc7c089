"""Import paired MR/CT folders (SynthRAD-style or any "one folder per subject" layout) as an nnU-Net raw
translation dataset (``spinediff convert``).

Input layouts (found by walking the input folder; every folder that holds a file named like a source or the
target is one subject, its folder name the case identifier, its parent folder the region):

* SynthRAD2023 (MR→CT, Task 1): ``Task1/<brain|pelvis>/<1BA001>/{mr,ct,mask}.nii.gz``, plus ``overview/`` folders
  of figures and spreadsheets (ignored);
* SynthRAD2025 (MR→CT, Task 1): ``Task1/<HN|TH|AB>/<1HNA001>/{mr,ct,mask}.mha``, plus ``overviews/`` (ignored);
* any folder per subject with user-given file names (``--source-name t1 t2 --target-name ct --mask-name body``).

Output: exactly the layout of the phantom's translation dataset (``Dataset902``, documentation/dataset_format.md):
the source channel(s) then the target as image channels ``CASE_0000 ..``, ``dataset.json`` with
``"spinediff": {"task": "translation", "source_channels": [...], "target_channels": [...]}`` and ``labelsTr/CASE``
holding the body mask (value 1) or, with ``labels="ct-classes"``, the CT classes inside the body mask (1 soft tissue,
2 fat, 3 bone by HU), whose union is the body mask either way. ``"body_mask": "labels"`` in the block tells
``spinediff evaluate`` and the benchmark that ``labelsTr > 0`` is the body mask the challenge metrics score in.

Every image is checked as ``spinediff validate`` checks a channel (readable, one scalar 2D/3D image, no NaN/Inf),
the mask must be non-empty and hold 0/1, and all images of a subject must lie on one grid
(:func:`spinediff.utilities.geometry.same_geometry`). The dataset is assembled in a hidden staging folder next to
the target and renamed into place only when every subject passed; on any problem nothing is left behind.

Slab cross-validation (``slab_folds``): for a single object (or few subjects) each subject is cut along its
longest physical axis into ``slab_folds`` blocks; fold *k* validates on block *k* (case ``SUBJECT_slabK``) and trains
on the rest of the subject minus ``gap_mm`` on each side of block *k* (cases ``SUBJECT_foldK_trainJ``). The folds are
written to ``splits_final.json`` in the raw dataset folder (copy it to ``$nnUNet_preprocessed/DatasetXXX_NAME/``
after planning; ``benchmarks/slab_cv.py`` does).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinediff.datasets.validate import Problem, read_channel_image
from spinediff.errors import SpineDiffError
from spinediff.io import IMAGE_SUFFIXES, write_image, write_json
from spinediff.metrics.image_metrics import BODY_THRESHOLD_HU
from spinediff.paths import dataset_name_from_id
from spinediff.utilities.geometry import same_geometry

#: SynthRAD's per-subject file names (both challenges): MR source, CT target, body mask.
SYNTHRAD_NAMES = {"source": ("mr",), "target": "ct", "mask": "mask"}
#: folders of the challenges' releases that hold figures and spreadsheets, not subjects
IGNORED_FOLDERS = {"overview", "overviews"}
#: HU bounds of the CT classes written with labels="ct-classes" (inside the body mask)
FAT_HU, BONE_HU = (-190.0, -30.0), 200.0
CT_CLASS_LABELS = {"background": 0, "soft_tissue": 1, "fat": 2, "bone": 3}
BODY_LABELS = {"background": 0, "body": 1}
LABEL_MODES = ("mask", "ct-classes")
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class PairNames:
    """File names (without ending) of one subject's images."""

    source: tuple[str, ...] = SYNTHRAD_NAMES["source"]
    target: str = SYNTHRAD_NAMES["target"]
    mask: str | None = SYNTHRAD_NAMES["mask"]

    def roles(self) -> list[tuple[str, str]]:
        """(role, file name) in channel order, the mask last."""
        out = [(f"source {i}", name) for i, name in enumerate(self.source)] + [("target", self.target)]
        return out + ([("mask", self.mask)] if self.mask else [])


@dataclass
class Subject:
    case_id: str
    region: str
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)  # file name (e.g. "mr") → path


@dataclass(frozen=True)
class SlabSettings:
    folds: int
    gap_mm: float = 10.0
    axis: int | None = None  # SimpleITK index axis (0 x, 1 y, 2 z); None: the longest physical extent


def _stem(name: str) -> str | None:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def find_subjects(input_folder: str | os.PathLike, names: PairNames) -> list[Subject]:
    """Every subject folder under ``input_folder`` (any depth), checked for completeness before anything is read.

    Raises SpineDiffError listing every missing or ambiguous file and duplicate case identifier.
    """
    root = Path(input_folder).expanduser()
    if not root.is_dir():
        raise SpineDiffError(f"The input folder {root} does not exist (give the folder holding the subject folders, "
                             "e.g. .../Task1 of a SynthRAD release).")
    wanted = [name for _, name in names.roles()]
    if len(set(wanted)) != len(wanted):
        raise SpineDiffError(f"--source-name/--target-name/--mask-name must be different file names; got {wanted}.")
    problems: list[str] = []
    subjects: list[Subject] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d.lower() not in IGNORED_FOLDERS and not d.startswith("."))
        stems: dict[str, list[Path]] = {}
        for file in sorted(files):
            stem = _stem(file)
            if stem is not None:
                stems.setdefault(stem, []).append(Path(folder) / file)
        present = [n for n in [*names.source, names.target] if n in stems]
        if not present:
            continue
        path = Path(folder)
        subject = Subject(path.name, path.parent.name if path != root else "", path)
        for role, name in names.roles():
            found = stems.get(name, [])
            if not found:
                endings = "/".join(IMAGE_SUFFIXES)
                problems.append(f"{path}: the {role} image {name}{{{endings}}} is missing (found "
                                f"{', '.join(sorted(stems)) or 'no image'}); every subject folder needs "
                                f"{', '.join(wanted)}.")
            elif len(found) > 1:
                problems.append(f"{path}: {len(found)} files are named {name} ({', '.join(p.name for p in found)}); "
                                "keep one.")
            else:
                subject.files[name] = found[0]
        if not _CASE_ID.match(subject.case_id):
            problems.append(f"{path}: the folder name {subject.case_id!r} is not usable as a case identifier "
                            "(letters, digits, '_', '-', '.'; starting with a letter or digit); rename the folder.")
        subjects.append(subject)
    seen: dict[str, Subject] = {}
    for subject in subjects:
        if subject.case_id in seen:
            problems.append(f"{subject.folder}: the case identifier {subject.case_id} is also the folder "
                            f"{seen[subject.case_id].folder}; rename one of them.")
        seen.setdefault(subject.case_id, subject)
    if problems:
        raise SpineDiffError(f"{len(problems)} problem(s) in the input folder {root}; nothing was written:\n  - "
                             + "\n  - ".join(problems))
    if not subjects:
        raise SpineDiffError(f"No subject folder under {root} holds an image named {' or '.join(wanted[:-1])} "
                             f"({'/'.join(IMAGE_SUFFIXES)}). Give the folder that holds the subject folders, or the "
                             "file names with --source-name/--target-name/--mask-name.")
    return subjects


def body_mask_labels(mask: np.ndarray, ct: np.ndarray, mode: str) -> np.ndarray:
    """The label map of one case: the body mask as 1, or the CT classes inside it (union = the mask)."""
    body = mask > 0
    labels = body.astype(np.uint8)
    if mode == "ct-classes":
        labels[body & (ct >= FAT_HU[0]) & (ct <= FAT_HU[1])] = CT_CLASS_LABELS["fat"]
        labels[body & (ct >= BONE_HU)] = CT_CLASS_LABELS["bone"]
    return labels


def _check_mask(path: Path, array: np.ndarray, problems: list[Problem]) -> None:
    values = np.unique(array)
    if not np.all(np.isin(values, (0, 1))):
        shown = ", ".join(f"{v:g}" for v in values[:8])
        problems.append(Problem(str(path), f"holds values {shown}{' ...' if values.size > 8 else ''}; a body mask "
                                           "must hold 0 (outside) and 1 (inside)."))
    elif not np.any(values == 1):
        problems.append(Problem(str(path), "is empty (no voxel inside the body); the challenge metrics and the "
                                           "masked losses need the body."))


def _load_subject(subject: Subject, names: PairNames, problems: list[Problem]) -> dict[str, sitk.Image] | None:
    """Read and check every image of a subject (validate's channel checks, one grid, a 0/1 mask)."""
    images: dict[str, sitk.Image] = {}
    before = len(problems)
    reference: tuple[Path, sitk.Image] | None = None
    for role, name in names.roles():
        path = subject.files[name]
        loaded = read_channel_image(path, problems)
        if loaded is None:
            continue
        image, array = loaded
        if role == "mask":
            _check_mask(path, np.asarray(array), problems)
        if reference is None:
            reference = (path, image)
        elif (why := same_geometry(reference[1], image)) is not None:
            problems.append(Problem(str(path), f"does not lie on the grid of {reference[0].name} ({why}). The "
                                               f"{name} image of a subject must be resampled onto the same grid "
                                               "(size, spacing, origin, direction) as the others first."))
        images[name] = image
    return images if len(problems) == before else None


def _axis_of_slabs(image: sitk.Image, settings: SlabSettings) -> int:
    if settings.axis is not None:
        return settings.axis
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    return int(np.argmax(extent))


def slab_ranges(length: int, spacing: float, settings: SlabSettings) -> list[tuple[tuple[int, int],
                                                                                  list[tuple[int, int]]]]:
    """Per fold: the validation block (start, stop) and the training pieces along one axis of ``length`` voxels,
    leaving at least ``gap_mm`` (``ceil(gap_mm / spacing)`` voxels) untouched on each side of the block."""
    if settings.folds < 2:
        raise SpineDiffError(f"--slab-folds must be at least 2 (got {settings.folds}).")
    if settings.gap_mm < 0:
        raise SpineDiffError(f"--gap-mm must not be negative (got {settings.gap_mm}).")
    gap = math.ceil(settings.gap_mm / spacing - 1e-9)
    edges = np.round(np.linspace(0, length, settings.folds + 1)).astype(int)
    folds = []
    for k in range(settings.folds):
        start, stop = int(edges[k]), int(edges[k + 1])
        pieces = [(a, b) for a, b in ((0, start - gap), (stop + gap, length)) if b - a > 0]
        folds.append(((start, stop), pieces))
    return folds


def _cut(image: sitk.Image, axis: int, start: int, stop: int) -> sitk.Image:
    index = [slice(None)] * image.GetDimension()
    index[axis] = slice(start, stop)
    return image[tuple(index)]  # SimpleITK slicing keeps the physical position (origin moves with start)


@dataclass
class ConversionResult:
    folder: Path
    cases: list[str]
    subjects: int
    splits: list[dict[str, list[str]]] | None = None


def convert_pairs(input_folder: str | os.PathLike, output_folder: str | os.PathLike, dataset_id: int,
                  dataset_name: str = "MRCT", *, names: PairNames | None = None, labels: str = "mask",
                  slabs: SlabSettings | None = None, file_ending: str = ".nii.gz", overwrite: bool = False,
                  description: str = "", on_case: Callable[[str], None] | None = None) -> ConversionResult:
    """Convert the subject folders under ``input_folder`` into ``output_folder/DatasetXXX_NAME`` (raw layout).

    Returns the dataset folder and its case identifiers. Raises SpineDiffError, with nothing written, on a missing
    or unreadable image, NaN/Inf, a mask that is not 0/1 or is empty, images of a subject on different grids, an
    existing target without ``overwrite``, or slab settings that leave a fold without training data.
    """
    names = names or PairNames()
    if labels not in LABEL_MODES:
        raise SpineDiffError(f"--labels must be one of {', '.join(LABEL_MODES)} (got {labels!r}).")
    if file_ending not in (".nii.gz", ".mha", ".nrrd", ".nii"):
        raise SpineDiffError(f"--file-ending {file_ending!r}: choose .nii.gz, .nii, .mha or .nrrd.")
    if not re.match(r"^[A-Za-z0-9_-]+$", dataset_name):
        raise SpineDiffError(f"--name {dataset_name!r}: use letters, digits, '_' and '-' only.")
    if not 1 <= dataset_id <= 999:
        raise SpineDiffError(f"--dataset-id must be between 1 and 999 (got {dataset_id}).")
    out = Path(output_folder).expanduser().resolve()
    target = out / dataset_name_from_id(dataset_id, dataset_name)
    if target.exists() and not overwrite:
        raise SpineDiffError(f"{target} already exists. Choose another --dataset-id/--name or output folder, or pass "
                             "--overwrite to replace it.")
    subjects = find_subjects(input_folder, names)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=out))
    staging.chmod(0o755)  # mkdtemp's 0700 would stay with the dataset after the rename
    problems: list[Problem] = []
    cases: list[str] = []
    splits: list[dict[str, list[str]]] | None = [{"train": [], "val": []} for _ in range(slabs.folds)] \
        if slabs else None
    regions: dict[str, list[str]] = {}
    try:
        for sub in ("imagesTr", "labelsTr"):
            (staging / sub).mkdir()
        for subject in subjects:
            images = _load_subject(subject, names, problems)
            if images is None or problems:  # keep checking the others, write nothing more
                continue
            channels = [images[n] for n in names.source] + [images[names.target]]
            ct = sitk.GetArrayFromImage(images[names.target])
            mask = (sitk.GetArrayFromImage(images[names.mask]) if names.mask
                    else (ct > BODY_THRESHOLD_HU).astype(np.uint8))
            label = sitk.GetImageFromArray(body_mask_labels(mask, ct, labels))
            label.CopyInformation(channels[0])
            pieces = [(subject.case_id, None)]
            if slabs:
                pieces = _slab_pieces(subject, channels[0], label, slabs, splits, problems)
            for case_id, bounds in pieces:
                case_label = label if bounds is None else _cut(label, *bounds)
                for channel, image in enumerate(channels):
                    piece = image if bounds is None else _cut(image, *bounds)
                    write_image(piece, staging / "imagesTr" / f"{case_id}_{channel:04d}{file_ending}")
                write_image(case_label, staging / "labelsTr" / f"{case_id}{file_ending}")
                cases.append(case_id)
                regions.setdefault(subject.region or ".", []).append(case_id)
                if on_case:
                    on_case(case_id)
        if problems:
            raise SpineDiffError(f"{len(problems)} problem(s) in {Path(input_folder)}; nothing was written:\n  - "
                                 + "\n  - ".join(str(p) for p in problems))
        channel_names = {str(i): n.upper() for i, n in enumerate([*names.source, names.target])}
        n_source = len(names.source)
        dataset_json = {
            "channel_names": channel_names,
            "labels": dict(CT_CLASS_LABELS if labels == "ct-classes" else BODY_LABELS),
            "numTraining": len(cases), "file_ending": file_ending, "name": dataset_name,
            "description": description or f"Paired {'+'.join(names.source)} -> {names.target} imported by "
                                          f"spinediff convert from {Path(input_folder).resolve()}.",
            "spinediff": {"task": "translation", "source_channels": list(range(n_source)),
                          "target_channels": [n_source], "body_mask": "labels"},
            "conversion": {"input": str(Path(input_folder).resolve()), "subjects": len(subjects),
                           "files": {"source": list(names.source), "target": names.target,
                                     "mask": names.mask or f"{names.target} > {BODY_THRESHOLD_HU:g} HU"},
                           "labels": labels, "regions": regions,
                           **({"slabs": {"folds": slabs.folds, "gap_mm": slabs.gap_mm,
                                         "axis": "longest" if slabs.axis is None else "xyz"[slabs.axis]}}
                              if slabs else {})},
        }
        write_json(dataset_json, staging / "dataset.json")
        if splits is not None:
            write_json(splits, staging / "splits_final.json")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return ConversionResult(target, cases, len(subjects), splits)


def _slab_pieces(subject: Subject, image: sitk.Image, label: sitk.Image, slabs: SlabSettings,
                 splits: list[dict[str, list[str]]], problems: list[Problem]) -> list[tuple[str, tuple | None]]:
    """The slab cases of one subject (case id, (axis, start, stop)) and their place in the folds."""
    axis = _axis_of_slabs(image, slabs)
    length, spacing = image.GetSize()[axis], image.GetSpacing()[axis]
    body = sitk.GetArrayViewFromImage(label) > 0
    numpy_axis = image.GetDimension() - 1 - axis

    def has_body(start: int, stop: int) -> bool:
        index = [slice(None)] * body.ndim
        index[numpy_axis] = slice(start, stop)
        return bool(body[tuple(index)].any())

    pieces: list[tuple[str, tuple | None]] = []
    for k, ((start, stop), training) in enumerate(slab_ranges(length, spacing, slabs)):
        if stop - start < 1 or not has_body(start, stop):
            problems.append(Problem(str(subject.folder), f"slab {k} ({start}:{stop} along axis {'xyz'[axis]}) holds "
                                                         "no body voxel; use fewer --slab-folds."))
            continue
        case = f"{subject.case_id}_slab{k}"
        pieces.append((case, (axis, start, stop)))
        splits[k]["val"].append(case)
        kept = [(a, b) for a, b in training if has_body(a, b)]
        if not kept:
            problems.append(Problem(str(subject.folder), f"fold {k} keeps no training voxel of the body outside slab "
                                                         f"{k} and its {slabs.gap_mm:g} mm gaps; use a smaller "
                                                         "--gap-mm or more --slab-folds."))
        for j, (a, b) in enumerate(kept):
            case = f"{subject.case_id}_fold{k}_train{j}"
            pieces.append((case, (axis, a, b)))
            splits[k]["train"].append(case)
    return pieces


def parse_names(source: Sequence[str], target: str, mask: str | None) -> PairNames:
    """PairNames from the flags (``mask`` "none" or empty: no mask file, the body is the target > -500 HU)."""
    mask = None if mask is None or mask.lower() in ("", "none") else mask
    return PairNames(tuple(source), target, mask)
