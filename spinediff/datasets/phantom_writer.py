"""Write phantom subjects as nnU-Net raw datasets (segmentation, translation, generation)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from spinediff.datasets.anatomy import SEMANTIC_LABELS
from spinediff.datasets.phantom import PhantomCase, PhantomSettings, generate_case, landmarks_to_json
from spinediff.errors import SpineDiffError
from spinediff.io import write_json
from spinediff.paths import dataset_name_from_id

TASK_NAMES = {
    "segmentation": "SpinePhantomSeg",
    "translation": "SpinePhantomTranslation",
    "generation": "SpinePhantomGeneration",
}
TASK_OFFSETS = {"segmentation": 0, "translation": 1, "generation": 2}


def dataset_folder_name(task: str, dataset_id_base: int) -> str:
    return dataset_name_from_id(dataset_id_base + TASK_OFFSETS[task], TASK_NAMES[task])


def _dataset_json(task: str, num_cases: int, settings: PhantomSettings, seed: int) -> dict:
    labels = dict(SEMANTIC_LABELS)
    common = {
        "labels": labels,
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
        "name": TASK_NAMES[task],
        "description": (f"spinediff synthetic spine phantom (seed {seed}): {task}. MR {settings.mr_shape} @ "
                        f"{settings.mr_spacing} mm sagittal, CT @ {settings.ct_spacing} mm axial."),
        "licence": "CC0 (synthetic)",
    }
    if task == "segmentation":
        return {"channel_names": {"0": "T1w", "1": "T2w"}, **common}
    if task == "translation":
        return {"channel_names": {"0": "T1w", "1": "T2w", "2": "CT"}, **common,
                "spinediff": {"task": "translation", "source_channels": [0, 1], "target_channels": [2]}}
    if task == "generation":
        return {"channel_names": {"0": "CT"}, **common,
                "spinediff": {"task": "generation", "source_channels": [], "target_channels": [0]}}
    raise ValueError(task)


def _write(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), True)


def _write_case(case: PhantomCase, task: str, folder: Path) -> None:
    images, labels = folder / "imagesTr", folder / "labelsTr"
    cid = case.case_id
    if task == "segmentation":
        _write(case.t1, images / f"{cid}_0000.nii.gz")
        _write(case.t2, images / f"{cid}_0001.nii.gz")
        _write(case.mr_labels, labels / f"{cid}.nii.gz")
    elif task == "translation":
        _write(case.t1, images / f"{cid}_0000.nii.gz")
        _write(case.t2, images / f"{cid}_0001.nii.gz")
        _write(case.ct_on_mr, images / f"{cid}_0002.nii.gz")
        _write(case.mr_labels, labels / f"{cid}.nii.gz")
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
        sitk.WriteTransform(case.true_transform, str(un / f"{cid}_true_transform.tfm"))
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(case.true_transform.GetMatrix()).reshape(3, 3)
        centre = np.asarray(case.true_transform.GetCenter())
        matrix[:3, 3] = np.asarray(case.true_transform.GetTranslation()) + centre - matrix[:3, :3] @ centre
        write_json({
            "convention": "maps MR (fixed) physical points to CT (moving) physical points, LPS mm",
            "rotation_axis": case.rotation_axis, "rotation_deg": case.rotation_deg,
            "translation_mm": case.translation_mm, "centre_mm": centre, "matrix_4x4": matrix,
        }, un / f"{cid}_true_transform.json")
    elif task == "generation":
        _write(case.ct, images / f"{cid}_0000.nii.gz")
        _write(case.ct_labels, labels / f"{cid}.nii.gz")


def write_phantom_datasets(
    output_folder: str | os.PathLike,
    num_cases: int = 6,
    seed: int = 0,
    tasks: Iterable[str] = ("segmentation", "translation", "generation"),
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
    for target in targets.values():
        if target.exists() and not overwrite:
            raise SpineDiffError(f"{target} already exists. Choose another output folder or --dataset-id, "
                                 f"or pass --overwrite to replace it.")

    staging = {task: Path(tempfile.mkdtemp(prefix=f".{targets[task].name}.", dir=out)) for task in tasks}
    try:
        for task, folder in staging.items():
            for sub in ("imagesTr", "labelsTr") + (("unaligned",) if task == "translation" else ()):
                (folder / sub).mkdir(parents=True)
        previews = []
        for index in tqdm(range(num_cases), desc="phantom cases", disable=not progress, unit="case"):
            case = generate_case(seed, index, settings)
            for task, folder in staging.items():
                _write_case(case, task, folder)
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
