"""Diffusion that refines another model's answer: SpineSegDiff's nnU-Net presegmentation start, and the same for
translation (a regression's synthetic CT, SDEdit-like from a partially noised start).

What SpineSegDiff's public code does (github BMDS-ETH/SpineSegDiff, read for facts):

- the network is conditioned on the image only (image encoder + denoising U-Net over ``cat(image, x_t)``); the
  presegmentation is never a condition channel. It enters as the *start* of sampling:
  ``ddim_sample_loop_presegmentation`` noises the nnU-Net mask ``x_pre`` to ``t_max`` (``q_sample``) and denoises
  from there;
- the paper trains the refiner by noising the presegmentation (not the ground truth) and scoring the x0 estimate
  against the ground truth, over a shortened schedule (T = 30 of 1000 matched T = 1000); the released
  ``src/train.py`` hard-codes ``presegmentation = False``, i.e. the published weights are trained as the standard
  model (ground truth noised at uniform timesteps, loss Dice + BCE + MSE of the x0 estimate);
- inference draws S = 15 samples and combines the x0 estimates of the last Ts = 10 steps with exponential
  weights; the uncertainty is the maximum over those steps of the samples' entropy
  (:mod:`spinediff.diffusion.refinement`).

What this trainer does: the standard diffusion model of the task (the ground truth noised, conditioned on the
image, the plans' loss), with training timesteps drawn uniformly from the refinement range only,
``t <= REFINE_TRAIN_FRACTION x (T - 1)``: the levels a refinement ever starts from; sampling from pure noise is not
trained. Training on noised presegmentations would need answers of the training cases from models that never saw
them (nnU-Net's answers on its own training cases are near the ground truth and teach copying); it is not done.
Its final validation refines each validation case's answer of the *same fold* of the initial model
(``init_model``: nnU-Net's ``nnUNetTrainer`` of the plans' CPU 2D configuration for segmentation, the
``RegressionTrainer`` of the same configuration for translation), read from that fold's ``validation/`` export, so
that no case is refined from an answer of a model that saw it. The model folder records the initial model and the
start level in ``refinement.json``, which ``spinediff predict`` reads to run the initial model itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from spinediff.diffusion.process import DiffusionProcess
from spinediff.diffusion.refinement import check_fraction, refine, refine_volume
from spinediff.errors import SpineDiffError
from spinediff.io import read_json, write_json
from spinediff.paths import DEFAULT_PLANS, POSTPROCESSING_FILE, model_folder_name, split_model_folder_name
from spinediff.planning.plans import DERIVED
from spinediff.prediction.core import FoldModel
from spinediff.prediction.sampling import SamplingSettings
from spinediff.tasks import Segmentation, Translation
from spinediff.training.base import CUDA, SpineDiffTrainer
from spinediff.training.task_adapter import TaskAdapter
from spinediff.training.validation import batch_image_scores
from spinediff.utilities.initial_answer import InitialAnswerFolder, raw_shape, to_preprocessed_grid
from spinediff.utilities.precision import as_float32, autocast

REFINEMENT_FILE = "refinement.json"
#: A fold's validation answers after its model's post-processing, with probabilities that agree with it (written by
#: ``spinediff postprocess --save-probabilities``): what a refiner of that model's answers starts from.
POSTPROCESSED_ANSWERS = "validation_postprocessed"
#: Residual refinement: the residual (target - initial answer, network units) is divided by this so that it fits the
#: x0 range [-1, 1] that the solvers clip to (0.25 units = 1/8 of the target's range: larger residuals saturate).
RESIDUAL_SCALE = 0.25
#: What a residual refiner's network predicts when its configuration plans image mode (x0): ResidualRefinementTrainer.
RESIDUAL_PREDICTION_TYPE = "v_prediction"
#: The highest start level trained (fraction of T - 1); refinements start at or below it.
REFINE_TRAIN_FRACTION = 0.5
#: The start level when neither the command line, sampling.json nor the plans' warm_start give one.
DEFAULT_REFINE_FROM = 0.3
#: ResidualRefinementTrainer's: a residual sample deviates from the regression more the higher it starts, for about
#: the same realism (phantom, one sample: +3.4 % body MAE from 0.1 T, +7.9 % from 0.3 T, Fréchet 0.0607 and 0.0608).
RESIDUAL_REFINE_FROM = 0.1
#: nnU-Net configurations tried, in order, as a segmentation refiner's initial model (same dimension first).
INITIAL_CONFIGURATIONS = {2: ("2d_cpu", "2d"), 3: ("3d_fullres_cpu", "3d_fullres")}


def initial_estimate(answers: InitialAnswerFolder, case: str, properties: dict, task: TaskAdapter, plans_manager,
                     configuration_manager, shape) -> torch.Tensor:
    """The case's initial answer ``(C, *shape)`` on its preprocessed grid in the diffusion range: class probabilities
    as ``2 p - 1`` (the one-hot scale of :func:`~spinediff.training.task_adapter.one_hot_scaled`), images through
    the target intensity mapping."""
    raw = raw_shape(properties, plans_manager)
    if task.task.writes_labels:
        values = answers.raw_probabilities(case, task.num_classes, properties, raw)
        grid = to_preprocessed_grid(values, properties, plans_manager, configuration_manager, shape)
        return torch.from_numpy(grid) * 2 - 1
    values = answers.raw_image(case, properties, raw, len(task.target_channels))
    grid = to_preprocessed_grid(values, properties, plans_manager, configuration_manager, shape, kind="image")
    return task.target_intensity.to_network(torch.from_numpy(grid), channel_axis=0).clamp(-1, 1)


def default_initial_model(plans_manager, configuration: str, task, patch_dims: int) -> str:
    """``TRAINER__PLANS__CONFIG`` of the model whose answers a refiner of ``configuration`` starts from. A configuration
    derived for another prediction type (``2d_diffusion_v``) refines the answers of its planned one's regression."""
    own = plans_manager.plans["configurations"].get(configuration) or {}
    return initial_model_for(plans_manager.available_configurations, own.get(DERIVED, configuration), task, patch_dims,
                             plans_manager.plans_name)


def initial_model_for(available: list[str] | tuple[str, ...], configuration: str, task, patch_dims: int,
                      plans: str = DEFAULT_PLANS) -> str:
    """:func:`default_initial_model` from the plans' configuration names (the benchmark asks it before any trainer
    exists): nnU-Net's ``nnUNetTrainer`` on the CPU configuration of the same dimension for segmentation, the
    ``RegressionTrainer`` of the refiner's own configuration for translation."""
    if task.writes_labels:
        for name in INITIAL_CONFIGURATIONS[patch_dims]:
            if name in available:
                return model_folder_name("nnUNetTrainer", name, plans)
        raise SpineDiffError(f"The plans have none of {', '.join(INITIAL_CONFIGURATIONS[patch_dims])} for the nnU-Net "
                             "model whose answers the refiner starts from; plan one (spinediff plan) or name it.")
    return model_folder_name("RegressionTrainer", configuration, plans)


class DiffusionRefinementTrainer(SpineDiffTrainer):
    """Refines another model's answer (module docstring): nnU-Net's segmentation, or a regression's synthetic
    image. Trained on the refinement range of timesteps; validated from the same fold's initial answers."""

    supported_tasks = (Segmentation, Translation)
    #: its final validation needs the initial model's fold exports (the benchmark trains that model first)
    refines_initial_answers = True
    #: None: the model denoises the answer itself; a number: a residual refiner (ResidualRefinementTrainer)
    residual_scale: float | None = None
    #: the start level of its validation, recorded in refinement.json for prediction, unless the plans' warm_start
    #: or --init-noise give one
    default_refine_from: float = DEFAULT_REFINE_FROM

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA) -> None:
        # nnU-Net records the constructor's arguments by name: keep its exact signature.
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.train_fraction = REFINE_TRAIN_FRACTION
        self.refine_from = self.settings.warm_start or self.default_refine_from
        self.init_model = default_initial_model(self.plans_manager, configuration, self.task.task,
                                                len(self.configuration_manager.patch_size))
        self.answers: InitialAnswerFolder | None = None
        #: how the final validation combines the samples: "mean", or "spinesegdiff" (TrainingOptions.combine)
        self.combine = "mean"
        self.limit_training_timesteps()

    def apply_options(self, options) -> None:
        super().apply_options(options)
        if options.combine is not None:
            if options.combine != "mean" and not self.task.task.writes_labels:
                raise SpineDiffError(f"--combine {options.combine} combines class probabilities: segmentation "
                                     f"refiners only (this dataset's task is {self.task.task.name}).")
            self.combine = options.combine
        if options.init_noise is not None:
            self.refine_from = check_fraction(float(options.init_noise))

    # ------------------------------------------------------------------ training
    def max_timestep(self) -> int:
        return int(round(self.train_fraction * (self.process.num_train_timesteps - 1)))

    def limit_training_timesteps(self) -> None:
        """Training timesteps uniform in ``0..max_timestep`` (the refinement range) instead of the whole schedule;
        everything else of the process (noise, condition dropout, loss) is the plans'."""
        if self.process.rectified_flow:
            raise SpineDiffError("refinement trains DDPM schedules (cosine/linear), not rectified flow")
        highest = self.max_timestep()

        def sample_timesteps(batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"):
            return torch.randint(0, highest + 1, (batch_size,), generator=generator,
                                 device=generator.device).to(device)

        self.process.sample_timesteps = sample_timesteps

    # ------------------------------------------------------------------ initial answers
    def initial_answers_folder(self) -> Path:
        """The same fold's validation export of the initial model (it never saw these cases): after the initial
        model's post-processing (``validation_postprocessed``, :func:`answers_after_postprocessing`) when its
        cross-validation kept one, as a user of that model gets its answers; else as exported."""
        if split_model_folder_name(self.init_model) is None:
            raise SpineDiffError(f"init model {self.init_model!r} is not TRAINER__PLANS__CONFIG")
        return initial_exports(Path(self.output_folder_base).parent / self.init_model, self.fold)

    def check_initial_answers(self) -> InitialAnswerFolder:
        folder = self.initial_answers_folder()
        trainer, plans, configuration = split_model_folder_name(self.init_model)
        if not folder.is_dir() and folder.name == POSTPROCESSED_ANSWERS:
            raise SpineDiffError(
                f"{type(self).__name__} fold {self.fold} refines the answers of {self.init_model} fold {self.fold} "
                f"after that model's post-processing ({folder.parent.parent / POSTPROCESSING_FILE} keeps one), but "
                f"{folder} does not exist. Write it with `spinediff postprocess -i {folder.parent / 'validation'} -o "
                f"{folder} -m {folder.parent.parent} --save-probabilities` (spinediff benchmark does this itself).")
        if not folder.is_dir():
            how = (f"nnUNetv2_train {self.plans_manager.dataset_name} {configuration} {self.fold} -tr {trainer} "
                   f"-p {plans} --npz" if trainer.startswith("nnUNet") else
                   f"spinediff train -d {self.plans_manager.dataset_name} -c {configuration} -f {self.fold} "
                   f"-tr {trainer}")
            raise SpineDiffError(f"{type(self).__name__} fold {self.fold} refines the answers of {self.init_model} "
                                 f"fold {self.fold}, but {folder} does not exist. Train and validate that fold first "
                                 f"({how}).")
        answers = InitialAnswerFolder.open(folder, self.dataset_json["file_ending"])
        answers.check_cases(self.do_split()[1])
        return answers

    def on_train_start(self) -> None:
        self.check_initial_answers()  # before training: its validation could not run otherwise
        super().on_train_start()
        write_json({"init_model": self.init_model, "refine_from": self.refine_from,
                    "train_fraction": self.train_fraction, **self.refinement_record(),
                    "made_by": type(self).__name__}, Path(self.output_folder_base) / REFINEMENT_FILE)

    def refinement_record(self) -> dict:
        """What ``refinement.json`` holds beyond the initial model and the start level."""
        return {}

    @property
    def validation_setting_defaults(self) -> dict:
        """The validation settings of a fold validated before they were recorded (spinediff.experiments.folds): the
        mean of the plans' samples and steps, from the initial model's plain exports, at the start level every refiner
        had then (DEFAULT_REFINE_FROM)."""
        return {"combine": "mean", "initial_answers": "validation",
                "validation_steps": self.settings.num_inference_steps, "validation_samples": self.settings.num_samples,
                "refine_from": self.settings.warm_start or DEFAULT_REFINE_FROM}

    def validation_settings(self) -> dict:
        """What the final validation depends on beyond the checkpoint: how the samples are combined, which of the
        initial model's exports it starts from, the DDIM steps, the sample count and the start level (a benchmark that
        reuses the fold validates it again when they changed)."""
        return {"combine": self.combine, "initial_answers": self.initial_answers_folder().name,
                "validation_steps": int(self.num_inference_steps),
                "validation_samples": int(self.final_validation_samples), "refine_from": float(self.refine_from)}

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if self.local_rank != 0:
            return
        self.answers = self.check_initial_answers()
        super().perform_actual_validation(save_probabilities)
        metrics = Path(self.output_folder) / "validation_metrics.json"
        if metrics.is_file():  # how the samples were combined, beside the sampling settings
            write_json({**read_json(metrics), **self.validation_settings()}, metrics)

    def validation_models(self, key: str, properties: dict, shape) -> list:
        """This fold, starting from the case's initial answer (the same fold's export of the initial model)."""
        estimate = initial_estimate(self.answers, key, properties, self.task, self.plans_manager,
                                    self.configuration_manager, shape)
        return [RefiningFold(self.fold_model(), estimate, check_fraction(self.refine_from), self.combine,
                             self.residual_scale)]


def answers_after_postprocessing(initial_model_folder: Path) -> bool:
    """Whether a refiner starts from the initial model's answers post-processed: its ``postprocessing.json`` (the
    decision of its cross-validation, ``spinediff find_best`` / ``benchmark``) keeps a level numbering."""
    path = Path(initial_model_folder) / POSTPROCESSING_FILE
    if not path.is_file():
        return False
    decision = read_json(path)
    return isinstance(decision, dict) and bool(decision.get("level_order"))


def initial_exports(initial_model_folder: Path, fold) -> Path:
    """Fold ``fold``'s validation answers of the initial model that a refiner starts from: numbered
    (``validation_postprocessed``) where :func:`answers_after_postprocessing`, else ``validation``."""
    folder = Path(initial_model_folder)
    exports = POSTPROCESSED_ANSWERS if answers_after_postprocessing(folder) else "validation"
    return folder / f"fold_{fold}" / exports


def refine_answer(sampler, condition: torch.Tensor, estimate: torch.Tensor, *, fraction: float,
                  num_inference_steps: int, num_samples: int, seed: int, combination: str = "mean",
                  residual_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The members ``(K, C, *spatial)`` (and SpineSegDiff's entropy map) refining ``estimate`` for one preprocessed
    volume (:func:`~spinediff.diffusion.refinement.refine_volume`).

    ``residual_scale`` (a :class:`ResidualRefinementTrainer`): the model reads the estimate as extra condition channels
    and denoises the residual ``(target - estimate) / residual_scale`` from zero (the estimate taken as right),
    noised to ``fraction``; the members are ``estimate + residual_scale x residual``, clipped to [-1, 1]. At fraction
    0 they are the estimate itself."""
    if residual_scale is None:
        return refine_volume(sampler, condition, estimate, fraction=fraction, num_inference_steps=num_inference_steps,
                             num_samples=num_samples, seed=seed, combination=combination)
    residuals, entropy = refine_volume(sampler, torch.cat([condition, estimate.to(condition.dtype)]),
                                       torch.zeros_like(estimate), fraction=fraction,
                                       num_inference_steps=num_inference_steps, num_samples=num_samples, seed=seed,
                                       combination=combination)
    return (estimate.float().cpu()[None] + residual_scale * residuals.float().cpu()).clamp(-1, 1), entropy


@dataclass
class RefiningFold:
    """A fold that refines an initial estimate instead of sampling from noise (the prediction core's model)."""

    model: FoldModel
    estimate: torch.Tensor
    fraction: float
    combination: str = "mean"  # or "spinesegdiff": one combined member (spinediff.diffusion.refinement)
    residual_scale: float | None = None  # a residual refiner's (refine_answer)

    @property
    def fold(self) -> str:
        return self.model.fold

    def predict(self, condition: torch.Tensor, seed: int, sampling: SamplingSettings, on_slice=None) -> torch.Tensor:
        sampler = self.model.volume_predictor(sampling).sampler
        members, _ = refine_answer(sampler, condition, self.estimate.to(condition.device), fraction=self.fraction,
                                   num_inference_steps=sampling.num_inference_steps,
                                   num_samples=sampling.num_samples, seed=seed, combination=self.combination,
                                   residual_scale=self.residual_scale)
        return members


def read_refinement(model_folder: str | Path) -> dict | None:
    """A refinement model's ``refinement.json`` (its initial model and start level), or None for other models."""
    path = Path(model_folder) / REFINEMENT_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    if not isinstance(record, dict) or "init_model" not in record:
        raise SpineDiffError(f"{path} is not a refinement record (no init_model); train the fold again.")
    return record


class ResidualRefinementTrainer(DiffusionRefinementTrainer):
    """Residual diffusion on a regression's answer (translation): the network reads the image *and* the regression's
    synthetic image, and denoises the residual ``(target - regression) / RESIDUAL_SCALE`` (CorrDiff's split of a
    regression mean and a diffusion residual; "regression sampling"). Refinement starts from a zero residual (the
    regression taken as right) noised to ``refine_from``, so the answer keeps the regression's mean where the model is
    unsure, and the samples add texture and spread where it is not.

    The residuals it trains on come from the same fold's regression, run on each training patch (frozen, EMA
    weights, after augmentation) - answers of a model that saw those cases. At the CPU budgets of this project the
    regression's error on its training cases is close to its validation error; with long budgets it is smaller, and
    the refiner then learns residuals smaller than it meets (nested folds would fix that at k times the cost).
    The final validation refines the regression's export of the validation cases, as the parent class does."""

    supported_tasks = (Translation,)
    reads_initial_answer = True
    residual_scale = RESIDUAL_SCALE
    default_refine_from = RESIDUAL_REFINE_FROM
    refused_prediction_types = ("sample",)
    refused_prediction_types_reason = ("its refinement starts from a zero residual at a low noise level, which an "
                                       "image-mode (x0) network must learn to give back, and after hundreds of steps "
                                       "does not (documentation/results.md); it predicts v where the plans say x0.")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_network: torch.nn.Module | None = None
        if self.settings.prediction_type in self.refused_prediction_types:
            # see refused_prediction_types_reason: v gives x0 = sqrt(abar) x_t - sqrt(1 - abar) v, which keeps x_t at
            # low noise by construction (phantom fold 0, 320 steps: +59 % body MAE in x0 from 0.02 T and 0.3 T alike,
            # +1.3 % in v from 0.05 T; documentation/results.md)
            self.settings = replace(self.settings, prediction_type=RESIDUAL_PREDICTION_TYPE)
            self.process = DiffusionProcess.from_settings(self.settings)
            self.limit_training_timesteps()

    def refinement_record(self) -> dict:
        return {"residual_scale": self.residual_scale}

    def load_initial_network(self) -> torch.nn.Module:
        """The same fold's initial model (frozen EMA network) from its final checkpoint."""
        from spinediff.prediction.checkpoints import load_checkpoint, network_from_checkpoint
        from spinediff.training.registry import find_trainer

        trainer, _, configuration = split_model_folder_name(self.init_model)
        folder = Path(self.output_folder_base).parent / self.init_model
        path = folder / f"fold_{self.fold}" / "checkpoint_final.pth"
        if not path.is_file():
            raise SpineDiffError(f"{type(self).__name__} fold {self.fold} learns the residuals of {self.init_model} "
                                 f"fold {self.fold}, but {path} does not exist. Train that fold first (spinediff train "
                                 f"-d {self.plans_manager.dataset_name} -c {configuration} -f {self.fold} -tr "
                                 f"{trainer}).")
        network, _ = network_from_checkpoint(load_checkpoint(path), path, find_trainer(trainer), self.plans_manager,
                                             self.plans_manager.get_configuration(configuration),
                                             folder / "plans.json")
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        return network.to(self.device)

    def on_train_start(self) -> None:
        self.initial_network = self.load_initial_network()  # before training, as the answers' check
        super().on_train_start()

    @torch.no_grad()
    def initial_patches(self, condition: torch.Tensor) -> torch.Tensor:
        """The initial model's answer for a batch of condition patches, in [-1, 1]."""
        if self.initial_network is None:
            self.initial_network = self.load_initial_network()
        timesteps = torch.zeros(condition.shape[0], dtype=torch.long, device=condition.device)
        with autocast(self.device, self.amp_dtype):
            return as_float32(self.initial_network(condition, timesteps)).clamp(-1, 1)

    def split_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition = image + the initial answer; target = the scaled residual."""
        condition, target = super().split_batch(batch)
        initial = self.initial_patches(condition)
        return torch.cat([condition, initial], dim=1), (target - initial) / self.residual_scale

    def validation_step(self, batch: dict) -> dict:
        """Loss on the residual; PSNR/SSIM of the refined patches (initial answer + residual, refined from
        ``refine_from``) against the target."""
        condition, residual = self.split_batch(batch)
        loss = self.compute_loss(self.inference_network, condition, residual)
        # refined as the final validation refines: from a zero residual noised to refine_from (the levels it trained)
        sampler = self.make_predictor().sampler
        estimate = torch.cat([refine(sampler, c, torch.zeros_like(r), fraction=self.refine_from,
                                     num_inference_steps=self.epoch_validation_num_inference_steps, num_samples=1,
                                     seed=self.current_epoch + i).to(r.device)
                              for i, (c, r) in enumerate(zip(condition, residual, strict=True))])
        initial = condition[:, -residual.shape[1]:]
        refined = initial + self.residual_scale * estimate
        return {"loss": loss.detach().cpu().numpy(),
                **batch_image_scores(refined, initial + self.residual_scale * residual)}
