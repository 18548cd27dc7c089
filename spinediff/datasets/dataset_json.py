"""``dataset.json`` in nnU-Net v2 raw layout, plus spinediff's optional ``spinediff`` block.

The block names the task::

    "spinediff": {"task": "translation", "source_channels": [0, 1], "target_channels": [2]}

- ``segmentation`` (default when the block is absent): nnU-Net semantics, images -> labels.
- ``translation``: the target modality (e.g. CT) is an extra image channel; ``labelsTr`` holds
  spine masks. At prediction time only the source channels are given.
- ``generation``: the label map is the condition; the image channels are the target.

The block is read by :func:`spinediff.tasks.task_spec`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spinediff.errors import SpineDiffError

if TYPE_CHECKING:
    from spinediff.tasks import Task


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


def label_names(dataset_json: dict[str, Any]) -> dict[int, str]:
    """Label value -> name, for drawing (region-based entries, lists of values, left out)."""
    return {int(value): str(name) for name, value in dataset_json.get("labels", {}).items()
            if isinstance(value, int) and not isinstance(value, bool) and value > 0}


def ignore_label(dataset_json: dict[str, Any]) -> int | None:
    """nnU-Net's ignore label (``"ignore"`` in ``labels``, the highest value): voxels of it carry no annotation; the
    loss, the Dice and every statistic of the labels leave them out. None when the dataset has none."""
    value = dataset_json.get("labels", {}).get("ignore")
    return None if value is None else int(value)


def check_ignore_label(task: Task, dataset: str) -> None:
    """A dataset with an :func:`ignore_label` trains segmentation only (every segmentation trainer leaves the
    unannotated voxels out of its loss); a translation or generation ``task`` with one is refused (SpineDiffError
    naming ``dataset`` and the fix)."""
    if not task.writes_labels:
        raise SpineDiffError(f"{dataset} has nnU-Net's ignore label (dataset.json labels 'ignore') but is a "
                             f"{task.name} dataset: only segmentation leaves unannotated voxels out of its loss. "
                             "Remove the ignore label from dataset.json (and its voxels from the labels).")


def foreground_labels(dataset_json: dict[str, Any]) -> list[int]:
    """The annotated label values above background, sorted: neither 0 nor the :func:`ignore_label`."""
    ignore = ignore_label(dataset_json)
    return sorted({v for v in label_values(dataset_json).values() if v > 0 and v != ignore})


def annotated(array, dataset_json: dict[str, Any]):
    """``array > 0`` without the :func:`ignore_label`'s voxels: the labelled foreground of a label map."""
    ignore = ignore_label(dataset_json)
    return (array > 0) if ignore is None else (array > 0) & (array != ignore)
