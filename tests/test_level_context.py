"""nnUNetTrainerLevelContext's pieces (issue 34): the auxiliary labels beyond the first and last level, derived from
the labels alone; the folding of their output channels into background; the network wrapper's two modes; and the
benchmark offering the trainer only where the plans know the labels' order. Its run through `spinediff train` and
the stress test is in test_stress_position.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spinediff.tasks import get_task
from spinediff.training.level_context import (
    LevelContextNetwork,
    LevelContextTransform,
    context_labels,
    fold_context,
)

LEVELS = [1, 2, 3, 4, 5]


def ladder(rows: int = 60, pitch: int = 8, start: int = 12, drift: int = 1) -> np.ndarray:
    """Five 4-row bodies ``pitch`` rows apart down the rows, each ``drift`` columns further right (a tilted spine)."""
    seg = np.zeros((rows, 30), dtype=np.int16)
    for i, level in enumerate(LEVELS):
        seg[start + pitch * i: start + pitch * i + 4, 8 + drift * i: 16 + drift * i] = level
    return seg


def test_context_labels_sit_one_pitch_beyond_the_first_and_last_level():
    seg = ladder()
    out = context_labels(seg, LEVELS, 6, 7)
    below, above = np.argwhere(out == 6), np.argwhere(out == 7)
    # L5 rows 44-47, cols 12-19 moved by (8, 1): rows 52-55, cols 13-20; L1 rows 12-15, cols 8-15 moved by (-8, -1)
    assert (below.min(0).tolist(), below.max(0).tolist()) == ([52, 13], [55, 20])
    assert (above.min(0).tolist(), above.max(0).tolist()) == ([4, 7], [7, 14])
    assert np.array_equal(out[np.isin(seg, LEVELS)], seg[np.isin(seg, LEVELS)])  # the levels untouched
    assert np.array_equal(seg, ladder())  # the input is not modified


def test_context_labels_paint_background_only_and_skip_a_side_without_its_pitch():
    seg = ladder()
    seg[:9] = -1  # outside the image (nnU-Net's padding): no label there
    seg[seg == 2] = 0  # no L2: the body above L1 has no pitch to go by
    out = context_labels(seg, LEVELS, 6, 7)
    assert not (out == 7).any()
    assert (out[:9] == -1).all()
    assert (out == 6).sum() == 32
    moved_off = ladder(start=30)  # L5 at rows 62+ of a 60-row patch: below would leave the patch
    assert not (context_labels(moved_off[:50], LEVELS, 6, 7) == 6).any()


def test_the_transform_changes_the_labels_and_not_the_image():
    seg = torch.as_tensor(ladder()[None])
    image = torch.randn(1, *seg.shape[1:])
    out = LevelContextTransform(LEVELS, 6, 7)(image=image.clone(), segmentation=seg.clone())
    assert torch.equal(out["image"], image)
    assert set(torch.unique(out["segmentation"]).tolist()) == {0, 1, 2, 3, 4, 5, 6, 7}
    assert out["segmentation"].dtype == seg.dtype


def test_folding_gives_background_the_probability_of_the_auxiliary_classes():
    logits = torch.randn(2, 8, 5, 5)
    folded = fold_context(logits, 6)
    p, q = logits.softmax(1), folded.softmax(1)
    assert folded.shape == (2, 6, 5, 5)
    assert torch.allclose(q[:, 0], p[:, 0] + p[:, 6] + p[:, 7], atol=1e-6)
    assert torch.allclose(q[:, 1:], p[:, 1:6], atol=1e-6)


class TinyNet(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, channels, 1)
        self.decoder = torch.nn.Module()
        self.decoder.deep_supervision = True

    def forward(self, x):
        out = self.conv(x)
        return [out, out[..., ::2, ::2]] if self.decoder.deep_supervision else out


def test_the_network_shows_every_class_in_training_and_the_datasets_in_evaluation():
    network = LevelContextNetwork(TinyNet(8), 6)
    x = torch.randn(1, 1, 4, 4)
    assert [o.shape[1] for o in network.train()(x)] == [8, 8]
    assert [o.shape[1] for o in network.eval()(x)] == [6, 6]
    network.decoder.deep_supervision = False  # as nnU-Net switches it, through network.decoder
    assert network.eval()(x).shape == (1, 6, 4, 4)
    assert network.train()(x).shape == (1, 8, 4, 4)


@pytest.mark.parametrize("ordered,offered", [(("2d_cpu",), True), ((), False)])
def test_the_benchmark_offers_the_trainer_only_with_ordered_labels_and_on_request(ordered, offered):
    from spinediff.experiments.benchmark import methods_for, select_methods

    methods = methods_for(get_task("segmentation"), ["2d_diffusion", "2d_cpu"], ("2d",), ordered)
    assert ("nnUNetTrainerLevelContext" in [m.trainer for m in methods]) is offered
    assert "nnUNetTrainer" in [m.trainer for m in methods]
    # opt-in: not in the default set (no better under stress at CPU budgets), trained when --methods names it
    assert "nnUNetTrainerLevelContext" not in [m.trainer for m in select_methods(methods, None)]
    if offered:
        assert [m.trainer for m in select_methods(methods, ["nnUNetTrainerLevelContext"])] == [
            "nnUNetTrainerLevelContext"]


@pytest.mark.parametrize("trainer,found_through_ext", [("nnUNetTrainerLevelContext", True),
                                                     ("nnUNetTrainerGlobalContext", True), ("nnUNetTrainer", False)])
def test_find_bests_command_points_nnunet_at_the_trainer(trainer, found_through_ext, tmp_path):
    """find_best's nnUNetv2_predict command for a spinediff variant of nnU-Net's trainer sets nnUNet_extTrainer to the
    folder that holds it (a shell's nnUNetv2_predict does not import spinediff); nnU-Net's own trainer needs nothing."""
    from pathlib import Path

    from spinediff.inference.candidates import Candidate
    from spinediff.inference.find_best import predict_command

    folder = tmp_path / f"{trainer}__nnUNetPlans__2d_cpu"
    command = predict_command("501", Candidate(folder, trainer, "nnUNetPlans", "2d_cpu", ["0", "1"]))
    assert command.split("nnUNetv2_predict ")[1].startswith("-i INPUT_FOLDER")
    assert f"-tr {trainer} " in command
    if found_through_ext:
        entry = Path(command.split("nnUNet_extTrainer=")[1].split()[0])
        assert (entry / "spinediff_trainers.py").is_file()
        assert trainer in (entry / "spinediff_trainers.py").read_text()
    else:
        assert command.startswith("nnUNetv2_predict ")


def test_the_loss_is_nnunets_on_the_folded_classes_plus_the_auxiliary_cross_entropy():
    """LevelContextLoss: nnU-Net's loss on the dataset's classes (auxiliary labels as background, output folded),
    plus weight x the cross-entropy of all classes; in evaluation mode (an output already folded) nnU-Net's loss
    alone."""
    from spinediff.training.level_context import LevelContextLoss

    def base(output, target):  # any loss of (logits, label map) lists, as nnU-Net's deep-supervision wrapper
        return sum(torch.nn.functional.cross_entropy(o, t[:, 0].long()) for o, t in zip(output, target, strict=True))

    torch.manual_seed(0)
    outputs = [torch.randn(2, 8, 8, 6), torch.randn(2, 8, 4, 3)]
    targets = [torch.randint(0, 8, (2, 1, 8, 6)), torch.randint(0, 8, (2, 1, 4, 3))]
    plain = [torch.where(t >= 6, torch.zeros_like(t), t) for t in targets]
    folded = [fold_context(o, 6) for o in outputs]
    loss = LevelContextLoss(base, 6, 0.5)
    auxiliary = torch.nn.functional.cross_entropy(outputs[0], targets[0][:, 0].long())
    assert torch.allclose(loss(outputs, targets), base(folded, plain) + 0.5 * auxiliary)
    assert torch.allclose(LevelContextLoss(base, 6, 0.0)(outputs, targets), base(folded, plain))
    assert torch.allclose(loss(folded, plain), base(folded, plain))  # evaluation: no auxiliary term


def test_the_loss_leaves_nnunets_ignore_label_ignored_and_learns_the_auxiliary_classes_above_it():
    """On a dataset with an ignore label (Dataset505: L1-L5, ignore 6) the auxiliary labels are 7 and 8 and the
    network's extra channels 6 and 7: nnU-Net's loss gets the ignore label untouched, the auxiliary cross-entropy
    maps 7/8 to channels 6/7 and leaves the ignored voxels out (before, it read label 8 as a ninth class)."""
    from spinediff.training.level_context import LevelContextLoss

    seen = {}

    def base(output, target):  # nnU-Net's loss, recording what it is given
        seen["target"] = target[0].clone()
        ce = torch.nn.functional.cross_entropy
        return sum(ce(o, t[:, 0].long(), ignore_index=6) for o, t in zip(output, target, strict=True))

    torch.manual_seed(1)
    outputs = [torch.randn(2, 8, 8, 6), torch.randn(2, 8, 4, 3)]
    targets = [torch.randint(0, 9, (2, 1, 8, 6)), torch.randint(0, 9, (2, 1, 4, 3))]
    targets[0][0, 0, 0, 0] = 6
    loss = LevelContextLoss(base, 6, 0.5, context_values=(7, 8), ignore_label=6)
    value = loss(outputs, targets)
    assert torch.equal(seen["target"] == 6, targets[0] == 6)  # ignored voxels reach nnU-Net's loss as ignored
    assert not ((seen["target"] == 7) | (seen["target"] == 8)).any()  # auxiliary labels are background there
    channels = targets[0][:, 0].long().clone()
    channels[targets[0][:, 0] == 7], channels[targets[0][:, 0] == 8] = 6, 7
    keep = targets[0][:, 0] != 6
    logp = torch.log_softmax(outputs[0], 1).permute(0, 2, 3, 1)[keep]
    expected = -logp.gather(1, channels[keep][:, None]).mean()
    folded = [fold_context(o, 6) for o in outputs]
    plain = [torch.where((t == 7) | (t == 8), torch.zeros_like(t), t) for t in targets]
    assert torch.allclose(value, base(folded, plain) + 0.5 * expected)
    outputs[0][0, :, 0, 0] = torch.tensor([9.0, -9, 4, 0, 2, -3, 7, 1])  # an ignored voxel's output moves nothing
    assert torch.allclose(loss(outputs, targets), value)
