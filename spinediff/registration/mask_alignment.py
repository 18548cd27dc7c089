"""Landmark registration from vertebra masks, robust to fields of view that cut vertebrae.

The MR and CT fields of view rarely agree: a sagittal MR slab often cuts the transverse processes
or even the side of the vertebral bodies, a CT the highest or lowest vertebra. A vertebra cut in
one image has different centroids in the two, so landmarks must come from the same physical part
of each vertebra in both images. Clipping each image by the other's field of view mapped through
the current transform estimate does not work well: the clipped part moves with the error of the
estimate, so the fixed-point iteration converges slowly and amplifies noise.

Instead, each vertebra is restricted, in each image, to a left-right **window symmetric about its
own mid-sagittal plane** whose half-width stops short (by a margin of half the coarsest voxel
plus 1 mm) of the nearest field-of-view cut seen in either image. The window is centred by a
mean shift on the vertebra's own voxels, so its position depends on the anatomy, not on the
transform estimate; only its width does, and it is the same in both images. A vertebra whose
window would be narrower than ``MIN_WINDOW_HALF_WIDTH_MM`` (cut through its middle) is left out.
The transform estimate is refitted from the windowed landmarks until it changes by less than
``convergence_mm``; it only decides which voxels count as cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from spinediff.errors import SpineDiffError
from spinediff.registration import align
from spinediff.registration.landmarks import (
    MIN_VOXELS_PER_VERTEBRA,
    LandmarkSet,
    VertebraVoxels,
    landmarks_from_voxels,
    posterior_directions,
    spine_tangents,
    vertebra_voxels,
)

# A vertebra whose symmetric left-right window would be narrower than this is cut through its centre.
MIN_WINDOW_HALF_WIDTH_MM = 8.0


def inside_field_of_view(
    image: sitk.Image, matrix: np.ndarray | None = None, tolerance_voxels: float = 0.5
) -> Callable[[np.ndarray], np.ndarray]:
    """Predicate over (N, 3) physical points: does ``matrix`` send them inside ``image``'s grid?

    The grid covers voxel centres -0.5 ... size - 0.5 (index units); ``tolerance_voxels`` widens it,
    so that voxels at the very edge of a resampled copy (interpolation, rounding) are not taken
    for a field-of-view cut.
    """
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    to_index = np.linalg.inv(direction).T / np.asarray(image.GetSpacing(), dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    lower = -0.5 - tolerance_voxels
    upper = np.asarray(image.GetSize(), dtype=float) - 0.5 + tolerance_voxels

    def keep(points: np.ndarray) -> np.ndarray:
        mapped = points if matrix is None else align.apply_matrix(matrix, points)
        index = (mapped - origin) @ to_index
        return np.all((index >= lower) & (index <= upper), axis=1)

    return keep


@dataclass
class MaskInputs:
    """A vertebra instance mask and optional TPTBox subregion mask on the same grid."""

    vertebrae: sitk.Image
    subregions: sitk.Image | None = None
    source: str = "vertebra mask"

    def voxels(self, labels: Iterable[int] | None = None) -> VertebraVoxels:
        return vertebra_voxels(self.vertebrae, self.subregions, labels, self.source)


@dataclass
class LandmarkFit:
    """Result of :func:`fit_from_masks`.

    ``matched``, ``fixed_landmarks`` and ``moving_landmarks`` are the landmarks of each image in
    its own space, on the common field of view of the final iteration.
    """

    transform: sitk.Transform
    matched: align.MatchedLandmarks
    fixed_landmarks: LandmarkSet
    moving_landmarks: LandmarkSet
    excluded: dict[int, str] = field(default_factory=dict)
    iterations: int = 0


def _landmark_fit(
    fixed: VertebraVoxels, moving: VertebraVoxels, kind: str, per_vertebra: int, case: str
) -> tuple[sitk.Transform, align.MatchedLandmarks, LandmarkSet, LandmarkSet]:
    fixed_set = landmarks_from_voxels(fixed, per_vertebra)
    moving_set = landmarks_from_voxels(moving, per_vertebra)
    matched = align.match_landmarks(fixed_set, moving_set, case)
    align.check_point_geometry(matched, kind, case)
    return align.fit_transform(matched, kind), matched, fixed_set, moving_set


def _max_change(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    return float(np.linalg.norm(align.apply_matrix(a, points) - align.apply_matrix(b, points), axis=1).max())


def _same_vertebrae(
    fixed: VertebraVoxels, moving: VertebraVoxels, case: str, tolerance: float
) -> tuple[VertebraVoxels, VertebraVoxels, dict[int, str]]:
    selection = align.select_common_vertebrae(fixed.volumes(), moving.volumes(), case, tolerance)
    return fixed.restricted(labels=selection.labels), moving.restricted(labels=selection.labels), selection.excluded


def _lateral_frames(voxels: VertebraVoxels) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per vertebra: centroid and unit left-right axis."""
    clouds = voxels.points
    centroids = {label: cloud.mean(axis=0) for label, cloud in clouds.items()}
    tangents = spine_tangents(centroids, clouds)
    posterior = posterior_directions(clouds, centroids, tangents, voxels.source)
    frames = {}
    for label in clouds:
        lateral = np.cross(tangents[label], posterior[label])
        frames[label] = (centroids[label], lateral / np.linalg.norm(lateral))
    return frames


def _symmetric_windows(
    fixed_all: VertebraVoxels,
    moving_all: VertebraVoxels,
    fixed_inside: Callable[[np.ndarray], np.ndarray],
    moving_inside: Callable[[np.ndarray], np.ndarray],
    margin_mm: float,
) -> tuple[VertebraVoxels, VertebraVoxels, dict[int, str]]:
    """Both images' vertebrae restricted to a left-right window symmetric about each vertebra's
    mid-sagittal plane and clear of every field-of-view cut (see module doc)."""
    inside = {"fixed": {}, "moving": {}}
    for key, voxels, predicate in (("fixed", fixed_all, fixed_inside), ("moving", moving_all, moving_inside)):
        for label, cloud in voxels.points.items():
            inside[key][label] = predicate(cloud)
    labels = sorted(set(fixed_all.points) & set(moving_all.points))
    labels = [
        label
        for label in labels
        if inside["fixed"][label].sum() >= MIN_VOXELS_PER_VERTEBRA
        and inside["moving"][label].sum() >= MIN_VOXELS_PER_VERTEBRA
    ]
    if not labels:
        raise SpineDiffError(f"{fixed_all.source}: no vertebra lies in the common field of view of MR and CT.")
    frames = {}
    for key, voxels in (("fixed", fixed_all), ("moving", moving_all)):
        within = VertebraVoxels(
            {label: voxels.points[label][inside[key][label]] for label in labels},
            voxels.voxel_volume_mm3,
            None,
            voxels.source,
        )
        frames[key] = _lateral_frames(within)
    keep: dict[str, dict[int, np.ndarray]] = {"fixed": {}, "moving": {}}
    excluded: dict[int, str] = {}
    for label in labels:
        lateral, outside_lateral, offset = {}, {}, {}
        for key, voxels in (("fixed", fixed_all), ("moving", moving_all)):
            centre, axis = frames[key][label]
            lateral[key] = (voxels.points[label] - centre) @ axis
            outside_lateral[key] = lateral[key][~inside[key][label]]
            offset[key] = 0.0
        half_width = np.inf
        for _ in range(10):
            nearest = [np.abs(outside_lateral[k] - offset[k]).min() for k in offset if outside_lateral[k].size]
            half_width = min(nearest, default=np.inf) - margin_mm
            if half_width < MIN_WINDOW_HALF_WIDTH_MM:
                break
            moved = 0.0
            for key in offset:
                selected = inside[key][label] & (np.abs(lateral[key] - offset[key]) < half_width)
                new = float(lateral[key][selected].mean())
                moved = max(moved, abs(new - offset[key]))
                offset[key] = new
            if moved < 0.01:
                break
        if half_width < MIN_WINDOW_HALF_WIDTH_MM:
            excluded[label] = "cut by a field of view through its centre"
            continue
        for key in offset:
            keep[key][label] = inside[key][label] & (np.abs(lateral[key] - offset[key]) < half_width)
    parts = []
    for key, voxels in (("fixed", fixed_all), ("moving", moving_all)):
        points = {label: voxels.points[label][mask] for label, mask in keep[key].items()}
        subregions = None
        if voxels.subregions is not None:
            subregions = {label: voxels.subregions[label][mask] for label, mask in keep[key].items()}
        parts.append(VertebraVoxels(points, voxels.voxel_volume_mm3, subregions, voxels.source))
    return parts[0], parts[1], excluded


def fit_from_masks(
    fixed: MaskInputs,
    moving: MaskInputs,
    *,
    kind: str,
    landmarks_per_vertebra: int,
    case: str,
    volume_tolerance: float = 0.2,
    max_iterations: int = 8,
    convergence_mm: float = 0.05,
) -> LandmarkFit:
    """Fit the fixed (MR) -> moving (CT) transform from the landmarks of two vertebra masks.

    Vertebrae whose volumes in the common field of view disagree by more than
    ``volume_tolerance`` are left out (an inconsistent segmentation); masks whose labels mean
    different things raise ``SpineDiffError`` (see :func:`align.select_common_vertebrae`).
    """
    fixed_all, moving_all = fixed.voxels(), moving.voxels()
    # Whole masks first (a gross volume mismatch = label conventions); then the common field of view.
    fixed_part, moving_part, excluded = _same_vertebrae(fixed_all, moving_all, case, 0.5)
    transform, matched, fixed_set, moving_set = _landmark_fit(
        fixed_part, moving_part, kind, landmarks_per_vertebra, case
    )
    margin = 0.5 * max(*fixed.vertebrae.GetSpacing(), *moving.vertebrae.GetSpacing()) + 1.0
    iterations = 1
    for _ in range(max_iterations):
        iterations += 1
        matrix = align.transform_to_matrix(transform)
        fixed_part, moving_part, cut = _symmetric_windows(
            fixed_all,
            moving_all,
            inside_field_of_view(moving.vertebrae, matrix),
            inside_field_of_view(fixed.vertebrae, np.linalg.inv(matrix)),
            margin,
        )
        fixed_part, moving_part, excluded = _same_vertebrae(fixed_part, moving_part, case, volume_tolerance)
        excluded.update(cut)
        new, matched, fixed_set, moving_set = _landmark_fit(fixed_part, moving_part, kind, landmarks_per_vertebra, case)
        change = _max_change(align.transform_to_matrix(new), matrix, matched.fixed)
        transform = new
        if change < convergence_mm:
            break
    return LandmarkFit(transform, matched, fixed_set, moving_set, excluded, iterations)
