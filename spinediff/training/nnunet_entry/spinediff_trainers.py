"""Entry point for ``nnUNetv2_train ... -tr NAME``.

Point nnU-Net at this folder and it finds spinediff's trainers by class name::

    export nnUNet_extTrainer=$(python -c "import spinediff.training.nnunet_entry as e; print(e.__path__[0])")
    nnUNetv2_train 902 2d_diffusion 0 -tr DiffusionTranslationTrainer -device cpu

nnU-Net imports the files of that folder; this one re-exports the real classes, so the trainer
nnU-Net builds is the same class spinediff uses.
"""

from spinediff.training import (  # noqa: F401
    DiffusionSegmentationTrainer,
    DiffusionTranslationTrainer,
    Pix2PixTrainer,
    RegressionTrainer,
    SegGuidedGenerationTrainer,
)
