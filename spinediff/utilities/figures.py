"""matplotlib for every layer: a pyplot on the Agg backend with default styles, and an atomic PNG write."""

from __future__ import annotations

import os

from spinediff.io import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), its styles reset to matplotlib's defaults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # nnU-Net's progress plot changes matplotlib's global state (font size 50, then seaborn's
    # set(font_scale=2.5) with its grey grid style); start every figure of ours from the defaults.
    matplotlib.rcdefaults()
    matplotlib.rcParams.update({"font.size": 9, "font.weight": "normal"})
    return plt


def save_figure(fig, target: str | os.PathLike, dpi: int = 100) -> None:
    """Write ``fig`` to ``target`` atomically (nothing half-written appears under ``target``)."""
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")

