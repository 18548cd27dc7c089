"""PNG previews of phantom cases: mid-sagittal T1w, T2w, aligned CT, labels, and the raw CT."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from spinediff.io import atomic_path

LABEL_COLOURS = {1: (0.95, 0.85, 0.2), 2: (0.2, 0.8, 0.95), 3: (0.95, 0.3, 0.5)}


def _mid_sagittal(image: sitk.Image) -> tuple[np.ndarray, float]:
    """Mid-sagittal slice oriented superior-up, anterior-left, and its pixel aspect ratio."""
    oriented = sitk.DICOMOrient(image, "PIL")  # i → posterior, j → inferior, k → left
    array = sitk.GetArrayFromImage(oriented)  # (k, j, i)
    spacing = oriented.GetSpacing()
    return array[array.shape[0] // 2], spacing[1] / spacing[0]


def _overlay(labels: np.ndarray) -> np.ndarray:
    rgba = np.zeros(labels.shape + (4,), dtype=float)
    for value, colour in LABEL_COLOURS.items():
        rgba[labels == value] = (*colour, 0.55)
    return rgba


def save_phantom_preview(cases: Sequence, target: str | os.PathLike) -> None:
    """One row per case: T1w | T2w | CT on the MR grid | labels over T2w | raw (misaligned) CT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["T1w", "T2w", "CT (aligned to MR)", "labels over T2w", "raw CT (own grid)"]
    fig, axes = plt.subplots(len(cases), len(columns), figsize=(3.0 * len(columns), 3.6 * len(cases)),
                             squeeze=False)
    for row, case in enumerate(cases):
        t1, aspect = _mid_sagittal(case.t1)
        t2, _ = _mid_sagittal(case.t2)
        ct, _ = _mid_sagittal(case.ct_on_mr)
        labels, _ = _mid_sagittal(case.mr_labels)
        raw_ct, raw_aspect = _mid_sagittal(case.ct)
        mr_window = (0, np.percentile(t2, 99.5))
        panels = [
            (t1, (0, np.percentile(t1, 99.5)), aspect),
            (t2, mr_window, aspect),
            (ct, (-250, 1250), aspect),
            (t2, mr_window, aspect),
            (raw_ct, (-250, 1250), raw_aspect),
        ]
        for col, (image, window, asp) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], aspect=asp, interpolation="nearest")
            if col == 3:
                ax.imshow(_overlay(labels), aspect=asp, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=10)
        axes[row, 0].set_ylabel(f"{case.case_id}\n{case.rotation_deg:.1f}° / "
                                f"{np.linalg.norm(case.translation_mm):.1f} mm", fontsize=9)
    fig.suptitle("spinediff phantom: mid-sagittal slices (anterior left, superior up); "
                 "labels: vertebra yellow, disc cyan, canal pink", fontsize=10)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
