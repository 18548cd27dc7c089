"""Point-based alignment of a moving image (CT) to a fixed image (MR) from matched landmarks.

Convention (ITK's resampling convention, as in documentation/dataset_format.md): a transform
maps **fixed (MR) physical points to moving (CT) physical points**, so
``sitk.Resample(ct, mr, transform)`` puts the CT onto the MR grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from spinediff.errors import SpineDiffError
from spinediff.registration.landmarks import LandmarkSet

TRANSFORM_KINDS = ("rigid", "similarity", "affine")
INTERPOLATIONS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}
CT_OUTSIDE_VALUE = -1024.0
# Points closer than this (RMS, mm) to one line (rigid, similarity) or one plane (affine) are degenerate.
DEGENERACY_TOLERANCE_MM = 1.0
# Two masks whose matched vertebrae differ in volume by more than this factor use different label
# conventions (e.g. a semantic map against an instance mask).
CONVENTION_VOLUME_FACTOR = 3.0


@dataclass
class MatchedLandmarks:
    """Landmarks present in both sets, in the same order."""

    keys: list[tuple[int, str]]
    fixed: np.ndarray  # (N, 3) MR physical points
    moving: np.ndarray  # (N, 3) CT physical points

    @property
    def labels(self) -> list[int]:
        return sorted({label for label, _ in self.keys})


@dataclass
class VertebraSelection:
    """Vertebrae used for registration and those left out, with the reason."""

    labels: list[int]
    excluded: dict[int, str] = field(default_factory=dict)


def _label_list(labels) -> str:
    labels = sorted(labels)
    return "[" + ", ".join(str(x) for x in labels[:15]) + (", ..." if len(labels) > 15 else "") + "]"


def select_common_vertebrae(
    fixed_volumes: dict[int, float],
    moving_volumes: dict[int, float],
    case: str,
    volume_tolerance: float = 0.3,
) -> VertebraSelection:
    """Vertebra labels present in both images whose volumes agree.

    The volume ratio of each common vertebra is compared with the median ratio (which absorbs a
    global scale). A vertebra off by more than ``volume_tolerance`` (relative) is left out: it is
    usually cut by one image's field of view, which would bias its landmarks. If the median ratio
    is implausible, or most vertebrae disagree, the masks label different structures with the
    same numbers and a ``SpineDiffError`` is raised.
    """
    common = sorted(set(fixed_volumes) & set(moving_volumes))
    if not common:
        raise SpineDiffError(
            f"case {case}: no common vertebra labels: MR mask has {_label_list(fixed_volumes)}, CT mask has "
            f"{_label_list(moving_volumes)}. Both masks must number vertebrae the same way "
            f"(VerSe: 20 = L1 ... 24 = L5); relabel one of them."
        )
    ratios = {label: moving_volumes[label] / fixed_volumes[label] for label in common}
    median = float(np.median(list(ratios.values())))
    if not 1.0 / CONVENTION_VOLUME_FACTOR <= median <= CONVENTION_VOLUME_FACTOR:
        detail = ", ".join(
            f"{label}: {fixed_volumes[label] / 1000:.1f} vs {moving_volumes[label] / 1000:.1f} cm3"
            for label in common[:6]
        )
        raise SpineDiffError(
            f"case {case}: the MR and CT masks use different label conventions: the same labels mark "
            f"structures of very different size (MR vs CT volume, {detail}). Give vertebra instance masks "
            f"numbered the same way in both images."
        )
    selection = VertebraSelection([])
    for label in common:
        relative = ratios[label] / median
        if abs(relative - 1.0) > volume_tolerance:
            selection.excluded[label] = (
                f"volume differs by {100 * (relative - 1):+.0f}% between MR and CT "
                f"(cut by a field of view, or a different bone)"
            )
        else:
            selection.labels.append(label)
    if len(selection.labels) < len(common) / 2:
        raise SpineDiffError(
            f"case {case}: the MR and CT masks use different label conventions: the volumes of most common "
            f"vertebrae disagree ({'; '.join(f'{k}: {v}' for k, v in selection.excluded.items())}). "
            f"Give vertebra instance masks numbered the same way in both images."
        )
    return selection


def match_landmarks(fixed: LandmarkSet, moving: LandmarkSet, case: str) -> MatchedLandmarks:
    """Pair landmarks with the same vertebra label and name."""
    common_labels = sorted(set(fixed.points) & set(moving.points))
    if not common_labels:
        raise SpineDiffError(
            f"case {case}: no common vertebra labels: MR landmarks ({fixed.source}) have "
            f"{_label_list(fixed.points)}, CT landmarks ({moving.source}) have {_label_list(moving.points)}. "
            f"Both must number vertebrae the same way (VerSe: 20 = L1 ... 24 = L5)."
        )
    keys = [
        (label, name)
        for label in common_labels
        for name in sorted(set(fixed.points[label]) & set(moving.points[label]))
    ]
    if not keys:
        raise SpineDiffError(
            f"case {case}: the MR and CT landmarks share vertebrae {_label_list(common_labels)} "
            f"but no landmark names (MR: {sorted(fixed.points[common_labels[0]])}, CT: "
            f"{sorted(moving.points[common_labels[0]])})."
        )
    fixed_points = np.array([fixed.points[label][name] for label, name in keys], dtype=float)
    moving_points = np.array([moving.points[label][name] for label, name in keys], dtype=float)
    return MatchedLandmarks(keys, fixed_points, moving_points)


def check_point_geometry(
    matched: MatchedLandmarks, kind: str, case: str, tolerance_mm: float = DEGENERACY_TOLERANCE_MM
) -> None:
    """Require >= 3 non-collinear points (rigid, similarity) or >= 4 non-coplanar (affine)."""
    needed = 4 if kind == "affine" else 3
    if len(matched.keys) < needed:
        raise SpineDiffError(
            f"case {case}: only {len(matched.keys)} matched landmark(s) ({_keys(matched.keys)}); a {kind} "
            f"transform needs at least {needed}{' non-coplanar' if kind == 'affine' else ' non-collinear'} "
            f"points. Use more vertebrae or 2 landmarks per vertebra."
        )
    for name, points in (("MR", matched.fixed), ("CT", matched.moving)):
        centred = points - points.mean(axis=0)
        singular = np.linalg.svd(centred, compute_uv=False)
        n = len(points)
        off_line = float(np.sqrt((singular[1] ** 2 + singular[2] ** 2) / n))
        off_plane = float(singular[2] / np.sqrt(n))
        if off_line < tolerance_mm:
            raise SpineDiffError(
                f"case {case}: the {len(points)} matched {name} landmarks are collinear (RMS distance "
                f"from one line {off_line:.2f} mm < {tolerance_mm} mm), so the rotation about that line is "
                f"undetermined. Use 2 landmarks per vertebra or more vertebrae."
            )
        if kind == "affine" and off_plane < tolerance_mm:
            raise SpineDiffError(
                f"case {case}: the matched {name} landmarks are coplanar (RMS distance from one plane "
                f"{off_plane:.2f} mm), which leaves an affine transform undetermined (vertebra "
                f"landmarks lie near the mid-sagittal plane). Use a rigid or similarity transform, or landmark "
                f"files with points off that plane."
            )


def _keys(keys: list[tuple[int, str]]) -> str:
    return ", ".join(f"{label}/{name}" for label, name in keys) or "none"


def fit_transform(matched: MatchedLandmarks, kind: str = "rigid") -> sitk.Transform:
    """Least-squares transform mapping the fixed (MR) points onto the moving (CT) points."""
    if kind not in TRANSFORM_KINDS:
        raise SpineDiffError(f"unknown transform {kind!r}; expected one of {', '.join(TRANSFORM_KINDS)}.")
    initial = {
        "rigid": sitk.VersorRigid3DTransform,
        "similarity": sitk.Similarity3DTransform,
        "affine": lambda: sitk.AffineTransform(3),
    }[kind]()
    fixed = [float(v) for v in matched.fixed.ravel()]
    moving = [float(v) for v in matched.moving.ravel()]
    transform = sitk.LandmarkBasedTransformInitializer(initial, fixed, moving)
    # Return the concrete type (the initializer gives a generic Transform).
    return {
        "rigid": sitk.VersorRigid3DTransform,
        "similarity": sitk.Similarity3DTransform,
        "affine": sitk.AffineTransform,
    }[kind](transform)


def matrix_to_transform(matrix: np.ndarray, kind: str = "affine") -> sitk.Transform:
    """A SimpleITK transform of ``kind`` from a 4x4 matrix (rigid: the nearest rotation is used;
    similarity: the nearest rotation times the mean scale)."""
    linear = np.asarray(matrix, dtype=float)[:3, :3]
    translation = [float(v) for v in np.asarray(matrix, dtype=float)[:3, 3]]
    if kind == "affine":
        return sitk.AffineTransform([float(v) for v in linear.ravel()], translation)
    rotation = rotation_of(np.asarray(matrix))
    if kind == "rigid":
        transform = sitk.VersorRigid3DTransform()
        transform.SetMatrix([float(v) for v in rotation.ravel()])
    else:
        transform = sitk.Similarity3DTransform()
        scale = float(np.cbrt(abs(np.linalg.det(linear))))
        transform.SetMatrix([float(v) for v in rotation.ravel()])
        transform.SetScale(scale)
    transform.SetTranslation(translation)
    return transform


def identity_transform() -> sitk.Transform:
    return sitk.VersorRigid3DTransform()


def transform_to_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix of a linear (rigid, similarity, affine, composite of those) transform."""
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    matrix = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 100.0
        matrix[:3, axis] = (np.asarray(transform.TransformPoint(unit)) - origin) / 100.0
    matrix[:3, 3] = origin
    probe = np.array([37.0, -53.0, 71.0])
    if not np.allclose(transform.TransformPoint(probe.tolist()), matrix[:3, :3] @ probe + origin, atol=1e-4):
        raise SpineDiffError(
            f"the transform {transform.GetName()} is not linear; only rigid, similarity and "
            f"affine transforms are supported."
        )
    return matrix


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def rotation_of(matrix: np.ndarray) -> np.ndarray:
    """Nearest rotation to the linear part (polar decomposition)."""
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        u[:, -1] *= -1
        rotation = u @ vt
    return rotation


def rotation_angle_deg(rotation: np.ndarray) -> float:
    cosine = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cosine)))


def rotation_error_deg(estimated: sitk.Transform, true: sitk.Transform) -> float:
    """Angle of the rotation between the estimated and the true transform."""
    difference = rotation_of(transform_to_matrix(estimated)) @ rotation_of(transform_to_matrix(true)).T
    return rotation_angle_deg(difference)


def landmark_residuals(transform: sitk.Transform, matched: MatchedLandmarks) -> np.ndarray:
    """Distance (mm) between the transformed MR landmarks and their CT partners."""
    mapped = apply_matrix(transform_to_matrix(transform), matched.fixed)
    return np.linalg.norm(mapped - matched.moving, axis=1)


def target_registration_error(estimated: sitk.Transform, true: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """Distance (mm) between where the estimated and the true transform send each fixed point."""
    difference = apply_matrix(transform_to_matrix(estimated), points) - apply_matrix(transform_to_matrix(true), points)
    return np.linalg.norm(difference, axis=1)


def resample_onto(
    moving: sitk.Image,
    fixed: sitk.Image,
    transform: sitk.Transform,
    interpolation: str = "linear",
    outside_value: float = CT_OUTSIDE_VALUE,
    pixel_type: int | None = None,
) -> sitk.Image:
    """Resample ``moving`` onto the grid of ``fixed`` through ``transform`` (fixed -> moving points).

    Images (CT): ``linear`` or ``bspline``, float32 output, ``outside_value`` (-1024 HU) outside.
    Masks: ``nearest`` keeps the mask's pixel type, 0 outside.
    """
    if interpolation not in INTERPOLATIONS:
        raise SpineDiffError(f"unknown interpolation {interpolation!r}; expected one of {', '.join(INTERPOLATIONS)}.")
    if pixel_type is None:
        pixel_type = moving.GetPixelID() if interpolation == "nearest" else sitk.sitkFloat32
    return sitk.Resample(moving, fixed, transform, INTERPOLATIONS[interpolation], float(outside_value), pixel_type)
