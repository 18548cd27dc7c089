"""``ensemble_folders``: combine the predictions of several configurations or trainers, case by case.

- Segmentation: the mean class probabilities ``CASE.npz`` (written by ``spinediff predict
  --save-probabilities``, in raw geometry) are averaged and the label map is their argmax.
- Translation / generation: the predicted images (HU) are averaged voxel by voxel.

Inputs must hold the same cases on the same grid; their own uncertainty maps are not combined. With
``save_uncertainty`` (segmentation) the ensemble's disagreement is written instead, as ``spinediff predict
--save-uncertainty`` writes it for samples and folds: ``CASE_uncertainty`` (the mutual information between the
prediction and the member: entropy of the mean probabilities minus the members' mean entropy, in nats) and
``CASE_uncertainty.json`` with the case scores of :mod:`spinediff.metrics.case_uncertainty`, among them
``sample_disagreement``: 1 - the mean pairwise Dice between the members' label maps. For nnU-Net's fold models
(``nnUNetv2_predict -f N --save_probabilities``, one folder per fold) that is the failure detector that did best
across five datasets in Zenk et al. (MedIA 2025).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinediff.errors import SpineDiffError
from spinediff.inference.inputs import RUN_SUMMARY, read_run_summary, split_ending
from spinediff.io import ensure_writable_folder, read_image, write_image, write_json, write_probabilities
from spinediff.metrics.case_uncertainty import case_scores
from spinediff.tasks import SEGMENTATION, Task, get_task
from spinediff.utilities.geometry import same_geometry
from spinediff.utilities.lock import folder_lock

MAP_SUFFIXES = ("_uncertainty", "_variance")


@dataclass
class EnsembleReport:
    output_folder: Path
    task: str
    written: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.problems else 0


def _folder_task(folder: Path) -> Task:
    """The task of a prediction folder, from its run summary (else: probabilities → segmentation, images)."""
    summaries = [folder / RUN_SUMMARY] + sorted(folder.glob(f"{Path(RUN_SUMMARY).stem}_part*of*.json"))
    for summary in summaries:  # a split prediction (--num-parts) has one summary per part
        if summary.exists():  # a folder in its place is refused by the reader
            return get_task(read_run_summary(summary)["task"], summary)
    return SEGMENTATION if any(folder.glob("*.npz")) else get_task("translation")


def _prediction_files(folder: Path) -> dict[str, Path]:
    """Image files that are predictions (not uncertainty/variance maps), by name."""
    files = {}
    for path in sorted(folder.iterdir()):
        split = split_ending(path.name)
        if split and not split[0].endswith(MAP_SUFFIXES):
            files[path.name] = path
    return files


def _refuse_output_among_inputs(output: Path, folders: Sequence[Path]) -> None:
    """The output may be none of the inputs, nor inside or around one (with --overwrite too): the ensemble would
    replace the predictions it is made of."""
    out = output.expanduser().resolve()
    for folder in folders:
        member = folder.expanduser().resolve()
        if out == member or member in out.parents or out in member.parents:
            relation = "is" if out == member else "is inside" if member in out.parents else "contains"
            raise SpineDiffError(f"The output folder {output} {relation} the input folder {folder}: the ensemble "
                                 "would replace or mix with the predictions it averages (also with --overwrite). "
                                 "Choose a separate output folder with -o.")


def ensemble_folders(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *, overwrite: bool = False,
                     save_probabilities: bool = False, save_uncertainty: bool = False) -> EnsembleReport:
    """Average the predictions of ``inputs`` (two or more prediction folders) into ``output``; segmentation with
    ``save_uncertainty``: also the members' disagreement (module docstring)."""
    folders = [Path(p) for p in inputs]
    if len(folders) < 2:
        raise SpineDiffError("An ensemble needs at least two prediction folders (-i DIR1 DIR2 ...).")
    for folder in folders:
        if not folder.is_dir():
            raise SpineDiffError(f"Prediction folder {folder} does not exist.")
    tasks = {folder: _folder_task(folder) for folder in folders}
    if len(set(tasks.values())) > 1:
        found = {str(folder): task.name for folder, task in tasks.items()}
        raise SpineDiffError(f"The folders hold predictions of different tasks ({found}); ensemble one task only.")
    task = tasks[folders[0]]
    if save_uncertainty and not task.writes_labels:
        raise SpineDiffError("--save-uncertainty combines segmentations (their class probabilities); for images "
                             "the spread across samples is what `spinediff predict --save-uncertainty` writes.")
    _refuse_output_among_inputs(Path(output), folders)
    files = [_prediction_files(folder) for folder in folders]
    output = ensure_writable_folder(output, create=False)
    report = EnsembleReport(output, task.name)
    names = sorted(set().union(*files))
    complete = [n for n in names if all(n in f for f in files)]
    for name in names:
        if name not in complete:
            missing = [str(folder) for folder, f in zip(folders, files, strict=True) if name not in f]
            report.problems.append(f"{name}: missing in {', '.join(missing)}; not ensembled.")
    if not complete:
        raise SpineDiffError(f"No prediction is present in all of {', '.join(map(str, folders))}.")
    targets = [output / n for n in complete]
    if task.writes_labels and save_probabilities:
        targets += [output / f"{split_ending(n)[0]}.npz" for n in complete]
    if save_uncertainty:
        targets += [output / f"{split_ending(n)[0]}_uncertainty{split_ending(n)[1]}" for n in complete]
        targets += [output / f"{split_ending(n)[0]}_uncertainty.json" for n in complete]
    with folder_lock(output):  # held to the end; outputs are checked under it (no other run adds any now)
        existing = [t for t in [*targets, output / RUN_SUMMARY] if t.exists()]
        if existing and not overwrite:
            raise SpineDiffError(f"{existing[0]} already exists ({len(existing)} output file(s) in all). Choose "
                                 "another output folder or pass --overwrite.")
        for name in complete:
            try:
                paths = [f[name] for f in files]
                if task.writes_labels:
                    _ensemble_probabilities(paths, output / name, save_probabilities, save_uncertainty)
                else:
                    _average_images(paths, output / name)
                report.written.append(str(output / name))
            except SpineDiffError as exc:
                report.problems.append(str(exc))
        write_json({"task": task.name, "ensemble_of": [str(f) for f in folders], "written": report.written,
                    "problems": report.problems}, output / RUN_SUMMARY)
        return report


def _check_same_grid(images: list[sitk.Image], paths: list[Path]) -> None:
    for image, path in zip(images[1:], paths[1:], strict=True):
        why = same_geometry(images[0], image)
        if why is not None:
            raise SpineDiffError(f"{path}: {why} (compared with {paths[0]}); ensemble predictions of the same inputs.")


def _average_images(paths: list[Path], target: Path) -> None:
    images = [read_image(p) for p in paths]
    _check_same_grid(images, paths)
    total = np.zeros(images[0].GetSize()[::-1], dtype=np.float64)
    for image in images:
        total += sitk.GetArrayViewFromImage(image)
    result = sitk.GetImageFromArray((total / len(images)).astype(np.float32))
    result.CopyInformation(images[0])
    write_image(result, target)


def _entropy(probabilities: np.ndarray) -> np.ndarray:
    return -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(0)


def _ensemble_probabilities(paths: list[Path], target: Path, save_probabilities: bool,
                            save_uncertainty: bool = False) -> None:
    references = [read_image(p) for p in paths]
    _check_same_grid(references, paths)
    mean = None
    member_labels: list[np.ndarray] = []
    entropy_sum = None
    for path in paths:
        npz = path.with_name(f"{split_ending(path.name)[0]}.npz")
        if not npz.is_file():
            raise SpineDiffError(f"{npz} is missing: predict segmentation with --save-probabilities to ensemble it "
                                 "(label maps alone cannot be averaged).")
        with np.load(npz, allow_pickle=False) as data:  # no pickles: loading cannot run code
            probabilities = data["probabilities"].astype(np.float64)
        if mean is not None and probabilities.shape != mean.shape:
            raise SpineDiffError(f"{npz}: probabilities of shape {probabilities.shape}, {paths[0]}'s have "
                                 f"{mean.shape}.")
        if save_uncertainty:
            member_labels.append(np.argmax(probabilities, axis=0).astype(np.uint8))
            entropy = _entropy(probabilities)
            entropy_sum = entropy if entropy_sum is None else entropy_sum + entropy
        mean = probabilities if mean is None else mean + probabilities
    mean /= len(paths)
    # nnU-Net's label values are consecutive (0..C-1), so the argmax index is the label
    labels = np.argmax(mean, axis=0).astype(np.uint8 if mean.shape[0] < 256 else np.uint16)
    shape = sitk.GetArrayViewFromImage(references[0]).shape
    result = sitk.GetImageFromArray(labels.reshape(shape))
    result.CopyInformation(references[0])
    write_image(result, target)
    if save_probabilities:
        write_probabilities(mean, target.with_name(f"{split_ending(target.name)[0]}.npz"))
    if save_uncertainty:
        stem, ending = split_ending(target.name)
        disagreement = np.clip(_entropy(mean) - entropy_sum / len(paths), 0, None).astype(np.float32)
        image = sitk.GetImageFromArray(disagreement.reshape(shape))
        image.CopyInformation(references[0])
        write_image(image, target.with_name(f"{stem}_uncertainty{ending}"))
        spacing = tuple(reversed(references[0].GetSpacing()))  # numpy order, as the arrays
        scores = case_scores(mean.reshape(mean.shape[0], *shape), spacing, list(range(1, mean.shape[0])),
                             uncertainty=disagreement.reshape(shape),
                             member_labels=[m.reshape(shape) for m in member_labels])
        write_json({"case": stem, "members": len(paths), "inputs": [str(p) for p in paths], "scores": scores,
                    "uncertainty": "entropy of the mean class probabilities minus the members' mean entropy (nats)"},
                   target.with_name(f"{stem}_uncertainty.json"))
