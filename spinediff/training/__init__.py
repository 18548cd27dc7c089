"""Trainers (subclasses of nnunetv2's nnUNetTrainer) and the ``spinediff train`` API."""

from __future__ import annotations

from spinediff.training.base import SpineDiffTrainer
from spinediff.training.baselines import Pix2PixTrainer, RegressionTrainer
from spinediff.training.diffusion_trainers import (
    DiffusionSegmentationTrainer,
    DiffusionTranslationTrainer,
    SegGuidedGenerationTrainer,
)

TRAINERS: dict[str, type[SpineDiffTrainer]] = {
    cls.__name__: cls
    for cls in (DiffusionTranslationTrainer, DiffusionSegmentationTrainer, SegGuidedGenerationTrainer,
                RegressionTrainer, Pix2PixTrainer)
}

__all__ = ["TRAINERS", "SpineDiffTrainer", "DiffusionTranslationTrainer", "DiffusionSegmentationTrainer",
           "SegGuidedGenerationTrainer", "RegressionTrainer", "Pix2PixTrainer"]
