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

#: Centroids closer than this along an axis (mm) say nothing about the order along it.
MIN_SEPARATION_MM = 5.0
#: Share of separated label pairs that must agree on the order (robust to one mislabelled case).
MIN_AGREEMENT = 0.95
#: Share of all label pairs that must be separated along the axis (labels side by side, not stacked, fail).
MIN_SEPARATED = 0.5
#: Rotation limit (degrees) in configurations with an ordered in-plane axis.
ORDERED_MAX_ROTATION_DEGREES = 15.0


def case_centroids_mm(raw_dataset: Path, dataset_json: dict[str, Any]) -> list[dict[int, np.ndarray]]:
    """Per training case: label value -> centroid in mm per array axis (nnU-Net's (z, y, x) order)."""
    import SimpleITK as sitk
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from scipy import ndimage

    cases = get_filenames_of_train_images_and_targets(str(raw_dataset), dataset_json)
    result = []
    for _, files in sorted(cases.items()):
        image = sitk.ReadImage(str(files["label"]))
        array = sitk.GetArrayFromImage(image)
        spacing = np.asarray(image.GetSpacing(), dtype=float)[::-1]
        values = [int(v) for v in np.unique(array) if v > 0]
        if not values:
            result.append({})
            continue
        centres = ndimage.center_of_mass(np.ones_like(array, dtype=np.uint8), array, values)
        result.append({v: np.asarray(c, dtype=float) * spacing for v, c in zip(values, centres, strict=True)})
    return result


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
