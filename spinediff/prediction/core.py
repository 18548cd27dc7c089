"""The one prediction core below training and inference: fold and sample ensembles, export, file names.

``spinediff predict`` (:class:`spinediff.inference.predictor.SpineDiffPredictor`) and the trainers' final validation
(:class:`spinediff.training.validation.ValidationExporter`) both predict a preprocessed case here:

1. :func:`sample_case`: every fold (a :class:`FoldModel`: the EMA network and how it predicts a volume) draws
   ``SamplingSettings.num_samples`` members from the fold's seed (:func:`~spinediff.utilities.seeds.fold_seed`);
   the members are folded into running statistics (:mod:`spinediff.prediction.statistics`): class probabilities
   for segmentation, the target's units (HU) for images.
2. :func:`output_paths`: the file names of a case (``CASE.nii.gz``, ``CASE_0001.nii.gz`` per target channel of a
   multi-target translation, ``CASE_uncertainty``, ``CASE_variance``, ``CASE.npz``, ``CASE_uncertainty.json``).
3. :class:`CaseExporter`: the prediction (and maps) back in the raw input's geometry, written atomically.

The cross-validation therefore scores exactly what users get for the same model, seed and sampling settings
(``tests/test_prediction_core.py`` checks that the files are byte-identical).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from torch import nn

from spinediff.diffusion.process import DiffusionProcess
from spinediff.diffusion.settings import DiffusionSettings
from spinediff.diffusion.volume import VolumePredictor
from spinediff.io import atomic_path, write_probabilities
from spinediff.metrics.case_uncertainty import case_scores
from spinediff.metrics.image_metrics import BODY_THRESHOLD_HU
from spinediff.prediction.sampling import SamplingSettings
from spinediff.prediction.statistics import EnsembleStatistics, SegmentationEnsemble, masked_mean
from spinediff.utilities.export import revert_image_preprocessing, write_image_like_raw
from spinediff.utilities.precision import AutocastNetwork, autocast_dtype
from spinediff.utilities.seeds import fold_seed

# Windows per network call = this x the plans' training batch. Without gradients a forward pass keeps far
# less than a training step, and small batches waste the CPU: on Dataset501's 2D network (128x112) one
# window cost 0.18 CPU-s in batches of 4 and 0.067 CPU-s in batches of 16.
INFERENCE_BATCH_FACTOR = 4


@dataclass
class FoldModel:
    """One trained fold: the EMA network and how it predicts a volume (loaded from a checkpoint by
    :func:`spinediff.inference.models.load_fold_model`, or a trainer's own by ``SpineDiffTrainer.fold_model``)."""

    fold: str
    network: nn.Module
    settings: DiffusionSettings
    process: DiffusionProcess
    denoising: bool
    patch_size: tuple[int, ...]
    window_batch_size: int
    mirror_axes: tuple[int, ...]
    #: unpaired diffusion (UnpairedDiffusionTrainer): the start fraction and the training CT's histogram
    sdedit: dict | None = None

    @staticmethod
    def window_batch(batch_size: int) -> int:
        """Windows per network call for a configuration trained with ``batch_size``."""
        return INFERENCE_BATCH_FACTOR * max(1, int(batch_size))

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def volume_predictor(self, sampling: SamplingSettings, num_samples: int | None = None) -> VolumePredictor:
        """The sliding-window predictor of this fold with the run's sampling settings."""
        network, dtype = self.network, autocast_dtype(sampling.precision, self.device)
        if dtype is not None:
            network = AutocastNetwork(network, dtype, self.device)
        samples = sampling.num_samples if num_samples is None else num_samples
        sdedit = (float(self.sdedit["start"]), self.settings.target_channels) if self.sdedit is not None else None
        # 2D slices are small: all K members of a slice are denoised together (fewer, fuller network calls).
        # 3D volumes: one member at a time, so memory does not grow with K.
        return VolumePredictor(network, process=self.process if self.denoising else None,
                               patch_size=self.patch_size, window_batch_size=self.window_batch_size,
                               mirror_axes=self.mirror_axes if sampling.tta else (), eta=sampling.eta,
                               solver=sampling.solver, warm_start=sampling.warm_start,
                               sample_batch_size=samples if len(self.patch_size) == 2 else 1, sdedit=sdedit,
                               device=self.device)

    def predict(self, condition: torch.Tensor, seed: int, sampling: SamplingSettings,
                on_slice: Callable[[], None] | None = None) -> torch.Tensor:
        """``(K, C, *spatial)`` x0 estimates in [-1, 1] on the CPU; a one-step (non-denoising) model gives one."""
        if self.sdedit is not None:  # unpaired diffusion: the histogram-matched source is the initial estimate
            from spinediff.diffusion.unpaired import source_as_estimate

            condition = source_as_estimate(condition, self.sdedit["target_histogram"], self.settings.target_channels)
        return self.volume_predictor(sampling).predict(
            condition, num_inference_steps=sampling.num_inference_steps, seed=seed,
            num_samples=sampling.num_samples if self.denoising else 1, on_slice=on_slice)


def new_statistics(task) -> EnsembleStatistics:
    """Empty running statistics for ``task`` (a ``TaskAdapter``): class probabilities or target units."""
    return SegmentationEnsemble() if task.task.writes_labels else EnsembleStatistics()


def add_members(statistics: EnsembleStatistics, members: torch.Tensor, task) -> None:
    """Fold the x0 estimates ``(K, C, *spatial)`` into ``statistics``."""
    for member in members:
        if isinstance(statistics, SegmentationEnsemble):
            statistics.add_probabilities(task.probabilities(member, channel_axis=0))
        else:
            statistics.add(task.to_original_units(member, channel_axis=0))


def sample_case(models: Sequence[Any], condition: torch.Tensor, task, sampling: SamplingSettings, seed: int,
                on_slice: Callable[[], None] | None = None) -> EnsembleStatistics:
    """Every fold's members of one preprocessed case ``(C, *spatial)``, folded into running statistics.

    ``models``: objects with ``fold`` and ``predict(condition, seed, sampling, on_slice)`` (a :class:`FoldModel`, or a
    refinement's wrapper of one); fold ``f`` samples from ``fold_seed(seed, f)``.
    """
    statistics = new_statistics(task)
    for model in models:
        members = model.predict(condition, fold_seed(seed, model.fold), sampling, on_slice=on_slice)
        add_members(statistics, members, task)
        del members
    return statistics


@dataclass
class CaseOutputs:
    """Where one case's results go (all beside each other in the output folder)."""

    predictions: list[Path]
    uncertainty: list[Path]
    variance: Path | None
    probabilities: Path | None
    summary: Path | None
    #: nnU-Net's ``CASE.pkl`` (the properties) beside ``CASE.npz``, for nnU-Net's ensembling of validation folders
    properties: Path | None = None

    def all(self) -> list[Path]:
        extra = [p for p in (self.variance, self.probabilities, self.summary, self.properties) if p is not None]
        return [*self.predictions, *self.uncertainty, *extra]


def output_paths(identifier: str, ending: str, folder: Path, task, save_uncertainty: bool = False,
                 save_probabilities: bool = False, properties_file: bool = False) -> CaseOutputs:
    """The one naming of a case's outputs (see the module docstring)."""
    folder = Path(folder)
    segmentation = task.task.writes_labels
    targets = task.target_channels
    stems = [identifier] if segmentation or len(targets) == 1 else [f"{identifier}_{c:04d}" for c in targets]
    probabilities = save_probabilities and segmentation
    return CaseOutputs(
        predictions=[folder / f"{s}{ending}" for s in stems],
        uncertainty=[folder / f"{s}_uncertainty{ending}" for s in stems] if save_uncertainty else [],
        variance=folder / f"{identifier}_variance{ending}" if save_uncertainty and segmentation else None,
        probabilities=folder / f"{identifier}.npz" if probabilities else None,
        summary=folder / f"{identifier}_uncertainty.json" if save_uncertainty else None,
        properties=folder / f"{identifier}.pkl" if probabilities and properties_file else None)


#: ``postprocess(segmentation, probabilities, properties) -> (segmentation, report or None)``
Postprocess = Callable[[np.ndarray, Any, dict], tuple[np.ndarray, Any]]


class CaseExporter:
    """Writes a case's ensemble statistics in the raw input's geometry (prediction, maps, probabilities).

    Segmentation: the log of the mean class probabilities are logits whose softmax is that mean; nnU-Net resamples
    them and takes the argmax (``convert_predicted_logits_to_segmentation_with_correct_shape``), its writer writes
    the label map. Images: the mean in the target's units, resampled back with the target's clip floor outside.
    """

    def __init__(self, task, plans_manager, configuration_manager, label_manager) -> None:
        self.task = task
        self.plans_manager = plans_manager
        self.configuration_manager = configuration_manager
        self.label_manager = label_manager

    def export(self, statistics: EnsembleStatistics, properties: dict, outputs: CaseOutputs, *,
               postprocess: Postprocess | None = None, needs_probabilities: bool = False,
               scores: bool = False, expected_volumes: dict | None = None,
               label_map: np.ndarray | None = None) -> dict:
        """Write the prediction and maps; returns the case's summary (segmentation: ``level_numbering`` from
        ``postprocess``, ``scores`` when asked or maps are written; images: per-channel spread)."""
        if isinstance(statistics, SegmentationEnsemble):
            return self.segmentation(statistics, properties, outputs, postprocess=postprocess,
                                     needs_probabilities=needs_probabilities, scores=scores,
                                     expected_volumes=expected_volumes)
        return self.images(statistics, properties, outputs, label_map=label_map)

    def revert_map(self, values: torch.Tensor, properties: dict) -> np.ndarray:
        """A non-negative per-voxel map ``(*spatial)`` back to raw geometry (0 outside nnU-Net's crop), resampled as
        the plans resample probabilities (linear: cheaper than the images' cubic and never below zero)."""
        raw = revert_image_preprocessing(values[None], self.plans_manager, self.configuration_manager, properties,
                                         fill_value=0.0, resampling="probabilities")[0]
        return np.clip(raw, 0, None)

    def segmentation(self, statistics: SegmentationEnsemble, properties: dict, outputs: CaseOutputs, *,
                     postprocess: Postprocess | None = None, needs_probabilities: bool = False, scores: bool = False,
                     expected_volumes: dict | None = None) -> dict:
        logits = torch.log(statistics.mean.clamp_min(1e-8))
        keep = outputs.probabilities is not None or needs_probabilities
        result = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, self.plans_manager, self.configuration_manager, self.label_manager, properties,
            return_probabilities=keep, num_threads_torch=torch.get_num_threads())
        segmentation, probabilities = result if keep else (result, None)
        numbering = None
        if postprocess is not None:
            segmentation, numbering = postprocess(np.asarray(segmentation), probabilities, properties)
        writer = self.plans_manager.image_reader_writer_class()
        with atomic_path(outputs.predictions[0]) as tmp:
            writer.write_seg(np.asarray(segmentation), str(tmp), properties)
        if outputs.probabilities is not None:
            write_probabilities(probabilities, outputs.probabilities)
        if outputs.properties is not None:
            with atomic_path(outputs.properties) as tmp, open(tmp, "wb") as handle:
                pickle.dump(properties, handle)
        summary: dict = {"level_numbering": numbering} if numbering is not None else {}
        if not outputs.uncertainty and not scores:
            return summary
        # case scores on the preprocessed grid, where the members are (volumes in ml, spacing-independent)
        summary["scores"] = case_scores(
            statistics.mean.numpy(), self.configuration_manager.spacing,
            [int(label) for label in self.label_manager.foreground_labels], expected=expected_volumes,
            uncertainty=statistics.disagreement().numpy(), member_labels=statistics.member_labels)
        if not outputs.uncertainty:
            return summary
        disagreement = self.revert_map(statistics.disagreement(), properties)
        variance = self.revert_map(statistics.total_variance(), properties)
        write_image_like_raw(disagreement, properties, outputs.uncertainty[0])
        write_image_like_raw(variance, properties, outputs.variance)
        foreground = np.asarray(segmentation) > 0
        return {**summary, "members": statistics.count, "foreground_voxels": int(foreground.sum()),
                "mean_uncertainty_foreground": masked_mean(disagreement, foreground),
                "mean_variance_foreground": masked_mean(variance, foreground),
                "mean_uncertainty": float(disagreement.mean()), "max_uncertainty": float(disagreement.max()),
                "uncertainty": "entropy of the mean class probabilities minus the members' mean entropy (nats)",
                "variance": "variance of the class probabilities across members, summed over classes"}

    def images(self, statistics: EnsembleStatistics, properties: dict, outputs: CaseOutputs, *,
               label_map: np.ndarray | None = None) -> dict:
        std = statistics.variance.sqrt()
        summary: dict = {"members": statistics.count, "channels": {}}
        for i, channel in enumerate(self.task.target_channels):
            mapping = self.task.target_intensity.mappings[i]
            mean = revert_image_preprocessing(statistics.mean[i:i + 1], self.plans_manager, self.configuration_manager,
                                              properties, fill_value=mapping.clip_range[0])[0]
            write_image_like_raw(mean, properties, outputs.predictions[i])
            if not outputs.uncertainty:
                continue
            deviation = self.revert_map(std[i], properties)
            write_image_like_raw(deviation, properties, outputs.uncertainty[i])
            body = mean > BODY_THRESHOLD_HU if mapping.units == "HU" else np.ones(mean.shape, dtype=bool)
            entry = {"units": mapping.units, "body_voxels": int(body.sum()),
                     "mean_std_body": masked_mean(deviation, body), "mean_std": float(deviation.mean()),
                     "max_std": float(deviation.max())}
            if label_map is not None:
                entry["mean_std_foreground"] = masked_mean(deviation, label_map[0] > 0)
            summary["channels"][str(channel)] = entry
        summary["uncertainty"] = "standard deviation across members, in the target's units"
        return summary
