"""nnU-Net's trainer with the anatomy beyond the labelled levels as two auxiliary classes (issue 34).

A network trained on L1-L5 only learns "background" for everything else, and on scans like the training ones it
can number the levels by counting from the edge of the field of view. Cut the scan above L1 and it calls L2..S1
"L1..L5". :class:`nnUNetTrainerLevelContext` gives the network two more classes to learn, derived from the
labels of each training patch (no new annotation):

- **below** (S1 for L1-L5): the last level's mask moved by one level pitch further along the spine, the pitch
  and direction being the vector from the centroid of the second-last level to the last one's;
- **above** (T12): the first level's mask moved one pitch the other way (second level → first level).

They are painted on background only, before the spatial and field-of-view augmentation, so that a cut of the
field of view removes them with the anatomy they stand for. The network so learns what lies below L5 and above
L1 as classes of their own (the sacrum has a shape, the edge of a field of view does not), and the level
numbering of a scan cut above L1 can rest on the sacrum.

The auxiliary classes never leave the network: in evaluation mode (validation, ``spinediff predict``,
``nnUNetv2_predict``, the stress test) its two extra output channels are folded into background
(``logsumexp``: P(background) + P(below) + P(above)), so the exports, probabilities, the model folder's
``dataset.json`` and everything downstream see the dataset's own labels. Ordered labels (``spinediff plan``'s
``augmentation.field_of_view`` block) are required; without them the trainer refuses to start.
"""

from __future__ import annotations

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from spinediff.errors import SpineDiffError
from spinediff.planning.plans import PlannedConfiguration

CUDA = torch.device("cuda")  # nnU-Net's default device argument
#: The auxiliary classes, in the order of the network's extra output channels.
CONTEXT_CLASSES = ("below", "above")
#: Weight of the auxiliary cross-entropy (all classes) beside nnU-Net's loss on the dataset's classes.
AUXILIARY_WEIGHT = 0.5


def _shifted(mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``mask`` moved by the integer ``offset`` (voxels per axis), what leaves the array dropped, zeros coming in."""
    out = np.zeros_like(mask)
    source, target = [], []
    for size, step in zip(mask.shape, offset.astype(int), strict=True):
        if abs(step) >= size:
            return out
        source.append(slice(max(0, -step), size - max(0, step)))
        target.append(slice(max(0, step), size - max(0, -step)))
    out[tuple(target)] = mask[tuple(source)]
    return out


def context_labels(seg: np.ndarray, levels: list[int], below: int, above: int) -> np.ndarray:
    """``seg`` (spatial array of label values, -1 outside the image) with the body below the last level painted
    ``below`` and the one above the first level ``above``, on background (0) only. A side is skipped when its
    two levels are not both present (a patch without L4 has no pitch to go by)."""
    out = seg.copy()
    for value, (end, neighbour) in ((below, (levels[-1], levels[-2])), (above, (levels[0], levels[1]))):
        end_mask, neighbour_mask = seg == end, seg == neighbour
        if not end_mask.any() or not neighbour_mask.any():
            continue
        pitch = np.argwhere(end_mask).mean(0) - np.argwhere(neighbour_mask).mean(0)
        moved = _shifted(end_mask, np.round(pitch))
        out[moved & (out == 0)] = value
    return out


class LevelContextTransform(BasicTransform):
    """Adds the auxiliary ``below``/``above`` labels to a training sample's segmentation (channel 0); the image is
    untouched. Deterministic: it follows the sample's own labels."""

    def __init__(self, levels: list[int], below: int, above: int) -> None:
        super().__init__()
        self.levels, self.below, self.above = [int(v) for v in levels], int(below), int(above)

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        return img

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        seg = segmentation.numpy()
        out = seg.copy()
        out[0] = context_labels(seg[0], self.levels, self.below, self.above)
        return torch.as_tensor(out, dtype=segmentation.dtype)


def fold_context(logits: torch.Tensor, visible: int) -> torch.Tensor:
    """Logits of ``visible`` classes from logits with the auxiliary channels after them: background becomes
    logsumexp(background, auxiliary...), so that its softmax probability is the sum of theirs."""
    background = torch.logsumexp(torch.cat([logits[:, :1], logits[:, visible:]], dim=1), dim=1, keepdim=True)
    return torch.cat([background, logits[:, 1:visible]], dim=1)


class LevelContextNetwork(nn.Module):
    """A segmentation network with ``len(CONTEXT_CLASSES)`` more output channels than the dataset has classes: all
    of them in training mode, the dataset's classes (auxiliary ones folded into background) in evaluation mode."""

    def __init__(self, network: nn.Module, visible: int) -> None:
        super().__init__()
        self.network, self.visible = network, int(visible)

    @property
    def decoder(self):  # nnU-Net switches deep supervision on network.decoder
        return self.network.decoder

    def forward(self, x: torch.Tensor):
        out = self.network(x)
        if self.training:
            return out
        if isinstance(out, (list, tuple)):
            return type(out)(fold_context(o, self.visible) for o in out)
        return fold_context(out, self.visible)


class LevelContextLoss(nn.Module):
    """nnU-Net's loss (Dice + CE, deep supervision) on the dataset's classes, the auxiliary classes counting as
    background there (the folded output: exactly nnU-Net's objective), plus ``weight`` x the cross-entropy of all
    classes at full resolution, which teaches the auxiliary ones.

    ``context_values`` are the label values the auxiliary classes carry in the targets (:class:`LevelContextTransform`;
    default ``visible`` and ``visible + 1``), learnt by the output channels ``visible`` and ``visible + 1``. On a
    dataset with nnU-Net's ignore label the values lie above it; the ignored voxels stay ignored in nnU-Net's loss
    (which ``base`` knows the ignore label of) and are left out of the auxiliary cross-entropy.

    Training the auxiliary classes inside nnU-Net's Dice + CE instead (8 outputs) learnt the levels far slower: on
    Dataset501 two output channels that no target ever used were enough to leave L1 and L5 unlearnt after 2 300 steps
    (training loss -0.22 against -0.74), with or without the auxiliary labels (documentation/results.md)."""

    def __init__(self, base: nn.Module, visible: int, weight: float,
                 context_values: tuple[int, ...] | None = None, ignore_label: int | None = None) -> None:
        super().__init__()
        self.base, self.visible, self.weight = base, int(visible), float(weight)
        values = context_values or tuple(range(self.visible, self.visible + len(CONTEXT_CLASSES)))
        self.context_values = tuple(int(v) for v in values)
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.cross_entropy = nn.CrossEntropyLoss(ignore_index=-100)

    def _without_context(self, target: torch.Tensor) -> torch.Tensor:
        """The target with the auxiliary labels as background (the ignore label kept for nnU-Net's loss)."""
        out = target.clone()
        for value in self.context_values:
            out[target == value] = 0
        return out

    def _channels(self, target: torch.Tensor) -> torch.Tensor:
        """Class indices of the output channels for the auxiliary cross-entropy; ignored voxels -100."""
        out = target.long().clone()
        for channel, value in enumerate(self.context_values, start=self.visible):
            out[target == value] = channel
        if self.ignore_label is not None:
            out[target == self.ignore_label] = -100
        return out

    def forward(self, output, target):
        outputs = list(output) if isinstance(output, (list, tuple)) else [output]
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        folded = [fold_context(o, self.visible) for o in outputs]
        plain = [self._without_context(t) for t in targets]
        if isinstance(output, (list, tuple)):
            main = self.base(folded, plain)
        else:
            main = self.base(folded[0], plain[0])
        if self.weight <= 0 or outputs[0].shape[1] <= self.visible:  # evaluation mode: already folded
            return main
        return main + self.weight * self.cross_entropy(outputs[0], self._channels(targets[0][:, 0]))


class nnUNetTrainerLevelContext(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming of its trainer variants)
    """nnU-Net's trainer, its network learning the body below the last level and above the first as two auxiliary
    classes (see the module docstring). Its loss is nnU-Net's on the dataset's classes plus an auxiliary
    cross-entropy (:class:`LevelContextLoss`); everything else (plans, schedule, augmentation, exports) is
    nnU-Net's."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise SpineDiffError(f"{type(self).__name__} trains labels, not regions (dataset.json).")
        self.levels = sorted(int(v) for v in self.label_manager.foreground_labels)
        planned = PlannedConfiguration(configuration, self.configuration_manager, "plans")
        if len(self.levels) < 2 or planned.levels_axis is None:
            raise SpineDiffError(
                f"{type(self).__name__} needs labels with an order along the spine (at least two, and the plans' "
                f"augmentation.field_of_view block from `spinediff plan`); configuration {configuration!r} has none. "
                "Train nnUNetTrainer instead.")
        top = max(self.levels + [self.label_manager.ignore_label or 0])
        self.context_values = (top + 1, top + 2)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's network with the auxiliary channels, wrapped; ``num_output_channels`` counts the dataset's
        classes (as nnU-Net's predictor passes it from the model folder's ``dataset.json``)."""
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels + len(CONTEXT_CLASSES),
                                                           enable_deep_supervision)
        return LevelContextNetwork(network, num_output_channels)

    def _build_loss(self):
        return LevelContextLoss(super()._build_loss(), self.label_manager.num_segmentation_heads, AUXILIARY_WEIGHT,
                                self.context_values, self.label_manager.ignore_label)

    def get_training_transforms(self, *args, **kwargs):
        transforms = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        transforms.transforms.insert(0, LevelContextTransform(self.levels, *self.context_values))
        return transforms
