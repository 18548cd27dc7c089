"""Labels with an order in space (vertebral levels), and the augmentation that must respect it.

nnU-Net mirrors every axis and, for 2D patches of similar edge lengths, rotates by up to 180 degrees. That
is harmless for labels that mean the same thing wherever they are, but spine levels are numbered along
the spine: L1 is always above L2. Mirrored or upside-down training images show an L1 below an L2, an
anatomy that never occurs, and the network must spend its (budgeted) steps learning to tell up from
down before it can count. The planner therefore measures, from the training labels, along which axes the
labels keep one order in every case, and the spinediff configurations neither mirror along those axes nor
rotate by more than nnU-Net's 15 degrees (its own limit for elongated 2D patches).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from spinediff.datasets.dataset_json import annotated

#: Centroids closer than this along an axis (mm) say nothing about the order along it.
MIN_SEPARATION_MM = 5.0
#: Share of separated label pairs that must agree on the order (robust to one mislabelled case).
MIN_AGREEMENT = 0.95
#: Share of all label pairs that must be separated along the axis (labels side by side, not stacked, fail).
MIN_SEPARATED = 0.5
#: Rotation limit (degrees) in configurations with an ordered in-plane axis.
ORDERED_MAX_ROTATION_DEGREES = 15.0


def label_geometry(raw_dataset: Path, dataset_json: dict[str, Any]) -> list[dict[str, Any] | None]:
    """Per training case (sorted): None when its label map is empty, else the centroid of each label, the labels'
    extent (low/high) and the image's extent, in mm per array axis (nnU-Net's (z, y, x) order)."""
    import SimpleITK as sitk
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from scipy import ndimage

    cases = get_filenames_of_train_images_and_targets(str(raw_dataset), dataset_json)
    result: list[dict[str, Any] | None] = []
    for _, files in sorted(cases.items()):
        image = sitk.ReadImage(str(files["label"]))
        array = sitk.GetArrayFromImage(image)
        spacing = np.asarray(image.GetSpacing(), dtype=float)[::-1]
        foreground = annotated(array, dataset_json)  # nnU-Net's ignore label is no level
        values = [int(v) for v in np.unique(array[foreground])]
        if not values:
            result.append(None)
            continue
        centres = ndimage.center_of_mass(np.ones_like(array, dtype=np.uint8), array, values)
        where = np.argwhere(foreground)
        result.append({"centroids": {v: np.asarray(c, dtype=float) * spacing
                                     for v, c in zip(values, centres, strict=True)},
                       "low": where.min(0) * spacing, "high": (where.max(0) + 1) * spacing,
                       "size": np.asarray(array.shape) * spacing})
    return result


def case_centroids_mm(raw_dataset: Path, dataset_json: dict[str, Any]) -> list[dict[int, np.ndarray]]:
    """Per training case: label value -> centroid in mm per array axis (nnU-Net's (z, y, x) order)."""
    return [case["centroids"] if case else {} for case in label_geometry(raw_dataset, dataset_json)]


def ordered_axes(centroids: list[dict[int, np.ndarray]], n_axes: int) -> list[int]:
    """Axes along which the labels keep one order (by label value) in (nearly) every case."""
    axes = []
    for axis in range(n_axes):
        signs, pairs = [], 0
        for case in centroids:
            for a, b in combinations(sorted(case), 2):
                pairs += 1
                difference = case[b][axis] - case[a][axis]
                if abs(difference) >= MIN_SEPARATION_MM:
                    signs.append(np.sign(difference))
        if not pairs or len(signs) < MIN_SEPARATED * pairs or not signs:
            continue
        agreement = max(np.mean(np.asarray(signs) > 0), np.mean(np.asarray(signs) < 0))
        if agreement >= MIN_AGREEMENT:
            axes.append(axis)
    return axes


def augmentation_block(ordered: list[int], transpose_forward: list[int], dim: int) -> dict[str, Any]:
    """The configuration's ``augmentation`` block: mirror axes (patch axes) and the rotation limit.

    ``ordered`` are array axes before transpose; a 2D configuration's patch axes are the last two after it.
    """
    ordered_after = sorted(list(transpose_forward).index(a) for a in ordered)
    patch_axes = list(range(3 - dim, 3))
    ordered_patch = [patch_axes.index(a) for a in ordered_after if a in patch_axes]
    block: dict[str, Any] = {"ordered_label_axes": ordered_patch,
                             "mirror_axes": [a for a in range(dim) if a not in ordered_patch]}
    if ordered_patch:
        block["max_rotation_degrees"] = ORDERED_MAX_ROTATION_DEGREES
    return block


# ---------------------------------------------------------------------- position and field of view along the spine
#: Probability that a training patch is shifted (and maybe zoomed out) along the spine axis.
P_SHIFT = 0.5
#: Probability that a training patch's field of view is cut at a random height across the spine (0.3 before: with
#: nnU-Net's own scaling and rotation on top, half of Dataset501's 2d_cpu patches lost a level and a budgeted CPU
#: run learnt nothing in 600 steps; see documentation/planning.md).
P_CUT = 0.2
#: How far the levels may move (in level pitches, centroid to centroid): one and a half levels, so that the same
#: place in the patch holds different levels in training.
SHIFT_LEVELS = 1.5
#: Levels that stay visible at least after a cut (the stress test crops at most 35 % of a scan).
KEEP_LEVELS = 3.0
#: Zoom out until this many more levels would fit beside the labelled extent (nnU-Net's own scaling, 0.7-1.4 with
#: p 0.2, comes on top).
ZOOM_LEVELS = 1.0


def case_extents_mm(raw_dataset: Path, dataset_json: dict[str, Any]) -> list[dict[str, Any]]:
    """Per training case with labels: the centroid of each label, the labels' extent (low/high, mm per array axis in
    (z, y, x)) and the image's extent (mm)."""
    return [case for case in label_geometry(raw_dataset, dataset_json) if case]


def spine_axis(extents: list[dict[str, Any]], ordered: list[int]) -> int | None:
    """The ordered array axis along which the first and last label lie furthest apart (the spine's long axis)."""
    if not ordered or not extents:
        return None
    spans = []
    for case in extents:
        c = case["centroids"]
        if len(c) >= 2:
            spans.append(np.abs(c[max(c)] - c[min(c)]))
    if not spans:
        return None
    median = np.median(spans, axis=0)
    return int(max(ordered, key=lambda a: median[a]))


def field_of_view_block(extents: list[dict[str, Any]], ordered: list[int], transpose_forward: list[int],
                        patch_size: list[int], spacing: list[float]) -> dict[str, Any] | None:
    """The ``augmentation.field_of_view`` block of a configuration (patch ``patch_size`` at ``spacing``, in the
    transposed axis order), planned from the training labels: the spine axis in the patch, the level pitch and
    the labelled extent (mm), and from them how far to shift, zoom out and cut. None when the spine axis is not a
    patch axis (a 2D configuration whose slices cut across the spine) or the labels keep no order."""
    axis = spine_axis(extents, ordered)
    if axis is None:
        return None
    dim = len(patch_size)
    after = list(transpose_forward).index(axis)
    patch_axes = list(range(3 - dim, 3))
    if after not in patch_axes:
        return None
    patch_axis = patch_axes.index(after)
    pitches, labelled, image = [], [], []
    for case in extents:
        c = case["centroids"]
        if len(c) >= 2:
            pitches.append(abs(c[max(c)][axis] - c[min(c)][axis]) / (max(c) - min(c)))  # levels may be missing
        labelled.append(case["high"][axis] - case["low"][axis])
        image.append(case["size"][axis])
    pitch, extent = float(np.median(pitches)) if pitches else float(np.median(labelled)), float(np.median(labelled))
    patch_mm = float(patch_size[patch_axis]) * float(spacing[patch_axis])
    margin = max(0.0, (patch_mm - extent) / 2.0)
    return {
        "enabled": True,
        "axis": patch_axis,
        "p_shift": P_SHIFT,
        "max_shift_fraction": round(float(np.clip(SHIFT_LEVELS * pitch / patch_mm, 0.1, 0.5)), 3),
        "zoom_range": [round(float(np.clip(extent / (extent + ZOOM_LEVELS * pitch), 0.6, 1.0)), 3), 1.0],
        "p_cut": P_CUT,
        "max_cut_fraction": round(float(np.clip((margin + extent - KEEP_LEVELS * pitch) / patch_mm, 0.15, 0.6)), 3),
        "level_pitch_mm": round(pitch, 1),
        "labelled_extent_mm": round(extent, 1),
        "image_extent_mm": round(float(np.median(image)), 1),
        "patch_extent_mm": round(patch_mm, 1),
    }


# ---------------------------------------------------------------------- contrast
#: Contrast augmentation of MR segmentation (probabilities per training sample; see
#: spinediff.training.augmentation): inversion, a non-monotone remapping, strong gamma, a bias field. Sized so that
#: about half of the patches keep nnU-Net's own intensities (1 - 0.85^3 x 0.8), a remapping folds the intensity
#: range at most twice (3-4 control points: a tissue swap such as CSF between T2w and T1w; 7 points turned noise
#: into texture) and a bias field varies about 3x across a patch (MONAI's coefficients 0-0.2; 0.2-0.6 gave a
#: median 117x, far beyond a surface coil's shading).
CONTRAST_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "p_inversion": 0.15,
    "p_remap": 0.15,
    "remap_control_points": [3, 4],
    "p_gamma": 0.15,
    "gamma_range": [0.5, 2.0],
    "p_bias_field": 0.2,
    "bias_field_degree": 3,
    "bias_field_coefficients": [0.0, 0.2],
}


def contrast_block(writes_labels: bool, normalization_schemes: list[str]) -> dict[str, Any] | None:
    """The ``augmentation.contrast`` block: on for segmentation of images that nnU-Net normalises as MR (any scheme
    but ``CTNormalization``: a CT's Hounsfield units mean the same in every scan, an MR's intensities do not);
    off (None) for CT inputs and for translation and generation, whose targets must keep their intensities."""
    if not writes_labels or not normalization_schemes:
        return None
    if any("CTNormalization" in str(s) for s in normalization_schemes):
        return None
    return dict(CONTRAST_DEFAULTS)
