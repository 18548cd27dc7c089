"""The SynthRAD challenges' image metrics of a synthetic CT, as their public metric code defines them, so that a
number here is comparable to the leaderboards.

Followed (SynthRAD2023/metrics and SynthRAD2025/metrics, ``functions/image_metrics.py``):

* **Dynamic range** [-1024, 3000] HU (:data:`SYNTHRAD_RANGE`).
* **MAE** inside the body mask (mask > 0), in HU, on the values as they are (not clipped).
* **PSNR** inside the mask, after clipping prediction and reference to the range, with the range's width
  (4024 HU) as the peak: ``10 log10(4024² / MSE)``.
* **MS-SSIM** (SynthRAD2025): both images clipped to the range, set to -1024 outside the mask, shifted to be
  non-negative, data range 4024; padded (edge values) to the smallest size the levels need (97 voxels for 5
  levels of a 7-voxel window); at each of the 5 levels the SSIM map of a 7-voxel uniform window (K1 0.01,
  K2 0.03) is raised to the level's weight (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), clipped at 0 and averaged
  *inside the mask* (without the window's half-width at the border); the images are then smoothed by a 2x2x2 box
  and every second voxel kept (the mask: every second voxel); the score is the product of the levels' means.
  As in the 2025 code, the luminance term enters every level with the level's weight.
* **SSIM** (SynthRAD2023): the same at one level with weight 1 and no clipping of the map.

The SSIM maps are MONAI's (:func:`monai.metrics.regression.compute_ssim_and_cs`, uniform kernel); only the
challenge's masking, padding, level weights and downsampling are done here. Differences from the challenge code:
MONAI's map uses the population (co)variance in each window where scikit-image (2023) and the 2025 code use the
sample covariance (a factor 343/342 on the variances; it only changes how much the constant C2 weighs, far below
the third decimal on CT); the 2025 code clips the contrast and structure terms at 0 separately, here their product
is clipped (the same unless the structure term is negative, where both give 0).

Not applied: the 2025 segmentation-based score (TotalSegmentator run on the synthetic and on the real CT, mean
Dice and HD95 over the region's classes) needs TotalSegmentator and its weights; :func:`segmentation_score` computes
the score from two label maps when they are given (e.g. from the benchmark's downstream segmenter), and the dose
metrics need treatment plans.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.signal import fftconvolve

SYNTHRAD_RANGE = (-1024.0, 3000.0)
#: MS-SSIM level weights of Wang et al. 2003, as the SynthRAD2025 code uses them
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 7  # scikit-image's default uniform window, used by both challenges
_K1, _K2 = 0.01, 0.03


def _binary(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image shape {shape}")
    return np.asarray(mask) > 0


def synthrad_mae(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error in HU inside the mask (values not clipped), as both challenges compute it."""
    inside = _binary(mask, reference.shape)
    if not inside.any():
        return float("nan")
    diff = np.abs(reference.astype(np.float64) - prediction.astype(np.float64))
    return float(diff[inside].mean())


def synthrad_psnr(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
                  data_range: tuple[float, float] = SYNTHRAD_RANGE) -> float:
    """PSNR in dB inside the mask, both images clipped to ``data_range`` whose width is the peak."""
    inside = _binary(mask, reference.shape)
    if not inside.any():
        return float("nan")
    low, high = data_range
    p = np.clip(prediction.astype(np.float64), low, high)[inside]
    r = np.clip(reference.astype(np.float64), low, high)[inside]
    mse = float(np.mean((p - r) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10((high - low) ** 2 / mse))


def _prepared(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None,
              data_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip to the range, set the outside of the mask to the range's floor, shift to start at 0."""
    low, high = data_range
    inside = _binary(mask, reference.shape)
    p = np.where(inside, np.clip(prediction.astype(np.float64), low, high), low) - low
    r = np.where(inside, np.clip(reference.astype(np.float64), low, high), low) - low
    return p, r, inside


def _ssim_map(p: np.ndarray, r: np.ndarray, width: float) -> np.ndarray:
    """MONAI's SSIM map with a uniform window (valid positions only: the border of half a window is left out)."""
    from monai.metrics.regression import compute_ssim_and_cs

    dims = p.ndim
    as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)[None, None]  # noqa: E731
    ssim_map, _ = compute_ssim_and_cs(as_tensor(p), as_tensor(r), spatial_dims=dims,
                                      kernel_size=[SSIM_WINDOW] * dims, kernel_sigma=[1.5] * dims,
                                      data_range=width, kernel_type="uniform", k1=_K1, k2=_K2)
    return ssim_map[0, 0].numpy()


def _crop(array: np.ndarray, pad: int) -> np.ndarray:
    return array[tuple(slice(pad, s - pad) for s in array.shape)]


def _level_mean(ssim_map: np.ndarray, inside: np.ndarray, weight: float | None) -> float:
    values = ssim_map[_crop(inside, (SSIM_WINDOW - 1) // 2)]
    if weight is not None:
        values = np.clip(values, 0.0, None) ** weight
    return float(values.mean()) if values.size else float("nan")


def synthrad_ssim(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
                  data_range: tuple[float, float] = SYNTHRAD_RANGE) -> float:
    """SynthRAD2023's SSIM: the mean of the SSIM map (7-voxel uniform window) inside the mask."""
    p, r, inside = _prepared(prediction, reference, mask, data_range)
    if min(p.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW} voxels along every axis; got {p.shape}")
    return _level_mean(_ssim_map(p, r, data_range[1] - data_range[0]), inside, None)


def _downsample(image: np.ndarray) -> np.ndarray:
    """The 2025 code's downsampling: a 2x2(x2) box filter ('same' convolution) and every second voxel."""
    box = np.ones((2,) * image.ndim) / 2 ** image.ndim
    return fftconvolve(image, box, mode="same")[tuple(slice(None, None, 2) for _ in range(image.ndim))]


def synthrad_ms_ssim(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
                     data_range: tuple[float, float] = SYNTHRAD_RANGE,
                     weights: Sequence[float] = MS_SSIM_WEIGHTS) -> float:
    """SynthRAD2025's masked multi-scale SSIM (see the module's description)."""
    p, r, inside = _prepared(prediction, reference, mask, data_range)
    if not inside.any():
        return float("nan")
    levels = len(weights)
    target = (SSIM_WINDOW - 1) * 2 ** (levels - 1) + 1  # 97 for 5 levels
    pad = [((target - s) // 2, target - s - (target - s) // 2) if s < target else (0, 0) for s in p.shape]
    p, r, inside = (np.pad(a, pad, mode="edge") for a in (p, r, inside))
    width = data_range[1] - data_range[0]
    score = 1.0
    for level, weight in enumerate(weights):
        score *= float(np.clip(_level_mean(_ssim_map(p, r, width), inside, weight), 0.0, 1.0))
        if level < levels - 1:
            p, r = _downsample(p), _downsample(r)
            inside = inside[tuple(slice(None, None, 2) for _ in range(inside.ndim))]
    return float(score)


def challenge_metrics(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
                      ms_ssim: bool = True) -> dict[str, float]:
    """``synthrad_mae``, ``synthrad_psnr``, ``synthrad_ssim`` (2023) and ``synthrad_ms_ssim`` (2025) of one
    volume inside ``mask`` (None: the whole image). Images too small for the windows get NaN SSIMs."""
    out = {"synthrad_mae": synthrad_mae(prediction, reference, mask),
           "synthrad_psnr": synthrad_psnr(prediction, reference, mask)}
    small = min(reference.shape) < SSIM_WINDOW
    out["synthrad_ssim"] = float("nan") if small else synthrad_ssim(prediction, reference, mask)
    if ms_ssim:
        out["synthrad_ms_ssim"] = float("nan") if small else synthrad_ms_ssim(prediction, reference, mask)
    return out


def segmentation_score(prediction_labels: np.ndarray, reference_labels: np.ndarray, classes: Sequence[int],
                       spacing: Sequence[float] | None = None) -> dict[str, float]:
    """SynthRAD2025's segmentation-based score from two label maps (the segmentation of the synthetic CT and that
    of the real CT): MONAI's Dice and 95th-percentile Hausdorff distance per class, averaged over the ``classes``
    present in the reference (absent ones are skipped, as in the challenge)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    dice = DiceMetric(include_background=True, reduction="mean", get_not_nans=False)
    hd95 = HausdorffDistanceMetric(include_background=True, reduction="mean", percentile=95, get_not_nans=False)
    scored = 0
    for value in classes:
        truth = torch.as_tensor(reference_labels == value)[None, None]
        if not truth.any():
            continue
        predicted = torch.as_tensor(prediction_labels == value)[None, None]
        dice(predicted, truth)
        hd95(predicted, truth, spacing=list(spacing) if spacing is not None else None)
        scored += 1
    if not scored:
        return {"synthrad_seg_dice": float("nan"), "synthrad_seg_hd95": float("nan")}
    return {"synthrad_seg_dice": float(dice.aggregate().item()), "synthrad_seg_hd95": float(hd95.aggregate().item())}
