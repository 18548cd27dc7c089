"""Entry point for ``nnUNetv2_train ... -tr NAME``.

Point nnU-Net at this folder and it finds spinediff's trainers by class name::

    export nnUNet_extTrainer=$(python -c "import spinediff.training.nnunet_entry as e; print(e.__path__[0])")
    nnUNetv2_train 902 2d_diffusion 0 -tr DiffusionTranslationTrainer -device cpu

nnU-Net imports the files of that folder and looks the name up in each; this one holds every spinediff trainer
(:func:`spinediff.training.registry.trainer_classes`), so the trainer nnU-Net builds is the same class spinediff
uses, and a new trainer needs no entry here. The exception is a trainer built on nnU-Net's own
(``nnUNetTrainerLevelContext``, ``nnUNetTrainerGlobalContext``), which the registry of diffusion trainers does not
hold: they are named below.
"""

from spinediff.training.global_context import nnUNetTrainerGlobalContext
from spinediff.training.level_context import nnUNetTrainerLevelContext
from spinediff.training.registry import trainer_classes

globals().update(trainer_classes())
globals()["nnUNetTrainerLevelContext"] = nnUNetTrainerLevelContext  # nnU-Net's trainer with two auxiliary classes
globals()["nnUNetTrainerGlobalContext"] = nnUNetTrainerGlobalContext  # nnU-Net's trainer, attention at the bottleneck
