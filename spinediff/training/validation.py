"""Validation: per-epoch scores on patches, and the final export + metrics of a fold.

The final validation predicts every validation case of the fold from its preprocessed data through the prediction
core that ``spinediff predict`` uses (:mod:`spinediff.prediction.core`: the same members, seeds, ensemble and export,
so a case's file equals ``spinediff predict``'s for the same model, seed and sampling settings), writes it in the raw
input's geometry and scores it against the raw reference: Dice per class (nnU-Net's evaluation) or PSNR, SSIM and
MAE in HU (monai metrics).
"""

from __future__ import annotations

import time
from os.path import join
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.paths import nnUNet_raw
from tqdm import tqdm

from spinediff.io import write_json
from spinediff.metrics.image_metrics import image_metrics
from spinediff.metrics.segmentation_metrics import dice_counts
from spinediff.prediction.core import CaseExporter, output_paths, sample_case
from spinediff.utilities.in_process import metrics_in_process


def batch_segmentation_counts(estimate: torch.Tensor, target: torch.Tensor,
                              mask: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Hard TP/FP/FN per foreground class of a batch (nnU-Net's pseudo-Dice bookkeeping, through
    :func:`spinediff.metrics.segmentation_metrics.dice_counts`); ``mask`` ``(B, 1, *spatial)``: the voxels that
    count (None: all; nnU-Net's ignore label leaves its voxels out)."""
    classes = estimate.shape[1]
    predicted = torch.nn.functional.one_hot(estimate.argmax(1), classes).movedim(-1, 1)
    truth = torch.nn.functional.one_hot(target.argmax(1), classes).movedim(-1, 1)
    if mask is not None:
        known = mask.to(device=predicted.device, dtype=predicted.dtype)
        predicted, truth = predicted * known, truth * known
    tp, fp, fn = dice_counts(predicted[:, 1:], truth[:, 1:])
    return {"tp_hard": tp, "fp_hard": fp, "fn_hard": fn}


def batch_image_scores(estimate: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """PSNR and SSIM in the network range [-1, 1] (data range 2), averaged over the batch."""
    from monai.metrics import PSNRMetric, SSIMMetric

    estimate = estimate.clamp(-1, 1).float().cpu()
    target = target.float().cpu()
    psnr = PSNRMetric(max_val=2.0)(estimate, target).mean().item()
    spatial = estimate.shape[2:]
    kernel = max(3, min(7, min(spatial) - (1 - min(spatial) % 2)))
    ssim = SSIMMetric(spatial_dims=len(spatial), data_range=2.0, win_size=kernel)(estimate, target)
    return {"psnr": float(psnr), "ssim": float(ssim.mean().item())}


class ValidationExporter:
    """Runs the final validation of one trained fold through the prediction core (:mod:`spinediff.prediction.core`),
    as ``spinediff predict --seed 0`` predicts the case with this fold and the same sampling settings."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def run(self, save_probabilities: bool = False) -> dict:
        tr = self.trainer
        _, val_keys = tr.do_split()
        dataset = tr.dataset_class(tr.preprocessed_dataset_folder, val_keys)
        out_dir = Path(tr.validation_folder)
        out_dir.mkdir(parents=True, exist_ok=True)
        ending = tr.dataset_json["file_ending"]
        sampling = tr.validation_sampling()
        exporter = CaseExporter(tr.task, tr.plans_manager, tr.configuration_manager, tr.label_manager)
        timings = []
        for key in tqdm(val_keys, desc=f"validation fold {tr.fold}", unit="case"):
            data, seg, _, properties = dataset.load_case(key)
            data = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
            seg = torch.from_numpy(np.asarray(seg[:], dtype=np.int16))
            condition = tr.task.condition(data[None], seg[None])[0]
            start = time.perf_counter()
            # base seed 0: fold f samples from fold_seed(0, f), as `spinediff predict` (default --seed 0) does
            models = tr.validation_models(key, properties, tuple(condition.shape[1:]))
            statistics = sample_case(models, condition, tr.task, sampling, seed=0)
            timings.append(time.perf_counter() - start)
            outputs = output_paths(key, ending, out_dir, tr.task, save_probabilities=save_probabilities,
                                   properties_file=True)
            exporter.export(statistics, properties, outputs)
        metrics = self._score(out_dir, val_keys, ending)
        metrics["seconds_per_case"] = float(np.mean(timings)) if timings else float("nan")
        metrics["num_inference_steps"] = sampling.num_inference_steps if tr.denoising else 1
        metrics["samples"] = sampling.num_samples
        metrics["sampling"] = sampling.to_dict()
        write_json(metrics, join(tr.output_folder, "validation_metrics.json"))
        tr.print_to_log_file(f"Final validation: {self._headline(metrics)}")
        return metrics

    def _score(self, out_dir: Path, keys: list[str], ending: str) -> dict:
        tr = self.trainer
        if tr.task.task.writes_labels:
            reference = join(tr.preprocessed_dataset_folder_base, "gt_segmentations")
            with metrics_in_process():  # one process asked for: nnunetv2 would still spawn one
                summary = compute_metrics_on_folder(
                    reference, str(out_dir), str(out_dir / "summary.json"),
                    tr.plans_manager.image_reader_writer_class(), ending,
                    tr.label_manager.foreground_regions if tr.label_manager.has_regions
                    else tr.label_manager.foreground_labels, tr.label_manager.ignore_label, num_processes=1)
            per_class = {str(k): v["Dice"] for k, v in summary["mean"].items()}
            return {"task": tr.task.task.name, "dice_per_class": per_class,
                    "mean_dice": float(summary["foreground_mean"]["Dice"]), "num_cases": len(keys)}
        raw_images = Path(nnUNet_raw.get()) / tr.plans_manager.dataset_name / "imagesTr" if nnUNet_raw.is_set() \
            else None
        per_case = {}
        for key in keys:
            for i, channel in enumerate(tr.task.target_channels):
                mapping = tr.task.target_intensity.mappings[i]
                name = f"{key}{ending}" if len(tr.task.target_channels) == 1 else f"{key}_{channel:04d}{ending}"
                if raw_images is None:
                    continue
                reference = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_images / f"{key}_{channel:04d}{ending}")))
                prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / name)))
                per_case[name] = image_metrics(prediction, reference, mapping.clip_range, is_ct=mapping.units == "HU")
        names = sorted({m for case in per_case.values() for m in case})
        mean = {m: float(np.nanmean([case[m] for case in per_case.values()])) for m in names}
        return {"task": tr.task.task.name, "per_case": per_case, "mean": mean, "num_cases": len(keys)}

    @staticmethod
    def _headline(metrics: dict) -> str:
        if "mean_dice" in metrics:
            return f"mean Dice {metrics['mean_dice']:.4f} per class {metrics['dice_per_class']}"
        mean = metrics.get("mean", {})
        return ", ".join(f"{k} {v:.3f}" for k, v in mean.items())
