"""The three diffusion trainers: one task each, everything else shared in :class:`SpineDiffTrainer`.

Settings such as the prediction type (image mode ``sample`` vs noise mode ``epsilon``) live in the
plans configuration (``spinediff train --prediction-type`` derives a configuration), not in
subclasses.
"""

from __future__ import annotations

import torch

from spinediff.tasks import Generation, Segmentation, Translation
from spinediff.training.base import CUDA, SpineDiffTrainer
from spinediff.training.options import TrainingOptions


class DiffusionTranslationTrainer(SpineDiffTrainer):
    """MR → CT (or any source → target channels): the target is noised, conditioned on the sources
    (Graf et al. 2023). Image mode (x0) by default, noise mode (epsilon) selectable."""

    supported_tasks = (Translation,)


class DiffusionSegmentationTrainer(SpineDiffTrainer):
    """SpineSegDiff: one-hot labels (scaled to [-1, 1]) are noised and denoised conditioned on the
    image; loss Dice + CE on the predicted x0; validation by DDIM sampling with a few steps."""

    supported_tasks = (Segmentation,)


class SegGuidedGenerationTrainer(SpineDiffTrainer):
    """Konz et al. 2024: an image generated from the one-hot label map given at every step.

    ``mask_ablation_probability`` > 0 trains with classes removed from the condition at random (each
    foreground class of each sample independently), so that a model can later generate from partial
    masks.
    """

    supported_tasks = (Generation,)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA) -> None:
        # nnU-Net records the constructor's arguments by name: keep its exact signature.
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.mask_ablation_probability = 0.0

    def apply_options(self, options: TrainingOptions) -> None:
        super().apply_options(options)
        if options.mask_ablation_probability is not None:
            self.mask_ablation_probability = float(options.mask_ablation_probability)

    def ablate_classes(self, condition: torch.Tensor) -> torch.Tensor:
        """Drop foreground classes at random: their voxels become background in the one-hot condition."""
        if self.mask_ablation_probability <= 0:
            return condition
        batch, classes = condition.shape[:2]
        drop = torch.rand((batch, classes), generator=self.generator,
                          device=self.generator.device) < self.mask_ablation_probability
        drop[:, 0] = False
        drop = drop.to(condition.device).reshape(batch, classes, *([1] * (condition.ndim - 2)))
        present = (condition > 0) & ~drop
        present[:, 0] = present[:, 0] | ((condition > 0) & drop).any(1)
        return present.to(condition.dtype) * 2 - 1

    def compute_loss(self, network, condition, target):
        if network is self.network:  # only when training, not for the validation loss
            condition = self.ablate_classes(condition)
        return super().compute_loss(network, condition, target)
