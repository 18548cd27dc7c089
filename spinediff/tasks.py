"""The three tasks spinediff learns, as classes: what a task conditions on, what it produces, how it is
planned, scored and compared. Every other module asks the task object; none compares task names.

| task | condition | target | prediction written |
|---|---|---|---|
| segmentation | all image channels | one-hot labels | a label map (+ probabilities) |
| translation | the source image channels | the target channels (e.g. CT) | an image in target units |
| generation | the one-hot label map | the image channels | an image in target units |

A new task is one subclass here, registered in :data:`TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from spinediff.errors import SpineDiffError
from spinediff.metrics.direction import higher_is_better as metric_higher_is_better


@dataclass(frozen=True)
class MethodSpec:
    """One competing method of a task's benchmark (``nnunet``: nnU-Net's own trainer on its configuration)."""

    label: str
    trainer: str
    prediction_type: str | None = None  # a variant of the planned prediction type ("eps", "v")
    baseline: bool = False
    nnunet: bool = False
    needs_level_order: bool = False  # offered only where the plans found labels ordered along the spine
    opt_in: bool = False  # not in the default set: trained only when --methods names it


class Task:
    """Behaviour shared by the tasks; subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    #: the prediction is a label map (segmentation metrics, probabilities, post-processing, uncertainty maps)
    writes_labels: ClassVar[bool] = False
    #: the label map is the network's condition and the prediction's input file
    labels_are_condition: ClassVar[bool] = False
    #: the metric that ranks methods (its direction: :attr:`higher_is_better`)
    primary_metric: ClassVar[str] = "mae_body"
    #: per-case metrics a model's cross-validation is compared by (find_best)
    ranking_metrics: ClassVar[tuple[str, ...]] = ("mae_body", "psnr", "ssim")
    #: the budget planner measures the field of view on the labels (the spine), not the whole image
    field_of_view_from_labels: ClassVar[bool] = True
    #: augmentation may change intensities of the condition only (the target keeps its units)
    intensity_augmentation_on_condition_only: ClassVar[bool] = True
    #: a segmenter scores the synthetic images (downstream Dice)
    has_downstream_dice: ClassVar[bool] = False
    #: the prediction is a synthetic image that a segmenter of the target channel can score (Dice_gen / downstream)
    synthesises_images: ClassVar[bool] = True
    #: its images are also scored by the SynthRAD challenges' metrics (spinediff.metrics.challenge_metrics)
    challenge_metrics: ClassVar[bool] = False

    @property
    def higher_is_better(self) -> bool:
        """Is a higher :attr:`primary_metric` better (``spinediff.metrics.direction``, the one home of directions)?"""
        return metric_higher_is_better(self.primary_metric)

    # ------------------------------------------------------------------ identity
    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def evaluation_kind(self) -> str:
        """What ``spinediff evaluate`` compares: ``segmentation`` (labels) or ``image``."""
        return SEGMENTATION_KIND if self.writes_labels else IMAGE_KIND

    @property
    def has_image_target(self) -> bool:
        """The target is an image kept in its units (mapped to [-1, 1] by the plans' target_intensity)."""
        return not self.writes_labels

    # ------------------------------------------------------------------ dataset.json block
    def default_channels(self, n_channels: int, source: tuple[int, ...],
                         target: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(source, target) channels with this task's defaults filled in."""
        return source, target

    def block_problems(self, source: list[int], target: list[int], block: dict[str, Any]) -> list[str]:
        """What is wrong with a dataset.json ``spinediff`` block for this task (empty: nothing)."""
        return []

    # ------------------------------------------------------------------ planning
    def network_channels(self, source: int, target: int, label_channels: int) -> tuple[int, int]:
        """(condition, output) channels of the network."""
        raise NotImplementedError

    def diffusion_defaults(self, on_cpu: bool) -> dict[str, Any]:
        """The task's entries of the plans' diffusion block (see the planner for the reasons)."""
        raise NotImplementedError

    def describe(self, condition: int, target: int) -> str:
        """One sentence for the plans' notes."""
        raise NotImplementedError

    # ------------------------------------------------------------------ benchmark
    def benchmark_methods(self, tag: str) -> list[MethodSpec]:
        """The methods compared on this task, baseline first."""
        raise NotImplementedError


SEGMENTATION_KIND = "segmentation"
IMAGE_KIND = "image"


class Segmentation(Task):
    name = "segmentation"
    writes_labels = True
    primary_metric = "dice"
    ranking_metrics = ("dice", "dice_pp")
    intensity_augmentation_on_condition_only = False
    synthesises_images = False

    def default_channels(self, n_channels, source, target):
        return source or tuple(range(n_channels)), target

    def network_channels(self, source, target, label_channels):
        return source, label_channels

    def diffusion_defaults(self, on_cpu):
        return {"prediction_type": "sample", "num_inference_steps": 10, "num_samples": 5, "loss": "dice_ce",
                "timestep_power": 3.0}

    def describe(self, condition, target):
        return (f"Segmentation: condition = {condition} image channel(s), target = one-hot mask of {target} "
                "classes scaled to [-1, 1]; x0 prediction, Dice+CE.")

    def benchmark_methods(self, tag):
        return [MethodSpec(f"nnU-Net {tag}", "nnUNetTrainer", baseline=True, nnunet=True),
                # nnU-Net with the bodies beyond the first and last level as auxiliary classes (issue 34); opt-in:
                # no better than nnU-Net's trainer under the stress test at CPU budgets (documentation/results.md)
                MethodSpec(f"nnU-Net + level context {tag}", "nnUNetTrainerLevelContext", nnunet=True,
                           needs_level_order=True, opt_in=True),
                # nnU-Net with self-attention at the bottleneck (issue 34); opt-in, measured in documentation/results.md
                MethodSpec(f"nnU-Net + global context {tag}", "nnUNetTrainerGlobalContext", nnunet=True, opt_in=True),
                MethodSpec(f"Diffusion segmentation {tag}", "DiffusionSegmentationTrainer"),
                # refines the same fold's nnU-Net answers (issue 35); its row counts nnU-Net's training time too
                MethodSpec(f"nnU-Net + diffusion refinement {tag}", "DiffusionRefinementTrainer")]


class Translation(Task):
    name = "translation"
    field_of_view_from_labels = False
    has_downstream_dice = True
    challenge_metrics = True

    def block_problems(self, source, target, block):
        if not source or not target:
            return ["a translation dataset needs non-empty spinediff.source_channels and "
                    "spinediff.target_channels."]
        return []

    def network_channels(self, source, target, label_channels):
        return source, target

    def diffusion_defaults(self, on_cpu):
        return {"prediction_type": "sample", "num_inference_steps": 5 if on_cpu else 25, "num_samples": 5,
                "loss": "l1", "timestep_power": 1.0}

    def describe(self, condition, target):
        return (f"Translation: condition = {condition} source channel(s), target = {target} channel(s) kept in "
                "original units in the preprocessed data and mapped to [-1, 1] by diffusion.target_intensity "
                "(invertible); x0 prediction, L1.")

    def benchmark_methods(self, tag):
        return [MethodSpec(f"Regression U-Net {tag}", "RegressionTrainer", baseline=True),
                MethodSpec(f"Masked regression + perception loss {tag}", "PerceptionRegressionTrainer"),
                MethodSpec(f"Diffusion image mode (x0) {tag}", "DiffusionTranslationTrainer"),
                MethodSpec(f"Diffusion noise mode (eps) {tag}", "DiffusionTranslationTrainer", "eps"),
                MethodSpec(f"Diffusion v-prediction {tag}", "DiffusionTranslationTrainer", "v"),
                MethodSpec(f"Pix2Pix {tag}", "Pix2PixTrainer"),
                MethodSpec(f"CUT, unpaired {tag}", "CUTTrainer"),
                MethodSpec(f"Unpaired diffusion (SDEdit) {tag}", "UnpairedDiffusionTrainer"),
                # refines the same fold's regression output (issue 35); its row counts the regression's training too
                MethodSpec(f"Regression + diffusion refinement {tag}", "DiffusionRefinementTrainer"),
                # diffusion of the regression's residual, reading the regression's answer (CorrDiff-like)
                MethodSpec(f"Regression + residual diffusion {tag}", "ResidualRefinementTrainer")]


class Generation(Task):
    name = "generation"
    labels_are_condition = True

    def default_channels(self, n_channels, source, target):
        return source, target or tuple(range(n_channels))

    def block_problems(self, source, target, block):
        if block.get("source_channels"):
            return ["a generation dataset is conditioned on the labels; source_channels must be empty or absent."]
        return []

    def network_channels(self, source, target, label_channels):
        return label_channels, target

    def diffusion_defaults(self, on_cpu):
        # Noise prediction is the DDPM objective of Konz et al. (GPU schedules of 10^5 steps). At CPU budgets of
        # hundreds of steps v-prediction learned far faster: phantom mask -> CT, 600 steps each, MAE 112 vs 508 HU,
        # Dice_gen 0.57 vs 0.20 (studies/steps_generation.py, 2026-12-04).
        return {"prediction_type": "v_prediction" if on_cpu else "epsilon",
                "num_inference_steps": 10 if on_cpu else 50, "num_samples": 1, "loss": "mse", "timestep_power": 1.0}

    def describe(self, condition, target):
        return (f"Generation: condition = one-hot label map ({condition} classes), target = {target} image "
                "channel(s) mapped by diffusion.target_intensity; noise prediction (v-prediction when planned for "
                "the CPU), MSE.")

    def benchmark_methods(self, tag):
        return [MethodSpec(f"Regression U-Net {tag}", "RegressionTrainer", baseline=True),
                MethodSpec(f"Seg-guided diffusion {tag}", "SegGuidedGenerationTrainer")]


TASKS: dict[str, Task] = {task.name: task for task in (Segmentation(), Translation(), Generation())}
SEGMENTATION = TASKS["segmentation"]


def get_task(name: str | Task, origin: str | Path = "spinediff.task") -> Task:
    """The task called ``name`` (a Task is returned as it is)."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise SpineDiffError(f"{origin}: spinediff.task is {name!r}; expected one of {', '.join(TASKS)}.")
    return TASKS[name]


@dataclass(frozen=True)
class TaskSpec:
    """The typed view of a dataset's ``spinediff`` block."""

    task: Task = SEGMENTATION
    source_channels: tuple[int, ...] = ()
    target_channels: tuple[int, ...] = ()


def task_spec(dataset_json: dict[str, Any], origin: str | Path = "dataset.json") -> TaskSpec:
    """Read the ``spinediff`` block (absent → segmentation over all channels)."""
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    block = dataset_json.get("spinediff")
    if block is None:
        return TaskSpec(SEGMENTATION, tuple(range(n_channels)), ())
    if not isinstance(block, dict):
        raise SpineDiffError(f"{origin}: 'spinediff' must be an object, got {type(block).__name__}.")
    task = get_task(block.get("task", SEGMENTATION.name), origin)
    source, target = task.default_channels(n_channels, tuple(block.get("source_channels", ())),
                                           tuple(block.get("target_channels", ())))
    return TaskSpec(task, source, target)
