"""Level numbering post-processing and its cross-validation decision (numpy/SimpleITK only: fast)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from spinediff.inference.level_order import LevelOrder, assign, label_centroids, learn_order, renumber
from spinediff.inference.postprocessing import Postprocessing, determine_postprocessing


def spine(levels: int = 5, shape=(10, 64, 20)) -> np.ndarray:
    """Five stacked 'vertebrae' along array axis 1, labels 1..5 from top (index 0) to bottom."""
    array = np.zeros(shape, np.uint8)
    for i in range(levels):
        array[2:8, 2 + i * 12:2 + i * 12 + 9, 5:15] = i + 1
    return array


def image_of(array: np.ndarray, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 2.0, 3.0))
    image.SetDirection(direction)
    return image


@pytest.fixture(scope="module")
def order() -> LevelOrder:
    truth = spine()
    learnt = learn_order([label_centroids(image_of(truth), truth, [1, 2, 3, 4, 5])] * 3)
    assert learnt is not None
    return learnt


def test_order_is_learnt_in_world_coordinates(order):
    assert order.labels == (1, 2, 3, 4, 5)
    assert np.allclose(order.direction, (0, 1, 0))  # array axis 1 = world y
    flipped = image_of(spine(), direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert np.allclose(learn_order([label_centroids(flipped, spine(), [1, 2, 3, 4, 5])]).direction, (0, -1, 0))


def test_labels_without_an_order_are_not_ordered():
    side_by_side = np.zeros((10, 20, 40), np.uint8)
    side_by_side[2:8, 5:15, 2:18], side_by_side[2:8, 5:15, 22:38] = 1, 2
    other = side_by_side[:, :, ::-1].copy()  # label 2 left of label 1 in the second case
    cases = [label_centroids(image_of(a), a, [1, 2]) for a in (side_by_side, other)]
    assert learn_order(cases) is None


@pytest.mark.parametrize("damage", ["collapse", "slices", "extra", "bridge", "swap", "merged", "uniform_extra"])
def test_renumber_repairs_wrong_level_numbers(order, damage):
    truth = spine()
    predicted = truth.copy()
    if damage == "collapse":  # L3 called L2: two neighbours with one number
        predicted[truth == 3] = 2
    elif damage == "slices":  # L3 called L4 in half of the slices (a 2D network's per-slice numbering)
        predicted[:5][truth[:5] == 3] = 4
    elif damage == "extra":  # an extra vertebra below L5, also called L5; drawn smaller
        predicted[3:7, 61:64, 5:15] = 5
    elif damage == "bridge":  # L1 and L2 touch through a few voxels
        predicted[4, 11:14, 10] = 1
    elif damage == "uniform_extra":  # every vertebra called L3, plus a small extra one below: which to drop?
        predicted[truth > 0] = 3
        predicted[3:7, 61:64, 5:15] = 3
    elif damage == "merged":  # L2-L4 all called L3 and joined through bridges across the discs: one component
        predicted[np.isin(truth, (2, 3, 4))] = 3
        predicted[4, 22:27, 10] = predicted[4, 34:39, 10] = 3
    else:  # L2 and L4 swapped
        predicted[truth == 2], predicted[truth == 4] = 4, 2
    repaired = renumber(predicted, image_of(predicted), order)
    assert np.array_equal(repaired[truth > 0], truth[truth > 0])
    if damage in ("extra", "uniform_extra"):
        assert not repaired[3:7, 61:64, 5:15].any()  # the surplus component became background
    assert not np.array_equal(predicted, truth)  # the damage was real


def test_renumber_keeps_a_correct_prediction_and_other_labels(order):
    truth = spine()
    truth[0, 0, 0] = 7  # a label outside the order is untouched
    assert np.array_equal(renumber(truth, image_of(truth), order), truth)


def test_assign_is_monotone_and_drops_the_least_supported():
    votes = np.array([[0, 5, 0], [0, 4, 1], [0, 0, 3], [1, 0, 0]], dtype=float)
    assert assign(votes) == [0, 1, 2, None]
    assert assign(np.array([[0, 0, 9]], dtype=float)) == [2]


def _folders(tmp_path):
    """Empty reference and prediction folders."""
    references, predictions = tmp_path / "gt", tmp_path / "pred"
    references.mkdir()
    predictions.mkdir()
    return references, predictions


def test_determine_keeps_the_step_only_when_cross_validation_improves(tmp_path):
    references, predictions = _folders(tmp_path)
    for i in range(3):
        truth = spine()
        sitk.WriteImage(image_of(truth), str(references / f"case_{i}.nii.gz"))
        predicted = truth.copy()
        if i == 0:
            predicted[truth == 3] = 2
        sitk.WriteImage(image_of(predicted), str(predictions / f"case_{i}.nii.gz"))
    pairs = [(p, references / p.name) for p in sorted(predictions.glob("*.nii.gz"))]
    decision, dice = determine_postprocessing(pairs, [1, 2, 3, 4, 5], tmp_path / "pp.json")
    assert decision.active and decision.evidence["dice_after"] > decision.evidence["dice_before"]
    assert dice["after"]["case_0.nii.gz"]["3"] == 1.0 and dice["before"]["case_0.nii.gz"]["3"] == 0.0
    loaded = Postprocessing.from_dict(__import__("json").loads((tmp_path / "pp.json").read_text()))
    assert loaded.level_order == decision.level_order
    # already right everywhere: nothing to gain, so nothing is applied
    for i in range(3):
        sitk.WriteImage(image_of(spine()), str(predictions / f"case_{i}.nii.gz"))
    unchanged, _ = determine_postprocessing(pairs, [1, 2, 3, 4, 5])
    assert not unchanged.active and unchanged.evidence["learnt_order"] is not None


def test_grouped_argmax_keeps_a_vertebra_whose_level_is_uncertain():
    """Background 0.3 beats each of L4 0.25 / L5 0.25 / L3 0.2, but the vertebra (0.7) beats the background."""
    probabilities = np.zeros((6, 1, 1, 2), np.float32)
    probabilities[:, 0, 0, 0] = [0.3, 0.0, 0.0, 0.2, 0.25, 0.25]
    probabilities[:, 0, 0, 1] = [0.6, 0.1, 0.1, 0.1, 0.1, 0.0]
    from spinediff.inference.postprocessing import grouped_argmax

    assert np.argmax(probabilities[:, 0, 0, 0]) == 0  # plain argmax loses it
    assert grouped_argmax(probabilities, (1, 2, 3, 4, 5)).ravel().tolist() == [4, 0]
    # channels carry the dataset's label values (e.g. VerSe 20..24), not 0..5
    labelled = grouped_argmax(probabilities, (20, 21, 22, 23, 24), (0, 20, 21, 22, 23, 24))
    assert labelled.ravel().tolist() == [23, 0]


def test_determine_prefers_the_probability_foreground_when_it_recovers_voxels(tmp_path):
    """Predictions that lost L5 to the background while their probabilities still favour 'some vertebra':
    the decision forms the foreground from the probabilities and recovers it."""
    references, predictions = _folders(tmp_path)
    for i in range(2):
        truth = spine()
        sitk.WriteImage(image_of(truth), str(references / f"case_{i}.nii.gz"))
        probabilities = np.zeros((6, *truth.shape), np.float32)
        probabilities[0] = 1.0
        for level in range(1, 5):
            probabilities[:, truth == level] = 0.0
            probabilities[level, truth == level] = 1.0
        probabilities[:, truth == 5] = np.array([0.4, 0, 0, 0, 0.3, 0.3], np.float32)[:, None]
        predicted = np.argmax(probabilities, axis=0).astype(np.uint8)
        assert not (predicted == 5).any()
        sitk.WriteImage(image_of(predicted), str(predictions / f"case_{i}.nii.gz"))
        np.savez_compressed(predictions / f"case_{i}.npz", probabilities=probabilities)
    pairs = [(p, references / p.name) for p in sorted(predictions.glob("*.nii.gz"))]
    decision, dice = determine_postprocessing(pairs, [1, 2, 3, 4, 5])
    assert decision.active and decision.foreground == "probabilities"
    assert dice["probabilities"]["case_0.nii.gz"]["5"] == 1.0 and dice["argmax"]["case_0.nii.gz"]["5"] == 0.0
    restored = Postprocessing.from_dict(decision.to_dict())
    assert restored.needs_probabilities and restored.channel_labels == (0, 1, 2, 3, 4, 5)
    with pytest.raises(Exception, match="probabilities"):
        restored.apply(spine(), image_of(spine()))  # without them it says what to do


def _answer(truth: np.ndarray, shift: int) -> np.ndarray:
    """Probabilities of a network that numbered every vertebra ``shift`` levels too high (L2 called L1, ...), with
    0.8 on its level, 0.1 on the level below it and 0.1 background inside the vertebrae, and a faint 0.3 of its
    level in a one-voxel rim around each of them."""
    probabilities = np.zeros((6, *truth.shape), np.float32)
    probabilities[0] = 1.0
    for level in range(1, 6):
        inside = truth == level
        called = level - shift
        if not 1 <= called <= 5:  # a level outside L1..L5: left as background
            continue
        rim = (np.roll(inside, 1, axis=2) | np.roll(inside, -1, axis=2)) & ~inside & (truth == 0)
        probabilities[:, rim] = 0.0
        probabilities[0, rim], probabilities[called, rim] = 0.7, 0.3
        probabilities[:, inside] = 0.0
        probabilities[0, inside], probabilities[called, inside] = 0.1, 0.8
        probabilities[min(called + 1, 5), inside] += 0.1
    return probabilities


def test_renumbered_probabilities_follow_the_numbering_and_keep_the_vertebra_probability(order):
    """The numbering moves each vertebra's level (L1 called on L2 → L2); the probabilities follow it: the summed
    level probability stays the network's in every voxel, all of it on the new label (inside and on the rim beside
    it), and an argmax of the result gives the numbered map."""
    from spinediff.inference.postprocessing import grouped_argmax, renumbered_probabilities

    truth = spine()
    truth[truth == 1] = 0  # L1 outside the field of view: the network calls L2..L5 "L1..L4"
    probabilities = _answer(truth, shift=1)
    numbered = truth.copy()  # what a correct numbering returns
    result = renumbered_probabilities(probabilities, numbered, (1, 2, 3, 4, 5), spacing=(3.0, 2.0, 1.0))
    assert np.allclose(result[1:].sum(0), probabilities[1:].sum(0), atol=1e-6)
    assert np.allclose(result[0], probabilities[0])
    assert np.allclose(result.sum(0), 1.0, atol=1e-6)
    for level in range(2, 6):
        assert np.allclose(result[level][truth == level], 0.9)  # 0.8 + 0.1, on the level the numbering chose
        rim = (np.roll(truth == level, 1, axis=2) & (truth == 0))
        assert np.allclose(result[level][rim], 0.3)
    assert grouped_argmax(result, (1, 2, 3, 4, 5)).tolist() == numbered.tolist()
    # a vertebra the numbering removed gives its level probability to background
    removed = numbered.copy()
    removed[truth == 5] = 0
    dropped = renumbered_probabilities(probabilities, removed, (1, 2, 3, 4, 5))
    assert np.allclose(dropped[0][truth == 5], 1.0) and np.allclose(dropped[1:, truth == 5], 0.0)
    with pytest.raises(Exception, match="different grids"):
        renumbered_probabilities(probabilities, numbered[:, :10], (1, 2, 3, 4, 5))


def test_apply_to_answer_renumbers_a_shifted_answer_and_leaves_a_right_one_untouched(order):
    from spinediff.inference.postprocessing import grouped_argmax

    decision = Postprocessing(order, foreground="probabilities")
    truth = spine()
    right = _answer(truth, shift=0)
    labels, probabilities, report = decision.apply_to_answer(truth, image_of(truth), right)
    assert probabilities is right and labels.tolist() == truth.tolist() and report is not None
    # a scan cut through L1 (top open) with room below L5 (bottom closed), L2..L5 called "L1..L4": the numbering
    # moves them back, and the probabilities with them
    cut = spine(shape=(10, 80, 20))[:, 12:]
    shifted = _answer(cut, shift=1)
    labels, probabilities, _ = decision.apply_to_answer(grouped_argmax(shifted, order.labels), image_of(cut), shifted)
    assert labels.tolist() == cut.tolist()
    assert probabilities is not shifted
    assert grouped_argmax(probabilities, order.labels).tolist() == cut.tolist()
