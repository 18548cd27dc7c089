"""Generation in the other modality and across modalities (issue 19, point 2): the phantom's mask → MR dataset, and
an MR generated from a mask taken from a CT (the CT's labels carried onto the MR grid)."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
from conftest import nnunet_folders

GEN_MR = "Dataset904_SpinePhantomGenerationMR"


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    a, b = a == label, b == label
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_mr_generation_dataset_and_a_mask_from_ct(phantom_root):
    raw = phantom_root / GEN_MR
    spec = json.loads((raw / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "T2w"} and spec["spinediff"]["task"] == "generation"
    t2 = sitk.ReadImage(str(raw / "imagesTr" / "phantom_000_0000.nii.gz"))
    original = sitk.ReadImage(str(phantom_root / "Dataset901_SpinePhantomSeg" / "imagesTr" / "phantom_000_0001.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(t2), sitk.GetArrayFromImage(original))  # the segmentation set's T2w
    mr_mask = sitk.ReadImage(str(raw / "labelsTr" / "phantom_000.nii.gz"))
    from_ct = sitk.ReadImage(str(raw / "labelsFromCT" / "phantom_000.nii.gz"))
    for name in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(from_ct, name)(), getattr(mr_mask, name)()), name
    a, b = sitk.GetArrayFromImage(from_ct), sitk.GetArrayFromImage(mr_mask)
    labels = [int(v) for v in np.unique(b) if v and (b == v).sum() > 20]
    # the same anatomy seen on the CT grid: close to the MR mask, not a copy of it
    assert labels and np.mean([_dice(a, b, v) for v in labels]) > 0.7 and not np.array_equal(a, b)


def test_mr_generated_from_a_ct_mask_end_to_end(phantom_root, tmp_path):
    from spinediff.inference.api import predict
    from spinediff.planning.api import plan_dataset
    from spinediff.training.api import TrainingOptions, train

    raw = phantom_root / GEN_MR
    with nnunet_folders(phantom_root, tmp_path):
        plan_dataset(904, configurations=["2d_diffusion"], device="cpu", num_processes=1, show_progress_bar=False)
        train(904, "2d_diffusion", 0, "SegGuidedGenerationTrainer",
              TrainingOptions(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, num_inference_steps=2,
                              validation_samples=1))
        inputs = tmp_path / "masks_from_ct"
        inputs.mkdir()
        (inputs / "phantom_001.nii.gz").symlink_to(raw / "labelsFromCT" / "phantom_001.nii.gz")
        report = predict(inputs, tmp_path / "out", 904, "2d_diffusion", "SegGuidedGenerationTrainer", folds=[0],
                         num_samples=1, num_inference_steps=2, progress=False)
        assert report.exit_code == 0
    generated = sitk.ReadImage(str(tmp_path / "out" / "phantom_001.nii.gz"))
    mask = sitk.ReadImage(str(raw / "labelsFromCT" / "phantom_001.nii.gz"))
    for name in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(generated, name)(), getattr(mask, name)()), name
    mr = sitk.GetArrayFromImage(generated)
    real = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / "phantom_001_0000.nii.gz")))
    assert np.isfinite(mr).all() and mr.std() > 0
    assert real.min() - 0.5 * np.ptp(real) <= mr.min() and mr.max() <= real.max() + 0.5 * np.ptp(real)  # MR units
