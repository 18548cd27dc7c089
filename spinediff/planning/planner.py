"""``SpineDiffPlanner``: nnU-Net's experiment planner plus the diffusion configurations.

The planner keeps nnU-Net's own configurations (``2d``, ``3d_fullres``, ``3d_lowres`` when nnU-Net
makes it) exactly as nnU-Net plans them and adds ``2d_diffusion`` and ``3d_diffusion``. Each
diffusion configuration ``inherits_from`` the nnU-Net configuration with the same spacing
(``2d`` / ``3d_fullres``), so it reads the same preprocessed data as nnU-Net's baseline, and overrides
patch size, batch size and architecture (a time-conditioned U-Net sized by :mod:`.memory`), and adds
the ``diffusion`` block of the contract (``documentation/architecture.md``) and ``notes``.

On ``--device cpu`` it also adds ``2d_cpu`` / ``3d_fullres_cpu``: nnU-Net's own network and trainer
with the diffusion configuration's patch, batch and stage widths, so that a baseline comparison on
the CPU gives both sides the same topology budget (nnU-Net's GPU-sized defaults learn nothing here in
an hour, see ``shared/docs/nnunet-notes.md``).
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from spinediff.datasets.dataset_json import ignore_label
from spinediff.errors import SpineDiffError
from spinediff.io import read_json, write_json
from spinediff.paths import DEFAULT_PLANS
from spinediff.planning.memory import (
    Budget,
    FittedConfiguration,
    device_profile,
    fit_patch_and_batch,
    uses_real_network,
)
from spinediff.planning.plans import DERIVED, derived_configurations
from spinediff.planning.target_intensity import target_intensity_from_statistics
from spinediff.tasks import Task, TaskSpec, task_spec
from spinediff.version import __version__

DIFFUSION_NETWORK = "spinediff.networks.time_unet.TimeConditionedUNet"
DIFFUSION_NORM = "spinediff.networks.blocks.GroupNorm"
DIFFUSION_BASE = {"2d_diffusion": "2d", "3d_diffusion": "3d_fullres"}
CPU_BASELINES = {"2d_cpu": "2d_diffusion", "3d_fullres_cpu": "3d_diffusion"}
#: nnU-Net's own configurations that `spinediff plan -c` may ask for; nnU-Net adds its cascade with ``3d_lowres``
NNUNET_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
NNUNET_CASCADE = "3d_cascade_fullres"
OWN_CONFIGURATIONS = (*DIFFUSION_BASE, *CPU_BASELINES)
# Attention only where it is cheap: its memory grows with the square of the tokens of a stage.
MAX_ATTENTION_TOKENS = 1024


def diffusion_block(task: Task, condition_channels: int, target_channels: int, device: str,
                    target_intensity: dict[str, Any] | None) -> dict[str, Any]:
    """The contract's ``diffusion`` block with the defaults for ``task`` on ``device``.

    The task's own entries (:meth:`Task.diffusion_defaults`), and why:
    - prediction type: x0 ("image mode") for translation and segmentation: Graf et al. found image mode better
      than noise mode for MR->CT, and SpineSegDiff predicts the clean mask. Generation predicts the noise
      (epsilon) on a GPU, the standard DDPM objective of segmentation-guided generation, which favours diversity
      and detail over a regression to the mean image; on the CPU it predicts v, which at budgets of hundreds of
      steps learned far faster (phantom: MAE 112 vs 508 HU, Dice_gen 0.57 vs 0.20 at 600 steps each).
    - DDIM steps: Graf et al. sampled ~25 DDIM steps on a GPU and 5 on the CPU; SpineSegDiff 10-35 (the x0
      prediction of a mask settles after a few steps, so its lower end); generation from noise prediction
      needs more steps for texture (50; 10 on the CPU to keep sampling tolerable).
    - samples: ensembles of 5 (SpineSegDiff) give uncertainty maps and a better mean; a generated image is
      itself the product, so generation draws one sample per request.
    - loss: L1 for translation (Graf et al.); Dice + CE on the predicted clean mask for segmentation (as
      nnU-Net and SpineSegDiff's Diff-UNet-style code); MSE on the noise for generation (DDPM).
    - timestep power: segmentation draws training timesteps skewed to the noisy levels
      (t = T-1-floor(T u^3): 46 % in the noisiest tenth, 21 % in the cleaner half). With uniform timesteps
      half of the steps see a noisy mask that still shows the answer (cosine SNR > 1 for t < T/2) and teach
      copying; DDIM sampling from pure noise needs the noisy levels. Images keep DDPM's uniform draw.
    """
    on_cpu = device == "cpu"
    defaults = task.diffusion_defaults(on_cpu)
    return {
        "task": task.name,
        "condition_channels": int(condition_channels),
        "target_channels": int(target_channels),
        # T = 1000 and the cosine schedule: used by all three reference works (Graf et al.'s code,
        # SpineSegDiff, segmentation-guided generation); cosine keeps signal longer at small t, which
        # matters at the small image sizes of 2D slices.
        "num_train_timesteps": 1000,
        "noise_schedule": "cosine",
        "prediction_type": defaults["prediction_type"],
        # DDIM everywhere: deterministic (eta 0), few steps, used by all three works.
        "solver": "ddim",
        "num_inference_steps": defaults["num_inference_steps"],
        "eta": 0.0,
        "num_samples": defaults["num_samples"],
        # EMA: the averaging window 1 / (1 - decay) must be well below the number of training steps;
        # 0.999 (1000 steps) suits GPU schedules, CPU runs are a few thousand steps at most (0.995).
        "ema_decay": 0.995 if on_cpu else 0.999,
        "loss": defaults["loss"],
        # No classifier-free guidance by default: the condition (MR, image or mask) is always available
        # at prediction and none of the reference works used guidance.
        "condition_dropout": 0.0,
        "target_intensity": target_intensity,
        "timestep_power": defaults["timestep_power"],
    }


class SpineDiffPlanner(ExperimentPlanner):
    """nnU-Net's ``ExperimentPlanner`` that also writes ``2d_diffusion`` and ``3d_diffusion``.

    Args (beyond nnU-Net's):
        device: 'cuda' (size as nnU-Net would for ``memory_target_gb``) or 'cpu' (fit a step-time budget).
        memory_target_gb: GPU memory (cuda, default 8) or RAM (cpu, default 4) to plan for. On cuda it
            also sizes nnU-Net's own configurations; on cpu those keep nnU-Net's default 8 GB.
        target_statistics: :func:`~spinediff.planning.target_intensity.collect_target_statistics` output
            (required for translation and generation datasets).
    """

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = DEFAULT_PLANS,
                 overwrite_target_spacing: list[float] | tuple[float, ...] | None = None,
                 suppress_transpose: bool = False, *, device: str = "cuda", memory_target_gb: float | None = None,
                 target_statistics: dict[str, Any] | None = None, budget_seconds: float | None = None,
                 measure: bool = True, slicing: tuple[str, int] | None = None) -> None:
        self.profile = device_profile(device, memory_target_gb)
        #: (direction, array axis): 2D slices across that axis (transpose_forward puts it first); None: nnU-Net's rule
        self.slicing = slicing
        self.budget_seconds = budget_seconds
        self.measure = measure
        nnunet_gb = self.profile.memory_target_gb if device == "cuda" else gpu_memory_target_in_gb
        super().__init__(dataset_name_or_id, nnunet_gb, preprocessor_name, plans_name, overwrite_target_spacing,
                         suppress_transpose)
        self.task: TaskSpec = task_spec(self.dataset_json, Path(self.raw_dataset_folder) / "dataset.json")
        self._check_task()
        self.target_statistics = target_statistics or {}
        if self.task.task.has_image_target and not self.target_statistics:
            raise SpineDiffError(f"{self.dataset_name}: a {self.task.task.name} dataset needs the target channels' "
                                 "intensity statistics (collect_target_statistics) to plan.")
        self._saving_enabled = True

    # ------------------------------------------------------------------ nnU-Net overrides
    @staticmethod
    def static_estimate_VRAM_usage(patch_size: tuple[int, ...], input_channels: int, output_channels: int,
                                   arch_class_name: str, arch_kwargs: dict[str, Any],
                                   arch_kwargs_req_import: tuple[str, ...]) -> int:
        """nnU-Net's estimate (the same feature-map count), built on the meta device (no weights allocated)
        and without nnU-Net's ``torch.set_num_threads(nnUNet_n_proc_DA)``, which fails when that variable is
        0 (augmentation in the main process, as in our tests)."""
        import torch
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        with torch.device("meta"):
            network = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                             output_channels, allow_init=False)
        return network.compute_conv_feature_map_size(patch_size)

    def determine_transpose(self) -> tuple[list[int], list[int]]:
        """nnU-Net's transpose (the coarsest axis first), or with ``slicing`` the slicing axis first, the other two
        in their order: nnU-Net's own mechanism for the plane 2D configurations work in."""
        if self.slicing is None:
            return super().determine_transpose()
        axis = self.slicing[1]
        forward = [axis] + [a for a in range(3) if a != axis]
        return forward, [forward.index(a) for a in range(3)]

    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self) -> tuple[list[str], list[bool]]:
        """nnU-Net's schemes, except that target channels stay in original units (``NoNormalization``).

        The target is mapped to [-1, 1] by the invertible ``target_intensity`` mapping instead, because
        nnU-Net's CT normalisation clips and could not be undone when writing predictions in HU.
        """
        schemes, use_mask = super().determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        if self.task.task.has_image_target:
            for channel in self.task.target_channels:
                schemes[channel] = "NoNormalization"
                use_mask[channel] = False
        return schemes, use_mask

    def save_plans(self, plans: dict[str, Any]) -> None:
        """Write atomically; keep configurations of other planners that an existing file holds."""
        if not self._saving_enabled:
            return
        recursive_fix_for_json_export(plans)
        plans_file = self.plans_file
        if plans_file.is_file():
            old = read_json(plans_file).get("configurations", {})
            for name, configuration in old.items():
                if name not in plans["configurations"] and name not in OWN_CONFIGURATIONS \
                        and name not in (*NNUNET_CONFIGURATIONS, NNUNET_CASCADE) and DERIVED not in configuration:
                    plans["configurations"][name] = configuration
        write_json(plans, plans_file)

    @property
    def plans_file(self) -> Path:
        from nnunetv2.paths import nnUNet_preprocessed

        return Path(str(nnUNet_preprocessed)) / self.dataset_name / f"{self.plans_identifier}.json"

    def plan_experiment(self) -> dict[str, Any]:
        """nnU-Net's plan, then the diffusion configurations; writes the plans file once, at the end."""
        self._saving_enabled = False
        try:
            plans = super().plan_experiment()
        finally:
            self._saving_enabled = True
        self.add_diffusion_configurations(plans)
        self.plans = plans
        self.save_plans(plans)
        return plans

    # ------------------------------------------------------------------ diffusion configurations
    def _check_task(self) -> None:
        n_channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))
        origin = Path(self.raw_dataset_folder) / "dataset.json"
        channels = (*self.task.source_channels, *self.task.target_channels)
        bad = [c for c in channels if not 0 <= int(c) < n_channels]
        if bad:
            raise SpineDiffError(f"{origin}: spinediff block names channel(s) {bad}, but channel_names has "
                                 f"{n_channels} channel(s) (0..{n_channels - 1}).")
        problems = self.task.task.block_problems(list(self.task.source_channels), list(self.task.target_channels),
                                                 self.dataset_json.get("spinediff") or {})
        if problems:
            raise SpineDiffError(f"{origin}: {' '.join(problems)}")
        overlap = set(self.task.source_channels) & set(self.task.target_channels)
        if overlap:
            raise SpineDiffError(f"{origin}: channel(s) {sorted(overlap)} are both source and target.")

    def _num_label_channels(self) -> int:
        manager = LabelManager(self.dataset_json["labels"],
                               regions_class_order=self.dataset_json.get("regions_class_order"))
        return int(manager.num_segmentation_heads)

    def diffusion_channels(self) -> tuple[int, int]:
        """(condition_channels, target_channels) of the network for this dataset's task."""
        spec = self.task
        return spec.task.network_channels(len(spec.source_channels), len(spec.target_channels),
                                          self._num_label_channels())

    def _target_intensity(self) -> dict[str, Any] | None:
        if not self.task.task.has_image_target:
            return None
        return target_intensity_from_statistics(self.target_statistics, self.task.target_channels).to_dict()

    def _fullres_median_shape_and_voxels(self) -> tuple[np.ndarray, float]:
        # as nnU-Net's plan_experiment: median shape after resampling to the fullres spacing, transposed
        transpose_forward, _ = self.determine_transpose()
        spacing = self.determine_fullres_target_spacing()
        shapes = [compute_new_shape(shape, sp, spacing) for sp, shape in
                  zip(self.dataset_fingerprint["spacings"], self.dataset_fingerprint["shapes_after_crop"],
                      strict=True)]
        median = np.median(shapes, 0)[transpose_forward]
        return median, float(np.prod(median, dtype=np.float64) * self.dataset_json["numTraining"])

    def architecture_for(self, dim: int):
        """Callback for :func:`fit_patch_and_batch`: arch_kwargs of one topology (contract layout)."""
        base = self.profile.base_features
        max_features = self.profile.max_features[dim]

        def build(kernels: list[list[int]], strides: list[list[int]], patch: tuple[int, ...]) -> dict[str, Any]:
            n_stages = len(strides)
            bottleneck = np.asarray(patch) // np.prod(np.asarray(strides), axis=0)
            tokens = int(np.prod(bottleneck))
            return {
                "n_stages": n_stages,
                # nnU-Net's doubling per stage up to a cap (cpu: 16..128, see memory.device_profile)
                "features_per_stage": [min(max_features, base * 2**i) for i in range(n_stages)],
                "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
                "kernel_sizes": kernels,
                "strides": strides,
                "n_conv_per_stage": [2] * n_stages,
                "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                "conv_bias": True,
                # GroupNorm, not InstanceNorm: instance norm erases the per-image intensity level the
                # denoiser must read (see spinediff.networks.blocks.GroupNorm); 8 groups = 2 channels per
                # group at 16 features, the DDPM-style grouping that still works at CPU widths.
                "norm_op": DIFFUSION_NORM,
                "norm_op_kwargs": {"num_groups": 8, "eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                # SiLU: the smooth nonlinearity of DDPM/ADM U-Nets.
                "nonlin": "torch.nn.SiLU",
                "nonlin_kwargs": {"inplace": True},
                # 4 x base features, the DDPM convention for the sinusoidal embedding width.
                "time_embedding_dim": 4 * base,
                # Self-attention at the bottleneck only: global context (e.g. which vertebra level) at a
                # cost that is negligible there and quadratic in the tokens of finer stages.
                "attention_stages": [n_stages - 1] if tokens <= MAX_ATTENTION_TOKENS else [],
            }

        return build

    def plan_diffusion_configuration(self, name: str, base: dict[str, Any], n_voxels_dataset: float
                                     ) -> tuple[dict[str, Any], FittedConfiguration]:
        if self.budget_seconds is not None:
            return self.plan_budgeted_configuration(name, base, n_voxels_dataset)
        spacing = np.asarray(base["spacing"], dtype=float)
        median = np.asarray(base["median_image_size_in_voxels"], dtype=float)
        dim = len(spacing)
        condition, target = self.diffusion_channels()
        budget = Budget(self.profile, dim)
        fitted = fit_patch_and_batch(spacing, median, n_voxels_dataset, condition + target, target, budget,
                                     self.architecture_for(dim), self.UNet_featuremap_min_edge_length,
                                     self.max_dataset_covered)
        configuration = {
            "inherits_from": DIFFUSION_BASE[name],
            "batch_size": fitted.batch_size,
            "patch_size": list(fitted.patch_size),
            "architecture": {
                "network_class_name": DIFFUSION_NETWORK,
                "arch_kwargs": fitted.arch_kwargs,
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            },
            "diffusion": diffusion_block(self.task.task, condition, target, self.profile.device,
                                         self._target_intensity()),
            "planning": {
                "device": self.profile.device,
                "memory_target_gb": self.profile.memory_target_gb,
                "batch_limited_by": fitted.batch_limited_by,
                "patch_reductions": fitted.patch_reductions,
                "estimator": (f"{DIFFUSION_NETWORK}.compute_conv_feature_map_size" if uses_real_network()
                              else "PlainConvUNet count + diffusion correction (spinediff.planning.memory)"),
                **budget.describe(fitted.cost, fitted.batch_size),
            },
        }
        configuration["notes"] = self._notes(name, base, fitted, budget)
        return configuration, fitted

    def diffusion_architecture(self, arch_kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"network_class_name": DIFFUSION_NETWORK, "arch_kwargs": arch_kwargs,
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}

    def foreground_extent(self) -> np.ndarray | None:
        """Foreground extent in mm after transpose (computed once; see :mod:`.budget`)."""
        if not hasattr(self, "_extent"):
            from spinediff.planning.budget import foreground_extent_mm

            transpose_forward, _ = self.determine_transpose()
            self._extent = foreground_extent_mm(Path(self.raw_dataset_folder), self.dataset_json, self.task.task,
                                                list(transpose_forward))
        return self._extent

    def plan_budgeted_configuration(self, name: str, base: dict[str, Any], n_voxels_dataset: float
                                    ) -> tuple[dict[str, Any], FittedConfiguration]:
        """Budget mode (``--budget``): field of view first, spacing and patch for the time at hand, a measured
        step and a schedule that ends with the budget (:mod:`.budget_planner`)."""
        from spinediff.planning.budget_planner import budget_notes, fit_for_budget, schedule_from

        condition, target = self.diffusion_channels()
        fit = fit_for_budget(self, base, n_voxels_dataset, condition + target, target, self.foreground_extent())
        fitted = fit.fitted
        validation_batches = 2  # sampled validation: a few DDIM steps per batch
        schedule = schedule_from(self.budget_seconds, fit.step_seconds, fit.step_seconds_source, self.profile.device,
                                 validation_batches)
        configuration = {
            "inherits_from": DIFFUSION_BASE[name],
            **self._resampled(base, fit),
            "batch_size": fitted.batch_size,
            "patch_size": list(fitted.patch_size),
            "architecture": self.diffusion_architecture(fitted.arch_kwargs),
            "diffusion": diffusion_block(self.task.task, condition, target, self.profile.device,
                                         self._target_intensity()),
            "schedule": schedule.to_dict(),
            "planning": {
                "device": self.profile.device,
                "memory_target_gb": self.profile.memory_target_gb,
                "budget_seconds": self.budget_seconds,
                "foreground_extent_mm": None if fit.extent_mm is None else [round(float(e), 1) for e in fit.extent_mm],
                "required_field_of_view_mm": [round(float(f), 1) for f in fit.required_fov_mm],
                "patch_mm": [round(float(p), 1) for p in fit.patch_mm],
                "foreground_coverage": fit.coverage(),
                "spacing_factor": fit.spacing_factor,
                "fits_budget": bool(fitted.fits),
                "time_scale": round(fit.time_scale, 3),
                "batch_limited_by": fitted.batch_limited_by,
                "patch_reductions": fitted.patch_reductions,
            },
        }
        # the general notes, less their memory/step sizing line (the budget notes replace it)
        general = self._notes(name, {**base, "spacing": [float(v) for v in fit.spacing]}, fitted,
                              Budget(self.profile, len(fitted.patch_size)))
        configuration["notes"] = budget_notes(fit, schedule, self.budget_seconds) + [
            note for note in general if not note.startswith(("Sized for the CPU", "Sized as nnU-Net"))]
        self._budget_fits = getattr(self, "_budget_fits", {})
        self._budget_fits[name] = fit
        return configuration, fitted

    def ordered_label_axes(self) -> list[int]:
        """Array axes (before transpose) along which the training labels keep one order (segmentation only;
        see :mod:`.label_order`). Computed once."""
        if not hasattr(self, "_ordered"):
            from spinediff.planning.label_order import case_centroids_mm, ordered_axes

            self._ordered = []
            if self.task.task.writes_labels:
                centroids = case_centroids_mm(Path(self.raw_dataset_folder), self.dataset_json)
                self._ordered = ordered_axes(centroids, 3)
        return self._ordered

    def _add_augmentation(self, configuration: dict[str, Any], dim: int, base: dict[str, Any] | None = None) -> None:
        """Augmentation planned from the data (:mod:`.label_order`): mirroring and rotation that keep ordered labels
        (vertebral levels) in their order, shifts/zoom-outs/cuts of the field of view along the spine, and contrast
        augmentation (T1w/T2w) for MR segmentation. ``base``: the nnU-Net configuration it inherits from."""
        from spinediff.planning.label_order import augmentation_block, contrast_block, field_of_view_block

        merged = {**(base or {}), **configuration}
        block: dict[str, Any] = {}
        ordered = self.ordered_label_axes()
        transpose_forward, _ = self.determine_transpose()
        if ordered:
            order_block = augmentation_block(ordered, list(transpose_forward), dim)
            if order_block["ordered_label_axes"]:
                block.update(order_block)
                axes = ", ".join(str(a) for a in order_block["ordered_label_axes"])
                configuration.setdefault("notes", []).append(
                    f"The labels keep one order along patch axis {axes} in every training case (e.g. vertebral "
                    f"levels along the spine): no mirroring along it and rotations within "
                    f"{order_block['max_rotation_degrees']:g} degrees, so that training never shows the levels "
                    "upside down (nnU-Net mirrors every axis).")
            if merged.get("patch_size") is not None and merged.get("spacing") is not None:
                if not hasattr(self, "_extents"):
                    from spinediff.planning.label_order import case_extents_mm

                    self._extents = case_extents_mm(Path(self.raw_dataset_folder), self.dataset_json)
                fov = field_of_view_block(self._extents, ordered, list(transpose_forward),
                                          list(merged["patch_size"]), list(merged["spacing"])[-dim:])
                if fov:
                    ignore = ignore_label(self.dataset_json)
                    if ignore is not None:  # the cuts' labelled extent leaves it out
                        fov["ignore_label"] = ignore
                    block["field_of_view"] = fov
                    configuration.setdefault("notes", []).append(
                        f"Position and field of view along the spine (patch axis {fov['axis']}, levels "
                        f"{fov['level_pitch_mm']:g} mm apart, labelled extent {fov['labelled_extent_mm']:g} mm): "
                        f"shifts up to {fov['max_shift_fraction']:.0%} of the patch and zoom-outs to "
                        f"{fov['zoom_range'][0]:g} (p {fov['p_shift']:g}), field of view cut inside the labelled "
                        f"extent (p {fov['p_cut']:g}), the visible levels keeping their labels.")
        contrast = contrast_block(bool(self.task.task.writes_labels), list(merged.get("normalization_schemes") or []))
        if contrast:
            block["contrast"] = contrast
            configuration.setdefault("notes", []).append(
                "Contrast augmentation for T1w and T2w (MR segmentation): inversion (p {p_inversion:g}), a random "
                "non-monotone remapping (p {p_remap:g}), gamma in {gamma_range} (p {p_gamma:g}), a bias field "
                "(p {p_bias_field:g}); set augmentation.contrast.enabled to false in the plans to train "
                "without it.".format(**contrast))
        if block:
            configuration["augmentation"] = block

    def _resampled(self, base: dict[str, Any], fit) -> dict[str, Any]:
        """Spacing overrides of a budget configuration; its own preprocessed data when the spacing changed."""
        if fit.spacing_factor == 1.0:
            return {}
        tag = "x".join(f"{s:.3g}" for s in fit.spacing)
        return {"spacing": [float(s) for s in fit.spacing],
                "median_image_size_in_voxels": [round(float(m), 1) for m in fit.median_shape],
                "data_identifier": f"{base['data_identifier']}_{tag}mm"}

    def add_diffusion_configurations(self, plans: dict[str, Any]) -> None:
        """Add ``2d_diffusion``, ``3d_diffusion`` (when nnU-Net made 3d_fullres) and the CPU baselines."""
        configurations = plans["configurations"]
        _, n_voxels = self._fullres_median_shape_and_voxels()
        for name, base_name in DIFFUSION_BASE.items():
            if base_name not in configurations:
                continue
            base = configurations[base_name]
            configuration, fitted = self.plan_diffusion_configuration(name, base, n_voxels)
            self._add_augmentation(configuration, len(fitted.patch_size), base)
            configurations[name] = configuration
            if self.profile.device == "cpu" or self.budget_seconds is not None:
                baseline = {v: k for k, v in CPU_BASELINES.items()}[name]
                configurations[baseline] = self._cpu_baseline(base_name, base, fitted)
                if self.budget_seconds is not None:
                    self._budget_baseline(configurations[baseline], configuration, name)
                if "augmentation" in configuration:
                    configurations[baseline]["augmentation"] = deepcopy(configuration["augmentation"])
            # nnU-Net's own configuration too (nnUNetTrainer under `spinediff train` / the benchmark follows it;
            # nnUNetv2_train ignores the key)
            self._add_augmentation(base, len(base["patch_size"]), None)
            baseline_configuration = configurations.get({v: k for k, v in CPU_BASELINES.items()}[name])
            for own in (configuration, baseline_configuration):
                if "augmentation" in base and own is not None and "augmentation" not in own:
                    own["augmentation"] = {}  # planned for the other patch: not inherited
        configurations.update(derived_configurations(configurations))  # noise mode, v: trained on request
        plans["spinediff"] = {
            "planner": type(self).__name__,
            "version": __version__,
            "task": self.task.task.name,
            "device": self.profile.device,
            "memory_target_gb": self.profile.memory_target_gb,
            "budget_seconds": self.budget_seconds,
            "nnunet_memory_target_gb": self.UNet_vram_target_GB,
            "recommended_configuration": self.recommended_configuration(plans),
            "target_intensity_statistics": self.target_statistics or None,
        }

    def _cpu_baseline(self, base_name: str, base: dict[str, Any], fitted: FittedConfiguration) -> dict[str, Any]:
        architecture = deepcopy(base["architecture"])
        diffusion_kwargs = fitted.arch_kwargs
        architecture["arch_kwargs"].update({key: deepcopy(diffusion_kwargs[key]) for key in (
            "n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
            "n_conv_per_stage_decoder")})
        return {
            "inherits_from": base_name,
            "batch_size": fitted.batch_size,
            "patch_size": list(fitted.patch_size),
            "architecture": architecture,
            "notes": [f"nnU-Net's PlainConvUNet and trainer with the patch, batch and stage widths of "
                      f"{'2d' if len(fitted.patch_size) == 2 else '3d'}_diffusion: a CPU baseline with the same "
                      "topology budget (nnU-Net's GPU-sized defaults take seconds per step on this CPU)."],
        }

    def _budget_baseline(self, baseline: dict[str, Any], diffusion: dict[str, Any], name: str) -> None:
        """nnU-Net's trainer in the same budget plan: same spacing, patch and batch, its own measured step
        (PlainConvUNet with deep supervision) and its own schedule for the same budget."""
        from spinediff.planning.budget_planner import measure_or_estimate, schedule_from

        fit = self._budget_fits[name]
        for key in ("spacing", "median_image_size_in_voxels", "data_identifier"):
            if key in diffusion:
                baseline[key] = deepcopy(diffusion[key])
        n_channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))
        seconds, source = measure_or_estimate(fit.fitted, self.profile.device, n_channels, self._num_label_channels(),
                                              baseline["architecture"], measure=self.measure,
                                              time_scale=fit.time_scale, deep_supervision=True,
                                              time_conditioned=False)
        # nnU-Net's per-epoch validation is one forward pass per batch: 5 batches cost little
        schedule = schedule_from(self.budget_seconds, seconds, source, self.profile.device, 5)
        baseline["schedule"] = schedule.to_dict()
        baseline["planning"] = deepcopy(diffusion["planning"])
        baseline["notes"] = [baseline["notes"][0], *[n for n in diffusion["notes"] if n.startswith(
            ("Field of view", "Resolution traded"))],
            f"Schedule: {schedule.epochs} epochs x {schedule.iterations_per_epoch} iterations = {schedule.steps} steps "
            f"at {schedule.step_seconds:.3g} s/step ({schedule.step_seconds_source}), about "
            f"{schedule.expected_seconds / 60:.1f} min."]

    def anisotropy(self) -> float:
        spacing = self.determine_fullres_target_spacing()
        return float(max(spacing) / min(spacing))

    def recommended_configuration(self, plans: dict[str, Any]) -> str:
        configurations = plans["configurations"]
        if "3d_diffusion" not in configurations:
            return "2d_diffusion"
        if self.anisotropy() > ANISO_THRESHOLD or self.profile.device == "cpu":
            return "2d_diffusion"
        # On a GPU and near-isotropic data, 3D: Graf et al. found 3D translation more anatomically correct
        # (posterior elements) and better for downstream segmentation (Dice 0.80 vs 0.77).
        return "3d_diffusion"

    def _notes(self, name: str, base: dict[str, Any], fitted: FittedConfiguration, budget: Budget) -> list[str]:
        notes = []
        dim = len(fitted.patch_size)
        ratio = self.anisotropy()
        spacing = [round(float(s), 3) for s in base["spacing"]]
        kwargs = fitted.arch_kwargs
        inplane = sum(1 for k in kwargs["kernel_sizes"] if 1 in k)
        if dim == 3:
            if ratio > ANISO_THRESHOLD:
                notes.append(
                    f"Spacing {spacing} mm is strongly anisotropic (max/min {ratio:.1f} > {ANISO_THRESHOLD}, "
                    f"nnU-Net's threshold): the first {inplane} stage(s) use in-plane kernels and strides (size 1 "
                    "along the coarse axis) until voxels are near-isotropic, as nnU-Net's topology rules do. "
                    "2d_diffusion, which works in the fine plane, is the recommended configuration.")
            elif inplane:
                notes.append(f"Spacing {spacing} mm (max/min {ratio:.1f}): {inplane} stage(s) with in-plane "
                             "kernels until voxels are near-isotropic (nnU-Net's rules).")
            else:
                notes.append(f"Spacing {spacing} mm is near-isotropic (max/min {ratio:.1f}): 3x3x3 kernels and "
                             "isotropic strides in every stage.")
        else:
            note = (f"2D slices in the plane of the two finest axes (spacing {spacing} mm; transpose_forward puts "
                    "the coarsest axis first).")
            if self.slicing is not None:
                note = (f"2D slices in the {self.slicing[0]} plane (spinediff plan --slice-direction): "
                        f"transpose_forward puts array axis {self.slicing[1]}, the one closest to the "
                        f"{self.slicing[0]} normal, first (in-plane spacing {spacing} mm).")
            if ratio > ANISO_THRESHOLD:
                note += f" Recommended for this anisotropic data (max/min spacing {ratio:.1f})."
            notes.append(note)
        patch = "x".join(str(p) for p in fitted.patch_size)
        if self.profile.device == "cpu":
            notes.append(f"Sized for the CPU: step-time budget {self.profile.step_budget_seconds[dim]:g} s "
                         f"(estimated {fitted.cost.step_seconds(fitted.batch_size):.2f} s for batch "
                         f"{fitted.batch_size} at {patch}); features {kwargs['features_per_stage'][0]}-"
                         f"{max(kwargs['features_per_stage'])}. Patch shrunk {fitted.patch_reductions} time(s) from "
                         f"nnU-Net's initial patch; batch limited by {fitted.batch_limited_by}.")
        else:
            notes.append(f"Sized as nnU-Net sizes for a {self.profile.memory_target_gb:g} GB GPU, with the "
                         f"diffusion network's own feature-map count (input {sum(self.diffusion_channels())} "
                         f"channels, FiLM time conditioning, attention, no deep supervision): patch {patch}, "
                         f"batch {fitted.batch_size} (limited by {fitted.batch_limited_by}).")
        condition, target = self.diffusion_channels()
        notes.append(self.task.task.describe(condition, target))
        if kwargs["attention_stages"]:
            notes.append(f"Self-attention at stage {kwargs['attention_stages'][0]} (bottleneck).")
        return notes
