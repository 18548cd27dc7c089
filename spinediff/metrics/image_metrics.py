"""Image similarity metrics for translation and generation (built on monai.metrics).

All functions take numpy arrays of one volume (2D or 3D, no channel axis) in the target's units
(e.g. HU) and a data range ``(low, high)``: values are clipped to it, so PSNR and SSIM are
comparable across methods and datasets.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric


def _as_batch(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)[None, None]


def psnr(prediction: np.ndarray, reference: np.ndarray, data_range: tuple[float, float],
         mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB over the volume (or inside ``mask``)."""
    low, high = data_range
    p = np.clip(prediction, low, high).astype(np.float64)
    r = np.clip(reference, low, high).astype(np.float64)
    if mask is not None:
        p, r = p[mask], r[mask]
        mse = float(np.mean((p - r) ** 2)) if p.size else float("nan")
        return float("inf") if mse == 0 else float(10 * np.log10((high - low) ** 2 / mse))
    metric = PSNRMetric(max_val=high - low)
    return float(metric(_as_batch(p), _as_batch(r)).item())


def ssim(prediction: np.ndarray, reference: np.ndarray, data_range: tuple[float, float]) -> float:
    """Structural similarity (monai, Gaussian window; 3D on volumes), on values scaled to [0, 1].

    The window is 11 voxels, shrunk (odd) to fit the smallest axis of thin volumes.
    """
    low, high = data_range
    p = (np.clip(prediction, low, high) - low) / (high - low)
    r = (np.clip(reference, low, high) - low) / (high - low)
    spatial = [s for s in p.shape if s > 1]
    p, r = p.reshape(spatial), r.reshape(spatial)
    kernel = max(3, min(11, min(spatial) - (1 - min(spatial) % 2)))
    metric = SSIMMetric(spatial_dims=len(spatial), data_range=1.0, win_size=kernel,
                        kernel_sigma=1.5 * kernel / 11)
    return float(metric(_as_batch(p), _as_batch(r)).mean().item())


def mae(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error (in the target's units) over the volume or inside ``mask``."""
    diff = np.abs(prediction.astype(np.float64) - reference.astype(np.float64))
    if mask is not None:
        diff = diff[mask]
    return float(diff.mean()) if diff.size else float("nan")


def adjacent_difference_ratio(prediction: np.ndarray, reference: np.ndarray, axis: int,
                              mask: np.ndarray | None = None) -> float:
    """Through-plane consistency: the mean absolute difference between neighbouring voxels along ``axis`` in the
    prediction divided by the same in the reference (over neighbour pairs that are both inside ``mask``).

    1: the prediction changes from slice to slice as much as the real image; above 1: it jumps more, as a 2D
    model does across its slices when each slice is sampled with its own noise; below 1: smoother than real.
    """
    p, r = prediction.astype(np.float64), reference.astype(np.float64)
    if p.shape[axis] < 2:
        return float("nan")
    first = [slice(None)] * p.ndim
    second = [slice(None)] * p.ndim
    first[axis], second[axis] = slice(None, -1), slice(1, None)
    first, second = tuple(first), tuple(second)
    pairs = np.ones(p[first].shape, dtype=bool) if mask is None else (mask[first] & mask[second])
    if not pairs.any():
        return float("nan")
    real = np.abs(r[second] - r[first])[pairs].mean()
    return float(np.abs(p[second] - p[first])[pairs].mean() / real) if real > 0 else float("nan")


BODY_THRESHOLD_HU = -500.0  # air and padding are below


#: CT voxels denser than this are bone (the bone MAE, and the labels a downstream CT segmenter is trained on).
BONE_THRESHOLD_HU = 200.0


def body_mask_ct(reference_hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Voxels inside the body on CT: denser than ``threshold`` HU (air and padding are below)."""
    return reference_hu > threshold


def image_metrics(prediction: np.ndarray, reference: np.ndarray, data_range: tuple[float, float],
                  bone_threshold: float | None = BONE_THRESHOLD_HU, is_ct: bool = True) -> dict[str, float]:
    """PSNR, SSIM, MAE overall, MAE in the body and in bone (CT), for one volume."""
    out = {"psnr": psnr(prediction, reference, data_range), "ssim": ssim(prediction, reference, data_range),
           "mae": mae(prediction, reference)}
    if is_ct:
        body = body_mask_ct(reference)
        out["mae_body"] = mae(prediction, reference, body)
        out["psnr_body"] = psnr(prediction, reference, data_range, body)
        if bone_threshold is not None:
            bone = reference > bone_threshold
            out["mae_bone"] = mae(prediction, reference, bone) if bone.any() else float("nan")
    if prediction.ndim == 3:  # through-plane consistency along each array axis (z, y, x of the image)
        mask = body_mask_ct(reference) if is_ct else None
        for axis, name in enumerate("zyx"):
            out[f"adjacent_ratio_{name}"] = adjacent_difference_ratio(prediction, reference, axis, mask)
    return out
