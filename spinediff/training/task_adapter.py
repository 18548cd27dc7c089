"""What the network is conditioned on and what it produces, for each task, from an nnU-Net batch.

nnU-Net's data loader yields ``data`` (all image channels, in ``channel_names`` order) and
``target`` (the label map). The adapter turns them into the diffusion ``condition`` and the clean
``target`` in the network range [-1, 1], and turns a network estimate back into the task's output:

| task | condition | target |
|---|---|---|
| segmentation | all image channels | one-hot labels scaled to [-1, 1] |
| translation | the source image channels | the target channels (e.g. CT) mapped to [-1, 1] |
| generation | one-hot labels scaled to [-1, 1] | the image channels mapped to [-1, 1] |

Labels are always given one-hot (one channel per class), never as one channel with scaled class
values, which fails on multi-class masks (Konz et al.).

A segmentation dataset with nnU-Net's ignore label (unannotated voxels, ``"ignore"`` in dataset.json) gets a
target that says "unknown" there (every class at 1 / C) and a loss mask (:meth:`TaskAdapter.loss_mask`) that leaves
those voxels out of the loss, as nnU-Net's own loss does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from spinediff.diffusion.settings import DiffusionSettings
from spinediff.planning.target_intensity import TargetIntensity
from spinediff.tasks import Task, task_spec


def one_hot_scaled(labels: torch.Tensor, num_classes: int, ignore: int | None = None) -> torch.Tensor:
    """``(B, 1, *spatial)`` integer labels → ``(B, num_classes, *spatial)`` one-hot in {-1, 1}.

    Negative values (nnU-Net's "outside the crop" marker -1) count as background. ``ignore``: nnU-Net's ignore
    label; its voxels get every class at probability 1 / num_classes (``2 / num_classes - 1``): unknown.
    """
    labels = labels[:, 0].long().clamp(min=0)
    unknown = None if ignore is None else labels == ignore
    if unknown is not None:
        labels = labels.masked_fill(unknown, 0)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).to(torch.float32)
    if unknown is not None:
        one_hot = torch.where(unknown[:, None], torch.full_like(one_hot, 1.0 / num_classes), one_hot)
    return one_hot * 2 - 1


@dataclass(frozen=True)
class TaskAdapter:
    task: Task
    source_channels: tuple[int, ...]
    target_channels: tuple[int, ...]
    num_classes: int
    target_intensity: TargetIntensity | None
    #: nnU-Net's ignore label of a segmentation's labels (None: every voxel annotated)
    ignore_label: int | None = None

    @classmethod
    def from_configuration(cls, configuration: dict[str, Any], dataset_json: dict[str, Any],
                           num_classes: int) -> TaskAdapter:
        """Build from a plans configuration (with its ``diffusion`` block) and the dataset.json (its ignore label
        is kept for a task that writes labels; the trainer refuses it for the others)."""
        from spinediff.datasets.dataset_json import ignore_label

        settings = DiffusionSettings.from_dict(configuration["diffusion"])
        task = settings.task_type
        spec = task_spec(dataset_json)
        n_channels = len(dataset_json["channel_names"])
        if task.writes_labels:  # condition: every image channel, as nnU-Net
            return cls(task, tuple(range(n_channels)), (), num_classes, None, ignore_label(dataset_json))
        intensity = TargetIntensity.from_dict(settings.target_intensity or {})
        source = () if task.labels_are_condition else tuple(spec.source_channels)
        target = tuple(spec.target_channels) or tuple(range(n_channels))
        return cls(task, source, target, num_classes, intensity)

    # ------------------------------------------------------------------ sizes
    @property
    def condition_channels(self) -> int:
        return self.num_classes if self.task.labels_are_condition else len(self.source_channels)

    @property
    def output_channels(self) -> int:
        return self.num_classes if self.task.writes_labels else len(self.target_channels)

    # ------------------------------------------------------------------ batches
    def condition(self, data: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The conditioning tensor ``(B, condition_channels, *spatial)``."""
        if self.task.labels_are_condition:
            if labels is None:
                raise ValueError(f"{self.task.name} needs the label map as its condition")
            return one_hot_scaled(labels, self.num_classes).to(data.device)
        return data[:, list(self.source_channels)].float()

    def target(self, data: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The clean target in the network range ``(B, output_channels, *spatial)``."""
        if self.task.writes_labels:
            return one_hot_scaled(labels, self.num_classes, self.ignore_label).to(data.device)
        target = data[:, list(self.target_channels)].float()
        return self.target_intensity.to_network(target, channel_axis=1)

    def loss_mask(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """``(B, 1, *spatial)`` bool, True where the target is known (the voxels not of the ignore label); None when
        every voxel is (no ignore label, or a task whose target is not the labels)."""
        if self.ignore_label is None or labels is None or not self.task.writes_labels:
            return None
        return labels[:, :1] != self.ignore_label

    # ------------------------------------------------------------------ outputs
    def probabilities(self, x0: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
        """Segmentation: class probabilities from a sampled x0, which the sampler keeps in the one-hot scale
        (``2 p - 1``, :meth:`DiffusionProcess.project_x0`)."""
        p = ((x0.float() + 1) / 2).clamp_min(0)
        return p / p.sum(dim=channel_axis, keepdim=True).clamp_min(1e-6)

    def to_original_units(self, x0: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
        """Translation/generation: x0 in [-1, 1] → the target's units (e.g. HU)."""
        return self.target_intensity.from_network(x0.float().clamp(-1, 1), channel_axis=channel_axis)
