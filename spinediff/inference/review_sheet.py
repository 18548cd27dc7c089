"""The cases a person should open, drawn: ``review.png`` beside ``review.csv``.

``review.csv`` says which cases the model's review rule flags and why; checking one means opening its segmentation
beside its image. The sheet puts the flagged cases (most doubtful first, at most :data:`MAX_PANELS`) side by side:
for each, the sagittal slice that holds the most of its segmentation, the spine upright (L1 at the top) whatever
the acquisition plane or the image header (:func:`case_view`), the scan in grey (when its image is known), every
label in its colour with its name at its centre, and the reasons for the flag under it. A level numbered one off
(T12 called L1, S1 called L5) or a label on the wrong tissue shows at a glance; a scan without a flag is not drawn.
``spinediff predict`` and ``spinediff postprocess`` write it whenever a case is flagged.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REVIEW_SHEET = "review.png"
#: The most cases one sheet draws (its title counts the rest; review.csv ranks them all).
MAX_PANELS = 12
#: Colours of labels 1, 2, ... (matplotlib's tab10, cycled).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


@dataclass(frozen=True)
class SheetCase:
    """One flagged case: its written segmentation, the image that was predicted (None: not known) and why."""

    case: str
    segmentation: Path
    image: Path | None
    reasons: tuple[str, ...]


def case_view(segmentation, image=None, ignore: int | None = None) -> tuple[np.ndarray, np.ndarray | None, float]:
    """The slice to draw of a case: ``(labels, image or None, pixel height / width)``, the spine upright.

    Read from the data, not from the header (the spine datasets here hold sagittal stacks under an identity
    direction): the spine runs along the axis of the segmentation's longest extent (mm), drawn top to bottom; a 3D
    segmentation is cut across the axis it was acquired in slices (the coarsest spacing; then the fewest voxels;
    then the header's left-right axis), at the slice with the most labelled voxels. The end that holds the lowest
    label (L1 of L1..L5) is drawn at the top; without two labels apart along the spine, the header's superior end.
    The image is used when it lies on the segmentation's grid (its first channel), else left out. ``ignore``:
    nnU-Net's ignore label (a reference mask's unannotated band across the scan), drawn as background."""
    import SimpleITK as sitk

    from spinediff.utilities.geometry import same_geometry

    labels = sitk.GetArrayFromImage(segmentation)
    if ignore is not None:
        labels = np.where(labels == ignore, 0, labels)
    picture = sitk.GetArrayFromImage(image) if image is not None and same_geometry(segmentation, image) is None \
        else None
    dim = labels.ndim
    spacing = np.asarray(segmentation.GetSpacing(), dtype=float)[::-1]  # numpy axis order
    matrix = np.asarray(segmentation.GetDirection(), dtype=float).reshape(dim, dim)[:, ::-1]  # world vector per axis
    foreground = labels > 0
    spans = [np.nonzero(np.any(foreground, axis=tuple(a for a in range(dim) if a != axis)))[0] for axis in range(dim)]
    extent = [(span.max() - span.min() + 1) * spacing[axis] if span.size else 0.0 for axis, span in enumerate(spans)]
    spine = int(np.argmax(extent))
    if dim == 3:
        across = [a for a in range(3) if a != spine]
        across.sort(key=lambda a: (-round(float(spacing[a]), 3), labels.shape[a], -abs(matrix[0, a])))
        cut = across[0]
        index = int(np.argmax(foreground.sum(axis=tuple(a for a in range(3) if a != cut))))
        labels = np.take(labels, index, axis=cut)
        picture = None if picture is None else np.take(picture, index, axis=cut)
        rows, columns, kept = spine, across[1], [a for a in range(3) if a != cut]
    else:
        rows, columns, kept = spine, 1 - spine, [0, 1]
    if kept.index(rows) != 0:  # the spine along the rows
        labels, picture = labels.T, None if picture is None else picture.T
    if _head_at_bottom(labels, float(matrix[2, rows]) if dim == 3 else 0.0):
        labels, picture = labels[::-1], None if picture is None else picture[::-1]
    return labels, picture, float(spacing[rows] / spacing[columns])


def _head_at_bottom(labels: np.ndarray, superior_component: float) -> bool:
    """Whether the rows of an upright slice run from the feet up: its lowest label's centre lies below its highest
    label's (by more than a tenth of the rows), else the header's superior direction (``superior_component``: the
    world z of the row axis) points down the rows."""
    values = [v for v in np.unique(labels) if v > 0]
    if len(values) >= 2:
        low, high = (np.nonzero(labels == v)[0].mean() for v in (values[0], values[-1]))
        if abs(high - low) > 0.1 * labels.shape[0]:
            return bool(low > high)
    return superior_component > 0  # LPS: world z grows to the head, so increasing rows would run to it


def _overlay(labels: np.ndarray) -> np.ndarray:
    """RGBA overlay of a label slice: each label in its colour, half transparent; background clear."""
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*labels.shape, 4))
    for value in np.unique(labels):
        if value > 0:
            rgba[labels == value] = (*to_rgba(COLOURS[(int(value) - 1) % len(COLOURS)])[:3], 0.45)
    return rgba


def write_review_sheet(cases: Sequence[SheetCase], dataset_json: dict, target: str | Path) -> Path:
    """Draw ``cases`` (the flagged ones, most doubtful first; the first :data:`MAX_PANELS`) into ``target`` (PNG,
    written atomically). ``dataset_json``: the model's, whose label names are written at each label's centre and
    whose ignore label (nnU-Net's, a reference mask's band across the scan) is drawn as background."""
    import matplotlib.patheffects as effects
    import SimpleITK as sitk

    from spinediff.datasets.dataset_json import ignore_label, label_names
    from spinediff.io import read_image
    from spinediff.utilities.figures import pyplot, save_figure

    labels, ignore = label_names(dataset_json), ignore_label(dataset_json)
    drawn = list(cases)[:MAX_PANELS]
    total = len(cases)
    columns = min(4, len(drawn))
    rows = -(-len(drawn) // columns)
    plt = pyplot()
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 4.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, case in zip(axes.flat, drawn, strict=False):  # the last row may have empty axes
        segmentation = read_image(case.segmentation)
        image = read_image(case.image) if case.image is not None else None
        if image is not None and image.GetDimension() != segmentation.GetDimension():
            image = None
        if image is not None and image.GetNumberOfComponentsPerPixel() > 1:
            image = sitk.VectorIndexSelectionCast(image, 0)
        slice_labels, picture, aspect = case_view(segmentation, image, ignore)
        if picture is not None:
            low, high = np.percentile(picture, (1, 99))
            ax.imshow(picture, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), aspect=aspect,
                      interpolation="nearest")
        else:
            ax.imshow(np.zeros(slice_labels.shape), cmap="gray", vmin=0, vmax=1, aspect=aspect)
        ax.imshow(_overlay(slice_labels), aspect=aspect, interpolation="nearest")
        for value in np.unique(slice_labels):
            if value <= 0:
                continue
            rows_at, cols_at = np.nonzero(slice_labels == value)
            text = ax.text(float(cols_at.mean()), float(rows_at.mean()), labels.get(int(value), str(int(value))),
                           color="white", fontsize=7, ha="center", va="center")
            text.set_path_effects([effects.withStroke(linewidth=2, foreground="black")])
        reasons = "\n".join(textwrap.fill(reason, 46) for reason in case.reasons) or "flagged"
        ax.set_title(f"{case.case}\n{reasons}", fontsize=6.5, loc="left")
    left_out = total - len(drawn)
    heading = f"{total} case(s) flagged for review, most doubtful first"
    if left_out > 0:
        heading += f" ({left_out} more not drawn; review.csv ranks them all)"
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    save_figure(fig, target, dpi=110)
    plt.close(fig)
    return Path(target)
