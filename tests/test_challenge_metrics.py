"""The SynthRAD challenges' metrics (spinediff.metrics.challenge_metrics) against hand-computed values on tiny
arrays, MONAI on the same input, and the masking the challenges define."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric

from spinediff.metrics.challenge_metrics import (
    challenge_metrics,
    segmentation_score,
    synthrad_mae,
    synthrad_ms_ssim,
    synthrad_psnr,
    synthrad_ssim,
)


def test_mae_inside_the_mask_and_not_clipped():
    reference = np.array([[0.0, 100.0], [200.0, 3000.0]])
    prediction = np.array([[10.0, 100.0], [150.0, 4000.0]])
    mask = np.array([[1, 1], [1, 0]])
    assert synthrad_mae(prediction, reference, mask) == pytest.approx((10 + 0 + 50) / 3)
    # the challenges do not clip for the MAE: 1000 HU above the range's top still counts in full
    assert synthrad_mae(prediction, reference, np.array([[0, 0], [0, 1]])) == pytest.approx(1000.0)
    assert math.isnan(synthrad_mae(prediction, reference, np.zeros((2, 2))))


def test_psnr_clips_to_the_range_and_uses_its_width_as_peak():
    reference = np.array([-2000.0, 0.0, 3500.0, 50.0])
    prediction = np.array([-1024.0, 100.0, 3000.0, 9999.0])
    mask = np.array([1, 1, 1, 0])
    # after clipping to [-1024, 3000] the errors inside the mask are 0, 100, 0 HU: MSE 10000 / 3, peak 4024 HU
    assert synthrad_psnr(prediction, reference, mask) == pytest.approx(10 * math.log10(4024.0 ** 2 / (1e4 / 3)))
    assert synthrad_psnr(prediction, reference, mask) == pytest.approx(36.8644, abs=1e-4)
    assert synthrad_psnr(reference, reference, mask) == math.inf


def test_ssim_of_one_window_equals_the_formula():
    """A 7x7 image holds one window: the SSIM is Wang et al.'s formula on its (population) statistics."""
    rng = np.random.default_rng(0)
    reference = rng.uniform(-200, 1500, (7, 7))
    prediction = reference + rng.normal(0, 300, (7, 7))
    x, y = np.clip(prediction, -1024, 3000) + 1024, np.clip(reference, -1024, 3000) + 1024
    c1, c2 = (0.01 * 4024) ** 2, (0.03 * 4024) ** 2
    mx, my = x.mean(), y.mean()
    vx, vy, vxy = x.var(), y.var(), ((x - mx) * (y - my)).mean()
    expected = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert synthrad_ssim(prediction, reference) == pytest.approx(expected, rel=1e-4)
    assert expected < 0.95  # the noise is visible, so the check can fail


def test_ms_ssim_identity_is_one_and_errors_lower_it():
    rng = np.random.default_rng(1)
    reference = rng.uniform(-1000, 2000, (12, 14, 10))
    mask = np.zeros(reference.shape, dtype=np.uint8)
    mask[2:10, 3:12, 2:8] = 1
    assert synthrad_ms_ssim(reference, reference, mask) == pytest.approx(1.0)
    noise = rng.normal(0, 1, reference.shape)
    small, large = (synthrad_ms_ssim(reference + sigma * noise, reference, mask) for sigma in (200, 600))
    # padded to 97 voxels, a tiny image is mostly its edge at the coarse levels: the scores stay near 1
    assert large < small < 1 - 1e-4


def test_single_level_ms_ssim_equals_monai_multiscale_ssim():
    """With one level (weight 1) and no mask, the masked MS-SSIM is MONAI's MultiScaleSSIMMetric on the images
    clipped to [-1024, 3000] and shifted to start at 0 (uniform 7-voxel window, data range 4024)."""
    rng = np.random.default_rng(2)
    reference = rng.uniform(-500, 1500, (9, 11, 10))
    prediction = reference + rng.normal(0, 150, reference.shape)
    ours = synthrad_ms_ssim(prediction, reference, None, weights=(1.0,))
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=4024.0, kernel_type="uniform", kernel_size=7,
                                  weights=(1.0,))
    as_batch = lambda a: torch.as_tensor(np.clip(a, -1024, 3000) + 1024, dtype=torch.float32)[None, None]  # noqa: E731
    monai = float(metric(as_batch(prediction), as_batch(reference)).item())
    assert ours == pytest.approx(monai, rel=1e-4)
    assert ours < 0.99


def test_ms_ssim_masking_as_the_challenge_defines_it():
    rng = np.random.default_rng(3)
    reference = rng.uniform(-900, 1800, (16, 16, 16))
    mask = np.zeros(reference.shape, dtype=np.uint8)
    mask[3:13, 3:13, 3:13] = 1
    outside = np.where(mask > 0, reference, reference + rng.normal(0, 500, reference.shape))
    # errors outside the mask do not count at all: the outside is set to -1024 in both images first
    assert synthrad_ms_ssim(outside, reference, mask) == pytest.approx(1.0)
    assert synthrad_ms_ssim(outside, reference, None) < 0.99
    inside = np.where(mask > 0, reference + rng.normal(0, 200, reference.shape), reference)
    masked = synthrad_ms_ssim(inside, reference, mask)
    # the same images with a mask over everything: the error is averaged with the untouched border too
    everywhere = synthrad_ms_ssim(inside, reference, np.ones_like(mask))
    assert masked < everywhere < 1.0


def test_challenge_metrics_columns_and_small_images():
    reference = np.full((4, 4, 4), 100.0)
    prediction = reference + 10
    out = challenge_metrics(prediction, reference)
    assert out["synthrad_mae"] == pytest.approx(10.0)
    assert out["synthrad_psnr"] == pytest.approx(10 * math.log10(4024.0 ** 2 / 100.0))
    assert math.isnan(out["synthrad_ms_ssim"]) and math.isnan(out["synthrad_ssim"])  # smaller than one window


def test_segmentation_score_averages_the_classes_present_in_the_reference():
    reference = np.zeros((10, 10, 10), dtype=np.uint8)
    reference[2:6, 2:6, 2:6] = 1  # 64 voxels
    prediction = np.zeros_like(reference)
    prediction[2:6, 2:6, 2:4] = 1  # 32 voxels, all inside
    prediction[7:9, 7:9, 7:9] = 2  # class 2 is not in the reference: skipped, as in the challenge
    score = segmentation_score(prediction, reference, classes=[1, 2], spacing=(1.0, 1.0, 1.0))
    assert score["synthrad_seg_dice"] == pytest.approx(2 * 32 / (64 + 32))
    assert score["synthrad_seg_hd95"] == pytest.approx(2.0)  # the missing half lies up to 2 voxels away


def _write(array: np.ndarray, path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def test_evaluate_adds_the_challenge_columns_inside_the_given_masks(tmp_path):
    from spinediff.errors import SpineDiffError
    from spinediff.evaluation.evaluate import evaluate_folders

    ref, pred, masks = (tmp_path / n for n in ("ref", "pred", "masks"))
    for folder in (ref, pred, masks):
        folder.mkdir()
    reference = np.full((8, 9, 10), -1000.0, dtype=np.float32)
    reference[2:6, 2:7, 2:8] = 40.0
    prediction = reference.copy()
    prediction[2:6, 2:7, 2:8] += 30.0  # 30 HU inside the body
    prediction[0, 0, 0] = 500.0  # outside the mask: not counted
    mask = (reference > -500).astype(np.uint8)
    _write(reference, ref / "case1.nii.gz")
    _write(prediction, pred / "case1.nii.gz")
    _write(mask, masks / "case1.nii.gz")
    row = evaluate_folders(ref, pred, task="image", mask_folder=masks, progress=False).rows[0]
    assert row["synthrad_mae"] == pytest.approx(30.0)
    assert row["synthrad_psnr"] == pytest.approx(10 * math.log10(4024.0 ** 2 / 900.0))
    assert 0 < row["synthrad_ms_ssim"] < 1
    plain = evaluate_folders(ref, pred, task="image", progress=False).rows[0]
    assert "synthrad_mae" not in plain
    (masks / "case1.nii.gz").unlink()
    _write(mask, masks / "other.nii.gz")
    with pytest.raises(SpineDiffError, match="no mask for case"):
        evaluate_folders(ref, pred, task="image", mask_folder=masks, progress=False)


def test_benchmark_scores_translation_inside_the_dataset_masks_and_shows_the_columns(tmp_path):
    from spinediff.experiments.benchmark import benchmark_table, score_method
    from spinediff.experiments.folds import Method, MethodResult
    from spinediff.tasks import TASKS

    translation = TASKS["translation"]
    reference, masks, results = tmp_path / "reference", tmp_path / "labelsTr", tmp_path / "results"
    method = Method("Regression U-Net 2D", "RegressionTrainer", "2d_diffusion", baseline=True)
    validation = results / method.folder_name / "fold_0" / "validation"
    for folder in (reference, masks, validation):
        folder.mkdir(parents=True)
    ct = np.full((8, 9, 10), 40.0, dtype=np.float32)  # all "body" by the -500 HU rule
    synthetic = ct.copy()
    synthetic[:, :, :5] += 100.0  # 100 HU off in one half ...
    mask = np.zeros(ct.shape, dtype=np.uint8)
    mask[:, :, 5:] = 2  # ... but the dataset's body mask (a CT class, > 0) covers the other half only
    _write(ct, reference / "case1.nii.gz")
    _write(synthetic, validation / "case1.nii.gz")
    _write(mask, masks / "case1.nii.gz")
    result = MethodResult(method, [0])
    score_method(result, results, reference, translation, (-1024.0, 3071.0), masks)
    scores = result.per_case["case1"]
    assert scores["synthrad_mae"] == pytest.approx(0.0) and scores["mae_body"] == pytest.approx(50.0)
    _, table = benchmark_table([result], translation)
    assert "synthrad_mae | synthrad_psnr | synthrad_ms_ssim" in table
    without = MethodResult(method, [0])
    score_method(without, results, reference, translation, (-1024.0, 3071.0))  # no masks: reference > -500 HU
    assert without.per_case["case1"]["synthrad_mae"] == pytest.approx(50.0)


def test_benchmark_table_tests_the_post_processed_dice_pairwise_too():
    """Segmentation rows get a second paired Wilcoxon test on dice_pp (each method after its own post-processing),
    beside the one on the Dice as trained; it follows the per-case values, not the method order."""
    from scipy import stats

    from spinediff.experiments.benchmark import benchmark_table
    from spinediff.experiments.folds import Method, MethodResult
    from spinediff.tasks import TASKS

    segmentation = TASKS["segmentation"]
    base = MethodResult(Method("nnU-Net 2D", "nnUNetTrainer", "2d_cpu", baseline=True), [0])
    other = MethodResult(Method("Refinement 2D", "DiffusionRefinementTrainer", "2d_diffusion"), [0])
    rng = np.random.default_rng(0)
    for i in range(12):
        dice, dice_pp = rng.uniform(0.5, 0.9), rng.uniform(0.7, 0.9)
        base.per_case[f"c{i}"] = {"dice": dice, "dice_pp": dice_pp}
        other.per_case[f"c{i}"] = {"dice": dice + (0.01 if i % 3 else -0.02) * (i + 1),
                                   "dice_pp": dice_pp - 0.02 - 0.001 * i}
    rows, table = benchmark_table([base, other], segmentation)
    expected = stats.wilcoxon([other.per_case[f"c{i}"]["dice_pp"] for i in range(12)],
                              [base.per_case[f"c{i}"]["dice_pp"] for i in range(12)]).pvalue
    assert rows[1]["wilcoxon_p_pp_vs_nnU-Net 2D"] == pytest.approx(expected)
    assert rows[1]["wilcoxon_p_vs_nnU-Net 2D"] != pytest.approx(expected)
    assert "Wilcoxon p (dice_pp)" in table and f"{expected:.3g}" in table.splitlines()[3]
