"""``SpineDiffPredictor``: raw files → nnU-Net preprocessing → fold × sample ensemble → raw geometry.

One case at a time: read and check the files, preprocess with the plans' preprocessor, let every
fold draw its samples (the prediction core, :mod:`spinediff.prediction.core`), undo
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
from tqdm import tqdm

from spinediff.errors import SpineDiffError
from spinediff.inference.inputs import InputCase, InputLayout, check_case_files
from spinediff.inference.models import ModelFolder, load_fold_model
from spinediff.inference.postprocessing import Postprocessing, geometry_like
from spinediff.inference.review import ReviewRule, intensity_signature
from spinediff.io import write_json
from spinediff.prediction.core import CaseExporter, CaseOutputs, output_paths, sample_case
from spinediff.prediction.sampling import SamplingRequest, SamplingSettings, resolve_sampling
from spinediff.prediction.statistics import EnsembleStatistics
from spinediff.training.task_adapter import TaskAdapter
from spinediff.utilities.device import parse_device
from spinediff.utilities.geometry import orientation_code


@dataclass(frozen=True)
class PredictionOptions:
    """One run's options: how to sample (resolved once, see :func:`spinediff.prediction.sampling.resolve_sampling`;
    :meth:`SpineDiffPredictor.sampling` builds it for this predictor's model), the base seed, and which extra
    outputs to write."""

    sampling: SamplingSettings
    seed: int = 0
    save_uncertainty: bool = False
    save_probabilities: bool = False


@dataclass
class PreprocessedCase:
    condition: torch.Tensor
    properties: dict
    label_map: np.ndarray | None = None  # generation: the raw label map, for the foreground summary
    intensity: list[list[float]] | None = None  # segmentation with a review rule: each channel's intensity signature


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
        self.models = [load_fold_model(folder, fold, checkpoint, self.device) for fold in folds]
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
        self.exporter = CaseExporter(self.task, self.plans_manager, self.configuration_manager, self.label_manager)
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

    def sampling(self, request: SamplingRequest | None = None, *, tuned=None, tuned_source: str = "sampling.json",
                 plans_source: str = "plans", **keywords) -> SamplingSettings:
        """This model's sampling settings: plans <- ``tuned`` (sampling.json) <- ``request`` and ``keywords``
        (``num_samples``, ``num_inference_steps``, ``eta``, ``solver``, ``warm_start``, ``precision``, ``tta``; None:
        the model's); see :func:`spinediff.prediction.sampling.resolve_sampling`."""
        return resolve_sampling(self.settings, SamplingRequest.from_keywords(request, **keywords), tuned=tuned,
                                tuned_source=tuned_source, plans_source=plans_source, device=self.device,
                                denoising=self.models[0].denoising)

    def sample(self, condition: torch.Tensor, options: PredictionOptions, progress: bool = False,
               label: str = "") -> EnsembleStatistics:
        """Every fold's samples, folded into running statistics (in the preprocessed grid; see
        :func:`spinediff.prediction.core.sample_case`). ``progress``: a bar over folds x slices (2D) or folds (3D)
        with its ETA, for cases that take minutes."""
        sampling = options.sampling
        slices = condition.shape[1] if len(self.configuration_manager.patch_size) == 2 and condition.ndim == 4 else 1
        bar = tqdm(total=len(self.models) * slices,
                   desc=f"  {label} {sampling.num_samples} sample(s) x {sampling.num_inference_steps} steps",
                   unit="slice" if slices > 1 else "fold", leave=False, disable=not progress)
        statistics = sample_case(self.models, condition, self.task, sampling, options.seed,
                                 on_slice=lambda: bar.update(1))
        bar.close()
        return statistics

    def output_paths(self, case: InputCase, folder: Path, options: PredictionOptions) -> CaseOutputs:
        return output_paths(case.identifier, case.ending, folder, self.task, options.save_uncertainty,
                            options.save_probabilities)

    def export(self, statistics: EnsembleStatistics, case: PreprocessedCase, outputs: CaseOutputs,
               options: PredictionOptions) -> dict:
        """Write the prediction and maps in raw geometry (the model's post-processing applied, review flags from
        its review rule); returns the case's summary."""
        postprocess = self._postprocess if self.postprocessing.active else None
        summary = self.exporter.export(statistics, case.properties, outputs, postprocess=postprocess,
                                       needs_probabilities=self.postprocessing.needs_probabilities,
                                       scores=self.review is not None,
                                       expected_volumes=self.review.expected_volumes_ml if self.review else None,
                                       label_map=case.label_map)
        if self.review is not None and "scores" in summary:
            summary["review"] = self.review.flag(summary["scores"], case.intensity, summary.get("level_numbering"),
                                                 orientation_code(case.properties["sitk_stuff"]["direction"]))
        return summary

    def _postprocess(self, segmentation: np.ndarray, probabilities, properties: dict):
        stuff = properties["sitk_stuff"]
        if len(stuff["spacing"]) != 3:
            return segmentation, None
        geometry = geometry_like(stuff["spacing"], stuff["origin"], stuff["direction"])
        # the room at the scan's ends is measured to the edges of its image data (nnU-Net's nonzero crop, made on
        # the transposed axes), not to planes of zeros padded around it
        box = properties.get("bbox_used_for_cropping")
        if box is not None and len(box) == segmentation.ndim:
            box = [box[i] for i in self.plans_manager.transpose_backward]
        changed, numbering = self.postprocessing.apply_with_report(segmentation, geometry, probabilities, box)
        return changed.astype(segmentation.dtype), numbering

    def _revert_map(self, values: torch.Tensor, properties: dict) -> np.ndarray:
        return self.exporter.revert_map(values, properties)

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
