"""The stress test drawn (``stress_position.png`` beside ``stress_position.json``): every scan's level Dice in every
variant, the variant's mean, the plain cross-validation and the issue's target (plain − 0.05), the failures and
the scans the review flagged marked, so that which cuts fail and whether the review catches them is seen at once."""

from __future__ import annotations

import os

import numpy as np

#: the stress test's target: the stressed mean within this of the plain cross-validation (issue 34)
TARGET_GAP = 0.05
#: a scan below this level Dice counts as a failure (its levels numbered wrong): the stress test's table and figure
FAILURE = 0.5


def variant_points(result: dict, source: str) -> list[dict]:
    """Per variant of ``source`` in the summary's order: its name, the cases' level Dice, which of them the review
    flagged, and the mean (what the figure draws)."""
    points = []
    for row in (r for r in result["summary"] if r["source"] == source):
        cases = [c for c in result["cases"] if c["source"] == source and c["variant"] == row["variant"]]
        points.append({"variant": row["variant"], "mean": row["mean_level_dice"],
                       "dice": [float(c["level_dice"]) for c in cases],
                       "flagged": [bool(c.get("flagged")) for c in cases]})
    return points


def stress_figure(result: dict, target: str | os.PathLike) -> list[dict]:
    """Draw ``result`` (a ``stress_position.json``'s content) to ``target`` (PNG, written atomically): one panel
    per source of scans (the model's dataset, and another dataset's when it was tested too). Returns the drawn
    points per source (:func:`variant_points`)."""
    from spinediff.utilities.figures import pyplot, save_figure

    plt = pyplot()
    drawn = [{"source": source, "variants": variant_points(result, source)}
             for source in dict.fromkeys(r["source"] for r in result["summary"])]
    widest = max(len(panel["variants"]) for panel in drawn)
    fig, axes = plt.subplots(1, len(drawn), figsize=(1.1 * widest * len(drawn) + 1.5, 4.2), squeeze=False)
    rng = np.random.default_rng(0)  # the same jitter every time
    for ax, panel in zip(axes[0], drawn, strict=True):
        source, points = panel["source"], panel["variants"]
        plain = next((p["mean"] for p in points if p["variant"] == "plain"), None)
        stressed = [p["mean"] for p in points if p["variant"] != "plain"]
        for x, point in enumerate(points):
            dice = np.asarray(point["dice"], dtype=float)
            jitter = x + rng.uniform(-0.18, 0.18, size=dice.size)
            failed = ~(dice >= FAILURE)
            flagged = np.asarray(point["flagged"], dtype=bool)
            shown = np.nan_to_num(dice, nan=0.0)
            ax.scatter(jitter[~failed], shown[~failed], s=18, color="tab:blue", alpha=0.7, zorder=3,
                       label="scan" if x == 0 else None)
            ax.scatter(jitter[failed], shown[failed], s=22, color="tab:red", marker="x", zorder=3,
                       label=f"level Dice < {FAILURE}" if x == 0 else None)
            ax.scatter(jitter[flagged], shown[flagged], s=80, facecolors="none", edgecolors="black", linewidths=0.9,
                       zorder=4, label="flagged for review" if x == 0 else None)
            ax.hlines(point["mean"], x - 0.3, x + 0.3, color="black", linewidth=2, zorder=5,
                      label="variant mean" if x == 0 else None)
        if plain is not None:
            ax.axhline(plain, color="tab:green", linestyle="--", linewidth=1, label=f"plain CV {plain:.3f}")
            ax.axhline(plain - TARGET_GAP, color="tab:orange", linestyle=":", linewidth=1.2,
                       label=f"target: plain − {TARGET_GAP}")
        ax.set_xticks(range(len(points)), [p["variant"].replace("_", " ") for p in points], rotation=35,
                      ha="right")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("mean L1–L5 Dice per scan (after the numbering)")
        title = source
        if stressed:
            mean = float(np.mean(stressed))
            title += f"\nstressed mean {mean:.3f}" + (f" ({mean - plain:+.3f} against plain)" if plain is not None
                                                       else "")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(loc="lower left", fontsize=7, framealpha=0.9)
    fig.suptitle(f"Stress test of position and field of view: {os.path.basename(str(result['model']))}, "
                 f"folds {', '.join(result['folds'])}", fontsize=10, y=1.04)
    save_figure(fig, target)
    plt.close(fig)
    return drawn
