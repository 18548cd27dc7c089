"""Failure-detection metrics and case-level uncertainty scores against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spinediff.metrics.case_uncertainty import (
    MISSING_LEVEL,
    case_scores,
    expected_volumes,
    level_anomaly,
    pairwise_dice,
)
from spinediff.metrics.failure_detection import (
    aurc,
    error_auroc,
    expected_calibration_error,
    optimal_aurc,
    review_threshold,
    risk_coverage,
)


def test_error_auroc_counts_ordered_pairs_inside_the_region():
    uncertainty = np.array([0.1, 0.4, 0.35, 0.8])
    error = np.array([False, False, True, True])
    assert error_auroc(uncertainty, error) == pytest.approx(0.75)  # 3 of the 4 (wrong, right) pairs ordered
    assert error_auroc(uncertainty, error, region=np.array([1, 0, 1, 1])) == pytest.approx(1.0)
    assert error_auroc(uncertainty, np.zeros(4, bool)) is None


def test_expected_calibration_error_weighs_each_bin_by_its_voxels():
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 0, 1, 1])
    # bin 9: accuracy 0.5 vs confidence 0.95; bin 5: 1.0 vs 0.55; each holds half the voxels
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    assert expected_calibration_error(np.ones(3), np.ones(3)) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([]), np.array([])) is None


def test_aurc_of_a_perfect_a_reversed_and_a_tied_ranking():
    risks = [0.0, 0.5, 1.0]
    assert aurc([0.1, 0.2, 0.3], risks) == pytest.approx((0 + 0.25 + 0.5) / 3)
    assert optimal_aurc(risks) == pytest.approx(aurc([0.1, 0.2, 0.3], risks))
    assert aurc([0.3, 0.2, 0.1], risks) == pytest.approx((1 + 0.75 + 0.5) / 3)
    coverage, risk = risk_coverage([1.0, 1.0], [0.0, 1.0])
    assert coverage.tolist() == [0.5, 1.0] and risk.tolist() == [0.5, 0.5]  # a tie costs its mean risk
    with pytest.raises(ValueError):
        aurc([1.0], [0.1, 0.2])


def test_review_threshold_separates_failures_and_falls_back_without_any():
    chosen = review_threshold([0.1, 0.2, 0.8, 0.9], [False, False, True, True])
    assert chosen["threshold"] == pytest.approx(0.5)
    assert (chosen["failures_flagged"], chosen["good_flagged"]) == (2, 0)
    assert review_threshold([0.1, 0.3], [False, False])["threshold"] == pytest.approx(0.3)


def test_case_scores_see_a_missing_level_and_disagreeing_members():
    spacing = (2.0, 1.0, 1.0)  # 2 ul per voxel
    labels = np.zeros((1, 4, 5), dtype=int)
    labels[0, 0, :2] = 1
    labels[0, 1, :2] = 2  # label 3 is missing
    probabilities = np.stack([labels == c for c in range(4)]).astype(np.float32) * 0.8 + 0.05
    expected = expected_volumes([labels, labels], [spacing, spacing], [1, 2, 3])
    assert expected == {1: pytest.approx(0.004), 2: pytest.approx(0.004)}  # label 3 never occurs: no expectation
    scores = case_scores(probabilities, spacing, [1, 2, 3], expected={**expected, 3: 0.004},
                         member_labels=[labels, np.where(labels == 2, 0, labels)])
    assert scores["level_anomaly"] == pytest.approx(MISSING_LEVEL)
    assert scores["level_confidence"] == pytest.approx(1 - 0.85)
    # the two members agree on label 1 (Dice 1) and not at all on label 2 (Dice 0)
    assert scores["sample_disagreement"] == pytest.approx(0.5)
    p = np.array([0.85, 0.05, 0.05, 0.05])
    assert scores["entropy"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-5)
    assert scores["levels"]["3"] == {"volume_ml": 0.0}
    assert level_anomaly({1: {"volume_ml": 0.008}}, {1: 0.004}) == pytest.approx(math.log(2))
    assert pairwise_dice([labels], [1]) is None


def test_evaluate_scores_uncertainty_outputs_against_the_errors(tmp_path):
    """A folder with a right case and a wrong-level case (L1 and L2 swapped), probabilities and uncertainty maps:
    evaluate finds the wrong-level case, the map that is high exactly on the wrong voxels gets AUROC 1, and the
    case score built from it ranks the wrong case first."""
    import SimpleITK as sitk

    from spinediff.evaluation.evaluate import evaluate_folders

    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    reference = np.zeros((4, 12, 12), dtype=np.uint8)
    reference[:, 2:5, 2:10] = 1
    reference[:, 7:10, 2:10] = 2

    def write(array, path, spacing=(1.0, 1.0, 2.0)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(path))

    for case, prediction in (("right", reference), ("swapped", np.choose(reference, [0, 2, 1]).astype(np.uint8))):
        write(reference, ref_dir / f"{case}.nii.gz")
        write(prediction, pred_dir / f"{case}.nii.gz")
        probabilities = np.stack([prediction == c for c in range(3)]).astype(np.float32) * 0.9 + 0.1 / 3
        np.savez_compressed(pred_dir / f"{case}.npz", probabilities=probabilities)
        write((prediction != reference).astype(np.float32) * 0.5 + 0.01, pred_dir / f"{case}_uncertainty.nii.gz")
    failure = evaluate_folders(ref_dir, pred_dir, progress=False).summary["failure_detection"]
    assert failure["cases"] == 2 and failure["wrong_level"] == ["swapped"]
    assert failure["auroc_mutual_information"] == pytest.approx(1.0)
    # every voxel is near the vertebrae and has confidence 0.9 + 0.1/3; 192 of the 2 x 576 voxels are wrong
    assert failure["ece"] == pytest.approx(abs((1 - 192 / 1152) - (0.9 + 0.1 / 3)), abs=1e-6)
    rows = {row["score"]: row for row in failure["scores"]}
    assert rows["mutual_information"]["separates_wrong_levels"] is True
    assert rows["mutual_information"]["aurc"] == pytest.approx(failure["optimal_aurc"])
    assert rows["mutual_information"]["wrong_level_flagged"] == 1 and rows["mutual_information"]["good_flagged"] == 0


def test_ensemble_save_uncertainty_writes_member_disagreement(tmp_path):
    """Two members (e.g. nnU-Net fold models) that agree on row 0 (label 1) and call row 1 label 2 or 1: the
    ensemble's mutual-information map and its sample_disagreement (1 - pairwise Dice) against hand-computed
    values; images cannot be combined this way."""
    import SimpleITK as sitk

    from spinediff.cli import main
    from spinediff.errors import SpineDiffError
    from spinediff.inference.ensemble import ensemble_folders

    shape = (2, 4, 4)
    first, second = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    first[:, 0] = second[:, 0] = 1  # both: label 1 in row 0 (8 voxels)
    first[:, 1], second[:, 1] = 2, 1  # row 1: label 2 in the first, label 1 in the second
    for name, labels in (("a", first), ("b", second)):
        folder = tmp_path / name
        folder.mkdir()
        image = sitk.GetImageFromArray(labels)
        image.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(image, str(folder / "case.nii.gz"))
        probabilities = np.stack([labels == c for c in range(3)]).astype(np.float32)  # one-hot: entropy 0
        np.savez_compressed(folder / "case.npz", probabilities=probabilities)
    assert main(["ensemble", "-i", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "ab"),
                 "--save-uncertainty"]) == 0
    mi = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ab" / "case_uncertainty.nii.gz")))
    disputed = first != second  # row 1, mean (0, 0.5, 0.5): entropy ln 2, members' entropy 0
    assert np.allclose(mi[disputed], math.log(2), atol=1e-5) and np.allclose(mi[~disputed], 0, atol=1e-6)
    from spinediff.io import read_json

    said = read_json(tmp_path / "ab" / "case_uncertainty.json")
    assert said["members"] == 2
    # pairwise Dice: label 1 → 2 x 8 / (8 + 16) = 2/3, label 2 → 0; their mean 1/3
    assert said["scores"]["sample_disagreement"] == pytest.approx(2 / 3)
    # the predicted foreground is rows 0 and 1; half of it (row 1) has ln 2
    assert said["scores"]["mutual_information"] == pytest.approx(math.log(2) / 2, rel=1e-5)
    # translations (images without probabilities) are refused clearly
    for name in ("a", "b"):
        (tmp_path / name / "case.npz").unlink()
        image = sitk.GetImageFromArray(np.zeros(shape, np.float32))
        sitk.WriteImage(image, str(tmp_path / name / "case.nii.gz"))
    with pytest.raises(SpineDiffError, match="save-uncertainty"):
        ensemble_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "img", save_uncertainty=True)
