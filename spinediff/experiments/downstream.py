"""Downstream Dice: how well a CT segmentation model finds the anatomy in synthetic CT.

Both reference works judge generated images by a segmenter trained on *real* images: Graf et al. run
a CT segmentation network on the synthetic CT (Dice 0.80 for 3D), Konz et al. compare the segmenter's
Dice on generated images (Dice_gen) with its Dice on the real ones (Dice_orig). Here:

1. :func:`write_segmenter_dataset` turns a translation dataset into a segmentation dataset of its
   *target* channel (CT) and label maps (files are linked, not copied). For the downstream Dice of synthetic CT
   it keeps only the labels that CT shows (:func:`ct_visible_labels`: median intensity in bone range, e.g. the
   vertebrae; discs and the spinal canal are soft tissue that no CT segmenter finds reliably, and averaging them
   in made the segmenter's Dice on the *real* CT 0.23 in the demo, noise rather than an end point);
2. the caller plans it and trains nnU-Net's own ``nnUNetTrainer`` on it with the translation
   dataset's ``splits_final.json``, so a fold's segmenter never saw that fold's validation cases;
3. :func:`segmenter_dice` runs nnU-Net's predictor (``checkpoint_final.pth``, no mirroring) over any
   folder of CT volumes named ``CASE.nii.gz`` (the real CT, or each method's synthetic CT) and scores
   the label maps against the ground truth with :func:`~spinediff.evaluation.evaluate.evaluate_folders`.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinediff.errors import SpineDiffError
from spinediff.io import read_image, read_json, write_image, write_json
from spinediff.metrics.image_metrics import BONE_THRESHOLD_HU
from spinediff.paths import DEFAULT_PLANS, dataset_name_from_id, model_folder_name
from spinediff.tasks import SEGMENTATION_KIND, task_spec

SEGMENTER_TRAINER = "nnUNetTrainer"
SOURCE_KEY = "spinediff_downstream_of"  # dataset.json key naming the translation dataset


LABEL_MAP_KEY = "spinediff_label_map"  # dataset.json key: segmenter label value -> source label value


def ct_visible_labels(images: list[Path], labels: list[Path], names: dict[str, int],
                      threshold: float = BONE_THRESHOLD_HU) -> dict[str, int]:
    """The labels (name → value) whose median CT intensity over ``images`` is above ``threshold`` (bone): the
    classes a CT shows. All labels if none is (a target that is not in HU)."""
    values: dict[int, list[np.ndarray]] = {v: [] for k, v in names.items() if v != 0}
    for image, label in zip(images, labels, strict=True):
        ct = sitk.GetArrayFromImage(read_image(image))
        seg = sitk.GetArrayFromImage(read_image(label))
        for value, found in values.items():
            found.append(ct[seg == value])
    medians = {value: float(np.median(np.concatenate(found))) if sum(f.size for f in found) else -np.inf
               for value, found in values.items()}
    visible = {k: v for k, v in names.items() if v != 0 and medians[v] > threshold}
    return visible or {k: v for k, v in names.items() if v != 0}


def write_segmenter_dataset(translation_raw: Path, output_raw: Path, ct_visible_only: bool = False) -> Path:
    """A segmentation dataset of ``translation_raw``'s target channel and labels, at ``output_raw`` (a generation
    dataset works the same way: its segmenter gives Dice_gen).

    Images and labels are symbolic links to the translation dataset's files; the dataset.json names
    the target channel and copies the labels. With ``ct_visible_only`` and a CT target, only the labels the CT
    shows are kept (:func:`ct_visible_labels`), renumbered 1..k in their order, and the label maps are written
    (not linked); ``spinediff_label_map`` in dataset.json maps the new values to the source's. Idempotent: an
    existing complete folder is kept.
    """
    dataset_json = read_json(translation_raw / "dataset.json")
    spec = task_spec(dataset_json, translation_raw / "dataset.json")
    if not spec.task.synthesises_images or len(spec.target_channels) != 1:
        raise SpineDiffError(f"{translation_raw}: downstream Dice needs a translation dataset (or a generation "
                             "dataset: Dice_gen) with one target channel; this one is not.")
    labels = translation_raw / "labelsTr"
    if not labels.is_dir() or not any(labels.iterdir()):
        raise SpineDiffError(f"{labels}: downstream Dice needs the label maps of the translation dataset; add them "
                             "(nnU-Net layout, CASE.nii.gz) or run the benchmark without it.")
    if (output_raw / "dataset.json").is_file():
        return output_raw
    target, ending = spec.target_channels[0], dataset_json["file_ending"]
    pairs = [(label, translation_raw / "imagesTr" / f"{label.name[: -len(ending)]}_{target:04d}{ending}")
             for label in sorted(labels.glob(f"*{ending}"))]
    missing = [str(image) for _, image in pairs if not image.is_file()]
    if missing:  # checked before anything is written: no half-built dataset
        raise SpineDiffError(f"{missing[0]} is missing ({len(missing)} in all): every labelled case needs its target "
                             "channel.")
    label_names = dict(dataset_json["labels"])
    channel_name = dataset_json["channel_names"][str(target)]
    kept = None
    if ct_visible_only and str(channel_name).upper() == "CT":
        visible = ct_visible_labels([image for _, image in pairs], [label for label, _ in pairs], label_names)
        if len(visible) < len(label_names) - 1:
            kept = sorted(visible.items(), key=lambda item: item[1])
    staging = output_raw.with_name(output_raw.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "imagesTr").mkdir(parents=True)
    (staging / "labelsTr").mkdir()
    for label, image in pairs:
        os.symlink(image.resolve(), staging / "imagesTr" / f"{label.name[: -len(ending)]}_0000{ending}")
        if kept is None:
            os.symlink(label.resolve(), staging / "labelsTr" / label.name)
            continue
        source = read_image(label)
        array = sitk.GetArrayFromImage(source)
        remapped = np.zeros(array.shape, np.uint8)
        for new, (_, old) in enumerate(kept, start=1):
            remapped[array == old] = new
        out = sitk.GetImageFromArray(remapped)
        out.CopyInformation(source)
        write_image(out, staging / "labelsTr" / label.name)
    count = len(pairs)
    extra = {}
    if kept is not None:
        label_names = {"background": 0, **{name: new for new, (name, _) in enumerate(kept, start=1)}}
        extra[LABEL_MAP_KEY] = {str(new): old for new, (_, old) in enumerate(kept, start=1)}
    write_json({"channel_names": {"0": channel_name},
                "labels": label_names, "numTraining": count, "file_ending": ending, **extra,
                "name": output_raw.name.split("_", 1)[-1],
                SOURCE_KEY: translation_raw.name,
                "description": f"Target channel {target} and labels of {translation_raw.name}: trains the CT "
                               "segmenter that scores synthetic CT (downstream Dice)."},
               staging / "dataset.json")
    staging.rename(output_raw)
    return output_raw


def copy_splits(source_preprocessed: Path, target_preprocessed: Path) -> None:
    """Give the segmenter the translation dataset's folds (its validation cases stay unseen)."""
    splits = source_preprocessed / "splits_final.json"
    if not splits.is_file():
        raise SpineDiffError(f"{splits} is missing: train the translation methods first (it is written then).")
    write_json(read_json(splits), target_preprocessed / "splits_final.json")


def segmenter_dice(model_folder: Path, fold: int | str, images: dict[str, Path], labels_folder: Path,
                   work: Path | None = None, device: str = "cpu") -> dict[str, dict]:
    """Per case: Dice per label and their mean, of the segmenter in ``model_folder`` run on ``images``.

    Args:
        model_folder: ``nnUNetTrainer__PLANS__CONFIG`` of the segmenter.
        fold: the fold whose ``checkpoint_final.pth`` segments.
        images: case → CT volume (HU, the dataset's geometry).
        labels_folder: the ground-truth label maps ``CASE.nii.gz``.
        work: where inputs and predictions go (a temporary folder if ``None``).
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from spinediff.evaluation.evaluate import dice_per_case, evaluate_folders

    if not (model_folder / f"fold_{fold}" / "checkpoint_final.pth").is_file():
        raise SpineDiffError(f"{model_folder / f'fold_{fold}'} has no checkpoint_final.pth: train the CT segmenter "
                             "first.")
    missing = [str(p) for p in images.values() if not Path(p).is_file()]
    if missing:
        raise SpineDiffError(f"Downstream Dice: {missing[0]} (and {len(missing) - 1} more) not found.")
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        inputs, outputs = Path(scratch) / "in", Path(scratch) / "out"
        inputs.mkdir()
        outputs.mkdir()
        for case, image in images.items():
            os.symlink(Path(image).resolve(), inputs / f"{case}_0000.nii.gz")
        torch_device = torch.device(device)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=torch_device.type != "cpu", device=torch_device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold,),
                                                       checkpoint_name="checkpoint_final.pth")
        predictor.predict_from_files_sequential(str(inputs), str(outputs), save_probabilities=False,
                                                overwrite=True, folder_with_segs_from_prev_stage=None)
        evaluation = evaluate_folders(labels_folder, outputs, task=SEGMENTATION_KIND, progress=False)
    return dice_per_case(evaluation.rows)


def downstream_dataset_name(raw_root: Path, translation_name: str) -> str:
    """The segmenter dataset of ``translation_name``: the one already written for it under ``raw_root``
    (its dataset.json names its source), else ``DatasetNNN_<Name>CTSegmenter`` with the highest ID
    (<= 999) that no raw or preprocessed dataset uses."""
    used = set()
    for root in (raw_root, raw_root.parent / "nnUNet_preprocessed", *[Path(os.environ[k]) for k in
                 ("nnUNet_preprocessed",) if os.environ.get(k)]):
        for folder in root.glob("Dataset[0-9][0-9][0-9]_*") if root.is_dir() else ():
            used.add(int(folder.name[7:10]))
            marker = folder / "dataset.json"
            if root == raw_root and marker.is_file() and read_json(marker).get(SOURCE_KEY) == translation_name:
                return folder.name
    free = next((i for i in range(999, 0, -1) if i not in used), None)
    if free is None:
        raise SpineDiffError(f"No free dataset ID under {raw_root} for the downstream CT segmenter.")
    return dataset_name_from_id(free, f"{translation_name.split('_', 1)[-1]}CTSegmenter")


def train_downstream_segmenter(translation_name: str, folds: list, options, configuration: str = "2d_cpu",
                               reuse: bool = True) -> tuple[Path, object]:
    """Train (or reuse) nnU-Net on the real target images of the translation dataset's folds; its model folder and
    its ``MethodResult`` (training time). The same segmenter scores the synthetic images (downstream Dice) and gives
    the perception loss of ``PerceptionRegressionTrainer`` (fold by fold: it saw the fold's training cases only)."""
    from spinediff.experiments.folds import Method, run_method
    from spinediff.paths import nnunet_folder
    from spinediff.planning.api import plan_dataset
    from spinediff.training.api import ensure_splits

    raw_root, preprocessed_root, results_root = (nnunet_folder(k) for k in ("raw", "preprocessed", "results"))
    name = downstream_dataset_name(raw_root, translation_name)
    write_segmenter_dataset(raw_root / translation_name, raw_root / name, ct_visible_only=True)
    if not (preprocessed_root / name / f"{DEFAULT_PLANS}.json").is_file():
        plan_dataset(raw_root / name, configurations=[configuration], device="cpu", num_processes=1,
                     show_progress_bar=False)
    ensure_splits(preprocessed_root / translation_name, write_five_folds=True)  # the segmenter may train first
    copy_splits(preprocessed_root / translation_name, preprocessed_root / name)
    segmenter = run_method(Method("CT segmenter (nnU-Net)", SEGMENTER_TRAINER, configuration), name, folds, options,
                           reuse=reuse)
    return results_root / name / model_folder_name(SEGMENTER_TRAINER, configuration), segmenter


def score_downstream(translation_name: str, folds: list, outcomes: list, options, reference: Path,
                     configuration: str = "2d_cpu", reuse: bool = True) -> dict:
    """Train (or reuse) the CT segmenter on the translation dataset's folds and add ``dice_downstream``
    to every method's per-case scores and the Fréchet distance between its synthetic and the real CT (in the fold
    segmenter's encoder features, averaged over the folds) to its ``set_metrics``; returns the segmenter's scores on
    the real CT (Dice_orig).

    Args:
        translation_name: the translation dataset (``DatasetXXX_Name``), raw and preprocessed.
        outcomes: the benchmark's ``MethodResult`` objects (their fold validation exports are scored).
        options: ``TrainingOptions`` (budget and schedule: the same as the translation methods').
        reference: folder of the real CT volumes ``CASE.nii.gz``.
        configuration: the segmenter's nnU-Net configuration (CPU-sized by default).
    """
    from spinediff.paths import nnunet_folder

    raw_root, preprocessed_root, results_root = (nnunet_folder(k) for k in ("raw", "preprocessed", "results"))
    model, segmenter = train_downstream_segmenter(translation_name, folds, options, configuration, reuse)
    name = model.parent.name
    labels = raw_root / name / "labelsTr"  # the classes the segmenter learned (those the CT shows)
    from spinediff.metrics.frechet import SegmenterFeatures, image_frechet_distance

    real: dict[str, dict] = {}
    frechet: dict[str, list[float]] = {}
    for fold in folds:
        validation = read_json(preprocessed_root / name / "splits_final.json")[int(fold)]["val"] \
            if fold != "all" else []
        real.update(segmenter_dice(model, fold, {c: reference / f"{c}.nii.gz" for c in validation}, labels))
        encoder = SegmenterFeatures(model, fold)
        for outcome in outcomes:
            exports = results_root / translation_name / outcome.method.folder_name / f"fold_{fold}" / "validation"
            synthetic = {c: exports / f"{c}.nii.gz" for c in validation if (exports / f"{c}.nii.gz").is_file()}
            for case, scores in segmenter_dice(model, fold, synthetic, labels).items():
                outcome.per_case.setdefault(case, {})["dice_downstream"] = scores["dice"]
            if synthetic:  # the fold's synthetic vs real CT, in the fold segmenter's feature space
                frechet.setdefault(outcome.method.name, []).append(image_frechet_distance(
                    encoder, list(synthetic.values()), [reference / f"{c}.nii.gz" for c in synthetic]))
    for outcome in outcomes:
        if outcome.method.name in frechet:
            outcome.set_metrics["frechet"] = float(np.mean(frechet[outcome.method.name]))
    values = [s["dice"] for s in real.values() if math.isfinite(s["dice"])]
    return {"segmenter": f"{SEGMENTER_TRAINER} {configuration} on {name}",
            "train_minutes": segmenter.train_seconds / 60,
            "epochs": segmenter.epochs, "dice_real_ct": float(np.mean(values)) if values else float("nan"),
            "per_case_real_ct": real}
