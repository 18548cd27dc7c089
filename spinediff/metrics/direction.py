"""Which way is better for each metric: the one home of a metric's direction.

The tasks' ranking (``Task.higher_is_better``), ``find_best``'s ranking and messages, the benchmark's tables and the
report's case panel all ask :func:`higher_is_better`; ``tests/test_architecture.py`` fails on a second table.
"""

from __future__ import annotations

#: True where a higher value is better (overlaps, similarity), False where lower is (errors, distances).
HIGHER_IS_BETTER: dict[str, bool] = {
    "dice": True, "dice_pp": True, "dice_merged": True, "dice_downstream": True, "dice_gen": True,
    "psnr": True, "psnr_body": True, "ssim": True, "ms_ssim": True,
    "mae": False, "mae_body": False, "mae_bone": False, "hd95": False, "asd": False, "fid": False,
}


def higher_is_better(metric: str, default: bool | None = None) -> bool:
    """Is a higher ``metric`` better? An unknown metric gives ``default``, or a KeyError naming the known ones."""
    if metric in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[metric]
    if default is None:
        raise KeyError(f"no direction known for metric {metric!r}; known: {', '.join(sorted(HIGHER_IS_BETTER))}")
    return default


def direction(metric: str) -> str:
    """``"higher"`` or ``"lower"`` (is better), for messages and JSON records."""
    return "higher" if higher_is_better(metric) else "lower"
