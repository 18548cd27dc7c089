"""The options of a training run, built once (from ``spinediff train``'s flags, the benchmark's or the demo's)
and handed down: nnU-Net's schedule attributes are set by :func:`spinediff.training.api.apply_options`, spinediff's
own by :meth:`spinediff.training.base.SpineDiffTrainer.apply_options`."""

from __future__ import annotations

from dataclasses import dataclass

from spinediff.errors import SpineDiffError


@dataclass
class TrainingOptions:
    """Schedule overrides; ``None`` keeps the trainer's default."""

    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    learning_rate: float | None = None
    num_inference_steps: int | None = None  # DDIM steps of the final validation
    validation_samples: int | None = None  # samples averaged per case in the final validation (None: the plans')
    mask_ablation_probability: float | None = None
    perception_model: str | None = None  # PerceptionRegressionTrainer: the frozen segmenter's model folder
    budget_minutes: float | None = None  # end training at this wall-clock budget (refits the schedule)
    seed: int | None = 0  # seeds network initialisation, augmentation and diffusion noise (None: unseeded)
    save_probabilities: bool = False  # segmentation: keep CASE.npz in the final validation (as nnU-Net's --npz)
    device: str | object = "auto"  # where to train: auto | cpu | cuda | cuda:N, or a torch.device (--device)
    precision: str | None = None  # auto | fp32 | bf16 | fp16 (None: the trainer's, auto)
    console_log: bool = False  # benchmark/demo: nnU-Net's full log on the console too (always in its log file)
    #: a refinement model's final validation: ``mean`` of the K samples (None: mean) or ``spinesegdiff`` (the last
    #: steps' weighted estimates; segmentation only; spinediff.diffusion.refinement.StepCombination)
    combine: str | None = None
    #: a refinement model's final validation: the start level, a fraction of T - 1 in [0, 1) (None: the plans'
    #: warm_start, else the trainer's default_refine_from: 0.3, 0.1 for ResidualRefinementTrainer)
    init_noise: float | None = None

    def __post_init__(self) -> None:
        # checked when the options are made, before a trainer creates its fold folder
        if self.validation_samples is not None and int(self.validation_samples) < 1:
            raise SpineDiffError(f"--val-samples must be at least 1, got {self.validation_samples}.")
        from spinediff.diffusion.refinement import COMBINATIONS

        if self.combine is not None and self.combine not in COMBINATIONS:
            raise SpineDiffError(f"--combine must be one of {', '.join(COMBINATIONS)}, got {self.combine!r}.")
        if self.init_noise is not None and not 0.0 <= float(self.init_noise) < 1.0:
            raise SpineDiffError(f"--init-noise must lie in [0, 1) (a fraction of the schedule), got "
                                 f"{self.init_noise}.")
