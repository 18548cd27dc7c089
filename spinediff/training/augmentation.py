"""Keep nnU-Net's intensity augmentation off the channels a model must reproduce.

nnU-Net applies its intensity transforms (noise, blur, brightness, contrast, low resolution,
gamma) to every image channel. For translation the target (e.g. CT) is an image channel: its values
must stay untouched, so those transforms are applied to the source channels only. For generation
every image channel is a target, so intensity augmentation is dropped. Spatial transforms (rotation,
scaling, mirroring) still act identically on source, target and labels.
"""

from __future__ import annotations

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

INTENSITY_TRANSFORMS = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
                        ContrastTransform, SimulateLowResolutionTransform, GammaTransform)


class ChannelSubsetTransform(BasicTransform):
    """Apply ``transform`` to the image channels ``channels`` only; the others pass through unchanged."""

    def __init__(self, transform: BasicTransform, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.transform = transform
        self.channels = list(channels)

    def __call__(self, **data_dict) -> dict:
        image = data_dict["image"]
        subset = dict(data_dict)
        subset["image"] = image[self.channels].clone()
        out = self.transform(**subset)
        image = image.clone()
        image[self.channels] = out["image"]
        data_dict["image"] = image
        return data_dict


def _is_intensity(transform: BasicTransform) -> bool:
    inner = transform.transform if isinstance(transform, RandomTransform) else transform
    return isinstance(inner, INTENSITY_TRANSFORMS)


def restrict_intensity_augmentation(transforms: BasicTransform, task) -> BasicTransform:
    """Rewrite nnU-Net's composed training transforms for ``task`` (a TaskAdapter)."""
    if not task.task.intensity_augmentation_on_condition_only or not isinstance(transforms, ComposeTransforms):
        return transforms
    kept = []
    for transform in transforms.transforms:
        if not _is_intensity(transform):
            kept.append(transform)
        elif task.source_channels:  # translation: the source channels only
            kept.append(ChannelSubsetTransform(transform, task.source_channels))
        # generation: every image channel is a target → no intensity augmentation
    return ComposeTransforms(kept)


def apply_planned_augmentation(trainer) -> None:
    """Follow the configuration's ``augmentation`` block (``spinediff plan``: labels with an order along an
    axis, such as vertebral levels) in any nnU-Net trainer, ours or nnU-Net's own: no mirroring along the
    ordered axes (in training and at test time) and rotations within ``max_rotation_degrees``."""
    import numpy as np
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    block = trainer.configuration_manager.configuration.get("augmentation")
    if not block:
        return
    original = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size

    def configure():
        rotation, dummy_2d, initial_patch_size, mirror_axes = original()
        mirror_axes = tuple(a for a in (mirror_axes or ()) if a in block.get("mirror_axes", mirror_axes))
        limit = block.get("max_rotation_degrees")
        if limit is not None:
            bound = float(limit) / 180.0 * np.pi
            rotation = (max(rotation[0], -bound), min(rotation[1], bound))
            patch_size = trainer.configuration_manager.patch_size
            dim = len(patch_size)
            initial_patch_size = get_patch_size(patch_size[-dim:], rotation, rotation, rotation, (0.85, 1.25))
            if dummy_2d:
                initial_patch_size[0] = patch_size[0]
        # nnU-Net's predictor asserts on an empty tuple: None means "no test-time mirroring"
        trainer.inference_allowed_mirroring_axes = mirror_axes or None
        trainer.print_to_log_file(f"Planned augmentation: mirror axes {mirror_axes}, rotation within "
                                  f"{np.degrees(rotation[1]):.0f} degrees (labels ordered along patch axes "
                                  f"{block.get('ordered_label_axes')}).")
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size = configure
