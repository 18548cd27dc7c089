"""The shared base of all spinediff trainers (a subclass of nnunetv2's ``nnUNetTrainer``).

It composes small, separately tested objects — the network built from the plans, the
:class:`~spinediff.diffusion.process.DiffusionProcess`, the
:class:`~spinediff.diffusion.volume.VolumePredictor`, the :class:`TaskAdapter` and the
:class:`WeightAverage` (EMA) — and keeps nnU-Net's data loading, augmentation, splits, logging,
progress plot and checkpoint layout. Subclasses only choose the task and, for baselines, the loss
and how a prediction is made.
Under torchrun the trainers are data-parallel (DDP) through :class:`DistributedTrainerMixin`.
"""

from __future__ import annotations

import os
from os.path import join

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from spinediff.datasets.dataset_json import check_ignore_label
from spinediff.diffusion.process import DiffusionProcess
from spinediff.diffusion.volume import VolumePredictor
from spinediff.errors import SpineDiffError
from spinediff.io import atomic_path, to_builtin
from spinediff.metrics.segmentation_metrics import dice_from_counts
from spinediff.planning.plans import PlannedConfiguration
from spinediff.prediction.core import FoldModel
from spinediff.prediction.sampling import SamplingRequest, SamplingSettings, resolve_sampling
from spinediff.tasks import Generation, Segmentation, Task, Translation
from spinediff.training.augmentation import restrict_intensity_augmentation
from spinediff.training.distributed import DistributedTrainerMixin
from spinediff.training.ema import WeightAverage
from spinediff.training.options import TrainingOptions
from spinediff.training.schedule import apply_schedule
from spinediff.training.task_adapter import TaskAdapter
from spinediff.training.validation import ValidationExporter, batch_image_scores, batch_segmentation_counts
from spinediff.utilities.precision import AutocastNetwork, as_float32, autocast, autocast_dtype
from spinediff.utilities.seeds import fold_seed

CUDA = torch.device("cuda")  # nnU-Net's default device argument


class SpineDiffTrainer(DistributedTrainerMixin, nnUNetTrainer):
    """Base of the diffusion trainers and the baselines that share their network and data."""

    #: True: the network denoises ``cat([condition, x_t])`` at a timestep. False: it maps the condition
    #: straight to the target (regression and Pix2Pix baselines; timestep fixed at 0).
    denoising: bool = True
    #: True: the condition also holds another model's answer (target channels) after the image channels
    #: (``ResidualRefinementTrainer``), so the network reads those channels too.
    reads_initial_answer: bool = False
    #: Tasks a trainer accepts (a dataset's ``spinediff.task``).
    supported_tasks: tuple[type[Task], ...] = (Segmentation, Translation, Generation)
    #: training needs a segmenter of the target modality (``TrainingOptions.perception_model``)
    needs_target_segmenter: bool = False
    #: prediction types ``--prediction-type`` may not ask for (monai's names), and why (spinediff.training.api)
    refused_prediction_types: tuple[str, ...] = ()
    refused_prediction_types_reason: str = ""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        config = self.configuration_manager.configuration
        if "diffusion" not in config:
            raise SpineDiffError(
                f"Configuration {configuration!r} has no diffusion block: {type(self).__name__} needs a spinediff "
                "configuration (2d_diffusion or 3d_diffusion from `spinediff plan`).")
        self.planned = PlannedConfiguration(configuration, self.configuration_manager, "plans")
        self.settings = self.planned.diffusion
        self.task = TaskAdapter.from_configuration(config, dataset_json, self.label_manager.num_segmentation_heads)
        if self.label_manager.has_ignore_label:
            check_ignore_label(self.task.task, self.plans_manager.dataset_name)
        if not isinstance(self.task.task, self.supported_tasks):
            supported = ", ".join(task.name for task in self.supported_tasks)
            raise SpineDiffError(f"{type(self).__name__} trains {supported} datasets; this "
                                 f"dataset's task is {self.task.task.name!r}.")
        if (self.task.condition_channels, self.task.output_channels) != (
                self.settings.condition_channels, self.settings.target_channels):
            raise SpineDiffError(
                f"The plans' diffusion block says {self.settings.condition_channels} condition and "
                f"{self.settings.target_channels} target channels, the dataset gives {self.task.condition_channels} "
                f"and {self.task.output_channels}; re-run `spinediff plan`.")
        self.process = DiffusionProcess.from_settings(self.settings)
        # Diffusion networks have one output (no deep supervision) and are trained with AdamW; 5e-4 is
        # higher than the 1e-4 of the reference works because CPU budgets give only hundreds of steps.
        self.enable_deep_supervision = False
        self.initial_lr = 5e-4
        self.weight_decay = 1e-4
        self.grad_clip = 1.0
        self.save_every = 1  # a checkpoint per epoch, so an interrupted run resumes where it stopped
        self.num_val_iterations_per_epoch = 4  # sampling-based validation costs steps × network calls
        self.epoch_validation_num_inference_steps = min(5, self.settings.num_inference_steps)
        self.num_inference_steps = self.settings.num_inference_steps
        #: samples averaged per case in the final validation: the plans' num_samples, as `spinediff predict` averages
        #: them, so that the cross-validation scores the prediction users get (TrainingOptions.validation_samples)
        self.final_validation_samples = self.settings.num_samples
        self.seed = 12345
        self.precision = "auto"  # autocast type: spinediff.utilities.precision (TrainingOptions.precision)
        # the diffusion noise's generator, seeded once in initialize() from the run's seed (TrainingOptions.seed may
        # change self.seed before), per fold (as prediction samples) and per rank under DDP
        self.generator = torch.Generator(device=self.device)
        self.ema: WeightAverage | None = None
        self._add_logging_keys()
        # a budget plan's epochs and iterations, also under `nnUNetv2_train -tr NAME` (which has no schedule flags)
        schedule = self.planned.schedule
        if schedule is not None:
            apply_schedule(self, schedule)

    def apply_options(self, options: TrainingOptions) -> None:
        """spinediff's options of a run (before :meth:`initialize`); nnU-Net's schedule attributes are set by
        :func:`spinediff.training.api.apply_options` for every trainer."""
        if options.num_inference_steps is not None:
            self.num_inference_steps = int(options.num_inference_steps)
        if options.validation_samples is not None:
            self.final_validation_samples = int(options.validation_samples)
        if options.precision is not None:
            autocast_dtype(options.precision, self.device)  # a clear error for an unknown value, now
            self.precision = options.precision

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The network's autocast type (None: float32), from :attr:`precision` and the device."""
        return autocast_dtype(self.precision, self.device)

    # ------------------------------------------------------------------ construction
    def _add_logging_keys(self) -> None:
        """Image tasks log PSNR and SSIM beside nnU-Net's keys (every key needs a value per epoch,
        or nnU-Net's progress plot breaks, so segmentation adds none)."""
        if self.task.task.writes_labels:
            return
        local = self.logger.local_logger if hasattr(self.logger, "local_logger") else self.logger
        for key in ("val_psnr", "val_ssim"):
            local.my_fantastic_logging.setdefault(key, [])

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = False) -> nn.Module:
        """The time-conditioned U-Net of the plans; channel counts come from the diffusion block.

        ``num_input_channels``/``num_output_channels`` (nnU-Net's image channels and label heads) are
        ignored: a translation network reads the source channels plus the noisy target, not all image
        channels, and outputs the target, not labels.
        """
        settings = PlannedConfiguration("", configuration_manager, "plans").diffusion
        inputs = (settings.condition_channels + (settings.target_channels if cls.reads_initial_answer else 0)
                  + (settings.target_channels if cls.denoising else 0))
        return get_network_from_plans(
            configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import, inputs, settings.target_channels,
            allow_init=True, deep_supervision=False)

    def initialize(self) -> None:
        super().initialize()
        self.generator.manual_seed(self.rank_seed(fold_seed(self.seed, self.fold)))
        # float16 needs loss scaling, bfloat16 and float32 do not (nnU-Net made a scaler for any CUDA device)
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        # Deep supervision is the network's and the loss's business only: nnU-Net's own flag stays off, so its
        # data loader does not build downsampled label maps (the loss downsamples the one-hot target itself).
        if self.settings.deep_supervision and hasattr(self.plain_network, "deep_supervision"):
            self.plain_network.deep_supervision = True
        self.ema = WeightAverage(self.plain_network, self.settings.ema_decay)
        if hasattr(self.ema.module, "deep_supervision"):
            self.ema.module.deep_supervision = False  # validation and prediction read the full resolution only

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        pass  # the time-conditioned U-Net has a single output

    def _build_loss(self):
        return None  # the diffusion process (or a baseline's compute_loss) owns the loss

    def _do_i_compile(self) -> bool:
        """torch.compile on CUDA, as nnU-Net decides it (its ``nnUNet_compile`` variable); never on the CPU, where
        compiling costs minutes that a short budget cannot win back."""
        return self.device.type == "cuda" and super()._do_i_compile()

    def configure_optimizers(self):
        # fused: one kernel for all parameters instead of ~10 ops per tensor (CPU step of the phantom's 2D
        # network: AdamW 14 -> 3 ms; benchmarks/perf_training_step.py)
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay,
                                      fused=self.device.type in ("cpu", "cuda"))
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's augmentation, with intensity transforms kept off the target channels."""
        transforms = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        return restrict_intensity_augmentation(transforms, self.task)

    @property
    def plain_network(self) -> nn.Module:
        """The network without DDP / compile wrappers."""
        network = self.network
        if hasattr(network, "module"):
            network = network.module
        return getattr(network, "_orig_mod", network)

    @property
    def inference_network(self) -> nn.Module:
        """What validation and prediction use: the EMA weights."""
        return self.ema.module if self.ema is not None else self.plain_network

    # ------------------------------------------------------------------ training
    def _labels(self, batch: dict) -> torch.Tensor:
        labels = batch["target"]
        labels = labels[0] if isinstance(labels, list) else labels
        return labels.to(self.device, non_blocking=True)

    def split_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        data = batch["data"].to(self.device, non_blocking=True)
        labels = self._labels(batch)
        return self.task.condition(data, labels), self.task.target(data, labels)

    def loss_mask(self, batch: dict) -> torch.Tensor | None:
        """Where the batch's target is known: None everywhere, except for a segmentation with nnU-Net's ignore label
        (its unannotated voxels count in no loss and no validation count)."""
        return self.task.loss_mask(self._labels(batch)) if self.label_manager.has_ignore_label else None

    def compute_loss(self, network: nn.Module, condition: torch.Tensor, target: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """Noise the target at random timesteps and score the network's prediction (diffusion); ``mask``
        (:meth:`loss_mask`): the voxels the loss counts (None: all)."""
        batch = self.process.prepare_training_batch(condition, target, self.generator, mask)
        with autocast(self.device, self.amp_dtype):  # the network only: schedule arithmetic and loss in float32
            output = as_float32(network(batch.network_input, batch.timesteps))
        if isinstance(output, (list, tuple)):
            return self.process.deep_supervision_loss(list(output), batch)
        return self.process.loss(output, batch)

    def masked_loss(self, network: nn.Module, condition: torch.Tensor, target: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
        """:meth:`compute_loss`, given the mask only where there is one: the trainers of tasks that cannot have an
        ignore label (translation, generation) keep a ``compute_loss`` of three arguments."""
        if mask is None:
            return self.compute_loss(network, condition, target)
        return self.compute_loss(network, condition, target, mask=mask)

    def train_step(self, batch: dict) -> dict:
        condition, target = self.split_batch(batch)
        mask = self.loss_mask(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.masked_loss(self.network, condition, target, mask)
        self.backward_and_step(loss, self.optimizer, self.network.parameters())
        self.ema.update(self.plain_network)
        return {"loss": loss.detach().cpu().numpy()}

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_parameters=None,
                          before_step=None) -> None:
        """Backward, gradient clipping and the optimiser step, through the gradient scaler under float16."""
        scaler = self.grad_scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if before_step is not None:
            before_step()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip_parameters is not None:
            torch.nn.utils.clip_grad_norm_(clip_parameters, self.grad_clip)
        if scaler is None:
            optimizer.step()
            return
        scaler.step(optimizer)
        scaler.update()

    # ------------------------------------------------------------------ prediction
    def make_predictor(self, **options) -> VolumePredictor:
        """The prediction core on the EMA network: DDIM sampling, or one step for a non-denoising trainer."""
        options.setdefault("window_batch_size", max(1, self.configuration_manager.batch_size))
        network = self.inference_network
        if self.amp_dtype is not None:
            network = AutocastNetwork(network, self.amp_dtype, self.device)
        return VolumePredictor(network, process=self.process if self.denoising else None,
                               patch_size=self.configuration_manager.patch_size, eta=self.settings.eta,
                               solver=self.settings.solver, warm_start=self.settings.warm_start,
                               device=self.device, **options)

    def predict_patches(self, condition: torch.Tensor, num_inference_steps: int, seed: int = 0) -> torch.Tensor:
        """x0 estimates for a batch of patch-sized conditions ``(B, C, *patch)``."""
        return self.make_predictor().predict_patches(condition, num_inference_steps=num_inference_steps, seed=seed)

    def fold_model(self) -> FoldModel:
        """This fold as ``spinediff predict`` loads it from the checkpoint (EMA network, diffusion settings, mirroring
        axes, window batch), for the prediction core (:mod:`spinediff.prediction.core`)."""
        return FoldModel(str(self.fold), self.inference_network, self.settings, self.process, self.denoising,
                         tuple(int(p) for p in self.configuration_manager.patch_size),
                         FoldModel.window_batch(self.configuration_manager.batch_size),
                         tuple(int(a) for a in self.inference_allowed_mirroring_axes or ()),
                         self.extra_checkpoint_state().get("sdedit"))

    def validation_sampling(self) -> SamplingSettings:
        """The final validation's sampling: the plans' solver, eta and warm start with this run's step count, samples
        (``final_validation_samples``) and precision; no mirroring (resolved as ``spinediff predict`` resolves its
        flags, :func:`spinediff.prediction.sampling.resolve_sampling`)."""
        request = SamplingRequest(num_samples=max(1, int(self.final_validation_samples)),
                                  num_inference_steps=self.num_inference_steps, precision=self.precision, tta=False)
        return resolve_sampling(self.settings, request, device=self.device, denoising=self.denoising,
                                plans_source="training")

    def validation_models(self, key: str, properties: dict, shape: tuple[int, ...]) -> list:
        """What predicts validation case ``key`` (preprocessed ``shape``) in the final validation: this fold (a
        refinement trainer wraps it to start from the case's initial answer)."""
        return [self.fold_model()]

    def predict_volume(self, condition: torch.Tensor, seed: int = 0, num_inference_steps: int | None = None,
                       num_samples: int = 1) -> torch.Tensor:
        """``(K, C, *spatial)`` x0 estimates for one preprocessed volume ``(C, *spatial)`` on the CPU, as the final
        validation samples (a 2D configuration predicts every slice of the first axis on its own, seeded per slice)."""
        sampling = self.validation_sampling().replace(
            num_inference_steps=num_inference_steps or self.settings.num_inference_steps,
            num_samples=num_samples if self.denoising else 1)
        return self.fold_model().predict(condition, seed, sampling)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict) -> dict:
        condition, target = self.split_batch(batch)
        mask = self.loss_mask(batch)
        loss = self.masked_loss(self.inference_network, condition, target, mask)
        estimate = self.predict_patches(condition, self.epoch_validation_num_inference_steps, seed=self.current_epoch)
        if self.task.task.writes_labels:
            return {"loss": loss.detach().cpu().numpy(), **batch_segmentation_counts(estimate, target, mask)}
        return {"loss": loss.detach().cpu().numpy(), **batch_image_scores(estimate, target)}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        outputs = collate_outputs(self.gather_across_ranks(val_outputs))  # all ranks: metrics of the global batch
        loss = float(np.mean(outputs["loss"]))
        if self.task.task.writes_labels:
            tp, fp, fn = (np.sum(outputs[k], 0) for k in ("tp_hard", "fp_hard", "fn_hard"))
            per_class = [float(d) for d in dice_from_counts(tp, fp, fn)]
            mean = float(np.nanmean(per_class)) if not np.all(np.isnan(per_class)) else 0.0
        else:
            # Image tasks: the "pseudo Dice" curve of nnU-Net's progress plot shows SSIM (in [0, 1]);
            # PSNR is logged beside it. The best checkpoint is chosen on its moving average.
            mean = float(np.mean(outputs["ssim"]))
            per_class = [mean]
            self.logger.log("val_psnr", float(np.mean(outputs["psnr"])), self.current_epoch)
            self.logger.log("val_ssim", mean, self.current_epoch)
        self.logger.log("mean_fg_dice", mean, self.current_epoch)
        self.logger.log("dice_per_class_or_region", per_class, self.current_epoch)
        self.logger.log("val_losses", loss, self.current_epoch)

    def on_epoch_end(self) -> None:
        if not self.task.task.writes_labels:
            psnr = self.logger.get_value("val_psnr", step=-1)
            steps = self.epoch_validation_num_inference_steps
            self.print_to_log_file(f"Validation PSNR (network range, {steps} steps): {psnr:.2f} dB")
        super().on_epoch_end()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """Predict every validation case of the fold, export it in raw geometry, and score it."""
        if self.local_rank != 0:
            return
        self.inference_network.eval()
        ValidationExporter(self).run(save_probabilities=save_probabilities)

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        """Subclasses add their own state (e.g. a discriminator)."""
        return {}

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        pass

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically, with the EMA weights as ``network_weights``
        (what prediction loads) and the raw weights, optimiser and RNG state for resuming."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        checkpoint = {
            "network_weights": self.inference_network.state_dict(),
            "training_weights": self.plain_network.state_dict(),
            "ema_updates": self.ema.num_updates if self.ema is not None else 0,
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": to_builtin(self.logger.get_checkpoint()),
            "_best_ema": to_builtin(self._best_ema),
            "current_epoch": self.current_epoch + 1,
            "init_args": to_builtin(self.my_init_kwargs),
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": to_builtin(self.inference_allowed_mirroring_axes),
            "generator_state": self.generator.get_state(),
            "spinediff": {"task": self.task.task.name, "diffusion": to_builtin(self.settings.to_dict()),
                          "denoising": self.denoising},
            **self.extra_checkpoint_state(),
        }
        with atomic_path(filename) as tmp:
            torch.save(checkpoint, tmp)

    def check_trained_as(self, checkpoint: dict | str | os.PathLike, source: str | os.PathLike | None = None) -> None:
        """Refuse a checkpoint whose network predicts something other than this trainer trains now (e.g. a
        ``ResidualRefinementTrainer`` fold trained in image mode, before the residual refiner predicted v): resumed,
        validated or reused, it would be scored as a model it is not."""
        if isinstance(checkpoint, (str, os.PathLike)):
            from spinediff.prediction.checkpoints import load_checkpoint

            source, checkpoint = checkpoint, load_checkpoint(checkpoint)
        trained = ((checkpoint.get("spinediff") or {}).get("diffusion") or {}).get("prediction_type")
        if trained is not None and trained != self.settings.prediction_type:
            folder = os.path.dirname(os.fspath(source)) if source is not None else self.output_folder
            raise SpineDiffError(f"{source or 'The checkpoint of ' + folder} was trained with prediction_type "
                                 f"{trained!r}; {type(self).__name__} trains {self.settings.prediction_type!r} on this "
                                 f"configuration now. Move or delete {folder} to train this fold again (nothing was "
                                 "changed).")

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(filename_or_checkpoint, (str, os.PathLike)):
            checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=True)
        self.check_trained_as(checkpoint, filename_or_checkpoint if isinstance(filename_or_checkpoint,
                                                                               (str, os.PathLike)) else None)
        self.plain_network.load_state_dict(checkpoint.get("training_weights", checkpoint["network_weights"]))
        self.ema.module.load_state_dict(checkpoint["network_weights"])
        self.ema.num_updates = int(checkpoint.get("ema_updates", 0))
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._add_logging_keys()
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        if "generator_state" in checkpoint:
            self.restore_generator(self.generator, checkpoint["generator_state"])
        self.load_extra_checkpoint_state(checkpoint)

    @property
    def validation_folder(self) -> str:
        return join(self.output_folder, "validation")
