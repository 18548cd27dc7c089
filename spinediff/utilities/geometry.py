"""The one comparison of two image grids (size, spacing, origin, direction), with one set of tolerances, used
by dataset validation, prediction inputs, ensembling, evaluation and registration; and a grid's orientation code,
used by dataset validation and the review flags."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

# Like nnU-Net's integrity check (np.allclose defaults), a little looser on origin for float32 headers.
SPACING_RTOL, ORIGIN_ATOL, DIRECTION_ATOL = 1e-5, 1e-4, 1e-5


def same_geometry(a: sitk.Image, b: sitk.Image) -> str | None:
    """None when ``b`` lies on ``a``'s grid; otherwise what differs, in words (for an error message)."""
    if a.GetSize() != b.GetSize():
        return f"size {b.GetSize()} differs from {a.GetSize()}"
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=SPACING_RTOL, atol=0):
        return f"spacing {tuple(round(s, 6) for s in b.GetSpacing())} differs from {a.GetSpacing()}"
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=ORIGIN_ATOL):
        return f"origin {b.GetOrigin()} differs from {a.GetOrigin()}"
    if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=DIRECTION_ATOL):
        return "direction (orientation) differs"
    return None


def orientation_code(direction) -> str | None:
    """The three-letter orientation code of a 3D grid's direction cosines, in ITK's convention (as
    ``sitk.DICOMOrient`` takes it: ``LPS`` for an identity direction); None for a 2D grid."""
    if len(direction) != 9:
        return None
    return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines([float(d) for d in direction])
