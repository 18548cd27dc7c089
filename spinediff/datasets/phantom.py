"""Synthetic paired spine data with known ground truth (``spinediff phantom``).

One subject = one :class:`~spinediff.datasets.anatomy.SpineAnatomy` sampled on two grids:

- an **MR** grid: sagittal slices (direction: rows anterior→posterior, columns superior→inferior,
  slices left→right), anisotropic spacing, T1w and T2w with a smooth bias field and Rician noise;
- a **CT** grid: axial, near-isotropic, a different field of view, Hounsfield units with CT-like
  noise, and the whole anatomy moved by a random rigid transform (the "misalignment" that
  landmark registration must undo). The true transform is saved.

Because both images come from the same continuous anatomy, labels, instance masks and
landmarks are exact on both grids. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from spinediff.datasets.anatomy import random_anatomy

# Sagittal MR: index i → posterior (+y), j → inferior (-z), k → right (-x), in LPS.
MR_DIRECTION = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class PhantomSettings:
    """Geometry and misalignment of the generated images.

    The defaults keep volumes small (96 x 128 x 16 MR voxels) so that tests and the demo stay
    fast; ``mr_spacing=(0.8, 0.8, 3.5)`` with ``mr_shape=(192, 256, 16)`` gives clinical
    resolution.
    """

    mr_shape: tuple[int, int, int] = (96, 128, 16)  # ITK index order: AP, SI, LR (slices)
    mr_spacing: tuple[float, float, float] = (1.6, 1.6, 3.5)
    ct_spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    max_translation_mm: float = 10.0
    max_rotation_deg: float = 10.0
    ct_noise_hu: tuple[float, float] = (10.0, 20.0)
    mr_noise: tuple[float, float] = (0.015, 0.03)
    mr_bias_strength: float = 0.15


@dataclass
class PhantomCase:
    """One generated subject: images, masks, landmarks and the true transform."""

    case_id: str
    t1: sitk.Image
    t2: sitk.Image
    mr_labels: sitk.Image
    mr_instances: sitk.Image
    ct: sitk.Image
    ct_labels: sitk.Image
    ct_instances: sitk.Image
    ct_on_mr: sitk.Image
    mr_landmarks: dict[int, dict[str, np.ndarray]]
    ct_landmarks: dict[int, dict[str, np.ndarray]]
    true_transform: sitk.Euler3DTransform  # MR physical point → CT physical point (ITK resampling convention)
    rotation_axis: np.ndarray = field(default_factory=lambda: np.zeros(3))
    rotation_deg: float = 0.0
    translation_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    vertebra_labels: tuple[int, ...] = ()
    degenerated_discs: int = 0


def _rotation_matrix(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _grid_points(shape, spacing, origin, direction, offsets=None) -> np.ndarray:
    """Physical points (n, 3) of all voxels in numpy order (k, j, i), optionally shifted in index space."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    if offsets is not None:
        idx = idx + np.asarray(offsets)
    # (i, j, k) grid → transpose so the flattened order is numpy's (k, j, i).
    idx = idx.transpose(2, 1, 0, 3).reshape(-1, 3)
    return np.asarray(origin) + (idx * np.asarray(spacing)) @ np.asarray(direction).T


def _make_image(array: np.ndarray, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
    return image


def _bias_field(shape_kji: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field: exp of a random second-order polynomial over [-1, 1]^3."""
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_kji], indexing="ij")
    terms = [*axes, axes[0] * axes[1], axes[1] * axes[2], axes[0] * axes[2], axes[1] ** 2, axes[2] ** 2]
    log_field = sum(rng.normal(0, strength / 2) * t for t in terms)
    return np.exp(log_field).astype(np.float32)


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    real = signal + rng.normal(0, sigma, signal.shape)
    imag = rng.normal(0, sigma, signal.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def generate_case(seed: int, index: int, settings: PhantomSettings | None = None) -> PhantomCase:
    """Generate subject ``index`` of the phantom with ``seed`` (deterministic)."""
    settings = settings or PhantomSettings()
    rng = np.random.default_rng([int(seed), int(index)])
    anatomy = random_anatomy(rng)

    # ---- true misalignment: rotation about the spine centre, then translation.
    axis = _unit_vector(rng)
    angle_deg = float(rng.uniform(0.0, settings.max_rotation_deg))
    translation = _unit_vector(rng) * rng.uniform(0.0, settings.max_translation_mm)
    rotation = _rotation_matrix(axis, math.radians(angle_deg))
    transform = sitk.Euler3DTransform()
    transform.SetCenter((0.0, 0.0, 0.0))
    transform.SetMatrix(tuple(rotation.ravel()))
    transform.SetTranslation(tuple(float(t) for t in translation))

    # ---- MR grid, centred on the spine (slightly posterior so the back muscles are in view).
    mr_shape = np.asarray(settings.mr_shape)
    mr_spacing = np.asarray(settings.mr_spacing, dtype=float)
    mr_centre = np.array([0.0, 18.0, 0.0]) + rng.uniform(-4, 4, 3)
    mr_origin = mr_centre - MR_DIRECTION @ ((mr_shape - 1) / 2 * mr_spacing)
    kji = tuple(int(n) for n in mr_shape[::-1])
    # Partial volume across the thick slices: average 3 sub-slices for the intensities.
    t1 = np.zeros(kji, dtype=np.float32)
    t2 = np.zeros(kji, dtype=np.float32)
    for offset in (-1 / 3, 0.0, 1 / 3):
        points = _grid_points(mr_shape, mr_spacing, mr_origin, MR_DIRECTION, offsets=(0, 0, offset))
        tissue, instance = anatomy.evaluate(points)
        t1 += anatomy.tissue_t1[tissue].reshape(kji) / 3
        t2 += anatomy.tissue_t2[tissue].reshape(kji) / 3
        if offset == 0.0:
            mr_tissue, mr_instance = tissue.reshape(kji), instance.reshape(kji)
    bias = _bias_field(kji, rng, settings.mr_bias_strength)
    t1 = _rician(t1 * bias, rng.uniform(*settings.mr_noise), rng) * 1000.0
    t2 = _rician(t2 * bias, rng.uniform(*settings.mr_noise), rng) * 1000.0

    mr = lambda a: _make_image(a, mr_spacing, mr_origin, MR_DIRECTION)  # noqa: E731
    t1_img, t2_img = mr(t1), mr(t2)
    mr_labels = mr(anatomy.semantic(mr_tissue).astype(np.uint8))
    mr_instances = mr(mr_instance.astype(np.uint8))

    # ---- CT grid: axial, identity direction, another field of view, in the moved frame.
    ct_spacing = np.asarray(settings.ct_spacing, dtype=float)
    s_lo, s_hi = anatomy.extent_s()
    mr_si_fov = mr_shape[1] * mr_spacing[1]
    ct_fov = np.array([150.0, 175.0, min(mr_si_fov - 10.0, s_hi - s_lo + 40.0)])
    ct_shape = np.maximum(np.ceil(ct_fov / ct_spacing).astype(int), 8)
    ct_centre = transform.TransformPoint((0.0, 15.0, float(rng.uniform(-12, 12))))
    ct_origin = np.asarray(ct_centre) - (ct_shape - 1) / 2 * ct_spacing
    ct_points = _grid_points(ct_shape, ct_spacing, ct_origin, np.eye(3))
    # Anatomy is defined in the MR (body) frame: map CT points back through the inverse transform.
    body_points = (ct_points - translation) @ rotation  # R^T (p - t), rotation centre at the origin
    tissue, instance = anatomy.evaluate(body_points)
    ct_kji = tuple(int(n) for n in ct_shape[::-1])
    hu = anatomy.tissue_ct[tissue].reshape(ct_kji)
    hu = gaussian_filter(hu, sigma=0.6)  # scanner point-spread function
    hu = hu + rng.normal(0, rng.uniform(*settings.ct_noise_hu), hu.shape)
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    ct = lambda a: _make_image(a, ct_spacing, ct_origin, np.eye(3))  # noqa: E731
    ct_img = ct(hu)
    ct_labels = ct(anatomy.semantic(tissue).reshape(ct_kji).astype(np.uint8))
    ct_instances = ct(instance.reshape(ct_kji).astype(np.uint8))
    ct_on_mr = sitk.Resample(ct_img, t1_img, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)

    # ---- landmarks: body frame = MR physical space; CT landmarks through the true transform.
    mr_landmarks = anatomy.landmarks()
    ct_landmarks = {label: {name: np.asarray(transform.TransformPoint(tuple(p))) for name, p in pts.items()}
                    for label, pts in mr_landmarks.items()}
    mr_landmarks = _visible(mr_landmarks, t1_img)
    ct_landmarks = _visible(ct_landmarks, ct_img)

    return PhantomCase(
        case_id=f"phantom_{index:03d}", t1=t1_img, t2=t2_img, mr_labels=mr_labels, mr_instances=mr_instances,
        ct=ct_img, ct_labels=ct_labels, ct_instances=ct_instances, ct_on_mr=ct_on_mr,
        mr_landmarks=mr_landmarks, ct_landmarks=ct_landmarks, true_transform=transform,
        rotation_axis=axis, rotation_deg=angle_deg, translation_mm=translation,
        vertebra_labels=tuple(v.label for v in anatomy.vertebrae),
        degenerated_discs=sum(d.degenerated for d in anatomy.discs),
    )


def _visible(landmarks: dict[int, dict[str, np.ndarray]], image: sitk.Image,
             body_margin_mm: float = 14.0) -> dict[int, dict[str, np.ndarray]]:
    """Keep vertebrae whose landmarks lie inside the image and whose body is not cut by its border.

    The body counts as whole when its centroid is at least ``body_margin_mm`` (about half a
    lumbar body's height) from every border.
    """
    size = np.asarray(image.GetSize())
    margin = body_margin_mm / np.asarray(image.GetSpacing())
    margin = np.where(size * np.asarray(image.GetSpacing()) > 2 * body_margin_mm, margin, 0)
    keep = {}
    for label, points in landmarks.items():
        ok = True
        for name, p in points.items():
            idx = np.asarray(image.TransformPhysicalPointToContinuousIndex(tuple(float(c) for c in p)))
            pad = margin if name == "body" else 0
            ok &= bool(np.all(idx >= pad) and np.all(idx <= size - 1 - pad))
        if ok:
            keep[label] = points
    return keep


def landmarks_to_json(landmarks: dict[int, dict[str, np.ndarray]]) -> dict:
    """The landmark file format of documentation/dataset_format.md."""
    return {
        "space": "LPS",
        "units": "mm",
        "vertebrae": {str(label): {name: [round(float(c), 4) for c in p] for name, p in pts.items()}
                      for label, pts in sorted(landmarks.items())},
    }

