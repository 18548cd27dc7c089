"""``dataset.json`` in nnU-Net v2 raw layout, plus spinediff's optional ``spinediff`` block.

The block names the task::

    "spinediff": {"task": "translation", "source_channels": [0, 1], "target_channels": [2]}

- ``segmentation`` (default when the block is absent): nnU-Net semantics, images -> labels.
- ``translation``: the target modality (e.g. CT) is an extra image channel; ``labelsTr`` holds
  spine masks. At prediction time only the source channels are given.
- ``generation``: the label map is the condition; the image channels are the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinediff.errors import SpineDiffError

TASKS = ("segmentation", "translation", "generation")


@dataclass(frozen=True)
class TaskSpec:
    """The typed view of a dataset's ``spinediff`` block."""

    task: str = "segmentation"
    source_channels: tuple[int, ...] = ()
    target_channels: tuple[int, ...] = ()


def task_spec(dataset_json: dict[str, Any], origin: str | Path = "dataset.json") -> TaskSpec:
    """Read the ``spinediff`` block (absent → segmentation over all channels)."""
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    block = dataset_json.get("spinediff")
    if block is None:
        return TaskSpec("segmentation", tuple(range(n_channels)), ())
    if not isinstance(block, dict):
        raise SpineDiffError(f"{origin}: 'spinediff' must be an object, got {type(block).__name__}.")
    task = block.get("task", "segmentation")
    if task not in TASKS:
        raise SpineDiffError(f"{origin}: spinediff.task is {task!r}; expected one of {', '.join(TASKS)}.")
    source = tuple(block.get("source_channels", ()))
    target = tuple(block.get("target_channels", ()))
    if task == "segmentation" and not source:
        source = tuple(range(n_channels))
    if task == "generation" and not target:
        target = tuple(range(n_channels))
    return TaskSpec(task, source, target)


def label_values(dataset_json: dict[str, Any]) -> dict[str, int]:
    """Label name -> integer value (regions, i.e. lists, are flattened to their members)."""
    out: dict[str, int] = {}
    for name, value in dataset_json.get("labels", {}).items():
        if isinstance(value, (list, tuple)):
            for v in value:
                out[f"{name}[{v}]"] = int(v)
        else:
            out[name] = int(value)
    return out
