"""Memory and compute model of the time-conditioned diffusion U-Net, used to pick patch and batch size.

nnU-Net sizes its networks by counting the elements of all convolution outputs of one forward pass
(``compute_conv_feature_map_size``) and comparing that count with a reference value measured on an
8 GB GPU. We do the same for ``--device cuda`` so that a diffusion configuration on a GPU of
``G`` GB is what nnU-Net would choose there, with three differences of the diffusion network
accounted for:

- the input has ``condition + target`` channels and the network predicts ``target`` channels;
  the loss needs the clean target, the noise, the noisy target and the prediction (counted below);
- every conv block adds a broadcast time embedding (one more feature map per block);
- there is no deep supervision (no low-resolution output heads).

On ``--device cpu`` memory is rarely the limit; time is. There the model estimates the seconds of one
training step from the convolution FLOPs and the number of elements that element-wise layers
(GroupNorm, SiLU, the time-embedding addition) touch, with constants measured on the project's
2-core machine (see ``CPU_*`` below), and fits patch and batch into a per-step time budget.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

# --- nnU-Net's reference point (default_experiment_planner.ExperimentPlanner): a network whose feature
# maps count 85e6 (2D) / 560e6 (3D) elements at batch 12 (2D) / 2 (3D) fits an 8 GB GPU with AMP.
# We reuse these numbers so that cuda plans scale exactly as nnU-Net's do.
NNUNET_REFERENCE_ELEMENTS = {2: 85_000_000, 3: 560_000_000}
NNUNET_REFERENCE_BATCH = {2: 12, 3: 2}
NNUNET_REFERENCE_GB = 8.0

# --- CPU constants, measured on the project's machine (2 cores, torch 2.x, fp32, PlainConvUNet-like
# networks with 16-128 features; fastest of several steps, the machine being shared):
#   2D 64x64 b8 0.14 s, 2D 96x96 b8 0.27 s, 2D 128x128 b4 0.31 s, 2D 128x128 b8 (32-256 features) 1.8 s,
#   3D 32^3 b2 0.27 s, 3D 48^3 b2 0.75 s.
# A least-squares fit (relative error) of
# ``time = 3 * flops / CPU_FLOPS_PER_SECOND + 3 * elements * CPU_SECONDS_PER_ELEMENT`` (forward + backward)
# to these gave the two constants; every measurement is predicted within 15 %.
CPU_FLOPS_PER_SECOND = 120e9
CPU_SECONDS_PER_ELEMENT = 2.3e-9
# fp32 training keeps about four tensors per counted conv output for the backward pass (conv output,
# normalised, activated, gradient buffer): 16 bytes per element.
CPU_BYTES_PER_ELEMENT = 16
# Per parameter: weight, gradient, two Adam moments and the EMA copy (fp32).
BYTES_PER_PARAMETER = 20


def gb_per_element(dim: int) -> float:
    """GPU memory per feature-map element implied by nnU-Net's reference: the reference count times the
    reference batch fills 8 GB (nnU-Net's batch rule is ``round(reference / estimate * reference_batch)``)."""
    return NNUNET_REFERENCE_GB / (NNUNET_REFERENCE_ELEMENTS[dim] * NNUNET_REFERENCE_BATCH[dim])


@dataclass(frozen=True)
class DeviceProfile:
    """What the planner may spend on one training step, and the network width it starts from."""

    device: str
    memory_target_gb: float
    base_features: int
    max_features: dict[int, int]
    min_batch_size: dict[int, int]
    step_budget_seconds: dict[int, float] | None  # cpu only

    def describe(self) -> str:
        if self.device == "cpu":
            budget = ", ".join(f"{d}D {s:g} s" for d, s in sorted((self.step_budget_seconds or {}).items()))
            return f"cpu: step budget {budget}, memory target {self.memory_target_gb:g} GB"
        return f"cuda: memory target {self.memory_target_gb:g} GB (nnU-Net's reference scaled from 8 GB)"


def device_profile(device: str, memory_target_gb: float | None = None) -> DeviceProfile:
    """The planning budget for ``device`` ('cpu' or 'cuda')."""
    if device == "cuda":
        # nnU-Net's own widths (32 base, 512/320 max features) and minimum batch of 2: on a GPU we want
        # exactly what nnU-Net would choose, so the only difference is the network's own cost.
        return DeviceProfile("cuda", float(memory_target_gb or NNUNET_REFERENCE_GB), 32, {2: 512, 3: 320},
                             {2: 2, 3: 2}, None)
    if device == "cpu":
        # 16 base features capped at 128: the notes measured 0.14 s for such a 2D net at 64x64 b8, whereas
        # nnU-Net's 32-512 widths cost seconds per step here. The 2D budget of 0.3 s keeps a step "well
        # under a second" even when the 2 cores are shared; 3D gets 1.5 s because a 3D patch needs some
        # depth to be useful at all. Minimum batch 4 in 2D: a diffusion step draws one timestep per sample,
        # and with 2 samples the loss over noise levels is too noisy to train in a few thousand steps.
        return DeviceProfile("cpu", float(memory_target_gb or 4.0), 16, {2: 128, 3: 128}, {2: 4, 3: 2},
                             {2: 0.3, 3: 1.5})
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


@dataclass(frozen=True)
class NetworkCost:
    """Cost of one training sample (batch size 1) of a diffusion network at one patch size."""

    feature_map_elements: int  # in nnU-Net's units (conv outputs), plus the diffusion corrections
    plain_unet_elements: int  # what PlainConvUNet.compute_conv_feature_map_size counts (no corrections)
    io_elements: int  # input, clean target, noise, noisy target, prediction: held by the training step
    elementwise_elements: int  # elements touched by norm / nonlinearity / embedding additions
    forward_flops: float
    parameters: int

    def step_seconds(self, batch_size: int) -> float:
        """Estimated seconds of one training step on the project's 2-core CPU."""
        training_flops = 3.0 * self.forward_flops  # backward ~ twice the forward
        per_sample = training_flops / CPU_FLOPS_PER_SECOND + 3.0 * self.elementwise_elements * CPU_SECONDS_PER_ELEMENT
        return batch_size * per_sample

    def cpu_memory_gb(self, batch_size: int) -> float:
        return (batch_size * self.feature_map_elements * CPU_BYTES_PER_ELEMENT
                + self.parameters * BYTES_PER_PARAMETER) / 1024**3

    def cuda_memory_gb(self, batch_size: int, dim: int) -> float:
        """GPU memory implied by nnU-Net's reference (8 GB for the reference element count at its batch)."""
        return batch_size * self.feature_map_elements * gb_per_element(dim)


def _stage_sizes(patch_size: tuple[int, ...], strides: list[list[int]]) -> list[list[int]]:
    sizes, current = [], list(patch_size)
    for stride in strides:
        current = [c // s for c, s in zip(current, stride, strict=True)]
        sizes.append(current)
    return sizes


def analytic_cost(patch_size: tuple[int, ...], arch_kwargs: dict[str, Any], input_channels: int,
                  output_channels: int) -> NetworkCost:
    """FLOPs, element counts and parameters of a PlainConvUNet-style network with time embedding.

    Counted per sample: every convolution of the encoder and decoder (decoder convs see the
    concatenated skip), the transposed convolutions, the 1x1 output conv, one time-embedding
    projection per block and self-attention at ``attention_stages``.
    """
    features = [int(f) for f in arch_kwargs["features_per_stage"]]
    kernels = [list(k) for k in arch_kwargs["kernel_sizes"]]
    strides = [list(s) for s in arch_kwargs["strides"]]
    n_conv = list(arch_kwargs["n_conv_per_stage"])
    n_conv_dec = list(arch_kwargs["n_conv_per_stage_decoder"])
    time_dim = int(arch_kwargs.get("time_embedding_dim", 0) or 0)
    attention = set(arch_kwargs.get("attention_stages", []) or [])
    sizes = _stage_sizes(tuple(patch_size), strides)
    voxels = [int(np.prod(s, dtype=np.int64)) for s in sizes]

    flops = 0.0
    elements = 0
    params = 0
    conv_outputs = 0
    corrections = 0

    def conv(c_in: int, c_out: int, kernel: list[int], n_vox: int) -> None:
        nonlocal flops, params, elements, conv_outputs
        taps = int(np.prod(kernel))
        flops += 2.0 * taps * c_in * c_out * n_vox
        params += taps * c_in * c_out + c_out
        conv_outputs += c_out * n_vox
        elements += 2 * c_out * n_vox  # norm + nonlinearity

    def block_embedding(c_out: int, n_vox: int) -> None:
        nonlocal flops, params, elements, corrections
        if time_dim:
            params += time_dim * c_out + c_out
            flops += 2.0 * time_dim * c_out
            elements += c_out * n_vox  # broadcast addition creates one more map
            corrections += c_out * n_vox

    def self_attention(channels: int, n_tokens: int) -> None:
        nonlocal flops, params, elements, corrections
        flops += 2.0 * n_tokens * channels * 4 * channels + 4.0 * n_tokens**2 * channels
        params += 4 * channels * channels
        heads = max(1, channels // 64)
        corrections += 4 * channels * n_tokens + heads * n_tokens**2  # q, k, v, out; attention weights
        elements += heads * n_tokens**2 * 2 + 2 * channels * n_tokens

    c_in = input_channels
    for s, c in enumerate(features):
        for i in range(n_conv[s]):
            conv(c_in if i == 0 else c, c, kernels[s], voxels[s])
        block_embedding(c, voxels[s])
        if s in attention:
            self_attention(c, voxels[s])
        c_in = c
    for s in range(len(features) - 2, -1, -1):
        # transposed conv with kernel = stride: one tap per output voxel
        flops += 2.0 * features[s + 1] * features[s] * voxels[s]
        params += int(np.prod(strides[s + 1])) * features[s + 1] * features[s]
        conv_outputs += features[s] * voxels[s]
        for i in range(n_conv_dec[s]):
            conv(2 * features[s] if i == 0 else features[s], features[s], kernels[s], voxels[s])
        block_embedding(features[s], voxels[s])
    conv(features[0], output_channels, [1] * len(patch_size), voxels[0])
    # input, clean target, noise, noisy target, prediction (and its gradient) per voxel
    n_full = int(np.prod(patch_size, dtype=np.int64))
    io_elements = n_full * (input_channels + 4 * output_channels)
    # time embedding MLP (sinusoidal -> dim -> dim)
    params += 2 * time_dim * time_dim
    return NetworkCost(int(conv_outputs + corrections + io_elements), int(conv_outputs), int(io_elements),
                       int(elements + io_elements), flops, int(params))


def _real_network_class() -> Any | None:
    """The project's TimeConditionedUNet if it is importable (another package owns it)."""
    try:
        from spinediff.networks.time_unet import TimeConditionedUNet  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - any import problem means "not available yet"
        return None
    return TimeConditionedUNet if hasattr(TimeConditionedUNet, "compute_conv_feature_map_size") else None


def estimate_cost(patch_size: tuple[int, ...], arch_kwargs: dict[str, Any], input_channels: int,
                  output_channels: int) -> NetworkCost:
    """Cost of one sample; the feature-map count is in nnU-Net's units (see ``NNUNET_REFERENCE_ELEMENTS``).

    Uses ``TimeConditionedUNet.compute_conv_feature_map_size`` (plus the input/target/noise/prediction
    tensors of the training step, which grow with the channels) when that network exists. Until then the
    count is dynamic_network_architectures' ``PlainConvUNet`` count (computed analytically, identical to
    ``PlainConvUNet.compute_conv_feature_map_size``; InstanceNorm/LeakyReLU there stand in for
    GroupNorm/SiLU, which produce maps of the same size) plus the diffusion corrections: one
    time-embedding map per block, attention maps, and the input/target/noise/prediction tensors.
    """
    cost = analytic_cost(patch_size, arch_kwargs, input_channels, output_channels)
    if _real_network_class() is None:
        return cost
    count = _real_feature_map_size(tuple(int(p) for p in patch_size), json.dumps(arch_kwargs, sort_keys=True),
                                   int(input_channels), int(output_channels))
    # the network's count covers its own maps; the step's input/target/noise tensors come on top
    return cost if count is None else replace(cost, feature_map_elements=count + cost.io_elements)


@functools.lru_cache(maxsize=512)
def _real_feature_map_size(patch_size: tuple[int, ...], arch_kwargs_json: str, input_channels: int,
                           output_channels: int) -> int | None:
    """``TimeConditionedUNet.compute_conv_feature_map_size``, built on the meta device (no weights allocated)."""
    import torch

    try:
        with torch.device("meta"):
            network = _instantiate(_real_network_class(), json.loads(arch_kwargs_json), input_channels,
                                   output_channels)
        return int(network.compute_conv_feature_map_size(patch_size))
    except Exception:  # noqa: BLE001 - a network under construction must not break planning
        return None


def uses_real_network() -> bool:
    """Whether estimates come from ``spinediff.networks.time_unet`` (else from the documented correction)."""
    return _real_network_class() is not None


def _instantiate(network_class: Any, arch_kwargs: dict[str, Any], input_channels: int, output_channels: int):
    import pydoc

    kwargs = dict(arch_kwargs)
    for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = pydoc.locate(kwargs[key])
    return network_class(input_channels=input_channels, num_classes=output_channels, **kwargs)


@dataclass(frozen=True)
class Budget:
    """Decides whether a (patch, batch) fits and how large the batch may grow."""

    profile: DeviceProfile
    dim: int
    #: measured / estimated step time on this machine (a ``--budget`` plan calibrates the CPU model)
    time_scale: float = 1.0

    @property
    def min_batch(self) -> int:
        return self.profile.min_batch_size[self.dim]

    def step_seconds(self, cost: NetworkCost, batch_size: int) -> float:
        return cost.step_seconds(batch_size) * self.time_scale

    def reference_elements(self) -> float:
        return NNUNET_REFERENCE_ELEMENTS[self.dim] * self.profile.memory_target_gb / NNUNET_REFERENCE_GB

    def fits(self, cost: NetworkCost, batch_size: int) -> bool:
        if self.profile.device == "cuda":
            # nnU-Net's test: estimate / reference_batch * batch <= reference (for the target GB)
            limit = self.reference_elements() * NNUNET_REFERENCE_BATCH[self.dim]
            return cost.feature_map_elements * batch_size <= limit
        budget = (self.profile.step_budget_seconds or {})[self.dim]
        return (self.step_seconds(cost, batch_size) <= budget
                and cost.cpu_memory_gb(batch_size) <= self.profile.memory_target_gb)

    def largest_batch(self, cost: NetworkCost) -> int:
        if self.profile.device == "cuda":
            # nnU-Net: round(reference / estimate * reference_batch)
            return int(round(self.reference_elements() / cost.feature_map_elements * NNUNET_REFERENCE_BATCH[self.dim]))
        budget = (self.profile.step_budget_seconds or {})[self.dim]
        by_time = math.floor(budget / max(self.step_seconds(cost, 1), 1e-9))
        by_memory = math.floor((self.profile.memory_target_gb * 1024**3 - cost.parameters * BYTES_PER_PARAMETER)
                               / max(cost.feature_map_elements * CPU_BYTES_PER_ELEMENT, 1))
        return int(min(by_time, by_memory))

    def describe(self, cost: NetworkCost, batch_size: int) -> dict[str, float]:
        if self.profile.device == "cuda":
            return {"estimated_memory_gb": round(cost.cuda_memory_gb(batch_size, self.dim), 2)}
        return {"estimated_step_seconds_cpu": round(self.step_seconds(cost, batch_size), 3),
                "estimated_memory_gb": round(cost.cpu_memory_gb(batch_size), 2)}


@dataclass(frozen=True)
class FittedConfiguration:
    """Patch, batch and topology that fit a budget, and why the batch has the size it has."""

    patch_size: tuple[int, ...]
    batch_size: int
    arch_kwargs: dict[str, Any]
    cost: NetworkCost
    patch_reductions: int
    batch_limited_by: str  # "budget", "dataset" (nnU-Net's 5 % rule) or "minimum"
    fits: bool = True  # False: even the smallest allowed patch at the minimum batch exceeds the budget


def initial_patch_size(spacing: np.ndarray, median_shape: np.ndarray) -> np.ndarray:
    """nnU-Net's start: a patch with the spacing's aspect ratio and the volume of 256^3 (3D) / 2048^2 (2D),
    clipped to the median image shape."""
    inverse = 1.0 / np.asarray(spacing, dtype=float)
    volume = 256.0**3 if len(spacing) == 3 else 2048.0**2
    patch = np.round(inverse * (volume / np.prod(inverse)) ** (1.0 / len(spacing))).astype(int)
    return np.minimum(patch, np.asarray(median_shape, dtype=float)[: len(spacing)].round().astype(int)).clip(min=1)


def fit_patch_and_batch(spacing: np.ndarray, median_shape: np.ndarray, approximate_n_voxels_dataset: float,
                        input_channels: int, output_channels: int, budget: Budget,
                        architecture_for: Any, min_feature_map_edge: int = 4,
                        max_dataset_covered: float = 0.05, min_patch: Any = None) -> FittedConfiguration:
    """nnU-Net's patch-size search with the diffusion network's cost and the device's budget.

    Start from :func:`initial_patch_size`; while the network at the minimum batch size does not fit,
    shrink the axis that is largest relative to the median shape by one pooling unit (nnU-Net's rule,
    which keeps the patch's aspect ratio close to the data's); then grow the batch into the remaining
    budget, but never beyond 5 % of the dataset's voxels per step (nnU-Net's overfitting guard).
    ``architecture_for(kernel_sizes, strides, patch_size)`` returns the arch_kwargs of one topology.
    ``min_patch`` (voxels per axis): never shrink an axis below it (the field of view the task needs);
    ``fits`` of the result is False when the budget would need a smaller patch than that.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    spacing = np.asarray(spacing, dtype=float)
    median = np.asarray(median_shape, dtype=float)[: len(spacing)]
    floor = (np.zeros(len(spacing)) if min_patch is None
             else np.minimum(np.asarray(min_patch, dtype=float), np.ceil(median)))

    def topology(patch):
        _, strides, kernels, new_patch, divisible = get_pool_and_conv_props(
            spacing, patch, min_feature_map_edge, 999999)
        new_patch = tuple(int(p) for p in new_patch)
        arch = architecture_for([list(k) for k in kernels], [list(s) for s in strides], new_patch)
        return new_patch, arch, np.asarray(divisible)

    patch, arch, divisible = topology(initial_patch_size(spacing, median))
    cost = estimate_cost(patch, arch, input_channels, output_channels)
    reductions = 0
    while not budget.fits(cost, budget.min_batch):
        shrinkable = [i for i in range(len(patch))
                      if patch[i] > max(divisible[i], min_feature_map_edge) and patch[i] - divisible[i] >= floor[i]]
        if not shrinkable:
            break  # every axis at its floor: the budget needs a smaller patch than allowed
        # nnU-Net's rule: shrink the axis that is largest relative to the median shape
        axis = max(shrinkable, key=lambda i: patch[i] / median[i])
        trial = list(patch)
        trial[axis] -= int(divisible[axis])
        # as nnU-Net: recompute the divisor for the smaller patch so that no valid size is skipped
        _, _, trial_divisible = topology(trial)
        new_patch = list(patch)
        new_patch[axis] -= int(trial_divisible[axis])
        candidate = topology(new_patch)
        if candidate[0] == patch:  # padding undid the reduction: take the full step
            candidate = topology(trial)
            if candidate[0] == patch:
                break
        patch, arch, divisible = candidate
        cost = estimate_cost(patch, arch, input_channels, output_channels)
        reductions += 1

    fits = budget.fits(cost, budget.min_batch)
    by_budget = budget.largest_batch(cost)
    by_dataset = int(round(approximate_n_voxels_dataset * max_dataset_covered / np.prod(patch, dtype=np.float64)))
    batch = min(by_budget, by_dataset)
    limited_by = "budget" if by_budget <= by_dataset else "dataset"
    if batch < budget.min_batch:
        batch, limited_by = budget.min_batch, "minimum"
    return FittedConfiguration(patch, int(batch), arch, cost, reductions, limited_by, fits)
