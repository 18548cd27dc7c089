"""Ensemble statistics over members (samples × folds) and the uncertainty maps derived from them.

Members are added one at a time (Welford's running mean and variance), so memory does not grow
with the number of samples or folds, and a single member gives a variance of exactly zero.

Uncertainty maps (per voxel):

- segmentation, ``CASE_uncertainty``: the entropy (nats) of the mean class probabilities minus the
  members' mean entropy, i.e. the mutual information between the prediction and the member. It is
  the part of the entropy that comes from *disagreement* between samples and folds (SpineSegDiff's
  entropy maps read the same thing off sampled masks); the softness of a single member's
  probabilities is not counted, so one member gives exactly zero. Range [0, ln C].
- segmentation, ``CASE_variance``: the variance of the class probabilities across members, summed
  over classes (the expected squared distance of a member from the mean, range [0, 1]).
- translation / generation, ``CASE_uncertainty``: the standard deviation across members in the
  output units (HU for CT).

Variances are population variances (divided by the number of members, not members - 1).
"""

from __future__ import annotations

import numpy as np
import torch

ENTROPY_FLOOR = 1e-12  # p log p -> 0 as p -> 0; the floor keeps log finite


def class_entropy(probabilities: torch.Tensor, channel_axis: int = 0) -> torch.Tensor:
    """Entropy in nats over the class axis."""
    return -(probabilities * torch.log(probabilities.clamp_min(ENTROPY_FLOOR))).sum(channel_axis)


class EnsembleStatistics:
    """Running mean, variance and mean entropy of members ``(C, *spatial)`` (float32 on the CPU)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self._entropy_sum: torch.Tensor | None = None

    def add(self, member: torch.Tensor, entropy: torch.Tensor | None = None) -> None:
        member = member.detach().float().cpu()
        self.count += 1
        if self.mean is None:
            self.mean = torch.zeros_like(member)
            self._m2 = torch.zeros_like(member)
        delta = member - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (member - self.mean)
        if entropy is not None:
            entropy = entropy.detach().float().cpu()
            self._entropy_sum = entropy.clone() if self._entropy_sum is None else self._entropy_sum + entropy

    @property
    def variance(self) -> torch.Tensor:
        """Per-channel population variance across members (zero for a single member)."""
        return (self._m2 / max(self.count, 1)).clamp_min(0)

    @property
    def mean_entropy(self) -> torch.Tensor:
        return self._entropy_sum / max(self.count, 1)


class SegmentationEnsemble(EnsembleStatistics):
    """Members are class probabilities ``(C, *spatial)``; each member's label map is kept (uint8) for the
    pairwise Dice between members (:func:`spinediff.metrics.case_uncertainty.pairwise_dice`)."""

    def __init__(self) -> None:
        super().__init__()
        self.member_labels: list[np.ndarray] = []

    def add_probabilities(self, probabilities: torch.Tensor) -> None:
        self.add(probabilities, class_entropy(probabilities))
        self.member_labels.append(probabilities.argmax(0).to(torch.uint8).cpu().numpy())

    def disagreement(self) -> torch.Tensor:
        """Entropy of the mean probabilities minus the members' mean entropy (mutual information)."""
        return (class_entropy(self.mean) - self.mean_entropy).clamp_min(0)

    def total_variance(self) -> torch.Tensor:
        return self.variance.sum(0)


def masked_mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean of ``values`` inside ``mask``; None when the mask is empty."""
    return float(values[mask].mean()) if mask.any() else None
