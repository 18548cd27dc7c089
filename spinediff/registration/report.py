"""Quality reports of a registration run: per-case JSON, one Markdown summary, PNG overlays."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk

# CT values above this (HU) are drawn as the bone contour on the MR.
BONE_THRESHOLD_HU = 200.0


def error_statistics(errors: np.ndarray | None) -> dict[str, float] | None:
    """Mean, median and maximum of distances in mm (None for no values)."""
    if errors is None or len(errors) == 0:
        return None
    errors = np.asarray(errors, dtype=float)
    return {"mean": float(errors.mean()), "median": float(np.median(errors)), "max": float(errors.max())}


@dataclass
class CaseReport:
    """What happened to one case; serialised to ``CASE_report.json`` and one summary row."""

    case: str
    status: str = "ok"  # ok | failed
    error: str | None = None
    transform: str = "rigid"
    landmarks_per_vertebra: int = 2
    landmark_source: str = "masks"
    vertebrae_used: list[int] = field(default_factory=list)
    vertebrae_excluded: dict[int, str] = field(default_factory=dict)
    landmarks_matched: int = 0
    residual_before_mm: dict[str, float] | None = None
    residual_after_mm: dict[str, float] | None = None
    tre_mm: dict[str, float] | None = None
    rotation_error_deg: float | None = None
    estimated_rotation_deg: float | None = None
    estimated_translation_mm: float | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data["vertebrae_excluded"] = {str(k): v for k, v in self.vertebrae_excluded.items()}
        return data


def _fmt(stats: dict[str, float] | None, keys: tuple[str, ...] = ("mean", "max")) -> str:
    if stats is None:
        return "-"
    return " / ".join(f"{stats[key]:.2f}" for key in keys)


def summary_markdown(reports: list[CaseReport], title: str = "Registration summary") -> str:
    """One Markdown table over all cases, followed by the list of failures."""
    lines = [
        f"# {title}",
        "",
        "Distances in mm. Residual: distance between matched landmarks (MR landmarks mapped into the "
        "CT) before (identity) and after registration. TRE: target registration error over the MR "
        "vertebra voxels against the true transform, where one is known.",
        "",
        "| case | status | transform | landmarks/vertebra | matched points | residual before (mean / max) "
        "| residual after (mean / max) | TRE (mean / median / max) | rotation error (deg) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        rotation = "-" if report.rotation_error_deg is None else f"{report.rotation_error_deg:.2f}"
        lines.append(
            f"| {report.case} | {report.status} | {report.transform} | {report.landmarks_per_vertebra} "
            f"| {report.landmarks_matched} | {_fmt(report.residual_before_mm)} "
            f"| {_fmt(report.residual_after_mm)} "
            f"| {_fmt(report.tre_mm, ('mean', 'median', 'max'))} | {rotation} |"
        )
    ok = [r for r in reports if r.status == "ok"]
    tre = [r.tre_mm["mean"] for r in ok if r.tre_mm]
    lines += ["", f"{len(ok)} of {len(reports)} cases registered."]
    if tre:
        lines.append(f"Per-case mean TRE over cases: median {np.median(tre):.2f} mm, max {np.max(tre):.2f} mm.")
    failed = [r for r in reports if r.status != "ok"]
    if failed:
        lines += ["", "## Failed cases", ""]
        lines += [f"- {r.case}: {r.error}" for r in failed]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ overlay


def _oriented_slice(
    image: sitk.Image,
    array: np.ndarray,
    through: np.ndarray,
    normal_axis: int,
    row_axis: int,
    column_axis: int,
) -> tuple[np.ndarray, float]:
    """2D slice of ``array`` (numpy z, y, x) perpendicular to the index axis closest to the physical
    ``normal_axis``, through the physical point ``through``. Rows run along the physical
    ``row_axis`` (towards decreasing physical coordinate: superior at the top), columns along the
    physical ``column_axis`` (increasing). Returns the slice and the row/column pixel aspect."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)  # column a = physical direction of index axis a
    spacing = np.asarray(image.GetSpacing())
    used: list[int] = []
    axes = []
    for physical in (normal_axis, row_axis, column_axis):
        scores = [abs(direction[physical, a]) if a not in used else -1.0 for a in range(3)]
        axis = int(np.argmax(scores))
        used.append(axis)
        axes.append(axis)
    index = image.TransformPhysicalPointToContinuousIndex([float(v) for v in through])
    position = int(np.clip(round(index[axes[0]]), 0, image.GetSize()[axes[0]] - 1))
    volume = np.transpose(array, (2, 1, 0))  # -> ITK index order (i, j, k)
    plane = np.take(volume, position, axis=axes[0])
    remaining = [a for a in range(3) if a != axes[0]]
    if remaining.index(axes[1]) != 0:
        plane = plane.T
    if direction[row_axis, axes[1]] > 0:  # increasing index goes up the physical axis: flip for "top = high"
        plane = plane[::-1, :]
    if direction[column_axis, axes[2]] < 0:
        plane = plane[:, ::-1]
    return plane, float(spacing[axes[1]] / spacing[axes[2]])


def overlay_png(
    mr: sitk.Image,
    ct_on_mr: sitk.Image,
    title: str,
    mr_mask: sitk.Image | None = None,
    bone_threshold_hu: float = BONE_THRESHOLD_HU,
) -> bytes:
    """PNG (bytes) of the MR with the registered CT's bone contour: a sagittal and a coronal slice
    through the centre of the vertebrae (or of the image). The MR vertebra mask, when given, is
    outlined too, so that a misalignment shows as two contours that disagree."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    mr_array = sitk.GetArrayFromImage(mr).astype(np.float32)
    ct_array = sitk.GetArrayFromImage(ct_on_mr).astype(np.float32)
    mask_array = None if mr_mask is None else (sitk.GetArrayFromImage(mr_mask) > 0).astype(np.float32)
    if mask_array is not None and mask_array.any():
        from spinediff.registration.landmarks import index_to_physical

        through = index_to_physical(mr, np.stack(np.nonzero(mask_array))).mean(axis=0)
    else:
        centre = [(s - 1) / 2.0 for s in mr.GetSize()]
        through = np.asarray(mr.TransformContinuousIndexToPhysicalPoint(centre))
    low, high = np.percentile(mr_array, [1.0, 99.5])
    figure, panels = plt.subplots(1, 2, figsize=(9, 5), dpi=90)
    # LPS: 0 = x (left), 1 = y (posterior), 2 = z (superior).
    for panel, (name, normal, column) in zip(panels, (("sagittal", 0, 1), ("coronal", 1, 0)), strict=True):
        mr_slice, aspect = _oriented_slice(mr, mr_array, through, normal, 2, column)
        ct_slice, _ = _oriented_slice(mr, ct_array, through, normal, 2, column)
        panel.imshow(mr_slice, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
        if ct_slice.max() > bone_threshold_hu > ct_slice.min():
            panel.contour(ct_slice, levels=[bone_threshold_hu], colors="red", linewidths=0.8)
        if mask_array is not None:
            mask_slice, _ = _oriented_slice(mr, mask_array, through, normal, 2, column)
            if 0 < mask_slice.max():
                panel.contour(mask_slice, levels=[0.5], colors="cyan", linewidths=0.7)
        panel.set_title(name)
        panel.set_axis_off()
    figure.suptitle(f"{title}: MR, CT bone > {bone_threshold_hu:.0f} HU (red), MR vertebrae (cyan)", fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
