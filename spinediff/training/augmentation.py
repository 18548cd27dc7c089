"""Augmentation that a trainer takes from the plans, for any nnU-Net trainer (ours or nnU-Net's own).

1. **Intensity augmentation off the channels a model must reproduce.** nnU-Net applies its intensity
   transforms (noise, blur, brightness, contrast, low resolution, gamma) to every image channel. For
   translation the target (e.g. CT) is an image channel: its values must stay untouched, so those transforms
   are applied to the source channels only. For generation every image channel is a target, so intensity
   augmentation is dropped. Spatial transforms still act identically on source, target and labels.
2. **Labels in an order** (``augmentation`` block of the plans, :mod:`spinediff.planning.label_order`): no
   mirroring along the axes the levels are ordered along, rotations within a limit.
3. **Contrast** (``augmentation.contrast``): T1w and T2w differ by a non-monotone remapping of the tissue
   intensities (CSF bright in T2w, dark in T1w; fat bright in both), so a model that saw one weighting only
   learns intensities, not shapes. Intensity inversion (batchgeneratorsv2's ``InvertImageTransform``), a
   random non-monotone piecewise-linear remapping of the normalised intensities (:class:`RandomRemapTransform`:
   neither batchgeneratorsv2 nor MONAI has one; MONAI's ``RandHistogramShift`` is monotone), strong gamma
   (batchgeneratorsv2's ``GammaTransform``) and a multiplicative bias field (MONAI's ``RandBiasField``).
4. **Position and field of view along the spine** (``augmentation.field_of_view``): shifts and zoom-outs
   along the spine axis (MONAI's ``Affine``, labels with nearest neighbour) so that the vertebrae sit where the
   training scans never had them, and cuts of the field of view at a random height inside the labelled
   extent (:class:`FieldOfViewCutTransform`), so that a scan may start or end in the middle of L1 or L5. The
   labels of what stays visible keep their true values: the network must number the vertebrae it sees from the
   anatomy (the end it sees, the sacrum), not from where they sit in the patch.
5. **Elastic deformation** (``augmentation.elastic``, ``{"p": 0.3}``; not planned by default): nnU-Net's own
   spatial transform deforms that share of the patches elastically (nnU-Net leaves it off), shapes a few
   training subjects do not show (documentation/results.md, issue 34).
"""

from __future__ import annotations

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.intensity.inversion import InvertImageTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform
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


def _plain(tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (batchgeneratorsv2 and nnU-Net's collation expect those)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


def _standardise_like(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``x`` with the given mean and standard deviation (the normalised scale the network is used to)."""
    return (x - x.mean()) / x.std().clamp_min(1e-6) * std + mean


class RandomRemapTransform(ImageOnlyTransform):
    """A random non-monotone intensity remapping: the channel's intensities between its 0.5 and 99.5
    percentiles are mapped to [0, 1] and through a piecewise-linear curve through ``control_points`` random
    values (drawn uniformly in [0, 1], so the curve goes up and down: a tissue brighter than another may become
    darker, as CSF does between T2w and T1w); the mean and standard deviation of the channel are kept.
    ``synchronize``: one curve for every channel (channels that are views of one image, such as lateral context
    slices), else one draw per channel (channels of different contrasts)."""

    def __init__(self, control_points: tuple[int, int] = (3, 4), p_per_channel: float = 1.0,
                 synchronize: bool = False) -> None:
        super().__init__()
        self.control_points = (int(control_points[0]), int(control_points[1]))
        self.p_per_channel = float(p_per_channel)
        self.synchronize = bool(synchronize)

    def _curve(self) -> torch.Tensor:
        count = np.random.randint(self.control_points[0], self.control_points[1] + 1)
        return torch.as_tensor(np.random.uniform(0.0, 1.0, count), dtype=torch.float32)

    def get_parameters(self, **data_dict) -> dict:
        channels = range(data_dict["image"].shape[0])
        if self.synchronize:
            if np.random.uniform() >= self.p_per_channel:
                return {"curves": {}}
            curve = self._curve()
            return {"curves": {c: curve for c in channels}}
        return {"curves": {c: self._curve() for c in channels if np.random.uniform() < self.p_per_channel}}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        for channel, values in params["curves"].items():
            x = img[channel]
            mean, std = x.mean(), x.std()
            low, high = torch.quantile(x.flatten()[:: max(1, x.numel() // 100_000)].float(),
                                       torch.tensor([0.005, 0.995], dtype=torch.float32)).to(x.dtype)
            u = ((x - low) / (high - low).clamp_min(1e-6)).clamp(0, 1) * (len(values) - 1)
            index = u.floor().clamp(max=len(values) - 2).long()
            fraction = u - index
            curve = values.to(x.dtype)
            mapped = curve[index] * (1 - fraction) + curve[index + 1] * fraction
            img[channel] = _standardise_like(mapped, mean, std)
        return img


class BiasFieldTransform(ImageOnlyTransform):
    """A smooth multiplicative bias field (MONAI's ``RandBiasField``: exp of a random polynomial of ``degree``)
    on the channel's intensities shifted to be positive (a bias field multiplies signal, and the normalised
    intensities are centred at zero), with the channel's mean and standard deviation kept. ``synchronize``: one
    field for every channel (views of one image), else one per channel."""

    def __init__(self, degree: int = 3, coefficients: tuple[float, float] = (0.0, 0.2), p_per_channel: float = 1.0,
                 synchronize: bool = False):
        super().__init__()
        from monai.transforms import RandBiasField

        self.field = RandBiasField(degree=int(degree), coeff_range=tuple(coefficients), prob=1.0)
        self.p_per_channel = float(p_per_channel)
        self.synchronize = bool(synchronize)

    def get_parameters(self, **data_dict) -> dict:
        count = data_dict["image"].shape[0]
        if self.synchronize:
            channels = list(range(count)) if np.random.uniform() < self.p_per_channel else []
        else:
            channels = [c for c in range(count) if np.random.uniform() < self.p_per_channel]
        # MONAI keeps its own random state: seed it from numpy's, so that a seeded run stays reproducible
        return {"channels": channels, "seed": int(np.random.randint(0, 2**31 - 1))}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        if not params["channels"]:
            return img
        self.field.set_random_state(seed=params["seed"])
        for channel in params["channels"]:
            if self.synchronize:  # the same draw for every channel
                self.field.set_random_state(seed=params["seed"])
            x = img[channel]
            mean, std = x.mean(), x.std()
            positive = (x - x.min() + 0.1 * std.clamp_min(1e-6))[None]
            biased = _plain(self.field(positive.float())).to(x.dtype)[0]
            img[channel] = _standardise_like(biased, mean, std)
        return img


class SynchronizedGammaTransform(GammaTransform):
    """batchgeneratorsv2's ``GammaTransform`` with one draw for every channel: its ``synchronize_channels`` shares
    the gamma but still inverts each channel at random; here the inversion and the kept statistics are shared too."""

    def get_parameters(self, **data_dict) -> dict:
        params = super().get_parameters(**data_dict)
        for key in ("retain_stats", "invert_image"):
            if params[key] is not None and params[key].numel():
                params[key] = params[key][:1].expand_as(params[key]).clone()
        return params


def contrast_transforms(block: dict) -> list[BasicTransform]:
    """The contrast augmentation of a plans ``augmentation.contrast`` block (probabilities per transform)."""
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast

    if not block or not block.get("enabled", True):
        return []
    sync = bool(block.get("synchronize_channels", False))
    transforms: list[BasicTransform] = []
    if block.get("p_inversion", 0) > 0:  # batchgeneratorsv2 inverts every channel together by default
        transforms.append(RandomTransform(InvertImageTransform(p_invert_image=1.0), block["p_inversion"]))
    if block.get("p_remap", 0) > 0:
        transforms.append(RandomTransform(RandomRemapTransform(tuple(block.get("remap_control_points", (3, 4))),
                                                               synchronize=sync), block["p_remap"]))
    if block.get("p_gamma", 0) > 0:
        gamma = SynchronizedGammaTransform if sync else GammaTransform
        transforms.append(RandomTransform(gamma(
            gamma=BGContrast(tuple(block.get("gamma_range", (0.5, 2.0)))), p_invert_image=0.5,
            synchronize_channels=sync, p_per_channel=1, p_retain_stats=1), block["p_gamma"]))
    if block.get("p_bias_field", 0) > 0:
        transforms.append(RandomTransform(BiasFieldTransform(int(block.get("bias_field_degree", 3)),
                                                             tuple(block.get("bias_field_coefficients", (0.0, 0.2))),
                                                             synchronize=sync),
                                          block["p_bias_field"]))
    return transforms


class SpineShiftZoomTransform(BasicTransform):
    """Shift (and zoom out) a patch along the spine axis: MONAI's ``Affine`` on the image (linear) and the labels
    (nearest), the space that comes into view filled with zeros (the normalised background nnU-Net pads with) and
    background. ``max_shift``: fraction of the patch along the axis; ``zoom``: (min, max) scale (< 1 zooms out,
    the same on every axis, so that the anatomy keeps its shape)."""

    def __init__(self, axis: int, max_shift: float, zoom: tuple[float, float] = (1.0, 1.0)) -> None:
        super().__init__()
        self.axis, self.max_shift, self.zoom = int(axis), float(max_shift), (float(zoom[0]), float(zoom[1]))

    def get_parameters(self, **data_dict) -> dict:
        spatial = data_dict["image"].shape[1:]
        translate = [0.0] * len(spatial)
        translate[self.axis] = float(np.random.uniform(-self.max_shift, self.max_shift) * spatial[self.axis])
        return {"translate": translate, "zoom": float(np.random.uniform(*self.zoom))}

    def _affine(self, mode: str, params: dict):
        from monai.transforms import Affine

        dim = len(params["translate"])
        # MONAI's scale_params scale the sampling grid: > 1 shows more of the image (zoom out)
        return Affine(translate_params=params["translate"], scale_params=[1.0 / params["zoom"]] * dim,
                      mode=mode, padding_mode="zeros", image_only=True)

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        return _plain(self._affine("bilinear", params)(img.float())).to(img.dtype).contiguous()

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        out = self._affine("nearest", params)(segmentation.float())
        return _plain(out).round().to(segmentation.dtype).contiguous()


class FieldOfViewCutTransform(BasicTransform):
    """End the field of view at a random height: everything beyond a plane across the spine axis becomes
    zeros (image) and background (labels), on one side: the top (towards lower array indices, the first level's
    side) with probability ``p_top``, else the bottom. The plane lies inside the labelled extent of the patch (so
    it may cut a vertebra partially, L1 or L5 as well as a middle one), or anywhere in the patch when it holds no
    label; what stays visible keeps its true labels. ``ignore``: nnU-Net's ignore label, not part of the labelled
    extent. ``end_range`` (beyond, inside; fractions of the patch's length along the axis; optional): the plane lies
    near the end of the labelled extent on the cut's side instead, from ``end_range[0]`` beyond it (the T12 or the
    sacrum cut away, every level kept) to ``end_range[1]`` inside it (the first or last levels cut): the cuts remove
    the end a network might count from, not the middle of the spine."""

    def __init__(self, axis: int, max_fraction: float = 0.5, p_top: float = 0.5, ignore: int | None = None,
                 end_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.axis, self.max_fraction, self.p_top = int(axis), float(max_fraction), float(p_top)
        self.ignore = None if ignore is None else int(ignore)
        self.end_range = None if end_range is None else (float(end_range[0]), float(end_range[1]))

    def get_parameters(self, **data_dict) -> dict:
        image, seg = data_dict["image"], data_dict.get("segmentation")
        length = image.shape[1 + self.axis]
        top = bool(np.random.uniform() < self.p_top)
        low, high = 0, length
        if seg is not None:
            other = tuple(a for a in range(seg.ndim) if a != 1 + self.axis)
            labelled = (seg > 0) if self.ignore is None else (seg > 0) & (seg != self.ignore)
            present = torch.nonzero(torch.amax(labelled.to(torch.uint8), dim=other)).flatten()
            if present.numel():
                low, high = int(present.min()), int(present.max()) + 1
        limit = int(round(self.max_fraction * length))
        if self.end_range is not None and (low, high) != (0, length):
            beyond, inside = (int(round(f * length)) for f in self.end_range)
            if top:  # near the first level (the top end)
                low, high = max(0, low - beyond), min(high, low + inside)
            else:
                low, high = max(low, high - inside), min(length, high + beyond)
        # the cut removes at most max_fraction of the patch
        if top:
            cut = int(np.random.randint(low, max(low, min(high, limit)) + 1))
        else:
            cut = int(np.random.randint(min(high, max(low, length - limit)), high + 1))
        return {"region": (0, cut) if top else (cut, length)}

    def _cut(self, tensor: torch.Tensor, region: tuple[int, int]) -> torch.Tensor:
        index = [slice(None)] * tensor.ndim
        index[1 + self.axis] = slice(*region)
        tensor[tuple(index)] = 0
        return tensor

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        return self._cut(img, params["region"])

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        return self._cut(segmentation, params["region"])


def _end_range(block: dict) -> tuple[float, float] | None:
    """``cut_near_ends`` ([level pitches beyond, inside] the labelled extent's end) as fractions of the patch, from
    the block's level pitch and patch extent; None (cuts anywhere in the labelled extent) without it."""
    near = block.get("cut_near_ends")
    if not near:
        return None
    pitch = float(block["level_pitch_mm"]) / float(block["patch_extent_mm"])
    return float(near[0]) * pitch, float(near[1]) * pitch


def field_of_view_transforms(block: dict) -> list[BasicTransform]:
    """The position and field-of-view augmentation of a plans ``augmentation.field_of_view`` block."""
    if not block or not block.get("enabled", True) or block.get("axis") is None:
        return []
    axis = int(block["axis"])
    transforms: list[BasicTransform] = []
    if block.get("p_shift", 0) > 0:
        transforms.append(RandomTransform(SpineShiftZoomTransform(axis, block.get("max_shift_fraction", 0.25),
                                                                  tuple(block.get("zoom_range", (0.75, 1.0)))),
                                          block["p_shift"]))
    if block.get("p_cut", 0) > 0:
        transforms.append(RandomTransform(FieldOfViewCutTransform(axis, block.get("max_cut_fraction", 0.5),
                                                                  block.get("p_cut_top", 0.5),
                                                                  block.get("ignore_label"), _end_range(block)),
                                          block["p_cut"]))
    return transforms


def elastic_probability(block: dict) -> float:
    """The probability of an ``augmentation.elastic`` block (``{"p": 0.3}``): nnU-Net's spatial transform deforms
    that share of the training patches elastically, with its own deformation scale and magnitude (nnU-Net leaves it
    off). 0 without the block or with ``enabled: false``."""
    if not block or not block.get("enabled", True):
        return 0.0
    from spinediff.planning.plans import elastic_share

    return elastic_share(block)  # the plans check's rule (ValueError outside 0-1)


def insert_planned_transforms(transforms: BasicTransform, block: dict, condition_channels=None) -> BasicTransform:
    """nnU-Net's composed training transforms with the planned position/field-of-view transforms right after the
    spatial transform and the contrast transforms after nnU-Net's own intensity transforms (before mirroring);
    the planned elastic deformation (``augmentation.elastic``) switched on in nnU-Net's spatial transform.
    ``condition_channels``: the image channels contrast augmentation may touch (None: all)."""
    spatial = field_of_view_transforms(block.get("field_of_view") or {})
    contrast = contrast_transforms(block.get("contrast") or {})
    p_elastic = elastic_probability(block.get("elastic") or {})
    if not (spatial or contrast or p_elastic) or not isinstance(transforms, ComposeTransforms):
        return transforms
    if p_elastic:
        for transform in transforms.transforms:
            if isinstance(transform, SpatialTransform):
                transform.p_elastic_deform = p_elastic
    if condition_channels is not None:
        if not condition_channels:
            contrast = []
        contrast = [ChannelSubsetTransform(t, tuple(condition_channels)) for t in contrast]
    items = list(transforms.transforms)
    after_spatial = 0
    for i, transform in enumerate(items):
        if isinstance(transform, (SpatialTransform, Convert2DTo3DTransform)):
            after_spatial = i + 1
    items[after_spatial:after_spatial] = spatial
    last_intensity = max([i for i, t in enumerate(items) if _is_intensity(t) or isinstance(t, ChannelSubsetTransform)]
                         or [after_spatial + len(spatial) - 1])
    items[last_intensity + 1:last_intensity + 1] = contrast
    return ComposeTransforms(items)


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
    _add_planned_transforms(trainer, block)


def _add_planned_transforms(trainer, block: dict) -> None:
    """Wrap the trainer's ``get_training_transforms`` (nnU-Net's static method or a spinediff override) so that
    the planned contrast, field-of-view and elastic transforms join nnU-Net's pipeline."""
    described = [name for name in ("contrast", "field_of_view", "elastic")
                 if (block.get(name) or {}).get("enabled", True) and block.get(name)]
    if not described or not hasattr(trainer, "get_training_transforms"):
        return  # none planned, or all switched off in the plans (enabled: false)
    original = trainer.get_training_transforms
    task = getattr(trainer, "task", None)
    channels = None
    if task is not None and task.task.intensity_augmentation_on_condition_only:
        channels = tuple(task.source_channels)

    def get_training_transforms(*args, **kwargs):
        return insert_planned_transforms(original(*args, **kwargs), block, channels)

    trainer.get_training_transforms = get_training_transforms
    trainer.print_to_log_file(f"Planned augmentation: {' and '.join(described)} "
                              f"({ {k: block[k] for k in described} }).")
