"""Validation: per-epoch scores on patches, and the final export + metrics of a fold.

The final validation predicts every validation case of the fold from its preprocessed data, writes
it in the raw input's geometry (labels for segmentation through nnU-Net's exporter; HU for
translation/generation through :mod:`spinediff.utilities.export`) and scores it against the raw
reference: Dice per class (nnU-Net's evaluation) or PSNR, SSIM and MAE in HU (monai metrics).
"""

from __future__ import annotations

import os
import time
from os.path import join
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.paths import nnUNet_raw
from tqdm import tqdm

from spinediff.errors import SpineDiffError
from spinediff.io import atomic_path, verify_written, write_json
from spinediff.metrics.image_metrics import image_metrics
from spinediff.utilities.export import revert_image_preprocessing, write_image_like_raw
from spinediff.utilities.seeds import fold_seed


def batch_segmentation_counts(estimate: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Hard TP/FP/FN per foreground class of a batch (nnU-Net's pseudo-Dice bookkeeping)."""
    predicted = estimate.argmax(1)
    truth = target.argmax(1)
    counts = {"tp_hard": [], "fp_hard": [], "fn_hard": []}
    for c in range(1, estimate.shape[1]):
        p, t = predicted == c, truth == c
        counts["tp_hard"].append(float((p & t).sum()))
        counts["fp_hard"].append(float((p & ~t).sum()))
        counts["fn_hard"].append(float((~p & t).sum()))
    return {k: np.asarray(v) for k, v in counts.items()}


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
    """Runs the final validation of one trained fold (see module docstring)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def run(self, save_probabilities: bool = False) -> dict:
        tr = self.trainer
        _, val_keys = tr.do_split()
        dataset = tr.dataset_class(tr.preprocessed_dataset_folder, val_keys)
        out_dir = Path(tr.validation_folder)
        out_dir.mkdir(parents=True, exist_ok=True)
        ending = tr.dataset_json["file_ending"]
        timings = []
        for key in tqdm(val_keys, desc=f"validation fold {tr.fold}", unit="case"):
            data, seg, _, properties = dataset.load_case(key)
            data = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
            seg = torch.from_numpy(np.asarray(seg[:], dtype=np.int16))
            condition = tr.task.condition(data[None], seg[None])[0]
            start = time.perf_counter()
            samples = max(1, int(getattr(tr, "final_validation_samples", 1))) if tr.denoising else 1
            # the fold's seed for base seed 0, as `spinediff predict` (default --seed 0) samples this fold
            x0 = tr.predict_volume(condition.to(tr.device), seed=fold_seed(0, tr.fold),
                                   num_inference_steps=tr.num_inference_steps,
                                   num_samples=samples)
            x0 = x0[0] if samples == 1 else self._ensemble(x0)
            timings.append(time.perf_counter() - start)
            self._export(x0, key, properties, out_dir, ending, save_probabilities)
        metrics = self._score(out_dir, val_keys, ending)
        metrics["seconds_per_case"] = float(np.mean(timings)) if timings else float("nan")
        metrics["num_inference_steps"] = tr.num_inference_steps if tr.denoising else 1
        metrics["samples"] = max(1, int(getattr(tr, "final_validation_samples", 1))) if tr.denoising else 1
        write_json(metrics, join(tr.output_folder, "validation_metrics.json"))
        tr.print_to_log_file(f"Final validation: {self._headline(metrics)}")
        return metrics

    def _ensemble(self, samples: torch.Tensor) -> torch.Tensor:
        """One x0 for K samples ``(K, C, *spatial)``, as ``spinediff predict`` forms it: segmentation averages the
        samples' class probabilities (SpineSegDiff), returned in the one-hot scale ``2 p - 1`` of a sample; images
        average the samples."""
        task = self.trainer.task
        if not task.task.writes_labels:
            return samples.float().mean(0)
        return 2 * task.probabilities(samples.float(), channel_axis=1).mean(0) - 1

    def _export(self, x0: torch.Tensor, key: str, properties: dict, out_dir: Path, ending: str,
                save_probabilities: bool) -> None:
        tr = self.trainer
        if tr.task.task.writes_labels:
            # log of the probabilities: logits whose softmax is those probabilities (nnU-Net resamples logits)
            logits = torch.log(tr.task.probabilities(x0[None].float(), channel_axis=1)[0].clamp_min(1e-8)).cpu()
            # nnunetv2 writes TRUNCATED + ending (and .npz/.pkl): under a temporary name, verified before renaming
            extras: list[Path] = []
            try:
                with atomic_path(out_dir / f"{key}{ending}") as tmp:
                    truncated = str(tmp)[: -len(ending)]
                    extras = [Path(truncated + e) for e in (".npz", ".pkl")] if save_probabilities else []
                    export_prediction_from_logits(logits, properties, tr.configuration_manager, tr.plans_manager,
                                                  tr.dataset_json, truncated, save_probabilities)
                    for extra in extras:
                        if extra.suffix == ".npz" and verify_written(extra, ".npz") is not None:
                            raise SpineDiffError(f"Could not write {out_dir / key}.npz completely (check free space "
                                                 f"on the device holding {out_dir}).")
                for extra in extras:
                    os.replace(extra, out_dir / f"{key}{extra.suffix}")
            finally:
                for extra in extras:
                    extra.unlink(missing_ok=True)
            return
        units = tr.task.to_original_units(x0[None].cpu())[0]
        fill = [m.clip_range[0] for m in tr.task.target_intensity.mappings]
        for i, channel in enumerate(tr.task.target_channels):
            restored = revert_image_preprocessing(units[i:i + 1], tr.plans_manager, tr.configuration_manager,
                                                  properties, fill_value=fill[i])[0]
            name = f"{key}{ending}" if len(tr.task.target_channels) == 1 else f"{key}_{channel:04d}{ending}"
            write_image_like_raw(restored, properties, out_dir / name)

    def _score(self, out_dir: Path, keys: list[str], ending: str) -> dict:
        tr = self.trainer
        if tr.task.task.writes_labels:
            reference = join(tr.preprocessed_dataset_folder_base, "gt_segmentations")
            summary = compute_metrics_on_folder(
                reference, str(out_dir), str(out_dir / "summary.json"), tr.plans_manager.image_reader_writer_class(),
                ending, tr.label_manager.foreground_regions if tr.label_manager.has_regions
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
