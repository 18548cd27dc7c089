"""Intensity statistics of the target modality and its invertible mapping to the network range [-1, 1].

A translation model (MR -> CT) or a generation model (mask -> CT) predicts the target modality in
the network range [-1, 1]; its predictions must be written back in the original units (Hounsfield
units for CT). nnU-Net's ``CTNormalization`` clips to the 0.5/99.5 foreground percentiles, which
loses air, fat and dense cortical bone, so it cannot be inverted. The planner therefore keeps the
target channels unnormalised in the preprocessed data (nnU-Net's ``NoNormalization``: values stay
in HU) and records here a strictly monotone piecewise-linear mapping HU -> [-1, 1]:

- the range ``[lo, hi]`` is the target's full range in the training data (for CT, ``lo`` is not
  below -1200 HU: air with noise reaches about -1100 HU, and lower values are padding outside the
  field of view, written as -2048 or -3024 by some scanners);
- the foreground window (0.5 to 99.5 percentile inside the label masks, i.e. the spine) gets
  ``1 / TAIL_WEIGHT`` times more of the network range per HU than the tails outside it, so that bone
  and soft tissue are resolved finely and air is not wasted on.

Inside ``[lo, hi]`` the mapping is exactly invertible (float32 round trip error ~1e-3 HU); values
outside are clipped to ``lo``/``hi``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spinediff.errors import SpineDiffError
from spinediff.tasks import TaskSpec

PERCENTILES = (0.05, 0.5, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.5, 99.95)
AIR_FLOOR_HU = -1200.0
# A HU in the tails costs a quarter of a HU inside the foreground window (see module docstring).
TAIL_WEIGHT = 0.25
# The network range; diffusion models are trained on data in [-1, 1] (the Gaussian noise has unit std).
NETWORK_RANGE = (-1.0, 1.0)


def channel_units(channel_name: str) -> str:
    """'HU' for CT channels (named CT, as nnU-Net's normalisation lookup does), else arbitrary units."""
    return "HU" if re.search(r"(^|[^a-z])ct([^a-z]|$)", channel_name.casefold()) else "a.u."


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _piecewise_linear(x: Any, xp: tuple[float, ...], fp: tuple[float, ...]) -> Any:
    """Interpolate ``x`` through the knots (``xp`` strictly increasing), clipping outside; numpy or torch."""
    if _is_torch(x):
        out = x.new_full(x.shape, fp[0]) if x.is_floating_point() else x.float().new_full(x.shape, fp[0])
        x = x if x.is_floating_point() else x.float()
        for i in range(len(xp) - 1):
            slope = (fp[i + 1] - fp[i]) / (xp[i + 1] - xp[i])
            out = out + slope * (x - xp[i]).clamp(0.0, xp[i + 1] - xp[i])
        return out
    array = np.asarray(x)
    dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float32
    result = np.interp(array.astype(np.float64), xp, fp).astype(dtype)
    return result if isinstance(x, np.ndarray) else result.item() if result.ndim == 0 else result


@dataclass(frozen=True)
class ChannelIntensityMapping:
    """Monotone piecewise-linear map of one target channel: ``source_points`` -> ``network_points``."""

    name: str
    units: str
    source_points: tuple[float, ...]
    network_points: tuple[float, ...]

    def __post_init__(self) -> None:
        src, net = self.source_points, self.network_points
        if len(src) != len(net) or len(src) < 2:
            raise ValueError("source_points and network_points need the same length (>= 2)")
        if any(b <= a for a, b in zip(src, src[1:], strict=False)) or any(
                b <= a for a, b in zip(net, net[1:], strict=False)):
            raise ValueError(f"mapping knots must be strictly increasing: {src} -> {net}")
        if not (math.isclose(net[0], NETWORK_RANGE[0]) and math.isclose(net[-1], NETWORK_RANGE[1])):
            raise ValueError(f"network_points must span {NETWORK_RANGE}, got {net}")

    @property
    def clip_range(self) -> tuple[float, float]:
        return self.source_points[0], self.source_points[-1]

    def to_network(self, values: Any) -> Any:
        """Original units (e.g. HU) -> [-1, 1]; values outside :attr:`clip_range` are clipped."""
        return _piecewise_linear(values, self.source_points, self.network_points)

    def from_network(self, values: Any) -> Any:
        """[-1, 1] -> original units (the exact inverse of :meth:`to_network` inside the range)."""
        return _piecewise_linear(values, self.network_points, self.source_points)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "units": self.units, "mapping": "piecewise_linear",
                "source_points": [float(v) for v in self.source_points],
                "network_points": [float(v) for v in self.network_points],
                "clip_range": [float(v) for v in self.clip_range]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelIntensityMapping:
        return cls(str(data["name"]), str(data["units"]), tuple(float(v) for v in data["source_points"]),
                   tuple(float(v) for v in data["network_points"]))


@dataclass(frozen=True)
class TargetIntensity:
    """The typed view of the plans' ``diffusion.target_intensity`` block (one mapping per target channel).

    ``normalization`` is the nnU-Net scheme the preprocessed data of these channels went through; it is
    ``NoNormalization`` (values in original units), so the mapping applies directly to preprocessed data.
    """

    channels: tuple[int, ...]
    normalization: str
    mappings: tuple[ChannelIntensityMapping, ...]

    def _apply(self, values: Any, channel_axis: int, forward: bool) -> Any:
        if len(self.mappings) == 1 and values.shape[channel_axis] == 1:
            mapping = self.mappings[0]
            return mapping.to_network(values) if forward else mapping.from_network(values)
        if values.shape[channel_axis] != len(self.mappings):
            raise ValueError(f"expected {len(self.mappings)} target channels on axis {channel_axis}, "
                             f"got shape {tuple(values.shape)}")
        parts = []
        for i, mapping in enumerate(self.mappings):
            part = values.narrow(channel_axis, i, 1) if _is_torch(values) else np.take(values, [i], axis=channel_axis)
            parts.append(mapping.to_network(part) if forward else mapping.from_network(part))
        if _is_torch(values):
            import torch

            return torch.cat(parts, dim=channel_axis)
        return np.concatenate(parts, axis=channel_axis)

    def to_network(self, values: Any, channel_axis: int = 0) -> Any:
        """Target in original units, channels on ``channel_axis`` -> network range."""
        return self._apply(values, channel_axis, True)

    def from_network(self, values: Any, channel_axis: int = 0) -> Any:
        """Network output -> original units (e.g. HU), for writing predictions."""
        return self._apply(values, channel_axis, False)

    def to_dict(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "normalization": self.normalization,
                "per_channel": [m.to_dict() for m in self.mappings]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetIntensity:
        if not data or "per_channel" not in data:
            raise SpineDiffError("The plans' diffusion.target_intensity block is missing or incomplete; "
                                 "re-run `spinediff plan` for this dataset.")
        return cls(tuple(int(c) for c in data["channels"]), str(data["normalization"]),
                   tuple(ChannelIntensityMapping.from_dict(m) for m in data["per_channel"]))


def mapping_from_statistics(name: str, statistics: dict[str, Any]) -> ChannelIntensityMapping:
    """Build a channel's mapping from :func:`collect_target_statistics` output for that channel."""
    units = statistics.get("units", channel_units(name))
    lo, hi = float(statistics["min"]), float(statistics["max"])
    if units == "HU":
        lo = max(lo, AIR_FLOOR_HU)  # below noisy air is padding outside the field of view
    lo, hi = math.floor(lo), math.ceil(hi)
    if hi <= lo:
        hi = lo + 1.0
    window_source = statistics.get("foreground") or statistics["whole_image"]
    window = (float(window_source["percentiles"]["0.5"]), float(window_source["percentiles"]["99.5"]))
    knots = [lo]
    for value in window:
        if knots[-1] + 1e-3 < value < hi - 1e-3:
            knots.append(float(value))
    knots.append(hi)
    # weight each segment: the foreground window at 1, the tails at TAIL_WEIGHT
    weights = []
    for a, b in zip(knots, knots[1:], strict=False):
        inside = window[0] - 1e-6 <= a and b <= window[1] + 1e-6
        weights.append((b - a) * (1.0 if inside else TAIL_WEIGHT))
    cumulative = np.concatenate([[0.0], np.cumsum(weights)]) / sum(weights)
    network = tuple(float(NETWORK_RANGE[0] + (NETWORK_RANGE[1] - NETWORK_RANGE[0]) * c) for c in cumulative)
    network = (NETWORK_RANGE[0], *network[1:-1], NETWORK_RANGE[1])
    return ChannelIntensityMapping(name, units, tuple(float(k) for k in knots), network)


def _summary(samples: np.ndarray) -> dict[str, Any]:
    if samples.size == 0:
        return {}
    values = np.percentile(samples, PERCENTILES)
    return {"mean": float(samples.mean()), "std": float(samples.std()),
            "percentiles": {f"{p:g}": float(v) for p, v in zip(PERCENTILES, values, strict=True)}}


def collect_target_statistics(raw_dataset_folder: str | Path, dataset_json: dict[str, Any], spec: TaskSpec,
                              samples_per_case: int = 200_000, seed: int = 0,
                              show_progress_bar: bool = True) -> dict[str, Any]:
    """Fingerprint extras for the target channels of a translation/generation dataset.

    Per target channel: exact min/max over all training voxels (the HU range for CT), and percentiles
    (``PERCENTILES``) of the whole image and of the foreground (label > 0), from up to
    ``samples_per_case`` voxels drawn per case with a seeded generator.
    """
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from tqdm import tqdm

    from spinediff.io import read_image

    if not spec.task.has_image_target or not spec.target_channels:
        return {}
    import SimpleITK as sitk

    names = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    files = get_filenames_of_train_images_and_targets(str(raw_dataset_folder), dataset_json)
    rng = np.random.default_rng(seed)
    per_channel: dict[int, dict[str, Any]] = {
        c: {"min": math.inf, "max": -math.inf, "whole": [], "fg": []} for c in spec.target_channels}
    for case in tqdm(sorted(files), desc="Target intensity statistics", disable=not show_progress_bar):
        label = sitk.GetArrayFromImage(read_image(files[case]["label"])) > 0  # not a view: the image is freed at once
        for channel in spec.target_channels:
            if channel >= len(files[case]["images"]):
                raise SpineDiffError(
                    f"{Path(raw_dataset_folder) / 'dataset.json'}: spinediff.target_channels names channel "
                    f"{channel}, but case {case} has {len(files[case]['images'])} image channels.")
            image = sitk.GetArrayFromImage(read_image(files[case]["images"][channel])).astype(np.float32)
            if image.shape != label.shape:
                raise SpineDiffError(f"Case {case}: channel {channel} and the label map differ in shape "
                                     f"({image.shape} vs {label.shape}); run `spinediff validate`.")
            record = per_channel[channel]
            record["min"] = min(record["min"], float(image.min()))
            record["max"] = max(record["max"], float(image.max()))
            flat = image.ravel()
            record["whole"].append(rng.choice(flat, min(samples_per_case, flat.size), replace=False))
            foreground = image[label]
            if foreground.size:
                record["fg"].append(rng.choice(foreground, min(samples_per_case, foreground.size), replace=False))
    result: dict[str, Any] = {}
    for channel, record in per_channel.items():
        name = str(names.get(str(channel), names.get(channel, f"channel {channel}")))
        whole = np.concatenate(record["whole"])
        foreground = np.concatenate(record["fg"]) if record["fg"] else np.empty(0, np.float32)
        result[str(channel)] = {
            "name": name, "units": channel_units(name), "min": record["min"], "max": record["max"],
            "whole_image": _summary(whole), "foreground": _summary(foreground), "num_cases": len(files)}
    return result


def target_intensity_from_statistics(statistics: dict[str, Any], channels: tuple[int, ...],
                                     normalization: str = "NoNormalization") -> TargetIntensity:
    """The plans block for ``channels`` from :func:`collect_target_statistics` output."""
    mappings = tuple(mapping_from_statistics(statistics[str(c)]["name"], statistics[str(c)]) for c in channels)
    return TargetIntensity(tuple(channels), normalization, mappings)
