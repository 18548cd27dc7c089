"""Fit the field of view: a scan much longer along the spine than the training scans is predicted again in windows of
the training scans' length, and the window the network is most certain of is kept.

A network trained on lumbar scans that all show the same stretch of spine (a partial T12 at the top, the sacrum at
the bottom) learns to number the vertebrae partly by where they lie in its view. On a scan with a longer field of
view (a T1w protocol from T11 to the pelvis, 381 mm against 224 mm) the sliding window shows it stretches that it
never saw, each window numbers its own vertebrae from its own edges, and the blend spreads L1 and L2 over three or
four vertebrae. The same network numbers the same scan right when it sees a window of the training length that
ends below the sacrum (measured on the five T1w scans of Dataset504: ``documentation/results.md``).

:func:`fit_view` predicts windows of the longest training scan's extent along the spine
(:attr:`~spinediff.inference.level_order.LevelOrder.view_mm`, recorded when the cross-validation learns the level
order) that start every :data:`WINDOW_STEPS`-th of it, numbers the vertebrae of each window on its own, and gives
every voxel the label most of the windows that cover it give it. Every window that shows the end of the spine the
network counts from numbers the vertebrae alike; the windows that do not are each wrong in their own way (shifted by
one level, or two), so they do not outvote them. On the five T1w scans every level was right after the vote (25 of
25 level centres), against 15 when the single window with the lowest foreground entropy was kept (a window shifted by
one level was about as certain as the right one). Scans at most :data:`VIEW_MARGIN` times the training extent are
left as they are.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: A scan longer than this many times the longest training scan (along the spine) has its field of view fitted.
VIEW_MARGIN = 1.2
#: Windows start every 1 / WINDOW_STEPS of the training extent (and one ends at the far edge of the scan).
WINDOW_STEPS = 8

#: ``predict(data, properties)`` → (label map, class probabilities ``(C, *shape)``) for image data ``(channels,
#: *shape)`` in nnU-Net's reader's axis order and its properties (``spacing``).
WindowPredictor = Callable[[np.ndarray, dict], tuple[np.ndarray, np.ndarray]]


def scan_extent(image, direction) -> float:
    """Length (mm) of the SimpleITK ``image`` along its spine axis (:func:`spine_axis`: the array axis closest to the
    world ``direction``), the axis its windows are cut along."""
    axis = spine_axis(image, direction)
    return float(image.GetSize()[::-1][axis] * image.GetSpacing()[::-1][axis])


def spine_axis(image, direction) -> int:
    """The array axis (numpy z, y, x order) whose world direction lies closest to ``direction``."""
    cosines = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)  # column i: world direction of ITK axis i
    alignment = np.abs(cosines.T @ np.asarray(direction, dtype=float))  # per ITK axis x, y, z
    return 2 - int(np.argmax(alignment))


def window_starts(length: int, window: int, steps: int = WINDOW_STEPS) -> list[int]:
    """First voxels of windows of ``window`` voxels along an axis of ``length``: every ``window / steps`` voxels,
    and one that ends at the far edge."""
    if window >= length:
        return [0]
    stride = max(1, int(round(window / steps)))
    starts = list(range(0, length - window + 1, stride))
    return starts if starts[-1] == length - window else [*starts, length - window]


def foreground_entropy(segmentation: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean entropy (nats) of the class probabilities over the voxels labelled foreground (inf when none is)."""
    mask = np.asarray(segmentation) > 0
    if not mask.any():
        return float("inf")
    p = np.clip(np.asarray(probabilities, dtype=np.float64)[:, mask], 1e-8, 1.0)
    return float((-(p * np.log(p)).sum(axis=0)).mean())


@dataclass
class ViewFit:
    """The fused prediction (label map and mean probabilities on the scan's whole grid) and the windows tried."""

    segmentation: np.ndarray
    probabilities: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


def needs_fitting(image, direction, view_mm: float | None) -> bool:
    """Is the scan longer along the spine than :data:`VIEW_MARGIN` times the training extent ``view_mm``?"""
    return view_mm is not None and view_mm > 0 and scan_extent(image, direction) > VIEW_MARGIN * view_mm


def fit_view(image, data: np.ndarray, properties: dict, predict: WindowPredictor, order) -> ViewFit:
    """Predict windows of ``order.view_mm`` along the spine of the scan (SimpleITK ``image``, its data ``(channels,
    *shape)`` and reader ``properties``) with ``predict``, number each window's vertebrae
    (:func:`~spinediff.inference.level_order.renumber_with_report` on the window's grid) and give every voxel the
    label most windows that cover it give it (background included); the probabilities are the windows' mean."""
    from spinediff.inference.level_order import renumber_with_report

    axis = spine_axis(image, order.direction)
    spacing = float(image.GetSpacing()[::-1][axis])
    shape = data.shape[1:]
    window = max(1, int(round(order.view_mm / spacing)))
    labels = max(order.labels) + 1
    votes = np.zeros((labels, *shape), np.uint16)
    summed: np.ndarray | None = None
    covered = np.zeros(shape[axis], np.float32)
    tried: list[dict[str, Any]] = []
    for start in window_starts(shape[axis], window):
        stop = min(start + window, shape[axis])
        cut = [slice(None)] * len(shape)
        cut[axis] = slice(start, stop)
        segmentation, probabilities = predict(np.ascontiguousarray(data[(slice(None), *cut)]), properties)
        itk_cut = [slice(None)] * len(shape)
        itk_cut[len(shape) - 1 - axis] = slice(start, stop)
        numbered, report = renumber_with_report(np.asarray(segmentation), image[tuple(itk_cut)], order)
        numbered = np.clip(np.asarray(numbered).astype(np.int64), 0, labels - 1)
        region = votes[(slice(None), *cut)]
        for label in range(labels):
            region[label] += numbered == label
        if summed is None:
            summed = np.zeros((probabilities.shape[0], *shape), np.float32)
        summed[(slice(None), *cut)] += probabilities
        covered[start:stop] += 1
        entropy = foreground_entropy(segmentation, probabilities)
        tried.append({"window_mm": [round(start * spacing, 1), round(stop * spacing, 1)],
                      "entropy": round(entropy, 4) if np.isfinite(entropy) else None,  # None: nothing found
                      "levels": [int(v) for v in report.get("labels", [])]})
    assert summed is not None
    along = [1] * (len(shape) + 1)
    along[axis + 1] = -1
    fused = votes.argmax(axis=0).astype(np.uint8)
    mean = summed / covered.reshape(along)
    entropy = foreground_entropy(fused, mean)
    return ViewFit(fused, mean, {"fitted": True, "scan_mm": round(shape[axis] * spacing, 1),
                                 "view_mm": round(order.view_mm, 1), "windows": len(tried),
                                 "entropy": round(entropy, 4) if np.isfinite(entropy) else None, "tried": tried})


class NnUNetWindows:
    """:data:`WindowPredictor` for a model of nnU-Net's trainers: nnunetv2's ``nnUNetPredictor`` with every trained
    fold of the model folder (as ``nnUNetv2_predict`` uses by default), loaded on first use; also reads a case's
    images with the plans' reader, as the predictor expects them."""

    def __init__(self, model_folder, folds: list[str], device: str = "auto", checkpoint: str = "checkpoint_final.pth"):
        self.model_folder, self.folds, self.device, self.checkpoint = model_folder, folds, device, checkpoint
        self._predictor = None

    @property
    def predictor(self):
        if self._predictor is None:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            from spinediff.utilities.device import parse_device

            device = parse_device(self.device)
            with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a note on every CPU predictor
                predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=device.type != "cpu",
                                            perform_everything_on_device=device.type == "cuda", device=device,
                                            verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(
                str(self.model_folder), use_folds=tuple(int(f) if f.isdigit() else f for f in self.folds),
                checkpoint_name=self.checkpoint)
            self._predictor = predictor
        return self._predictor

    def read(self, files) -> tuple[np.ndarray, dict]:
        reader = self.predictor.plans_manager.image_reader_writer_class()
        return reader.read_images([str(f) for f in files])

    def __call__(self, data: np.ndarray, properties: dict) -> tuple[np.ndarray, np.ndarray]:
        segmentation, probabilities = self.predictor.predict_single_npy_array(
            data.astype(np.float32), {"spacing": properties["spacing"]}, None, None, True)
        return np.asarray(segmentation), np.asarray(probabilities)
