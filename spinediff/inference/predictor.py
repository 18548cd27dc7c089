"""``SpineDiffPredictor``: raw files → nnU-Net preprocessing → fold × sample ensemble → raw geometry.

One case at a time: read and check the files, preprocess with the plans' preprocessor, let every
fold draw its samples (members are folded into running statistics, see :mod:`.uncertainty`), undo
the preprocessing and write the prediction (and, on request, uncertainty maps, a per-case JSON
summary and the class probabilities) with the input's exact geometry. What the models read:

| task | inputs per case | preprocessing input | output |
|---|---|---|---|
| segmentation | every image channel ``CASE_XXXX`` | the channels | argmax of the mean class probabilities |
| translation | the source channels only | the sources + a placeholder per target channel | mean target (CT in HU) |
| generation | the label map ``CASE`` | placeholders for the image channels; labels as ``seg`` | mean image |

The placeholders hold ones: they are never read by the network, but nnU-Net crops every case to the
nonzero region of *all* its channels and normalises inside that mask; in training the target (CT,
nonzero nearly everywhere) kept the whole field of view, and a nonzero placeholder does the same.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from tqdm import tqdm

from spinediff.errors import SpineDiffError
from spinediff.inference.inputs import InputCase, InputLayout, check_case_files
from spinediff.inference.models import FoldModel, ModelFolder
from spinediff.inference.postprocessing import Postprocessing, geometry_like
from spinediff.inference.review import ReviewRule, intensity_signature
from spinediff.inference.uncertainty import EnsembleStatistics, SegmentationEnsemble, masked_mean
from spinediff.io import atomic_path, write_json
from spinediff.metrics.case_uncertainty import case_scores
from spinediff.metrics.image_metrics import BODY_THRESHOLD_HU
from spinediff.training.task_adapter import TaskAdapter
from spinediff.utilities.device import parse_device
from spinediff.utilities.export import revert_image_preprocessing, write_image_like_raw
from spinediff.utilities.seeds import fold_seed


@dataclass(frozen=True)
class PredictionOptions:
    """How to sample; ``None`` takes the value the model was trained with (its plans' diffusion block).

    ``tta`` (mirroring test-time augmentation over the trainer's allowed axes) costs 2^axes network
    calls per window and step; ``None`` turns it on for GPUs and off on the CPU.
    """

    num_samples: int | None = None
    num_inference_steps: int | None = None
    eta: float | None = None
    seed: int = 0
    tta: bool | None = None
    save_uncertainty: bool = False
    save_probabilities: bool = False
    precision: str = "auto"  # the network's autocast type (spinediff.training.precision)
    solver: str | None = None  # a name of spinediff.diffusion.solvers (None: the plans')
    warm_start: float | None = None  # fraction of T to start from (None: the plans'; 0: from pure noise)


@dataclass
class PreprocessedCase:
    condition: torch.Tensor
    properties: dict
    label_map: np.ndarray | None = None  # generation: the raw label map, for the foreground summary
    intensity: list[list[float]] | None = None  # segmentation with a review rule: each channel's intensity signature


@dataclass
class CaseOutputs:
    """Where one case's results go (all beside each other in the output folder)."""

    predictions: list[Path]
    uncertainty: list[Path]
    variance: Path | None
    probabilities: Path | None
    summary: Path | None

    def all(self) -> list[Path]:
        extra = [p for p in (self.variance, self.probabilities, self.summary) if p is not None]
        return [*self.predictions, *self.uncertainty, *extra]


@dataclass
class CaseResult:
    identifier: str
    ok: bool
    message: str | None = None
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    uncertainty: dict | None = None


class SpineDiffPredictor:
    """Predict raw cases with an ensemble of trained folds of one trainer/plans/configuration."""

    def __init__(self, folder: ModelFolder, folds: Sequence[int | str], checkpoint: str = "final",
                 device: str | torch.device = "auto") -> None:
        if not folds:
            raise SpineDiffError("Give at least one fold (-f).")
        self.folder = folder
        self.device = parse_device(device)
        self.models = [FoldModel.load(folder, fold, checkpoint, self.device) for fold in folds]
        self.settings = self.models[0].settings
        for model in self.models[1:]:
            if model.settings != self.settings:
                raise SpineDiffError(f"Folds {self.models[0].fold} and {model.fold} of {folder.path} were trained with "
                                     "different diffusion settings; ensemble only folds of one configuration.")
        self.plans_manager = folder.plans_manager
        self.configuration_manager = folder.configuration_manager
        self.dataset_json = folder.dataset_json
        self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        configuration = dict(self.configuration_manager.configuration, diffusion=self.settings.to_dict())
        self.task = TaskAdapter.from_configuration(configuration, self.dataset_json,
                                                   self.label_manager.num_segmentation_heads)
        self.num_channels = len(self.dataset_json["channel_names"])
        names = {int(k): v for k, v in self.dataset_json["channel_names"].items()}
        self.layout = InputLayout(self.task.task, tuple(self.task.source_channels), names,
                                  tuple(self.label_manager.all_labels))
        self.postprocessing = Postprocessing()  # nothing unless the caller loads the model's decision
        self.review: ReviewRule | None = None  # the model's review rule (review.json), when the caller loads it

    # ------------------------------------------------------------------ one case, step by step
    def preprocess(self, case: InputCase) -> PreprocessedCase:
        """Check and read the case's files and run the plans' preprocessing (see module docstring)."""
        check_case_files(case, self.layout)
        reader = self.plans_manager.image_reader_writer_class()
        files = [str(p) for p in case.files]
        label_map = None
        try:
            if self.task.task.labels_are_condition:
                label_map, properties = reader.read_seg(files[0])
                seg = label_map.copy()
                data = np.ones((self.num_channels, *label_map.shape[1:]), dtype=np.float32)
            else:
                images, properties = reader.read_images(files)
                seg = None
                data = images
                if len(self.task.source_channels) < self.num_channels:  # translation: no target channel given
                    data = np.ones((self.num_channels, *images.shape[1:]), dtype=np.float32)
                    data[list(self.task.source_channels)] = images
        except (RuntimeError, ValueError, OSError) as exc:
            raise SpineDiffError(f"{files[0]}: nnU-Net's reader failed ({type(exc).__name__}: {exc}).") from None
        if "sitk_stuff" not in properties:
            raise SpineDiffError(f"The plans' reader {type(reader).__name__} keeps no SimpleITK geometry; spinediff "
                                 "predicts datasets read with SimpleITKIO.")
        intensity = None
        if self.review is not None and self.review.intensity is not None and seg is None:
            intensity = [intensity_signature(channel) for channel in data]  # the raw channels, as in training
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        data, seg, properties = preprocessor.run_case_npy(data, seg, properties, self.plans_manager,
                                                          self.configuration_manager, self.dataset_json)
        labels = torch.from_numpy(np.asarray(seg, dtype=np.int16))[None] if seg is not None else None
        condition = self.task.condition(torch.from_numpy(np.asarray(data, dtype=np.float32))[None], labels)[0]
        return PreprocessedCase(condition, properties, label_map, intensity)

    def sample(self, condition: torch.Tensor, options: PredictionOptions, progress: bool = False,
               label: str = "") -> EnsembleStatistics:
        """Every fold's samples, folded into running statistics (in the preprocessed grid).

        Segmentation members are class probabilities; image members are in the output units (HU). ``progress``:
        a bar over folds x slices (2D) or folds (3D) with its ETA, for cases that take minutes.
        """
        num_inference_steps = options.num_inference_steps or self.settings.num_inference_steps
        num_samples = options.num_samples or self.settings.num_samples
        eta = self.settings.eta if options.eta is None else options.eta
        tta = self.device.type != "cpu" if options.tta is None else options.tta
        statistics = SegmentationEnsemble() if self.task.task.writes_labels else EnsembleStatistics()
        slices = condition.shape[1] if len(self.configuration_manager.patch_size) == 2 and condition.ndim == 4 else 1
        bar = tqdm(total=len(self.models) * slices,
                   desc=f"  {label} {num_samples} sample(s) x {num_inference_steps} steps",
                   unit="slice" if slices > 1 else "fold", leave=False, disable=not progress)
        for model in self.models:
            x0 = model.predict(condition, fold_seed(options.seed, model.fold), num_samples, num_inference_steps, eta,
                               tta, on_slice=lambda: bar.update(1), precision=options.precision,
                               solver=options.solver, warm_start=options.warm_start)
            for member in x0:
                if isinstance(statistics, SegmentationEnsemble):
                    statistics.add_probabilities(self.task.probabilities(member, channel_axis=0))
                else:
                    statistics.add(self.task.to_original_units(member, channel_axis=0))
            del x0
        bar.close()
        return statistics

    def output_paths(self, case: InputCase, folder: Path, options: PredictionOptions) -> CaseOutputs:
        stem, ending = case.identifier, case.ending
        if self.task.task.writes_labels:
            stems = [stem]
        else:
            targets = self.task.target_channels
            stems = [stem] if len(targets) == 1 else [f"{stem}_{c:04d}" for c in targets]
        segmentation = self.task.task.writes_labels
        return CaseOutputs(
            predictions=[folder / f"{s}{ending}" for s in stems],
            uncertainty=[folder / f"{s}_uncertainty{ending}" for s in stems] if options.save_uncertainty else [],
            variance=folder / f"{stem}_variance{ending}" if options.save_uncertainty and segmentation else None,
            probabilities=folder / f"{stem}.npz" if options.save_probabilities and segmentation else None,
            summary=folder / f"{stem}_uncertainty.json" if options.save_uncertainty else None)

    def export(self, statistics: EnsembleStatistics, case: PreprocessedCase, outputs: CaseOutputs,
               options: PredictionOptions) -> dict:
        """Write the prediction and maps in raw geometry; returns the case's uncertainty summary."""
        if isinstance(statistics, SegmentationEnsemble):
            return self._export_segmentation(statistics, case, outputs)
        return self._export_images(statistics, case, outputs)

    def _revert_map(self, values: torch.Tensor, properties: dict) -> np.ndarray:
        """A non-negative per-voxel map ``(*spatial)`` back to raw geometry (0 outside nnU-Net's crop), resampled as
        the plans resample probabilities (linear: cheaper than the images' cubic and never below zero)."""
        raw = revert_image_preprocessing(values[None], self.plans_manager, self.configuration_manager, properties,
                                         fill_value=0.0, resampling="probabilities")[0]
        return np.clip(raw, 0, None)

    def _export_segmentation(self, statistics: SegmentationEnsemble, case: PreprocessedCase,
                             outputs: CaseOutputs) -> dict:
        properties = case.properties
        # nnU-Net resamples logits; log of the mean probabilities are logits whose softmax is that mean.
        logits = torch.log(statistics.mean.clamp_min(1e-8))
        keep = outputs.probabilities is not None or self.postprocessing.needs_probabilities
        result = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, self.plans_manager, self.configuration_manager, self.label_manager, properties,
            return_probabilities=keep, num_threads_torch=torch.get_num_threads())
        segmentation, probabilities = result if keep else (result, None)
        stuff = properties["sitk_stuff"]
        numbering = None
        if self.postprocessing.active and len(stuff["spacing"]) == 3:
            geometry = geometry_like(stuff["spacing"], stuff["origin"], stuff["direction"])
            segmentation = np.asarray(segmentation)
            changed, numbering = self.postprocessing.apply_with_report(segmentation, geometry, probabilities)
            segmentation = changed.astype(segmentation.dtype)
        writer = self.plans_manager.image_reader_writer_class()
        with atomic_path(outputs.predictions[0]) as tmp:
            writer.write_seg(np.asarray(segmentation), str(tmp), properties)
        if outputs.probabilities is not None:
            with atomic_path(outputs.probabilities) as tmp:
                np.savez_compressed(tmp, probabilities=np.asarray(probabilities, dtype=np.float32))
        extra = {"level_numbering": numbering} if numbering is not None else {}
        if not outputs.uncertainty and self.review is None:
            return extra
        # case scores on the preprocessed grid, where the members are (volumes in ml, spacing-independent)
        scores = case_scores(statistics.mean.numpy(), self.configuration_manager.spacing,
                             [int(label) for label in self.label_manager.foreground_labels],
                             expected=self.review.expected_volumes_ml if self.review else None,
                             uncertainty=statistics.disagreement().numpy(), member_labels=statistics.member_labels)
        if self.review:
            extra["review"] = self.review.flag(scores, case.intensity, numbering)
        if not outputs.uncertainty:
            return {**extra, "scores": scores}
        disagreement = self._revert_map(statistics.disagreement(), properties)
        variance = self._revert_map(statistics.total_variance(), properties)
        write_image_like_raw(disagreement, properties, outputs.uncertainty[0])
        write_image_like_raw(variance, properties, outputs.variance)
        foreground = np.asarray(segmentation) > 0
        return {**extra, "scores": scores, "members": statistics.count, "foreground_voxels": int(foreground.sum()),
                "mean_uncertainty_foreground": masked_mean(disagreement, foreground),
                "mean_variance_foreground": masked_mean(variance, foreground),
                "mean_uncertainty": float(disagreement.mean()), "max_uncertainty": float(disagreement.max()),
                "uncertainty": "entropy of the mean class probabilities minus the members' mean entropy (nats)",
                "variance": "variance of the class probabilities across members, summed over classes"}

    def _export_images(self, statistics: EnsembleStatistics, case: PreprocessedCase, outputs: CaseOutputs) -> dict:
        properties = case.properties
        std = statistics.variance.sqrt()
        summary: dict = {"members": statistics.count, "channels": {}}
        for i, channel in enumerate(self.task.target_channels):
            mapping = self.task.target_intensity.mappings[i]
            mean = revert_image_preprocessing(statistics.mean[i:i + 1], self.plans_manager, self.configuration_manager,
                                              properties, fill_value=mapping.clip_range[0])[0]
            write_image_like_raw(mean, properties, outputs.predictions[i])
            if not outputs.uncertainty:
                continue
            deviation = self._revert_map(std[i], properties)
            write_image_like_raw(deviation, properties, outputs.uncertainty[i])
            body = mean > BODY_THRESHOLD_HU if mapping.units == "HU" else np.ones(mean.shape, dtype=bool)
            entry = {"units": mapping.units, "body_voxels": int(body.sum()),
                     "mean_std_body": masked_mean(deviation, body), "mean_std": float(deviation.mean()),
                     "max_std": float(deviation.max())}
            if case.label_map is not None:
                entry["mean_std_foreground"] = masked_mean(deviation, case.label_map[0] > 0)
            summary["channels"][str(channel)] = entry
        summary["uncertainty"] = "standard deviation across members, in the target's units"
        return summary

    def predict_case(self, case: InputCase, outputs: CaseOutputs, options: PredictionOptions,
                     progress: bool = False) -> CaseResult:
        """Preprocess, sample and export one case; a failure leaves none of this case's files behind."""
        start, started_at = time.perf_counter(), time.time()
        try:
            preprocessed = self.preprocess(case)
            statistics = self.sample(preprocessed.condition, options, progress, case.identifier)
            summary = self.export(statistics, preprocessed, outputs, options)
            seconds = time.perf_counter() - start
            if outputs.summary is not None:
                write_json({"case": case.identifier, "inputs": [str(p) for p in case.files], "seconds": seconds,
                            **summary}, outputs.summary)
            return CaseResult(case.identifier, True, None, seconds, [str(p) for p in outputs.all()], summary or None)
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others; it is reported
            for path in outputs.all():  # only what this attempt wrote
                if path.exists() and path.stat().st_mtime >= started_at - 1:
                    path.unlink(missing_ok=True)
            message = str(exc)
            if not isinstance(exc, SpineDiffError):  # not the input's fault: keep the traceback for a bug report
                message = f"unexpected {type(exc).__name__}: {exc}"
                tqdm.write(traceback.format_exc(), file=sys.stderr)
            return CaseResult(case.identifier, False, message, time.perf_counter() - start)
