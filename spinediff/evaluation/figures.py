"""Figures (matplotlib, PNG): metric box plots, training curves, qualitative panels."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from spinediff.utilities.figures import pyplot, save_figure


def metric_boxplot(values: dict[str, Sequence[float]], metric: str, target: str | os.PathLike,
                   title: str = "") -> None:
    """Box plot (with the cases as dots) of one metric per method."""
    plt = pyplot()
    names = list(values)
    data = [[v for v in values[n] if v is not None and math.isfinite(v)] for n in names]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4))
    ax.boxplot([d if d else [np.nan] for d in data], tick_labels=names, showmeans=True)
    for i, d in enumerate(data, start=1):
        ax.scatter(np.full(len(d), i) + np.linspace(-0.08, 0.08, len(d)), d, s=12, alpha=0.7, color="k")
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, target)
    plt.close(fig)


def optional_image(path: str | os.PathLike | None) -> sitk.Image | None:
    """The image at ``path`` for a figure, or None if there is none (missing or unreadable: the panel leaves the
    cell grey)."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        return None


def checkpoint_logging(checkpoint: str | os.PathLike) -> dict:
    """The training log (nnU-Net's ``logging`` entry) of a checkpoint, loaded without executing code (nnU-Net's
    own checkpoints hold numpy scalars, which are allow-listed explicitly)."""
    import torch

    allowed = [np.dtype, np._core.multiarray.scalar, *[getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType")]]
    with torch.serialization.safe_globals(allowed):
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["logging"]


def training_curves(curves: dict[str, dict[str, list[float]]], target: str | os.PathLike) -> None:
    """Training and validation loss per epoch, and the validation score, for several runs."""
    plt = pyplot()
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
    for name, logging in curves.items():
        epochs = np.arange(len(logging.get("train_losses", [])))
        line, = ax_loss.plot(epochs, logging.get("train_losses", []), label=f"{name} train")
        if logging.get("val_losses"):
            ax_loss.plot(epochs[: len(logging["val_losses"])], logging["val_losses"], ls="--", color=line.get_color(),
                         label=f"{name} val")
        if logging.get("mean_fg_dice"):
            ax_score.plot(np.arange(len(logging["mean_fg_dice"])), logging["mean_fg_dice"], color=line.get_color(),
                          label=name)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    losses = [v for logging in curves.values() for key in ("train_losses", "val_losses")
              for v in logging.get(key, []) if v is not None and math.isfinite(v)]
    if losses and min(losses) > 0:  # nnU-Net's Dice + CE loss goes negative: a log axis would hide it
        ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=7)
    ax_score.set_xlabel("epoch")
    ax_score.set_ylabel("validation score (pseudo-Dice; SSIM for image tasks)")
    ax_score.legend(fontsize=7)
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
    save_figure(fig, target)
    plt.close(fig)


def _mid_slice(image: sitk.Image) -> tuple[np.ndarray, float]:
    """Mid-sagittal slice (anterior left, superior up) and its aspect ratio."""
    oriented = sitk.DICOMOrient(image, "PIL")
    array = sitk.GetArrayFromImage(oriented)
    spacing = oriented.GetSpacing()
    return array[array.shape[0] // 2], spacing[1] / spacing[0]


def qualitative_panel(rows: list[dict[str, sitk.Image | None]], columns: list[tuple[str, str, dict]],
                      target: str | os.PathLike, title: str = "") -> None:
    """One row per case; each column ``(title, key, imshow kwargs)`` shows ``row[key]``'s mid-sagittal slice
    (``row["_name"]`` labels the row).

    kwargs may hold ``overlay_on`` (another key: the column is drawn as a label overlay on that image).
    """
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.8 * len(columns), 3.3 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (name, key, kwargs) in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if row.get(key) is None:
                ax.set_facecolor("0.9")
                continue
            kwargs = dict(kwargs)
            base_key = kwargs.pop("overlay_on", None)
            array, aspect = _mid_slice(row[key])
            if base_key is not None and row.get(base_key) is not None:
                base, _ = _mid_slice(row[base_key])
                ax.imshow(base, cmap="gray", aspect=aspect, vmin=np.percentile(base, 1), vmax=np.percentile(base, 99))
                masked = np.ma.masked_where(array == 0, array)
                ax.imshow(masked, aspect=aspect, cmap=kwargs.pop("cmap", "tab10"), alpha=0.55, vmin=0, vmax=9,
                          interpolation="nearest")
            else:
                image = ax.imshow(array, aspect=aspect, interpolation="nearest", **kwargs)
                if kwargs.get("cmap") in ("magma", "inferno", "hot"):
                    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        if "_name" in row:
            axes[r, 0].set_ylabel(row["_name"], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, target, dpi=90)
    plt.close(fig)
