"""Time budgets: how much training a configuration gets, measured on the machine that will train it.

nnU-Net plans for memory and trains 1000 epochs x 250 iterations, whatever the hardware; on a CPU that
schedule is out of reach and a run cut short by the clock never anneals its learning rate. With a
budget (``spinediff plan --budget 20m``) the planner instead

1. reads the **foreground extent** (bounding box of all labels of every training case, in mm, after
   nnU-Net's transpose; for translation the body, i.e. the nonzero crop) and requires a patch that
   covers it with a margin (:func:`required_field_of_view`);
2. picks the **finest spacing** at which such a patch trains fast enough to fit :data:`TARGET_STEPS`
   steps into the budget, coarsening the spacing when it cannot (as nnU-Net's ``3d_lowres`` does, here
   for 2D too): field of view before resolution;
3. **measures** the chosen configuration's training step on this machine (a few timed steps of the real
   network, :func:`measure_step_seconds`) and turns the budget into a schedule of epochs x iterations
   whose poly learning-rate decay ends exactly when the budget does (:func:`schedule_for_budget`).

``spinediff train`` follows that schedule and refits the number of epochs when the measured speed
differs from the plan (:mod:`spinediff.training.schedule`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spinediff.datasets.dataset_json import annotated
from spinediff.errors import SpineDiffError
from spinediff.tasks import Task
from spinediff.utilities.argtypes import parse_duration

#: Steps a budget should buy at least. Calibration (shared/docs/nnunet-notes.md): nnU-Net's trainer reached
#: Dice 0.89 on real lumbar MRI after 2 000 annealed steps of a 2D whole-slice configuration, and stayed
#: near zero after 400 steps of a configuration sized for memory. Fewer steps than this and the planner
#: coarsens the spacing (cheaper steps) instead.
TARGET_STEPS = 2000
#: Never more steps than nnU-Net's own schedule (1000 epochs x 250 iterations).
MAX_STEPS = 250_000
#: Share of the budget planned for training steps; the rest covers data loading and per-epoch validation
#: (the trainer measures the real share and refits the schedule after its first epochs).
STEP_SHARE = 0.85
#: Margin around the foreground extent, as a share of that extent on each side: L1-L5 plus about one
#: vertebra above and below at lumbar proportions, which is what tells the level numbers apart.
FOV_MARGIN = 0.25
#: Spacing factors tried, finest first (relative to nnU-Net's full-resolution spacing).
SPACING_FACTORS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
#: Foreground extent percentile over cases (robust to one odd case, covers nearly all).
EXTENT_PERCENTILE = 95

#: The shortest ``spinediff plan --budget``: below it :data:`TARGET_STEPS` steps leave under 13 ms a step, and the
#: planner shrinks the patch to the smallest U-Net with one downsampling (on this project's 2-core CPU the
#: tiny test dataset reached that limit at about 12 s), so the plans would train a few hundred steps of a toy.
MIN_PLAN_BUDGET_SECONDS = 30.0


def parse_budget(text: str | float | int) -> float:
    """``"20m"``, ``"12h"``, ``"90s"``, ``"1.5h"`` or a bare number of minutes -> seconds
    (:func:`spinediff.utilities.argtypes.parse_duration`)."""
    return parse_duration(text, "budget")


def format_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:.3g} s"


# ---------------------------------------------------------------------------------------------- extent
def case_extents_mm(raw_dataset: Path, dataset_json: dict[str, Any], use_labels: bool) -> list[np.ndarray]:
    """Per training case, the extent (mm) of the labelled foreground (``use_labels``; nnU-Net's ignore label is not
    foreground) or of the image's
    nonzero region, per array axis in nnU-Net's (z, y, x) order (before transpose)."""
    import SimpleITK as sitk
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    cases = get_filenames_of_train_images_and_targets(str(raw_dataset), dataset_json)
    extents = []
    for case, files in sorted(cases.items()):
        path = files["label"] if use_labels else files["images"][0]
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise SpineDiffError(f"{path} (case {case}) cannot be read ({exc}); run `spinediff validate`.") from None
        array = sitk.GetArrayViewFromImage(image)
        mask = annotated(array, dataset_json) if use_labels else array > 0
        spacing = np.asarray(image.GetSpacing(), dtype=float)[::-1]  # numpy (z, y, x) order
        if not mask.any():
            continue
        corners = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
                   for axis in range(mask.ndim)]
        extents.append(np.array([(c[-1] - c[0] + 1) for c in corners], dtype=float) * spacing)
    return extents


def foreground_extent_mm(raw_dataset: Path, dataset_json: dict[str, Any], task: Task,
                         transpose_forward: list[int]) -> np.ndarray | None:
    """The dataset's foreground extent in mm per axis after ``transpose_forward`` (95th percentile over
    cases): all labels for segmentation and generation, the body (nonzero source image) for translation.
    None when nothing is labelled."""
    extents = case_extents_mm(raw_dataset, dataset_json, use_labels=task.field_of_view_from_labels)
    if not extents:
        return None
    extent = np.percentile(np.stack(extents), EXTENT_PERCENTILE, axis=0)
    return extent[list(transpose_forward)]


def required_field_of_view(extent_mm: np.ndarray | None, median_extent_mm: np.ndarray) -> np.ndarray:
    """The extent plus :data:`FOV_MARGIN` on each side, never more than the median image."""
    median_extent_mm = np.asarray(median_extent_mm, dtype=float)
    if extent_mm is None:
        return median_extent_mm
    return np.minimum(np.asarray(extent_mm, dtype=float) * (1 + 2 * FOV_MARGIN), median_extent_mm)


def coarser_spacing(fine: np.ndarray, factor: float) -> np.ndarray:
    """nnU-Net's low-resolution rule: coarsen the finest axes first (up to the coarsest), then all."""
    fine = np.asarray(fine, dtype=float)
    return np.maximum(fine, float(np.min(fine)) * factor)


# ---------------------------------------------------------------------------------------------- measuring
def measure_step_seconds(arch: dict[str, Any], patch_size: tuple[int, ...], batch_size: int, input_channels: int,
                         output_channels: int, device: str = "cpu", deep_supervision: bool = False,
                         time_conditioned: bool = True, steps: int = 3) -> float:
    """Seconds of one training step of the real network (forward, backward, AdamW), median of ``steps``
    timed steps after one untimed warm-up step, on ``device`` with torch's current thread count."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch_device = torch.device(device)
    kwargs = dict(arch["arch_kwargs"])
    network = get_network_from_plans(arch["network_class_name"], kwargs, arch["_kw_requires_import"],
                                     input_channels, output_channels, allow_init=True,
                                     deep_supervision=deep_supervision).to(torch_device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, input_channels, *patch_size), generator=generator).to(torch_device)
    t = torch.randint(0, 1000, (batch_size,), generator=generator).to(torch_device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = network(x, t) if time_conditioned else network(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = sum(o.float().square().mean() for o in outs)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)

    times = []
    for i in range(steps + 1):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


# ---------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """Epochs x iterations that fill a budget; stored in the plans as ``schedule``."""

    budget_seconds: float
    step_seconds: float
    step_seconds_source: str  # "measured" or "estimated"
    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    device: str
    threads: int

    @property
    def steps(self) -> int:
        return self.epochs * self.iterations_per_epoch

    @property
    def expected_seconds(self) -> float:
        return self.steps * self.step_seconds / STEP_SHARE

    def to_dict(self) -> dict[str, Any]:
        return {"budget_seconds": round(self.budget_seconds, 1), "budget": format_duration(self.budget_seconds),
                "step_seconds": round(self.step_seconds, 4), "step_seconds_source": self.step_seconds_source,
                "epochs": self.epochs, "iterations_per_epoch": self.iterations_per_epoch,
                "val_iterations_per_epoch": self.val_iterations_per_epoch, "steps": self.steps,
                "expected_minutes": round(self.expected_seconds / 60, 2), "device": self.device,
                "threads": self.threads, "lr_schedule": "poly over all epochs (ends with the budget)"}


def schedule_for_budget(budget_seconds: float, step_seconds: float, *, source: str = "measured",
                        device: str = "cpu", threads: int = 0, val_iterations_per_epoch: int = 2) -> Schedule:
    """Epochs x iterations that fill ``STEP_SHARE`` of the budget at ``step_seconds`` per step.

    Epochs of 50 iterations while the schedule is short (CPU budgets: tens of epochs, so that progress,
    checkpoints and the refit come often), nnU-Net's 250 once there are more than 1000 epochs' worth.
    """
    steps = int(min(MAX_STEPS, max(1, math.floor(budget_seconds * STEP_SHARE / max(step_seconds, 1e-6)))))
    iterations = 250 if steps >= 1000 * 50 else 50
    iterations = min(iterations, steps)
    epochs = max(1, steps // iterations)
    return Schedule(float(budget_seconds), float(step_seconds), source, int(epochs), int(iterations),
                    int(val_iterations_per_epoch), device, int(threads))
