"""Metrics against hand-computed values, and `spinediff evaluate` on real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from spinediff.cli import main
from spinediff.evaluation.evaluate import summarise
from spinediff.metrics.image_metrics import image_metrics, mae, psnr, ssim
from spinediff.metrics.segmentation_metrics import segmentation_metrics


def _cube(shape=(20, 20, 20), low=5, high=15, label=1):
    array = np.zeros(shape, np.uint8)
    array[low:high, low:high, low:high] = label
    return array


def test_perfect_segmentation():
    reference = _cube()
    metrics = segmentation_metrics(reference, reference, [1], (1.0, 1.0, 1.0))[1]
    assert metrics["dice"] == pytest.approx(1.0) and metrics["hd95"] == 0 and metrics["asd"] == 0


def test_empty_prediction():
    metrics = segmentation_metrics(np.zeros((20, 20, 20), np.uint8), _cube(), [1], (1.0, 1.0, 1.0))[1]
    assert metrics["dice"] == 0 and math.isinf(metrics["hd95"])
    both_empty = segmentation_metrics(np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8), [1], (1, 1, 1))
    assert math.isnan(both_empty[1]["dice"])


@pytest.mark.parametrize("shift,spacing", [(1, 1.0), (2, 1.0), (2, 2.5)])
def test_known_shift(shift, spacing):
    """A 10-voxel cube moved by `shift` voxels along one axis: Dice = (10 - shift) / 10 and the
    95th-percentile distance is the shift in mm."""
    reference = _cube()
    prediction = np.roll(reference, shift, axis=0)
    metrics = segmentation_metrics(prediction, reference, [1], (spacing, 1.0, 1.0))[1]
    assert metrics["dice"] == pytest.approx((10 - shift) / 10, abs=1e-6)
    assert metrics["hd95"] == pytest.approx(shift * spacing, abs=1e-6)
    assert 0 < metrics["asd"] < shift * spacing


def test_image_metrics_by_hand():
    rng = np.random.default_rng(0)
    reference = rng.uniform(-1000, 1000, (12, 16, 16)).astype(np.float32)
    assert mae(reference, reference) == 0 and math.isinf(psnr(reference, reference, (-1024, 3071)))
    assert ssim(reference, reference, (-1024, 3071)) == pytest.approx(1.0, abs=1e-5)
    shifted = reference + 10.0
    assert mae(shifted, reference) == pytest.approx(10.0, abs=1e-3)
    assert psnr(shifted, reference, (-1024, 3071)) == pytest.approx(10 * math.log10(4095**2 / 100), abs=1e-3)
    metrics = image_metrics(shifted, reference, (-1024, 3071))
    body = reference > -500
    assert metrics["mae_body"] == pytest.approx(10.0, abs=1e-3) and body.sum() > 0
    assert ssim(rng.uniform(-1000, 1000, reference.shape), reference, (-1024, 3071)) < 0.1


def test_summary_confidence_interval():
    summary = summarise([1.0, 2.0, 3.0, float("nan")])
    assert summary["mean"] == 2.0 and summary["n"] == 3 and summary["n_not_finite"] == 1
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n)
    assert summary["ci95_low"] == pytest.approx(2.0 - half) and summary["ci95_high"] == pytest.approx(2.0 + half)


def test_evaluate_command_writes_csv_and_summary(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for i, shift in enumerate((0, 2)):
        reference = _cube()
        for folder, array in ((ref, reference), (pred, np.roll(reference, shift, axis=0))):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((1.0, 1.0, 1.0))
            sitk.WriteImage(image, str(folder / f"case_{i}.nii.gz"))
    assert main(["evaluate", "-ref", str(ref), "-pred", str(pred)]) == 0
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["per_label"]["1"]["dice"]["mean"] == pytest.approx(0.9, abs=1e-6)
    assert (pred / "per_case.csv").read_text().count("\n") == 3


def test_segmenter_dataset_links_the_target_channel_and_labels(phantom_root, tmp_path, monkeypatch):
    """Downstream Dice trains its CT segmenter on the translation dataset's CT and labels, nothing else."""
    import json

    monkeypatch.delenv("nnUNet_preprocessed", raising=False)  # IDs in use there count too; none here

    import SimpleITK as sitk

    from spinediff.errors import SpineDiffError
    from spinediff.experiments.downstream import downstream_dataset_name, write_segmenter_dataset

    source = phantom_root / "Dataset902_SpinePhantomTranslation"
    name = downstream_dataset_name(tmp_path, source.name)
    assert name == "Dataset999_SpinePhantomTranslationCTSegmenter"
    out = write_segmenter_dataset(source, tmp_path / name)
    assert downstream_dataset_name(tmp_path, source.name) == name  # found again by its source
    (tmp_path / "Dataset998_Other").mkdir()
    assert downstream_dataset_name(tmp_path, "Dataset903_X") == "Dataset997_XCTSegmenter"  # next free ID
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "CT"} and spec["numTraining"] == 3
    assert spec["labels"] == json.loads((source / "dataset.json").read_text())["labels"]
    images = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert images == [f"phantom_00{i}_0000.nii.gz" for i in range(3)]
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / "phantom_001_0000.nii.gz")))
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "imagesTr" / "phantom_001_0002.nii.gz")))
    assert np.array_equal(ct, expected)
    with pytest.raises(SpineDiffError, match="translation dataset"):
        write_segmenter_dataset(phantom_root / "Dataset901_SpinePhantomSeg", tmp_path / "other")
    # a generation dataset (label map → CT) gives the segmenter of Dice_gen the same way
    generation = write_segmenter_dataset(phantom_root / "Dataset903_SpinePhantomGeneration", tmp_path / "gen")
    assert json.loads((generation / "dataset.json").read_text())["channel_names"] == {"0": "CT"}
    assert sorted(p.name for p in (generation / "imagesTr").iterdir()) == images


def test_figures_start_from_matplotlib_defaults_after_nnunet_plotted():
    """nnU-Net's progress plot leaves seaborn's font_scale=2.5 and grey style behind; our figures undo it."""
    import matplotlib
    import seaborn as sns

    from spinediff.evaluation.figures import pyplot

    sns.set(font_scale=2.5)  # what nnU-Net's logger does before each progress plot
    assert matplotlib.rcParams["xtick.labelsize"] != "medium"
    pyplot()
    assert matplotlib.rcParams["font.size"] == 9
    assert matplotlib.rcParams["xtick.labelsize"] == "medium" and matplotlib.rcParams["axes.facecolor"] == "white"


def test_segmenter_dataset_with_a_missing_ct_writes_nothing(phantom_root, tmp_path):
    import shutil

    from spinediff.errors import SpineDiffError
    from spinediff.experiments.downstream import write_segmenter_dataset

    source = tmp_path / "Dataset902_SpinePhantomTranslation"
    shutil.copytree(phantom_root / source.name, source)
    (source / "imagesTr" / "phantom_001_0002.nii.gz").unlink()
    target = tmp_path / "Dataset999_SpinePhantomTranslationCTSegmenter"
    with pytest.raises(SpineDiffError, match="phantom_001_0002.nii.gz is missing"):
        write_segmenter_dataset(source, target)
    assert not target.exists() and not target.with_name(target.name + ".partial").exists()


@pytest.mark.parametrize("damage,message", [
    ("spacing", "spacing"), ("origin", "origin"), ("direction", "direction"), ("truncated", "truncated")])
def test_evaluate_refuses_a_prediction_off_the_reference_grid_or_truncated(tmp_path, capsys, damage, message):
    """Same size is not enough: spacing 1.5x, a shifted origin, another orientation, or a truncated file would
    be scored as if right; evaluate names the file and writes nothing."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    reference = sitk.GetImageFromArray(_cube())
    sitk.WriteImage(reference, str(ref / "case_0.nii.gz"))
    prediction = sitk.GetImageFromArray(_cube())
    if damage == "spacing":
        prediction.SetSpacing((1.5, 1.5, 1.5))
    elif damage == "origin":
        prediction.SetOrigin((0.0, 0.0, 12.0))
    elif damage == "direction":
        prediction.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    target = pred / "case_0.nii.gz"
    sitk.WriteImage(prediction, str(target), True)
    if damage == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) * 2 // 3])
    assert main(["evaluate", "-ref", str(ref), "-pred", str(pred)]) == 2
    err = capsys.readouterr().err
    assert "case_0.nii.gz" in err and message in err and "Traceback" not in err
    assert not (pred / "summary.json").exists() and not (pred / "per_case.csv").exists()


def test_adjacent_difference_ratio_sees_slices_sampled_on_their_own():
    """A smooth volume: a copy has ratio 1 on every axis; per-slice offsets (what independent noise per 2D slice
    does) raise the ratio along that axis only; a constant prediction has ratio 0; by-hand value of a ramp."""
    from spinediff.metrics.image_metrics import adjacent_difference_ratio

    z, y, x = np.meshgrid(np.arange(10), np.arange(12), np.arange(14), indexing="ij")
    reference = (20.0 * z + 5.0 * y + 3.0 * x).astype(np.float32)  # steps 20, 5, 3 HU along z, y, x
    assert [adjacent_difference_ratio(reference, reference, a) for a in range(3)] == [1.0, 1.0, 1.0]
    offsets = np.where(np.arange(10) % 2, 30.0, 0.0)[:, None, None]  # +30 HU on every other z slice
    jumpy = reference + offsets
    # neighbours differ by 20 + 30 = 50 or |20 - 30| = 10 HU, alternately (5 and 4 of the 9 pairs)
    assert adjacent_difference_ratio(jumpy, reference, 0) == pytest.approx((5 * 50 + 4 * 10) / 9 / 20)
    assert adjacent_difference_ratio(jumpy, reference, 1) == pytest.approx(1.0)
    assert adjacent_difference_ratio(np.zeros_like(reference), reference, 2) == 0.0
    metrics = image_metrics(jumpy, reference, (-1024, 3071), is_ct=False)
    assert metrics["adjacent_ratio_z"] > 1.5 and metrics["adjacent_ratio_y"] == pytest.approx(1.0)


def test_frechet_distance_of_gaussians_by_hand():
    """Identical sets: 0; a mean shift m with equal covariances: |m|^2; symmetric; too few samples refused."""
    from spinediff.errors import SpineDiffError
    from spinediff.metrics.frechet import frechet_distance

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 6, generator=generator, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    assert frechet_distance(a + shift, a) == pytest.approx(float((shift**2).sum()), rel=1e-6)
    b = torch.randn(4000, 6, generator=generator, dtype=torch.float64) * 2
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(6 * (1 + 4 - 2 * 2), rel=0.1)  # tr(S1 + S2 - 2 (S1 S2)^1/2)
    with pytest.raises(SpineDiffError, match="N >= 2"):
        frechet_distance(a[:1], b)


def test_frechet_distance_in_a_trained_segmenters_feature_space(phantom_root, tmp_path):
    """Features from the encoder of an nnU-Net CT segmenter trained here (no download): real CT against itself is
    0, and the distance grows with how much the images are corrupted."""
    import SimpleITK as sitk
    from conftest import nnunet_folders

    from spinediff.experiments.downstream import write_segmenter_dataset
    from spinediff.metrics.frechet import SegmenterFeatures, image_frechet_distance
    from spinediff.planning.api import plan_dataset
    from spinediff.training.api import TrainingOptions, train

    source = phantom_root / "Dataset902_SpinePhantomTranslation"
    raw = tmp_path / "raw"
    write_segmenter_dataset(source, raw / "Dataset990_PhantomCT")
    with nnunet_folders(raw, tmp_path):
        plan_dataset(990, configurations=["2d_cpu"], device="cpu", num_processes=1, show_progress_bar=False)
        folder = train(990, "2d_cpu", 0, "nnUNetTrainer", TrainingOptions(epochs=1, iterations_per_epoch=2,
                                                                           val_iterations_per_epoch=1))
        extractor = SegmenterFeatures(Path(folder).parent, 0)  # train() returns the fold folder
        real = sorted((raw / "Dataset990_PhantomCT" / "imagesTr").glob("*.nii.gz"))
        rng = np.random.default_rng(0)
        corrupted = {}
        for level in (20.0, 300.0):
            for path in real:
                image = sitk.ReadImage(str(path))
                array = sitk.GetArrayFromImage(image).astype(np.float32)
                noisy = sitk.GetImageFromArray(array + rng.normal(0, level, array.shape).astype(np.float32))
                noisy.CopyInformation(image)
                target = tmp_path / f"noise{int(level)}" / path.name
                target.parent.mkdir(exist_ok=True)
                sitk.WriteImage(noisy, str(target))
                corrupted.setdefault(level, []).append(target)
        features = extractor.features(real[0])
        assert features.ndim == 2 and features.shape[0] >= 1 and torch.isfinite(features).all()
        assert image_frechet_distance(extractor, real, real) == pytest.approx(0.0, abs=1e-6)
        mild = image_frechet_distance(extractor, corrupted[20.0], real)
        strong = image_frechet_distance(extractor, corrupted[300.0], real)
        assert 0 < mild < strong


def test_the_downstream_ct_segmenter_learns_only_the_labels_the_ct_shows(phantom_root, tmp_path):
    """Discs and the spinal canal are soft tissue in CT: the downstream segmenter keeps the bone labels (median HU
    above the bone threshold), renumbered, with the map back to the source's values."""
    import json

    import SimpleITK as sitk

    from spinediff.experiments.downstream import LABEL_MAP_KEY, write_segmenter_dataset

    source = phantom_root / "Dataset902_SpinePhantomTranslation"
    out = write_segmenter_dataset(source, tmp_path / "Dataset990_Bone", ct_visible_only=True)
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["labels"] == {"background": 0, "vertebra": 1}, spec["labels"]
    assert spec[LABEL_MAP_KEY] == {"1": 1}
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "phantom_001.nii.gz")))
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / "phantom_001.nii.gz")))
    assert set(np.unique(label)) == {0, 1} and np.array_equal(label == 1, original == 1)
    assert not (out / "labelsTr" / "phantom_001.nii.gz").is_symlink()
