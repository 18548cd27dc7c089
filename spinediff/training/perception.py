"""The regression baseline of the SynthRAD2025 MR → CT winners (nnsyn, built on nnU-Net): L1 masked to the body and
an anatomical perception loss from a frozen segmenter of the target anatomy.

``PerceptionRegressionTrainer`` is :class:`~spinediff.training.baselines.RegressionTrainer` (the same U-Net, one step
from the MR to the CT) with two changes to its loss:

* **L1 in the body only**: voxels of the real CT denser than -500 HU (the body mask that ``mae_body`` scores), so the
  network spends nothing on the air around the patient.
* **Anatomical perception**: the synthetic and the real CT are both passed through the encoder of a frozen nnU-Net
  segmenter trained on real CT of the training cases (the downstream segmenter of the benchmark, same fold), each
  normalised as that segmenter's plans say; the loss is the mean absolute difference of their feature maps at every
  encoder stage, inside the body mask taken to the stage's resolution. A synthetic CT whose vertebrae the segmenter
  would see differently from the real CT's is penalised even where the voxel L1 is small.

How this differs from nnsyn, as far as its description goes: the segmenter here is nnU-Net's own trainer on the
benchmark's CPU configuration (its 2D encoder is applied slice by slice to a 3D patch), and the feature difference is
masked by the body, not by the segmenter's labels. The weight of the perception term is
:attr:`PerceptionRegressionTrainer.perception_weight`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spinediff.errors import SpineDiffError
from spinediff.metrics.image_metrics import BODY_THRESHOLD_HU
from spinediff.tasks import Translation
from spinediff.training.base import CUDA
from spinediff.training.baselines import RegressionTrainer
from spinediff.training.options import TrainingOptions


class AnatomicalPerception(nn.Module):
    """The frozen encoder of a trained nnU-Net segmenter and the masked feature distance it defines.

    Args:
        model_folder: the segmenter's ``TRAINER__PLANS__CONFIG`` folder.
        fold: the fold whose ``checkpoint_final.pth`` is loaded (the translation model's own fold: the segmenter saw
            the same training cases only).
    """

    def __init__(self, model_folder: str | Path, fold: int | str, device: torch.device) -> None:
        super().__init__()
        from spinediff.metrics.frechet import SegmenterFeatures

        extractor = SegmenterFeatures(model_folder, fold, device=device)
        self.encoder = extractor.encoder.float()
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        self.encoder.eval()
        self.dimension = len(extractor.patch_size)
        configuration = extractor.predictor.configuration_manager
        scheme = configuration.normalization_schemes[0]
        self.fixed_normalisation = scheme == "CTNormalization"
        properties = extractor.predictor.plans_manager.foreground_intensity_properties_per_channel.get("0", {})
        if self.fixed_normalisation and not properties:
            raise SpineDiffError(f"{model_folder}: the segmenter's plans have no foreground intensity properties for "
                                 "channel 0; re-plan it with nnU-Net.")
        self.clip = (float(properties.get("percentile_00_5", -1024.0)),
                     float(properties.get("percentile_99_5", 3071.0)))
        self.mean = float(properties.get("mean", 0.0))
        self.std = max(float(properties.get("std", 1.0)), 1e-8)

    def train(self, mode: bool = True) -> AnatomicalPerception:
        super().train(mode)
        self.encoder.eval()  # frozen: its normalisation statistics never change
        return self

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """Original units (HU) → the segmenter's input: nnU-Net's CT normalisation, else a z-score per sample."""
        if self.fixed_normalisation:
            return (image.clamp(*self.clip) - self.mean) / self.std
        axes = tuple(range(1, image.ndim))
        return (image - image.mean(axes, keepdim=True)) / image.std(axes, keepdim=True).clamp_min(1e-8)

    def _as_encoder_input(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim - 2 == self.dimension:
            return image
        if image.ndim == 5 and self.dimension == 2:  # a 2D segmenter reads a 3D patch slice by slice (first axis)
            return image.permute(0, 2, 1, 3, 4).reshape(-1, image.shape[1], *image.shape[3:])
        raise SpineDiffError(f"The perception segmenter is {self.dimension}D; it cannot read a patch of shape "
                             f"{tuple(image.shape)}. Use a 2D or a same-dimension segmenter.")

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        skips = self.encoder(self._as_encoder_input(self.normalise(image)))
        return list(skips) if isinstance(skips, (list, tuple)) else [skips]

    def forward(self, synthetic: torch.Tensor, real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean absolute feature difference inside ``mask``, averaged over the encoder stages.

        Args:
            synthetic, real: ``(B, 1, *spatial)`` in original units (HU); gradients flow into ``synthetic`` only.
            mask: ``(B, 1, *spatial)``, 1 inside the body.
        """
        with torch.no_grad():
            real_features = self.features(real)
        mask = self._as_encoder_input(mask.float())
        terms = []
        for fake, target in zip(self.features(synthetic), real_features, strict=True):
            weight = F.interpolate(mask, size=fake.shape[2:], mode="nearest")
            denominator = (weight.sum() * fake.shape[1]).clamp_min(1.0)
            terms.append(((fake - target).abs() * weight).sum() / denominator)
        return torch.stack(terms).mean()


class PerceptionRegressionTrainer(RegressionTrainer):
    """nnsyn's recipe on our network: L1 masked to the body + the anatomical perception loss of a frozen segmenter
    (``TrainingOptions.perception_model`` / ``spinediff train --perception-model``: the segmenter's model folder)."""

    supported_tasks = (Translation,)
    needs_target_segmenter = True  # the benchmark trains the downstream segmenter first and passes it
    perception_weight = 0.1  # the feature term is ~5-10x the body L1 at initialisation on the phantom

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA) -> None:
        # nnU-Net records the constructor's arguments by name: keep its exact signature.
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.perception_model: str | None = None
        self.perception: AnatomicalPerception | None = None

    def apply_options(self, options: TrainingOptions) -> None:
        super().apply_options(options)
        if options.perception_model is not None:
            self.perception_model = str(options.perception_model)

    def initialize(self) -> None:
        super().initialize()
        if self.perception_model is None:
            raise SpineDiffError(
                f"{type(self).__name__} needs a trained segmenter of the target modality for its perception loss: "
                "give --perception-model TRAINER__PLANS__CONFIG folder (nnU-Net trained on the real CT of the same "
                "folds; `spinediff benchmark` trains and passes it itself).")
        if self.task.output_channels != 1:
            raise SpineDiffError(f"{type(self).__name__} translates to one target channel; this dataset has "
                                 f"{self.task.output_channels}.")
        self.perception = AnatomicalPerception(self.perception_model, self.fold, self.device)

    def body_mask(self, target: torch.Tensor) -> torch.Tensor:
        """Voxels of the real target (network range) denser than the body threshold in HU."""
        threshold = float(self.task.target_intensity.to_network(torch.tensor([[BODY_THRESHOLD_HU]]), 1).item())
        return (target > threshold).float()

    def compute_loss(self, network, condition, target):
        synthetic = self.direct(network, condition)
        mask = self.body_mask(target)
        body_l1 = ((synthetic - target).abs() * mask).sum() / mask.sum().clamp_min(1.0)
        hu = self.task.target_intensity.from_network
        perception = self.perception(hu(synthetic, channel_axis=1), hu(target, channel_axis=1), mask)
        return body_l1 + self.perception_weight * perception
