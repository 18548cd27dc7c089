"""Write phantom subjects as nnU-Net raw datasets (segmentation, translation, generation of CT and of MR)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from spinediff.datasets.anatomy import SEMANTIC_LABELS
from spinediff.datasets.phantom import PhantomCase, PhantomSettings, generate_case, landmarks_to_json
from spinediff.errors import SpineDiffError
from spinediff.io import atomic_path, write_image, write_json
from spinediff.paths import dataset_name_from_id
from spinediff.utilities.lock import LOCK_NAME, folder_lock


def _write(image: sitk.Image, path: Path) -> None:
    write_image(image, path)  # verified: SimpleITK misses a short write on a full disk


def _write_mr(case: PhantomCase, folder: Path) -> None:
    _write(case.t1, folder / "imagesTr" / f"{case.case_id}_0000.nii.gz")
    _write(case.t2, folder / "imagesTr" / f"{case.case_id}_0001.nii.gz")
    _write(case.mr_labels, folder / "labelsTr" / f"{case.case_id}.nii.gz")


def _write_translation(case: PhantomCase, folder: Path) -> None:
    """MR channels and the registered CT, plus the unaligned pair with landmarks and the true transform."""
    _write_mr(case, folder)
    cid = case.case_id
    _write(case.ct_on_mr, folder / "imagesTr" / f"{cid}_0002.nii.gz")
    un = folder / "unaligned"
    _write(case.t1, un / f"{cid}_mr_T1w.nii.gz")
    _write(case.t2, un / f"{cid}_mr_T2w.nii.gz")
    _write(case.mr_instances, un / f"{cid}_mr_vertebrae.nii.gz")
    _write(case.mr_labels, un / f"{cid}_mr_labels.nii.gz")
    _write(case.ct, un / f"{cid}_ct.nii.gz")
    _write(case.ct_instances, un / f"{cid}_ct_vertebrae.nii.gz")
    _write(case.ct_labels, un / f"{cid}_ct_labels.nii.gz")
    write_json(landmarks_to_json(case.mr_landmarks), un / f"{cid}_mr_landmarks.json")
    write_json(landmarks_to_json(case.ct_landmarks), un / f"{cid}_ct_landmarks.json")
    with atomic_path(un / f"{cid}_true_transform.tfm") as tmp:
        sitk.WriteTransform(case.true_transform, str(tmp))
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(case.true_transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(case.true_transform.GetCenter())
    matrix[:3, 3] = np.asarray(case.true_transform.GetTranslation()) + centre - matrix[:3, :3] @ centre
    write_json({
        "convention": "maps MR (fixed) physical points to CT (moving) physical points, LPS mm",
        "rotation_axis": case.rotation_axis, "rotation_deg": case.rotation_deg,
        "translation_mm": case.translation_mm, "centre_mm": centre, "matrix_4x4": matrix,
    }, un / f"{cid}_true_transform.json")


def _write_ct(case: PhantomCase, folder: Path) -> None:
    _write(case.ct, folder / "imagesTr" / f"{case.case_id}_0000.nii.gz")
    _write(case.ct_labels, folder / "labelsTr" / f"{case.case_id}.nii.gz")


def ct_labels_on_mr(case: PhantomCase) -> sitk.Image:
    """The CT's label map carried onto the MR grid through the true MR → CT transform (nearest neighbour): a mask
    "taken from a CT" for generating an MR image from it (cross-modal generation)."""
    return sitk.Resample(case.ct_labels, case.mr_labels, case.true_transform, sitk.sitkNearestNeighbor, 0,
                         case.mr_labels.GetPixelID())


def _write_mr_generation(case: PhantomCase, folder: Path) -> None:
    """T2w MR generated from its label map; ``labelsFromCT/`` holds the CT's labels on the MR grid."""
    _write(case.t2, folder / "imagesTr" / f"{case.case_id}_0000.nii.gz")
    _write(case.mr_labels, folder / "labelsTr" / f"{case.case_id}.nii.gz")
    _write(ct_labels_on_mr(case), folder / "labelsFromCT" / f"{case.case_id}.nii.gz")


@dataclass(frozen=True)
class PhantomDataset:
    """What the phantom writes for one task."""

    name: str
    id_offset: int
    channel_names: dict[str, str]
    write_case: Callable[[PhantomCase, Path], None]
    spinediff_block: dict[str, Any] | None = None
    subfolders: tuple[str, ...] = ("imagesTr", "labelsTr")


PHANTOM_DATASETS = {
    "segmentation": PhantomDataset("SpinePhantomSeg", 0, {"0": "T1w", "1": "T2w"}, _write_mr),
    "translation": PhantomDataset("SpinePhantomTranslation", 1, {"0": "T1w", "1": "T2w", "2": "CT"},
                                  _write_translation,
                                  {"task": "translation", "source_channels": [0, 1], "target_channels": [2]},
                                  ("imagesTr", "labelsTr", "unaligned")),
    "generation": PhantomDataset("SpinePhantomGeneration", 2, {"0": "CT"}, _write_ct,
                                 {"task": "generation", "source_channels": [], "target_channels": [0]}),
    "generation_mr": PhantomDataset("SpinePhantomGenerationMR", 3, {"0": "T2w"}, _write_mr_generation,
                                    {"task": "generation", "source_channels": [], "target_channels": [0]},
                                    ("imagesTr", "labelsTr", "labelsFromCT")),
}
TASK_NAMES = {task: dataset.name for task, dataset in PHANTOM_DATASETS.items()}


def dataset_folder_name(task: str, dataset_id_base: int) -> str:
    dataset = PHANTOM_DATASETS[task]
    return dataset_name_from_id(dataset_id_base + dataset.id_offset, dataset.name)


def _dataset_json(task: str, num_cases: int, settings: PhantomSettings, seed: int) -> dict:
    dataset = PHANTOM_DATASETS[task]
    description = (f"spinediff synthetic spine phantom (seed {seed}): {task}. MR {settings.mr_shape} @ "
                   f"{settings.mr_spacing} mm sagittal, CT @ {settings.ct_spacing} mm axial.")
    block = {"spinediff": dict(dataset.spinediff_block)} if dataset.spinediff_block else {}
    return {"channel_names": dict(dataset.channel_names), "labels": dict(SEMANTIC_LABELS),
            "numTraining": num_cases, "file_ending": ".nii.gz", "name": dataset.name, "description": description,
            "licence": "CC0 (synthetic)", **block}


def write_phantom_datasets(
    output_folder: str | os.PathLike,
    *,
    num_cases: int = 6,
    seed: int = 0,
    tasks: Iterable[str] = tuple(PHANTOM_DATASETS),
    settings: PhantomSettings | None = None,
    dataset_id_base: int = 901,
    preview: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Generate ``num_cases`` subjects and write one nnU-Net raw dataset per task.

    Each dataset is assembled in a hidden staging folder and renamed into place when complete,
    so an interrupted run leaves no half-written dataset. Existing datasets are refused unless
    ``overwrite``.

    Returns:
        task → dataset folder.
    """
    settings = settings or PhantomSettings()
    tasks = list(dict.fromkeys(tasks))
    for task in tasks:
        if task not in TASK_NAMES:
            raise SpineDiffError(f"Unknown phantom task {task!r}; choose from {', '.join(TASK_NAMES)} or all.")
    if num_cases < 1:
        raise SpineDiffError(f"--cases must be at least 1 (got {num_cases}).")
    out = Path(output_folder).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    targets = {task: out / dataset_folder_name(task, dataset_id_base) for task in tasks}
    with contextlib.ExitStack() as locks:  # each dataset is replaced as a whole: its lock lies beside it
        for target in targets.values():
            locks.enter_context(folder_lock(out, name=f".{target.name}{LOCK_NAME}"))
        for target in targets.values():
            if target.exists() and not overwrite:
                raise SpineDiffError(f"{target} already exists. Choose another output folder or --dataset-id, "
                                     f"or pass --overwrite to replace it.")

        staging = {task: Path(tempfile.mkdtemp(prefix=f".{targets[task].name}.", dir=out)) for task in tasks}
        try:
            for task, folder in staging.items():
                for sub in PHANTOM_DATASETS[task].subfolders:
                    (folder / sub).mkdir(parents=True)
            previews = []
            for index in tqdm(range(num_cases), desc="phantom cases", disable=not progress, unit="case"):
                case = generate_case(seed, index, settings)
                for task, folder in staging.items():
                    PHANTOM_DATASETS[task].write_case(case, folder)
                if preview and index < 4:
                    previews.append(case)
            for task, folder in staging.items():
                write_json(_dataset_json(task, num_cases, settings, seed), folder / "dataset.json")
                if preview and previews:
                    from spinediff.datasets.preview import save_phantom_preview

                    save_phantom_preview(previews, folder / "preview.png")
            for task, folder in staging.items():
                if targets[task].exists():
                    shutil.rmtree(targets[task])
                os.replace(folder, targets[task])
        finally:
            for folder in staging.values():
                if folder.exists():
                    shutil.rmtree(folder, ignore_errors=True)
        return targets
