"""3D end to end: a tiny ``3d_diffusion`` translation model trains, validates, and predicts a raw case through the
sliding-window sampler with the input's geometry (issue 18, point 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import nnunet_folders

from spinediff.inference.api import predict
from spinediff.training.api import TrainingOptions, train

TRANS = "Dataset902_SpinePhantomTranslation"
CONFIG = "3d_diffusion"
TRAINER = "DiffusionTranslationTrainer"
#: smaller than the tiny phantom's preprocessed volume (8 x 64 x 48), so that prediction needs several windows
PATCH = [8, 32, 32]


@pytest.fixture(scope="module")
def trained_3d(phantom_root, tmp_path_factory):
    from spinediff.planning.api import plan_dataset

    base = tmp_path_factory.mktemp("three_d")
    with nnunet_folders(phantom_root, base) as env:
        plan_dataset(902, configurations=[CONFIG], device="cpu", num_processes=1, show_progress_bar=False)
        plans_file = Path(env["nnUNet_preprocessed"]) / TRANS / "nnUNetPlans.json"
        plans = json.loads(plans_file.read_text())
        plans["configurations"][CONFIG]["patch_size"] = PATCH
        plans_file.write_text(json.dumps(plans, indent=2))
        folder = train(902, CONFIG, 0, TRAINER, TrainingOptions(epochs=1, iterations_per_epoch=2,
                                                                val_iterations_per_epoch=1, num_inference_steps=2,
                                                                validation_samples=1))
        yield {**env, "raw": Path(phantom_root), "folder": Path(folder)}


def test_3d_translation_trains_validates_and_predicts_in_the_input_geometry(trained_3d, tmp_path):
    from spinediff.diffusion.sampler import SlidingWindowSampler
    from spinediff.inference.models import load_fold_model, model_folder

    folder = model_folder(902, CONFIG, TRAINER)
    model = load_fold_model(folder, 0)
    assert model.patch_size == tuple(PATCH) and len(model.patch_size) == 3
    # the validation exports of the 3D model, in each case's raw geometry
    exported = sorted((folder.path / "fold_0" / "validation").glob("*.nii.gz"))
    assert exported
    case = exported[0].name[: -len(".nii.gz")]
    source = trained_3d["raw"] / TRANS / "imagesTr" / f"{case}_0000.nii.gz"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for channel in (0, 1):
        (inputs / f"{case}_{channel:04d}.nii.gz").symlink_to(trained_3d["raw"] / TRANS / "imagesTr" /
                                                              f"{case}_{channel:04d}.nii.gz")
    calls = []
    original = SlidingWindowSampler._blended_output

    def counting(self, state, condition, timestep, windows, weight_total):
        calls.append(len(windows))
        return original(self, state, condition, timestep, windows, weight_total)

    SlidingWindowSampler._blended_output = counting
    try:
        report = predict(inputs, tmp_path / "out", 902, CONFIG, TRAINER, folds=[0], num_samples=2,
                         num_inference_steps=2, save_uncertainty=True, progress=False)
    finally:
        SlidingWindowSampler._blended_output = original
    assert report.exit_code == 0
    assert calls and min(calls) > 1  # the volume was sampled window by window (one global noise tensor)
    assert len(calls) == 4  # 2 samples x 2 steps: a 3D volume samples one member at a time
    reference, predicted = sitk.ReadImage(str(source)), sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz"))
    for name in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(reference, name)(), getattr(predicted, name)()), name
    hu = sitk.GetArrayFromImage(predicted)
    assert np.isfinite(hu).all() and -1100 < hu.min() and hu.max() < 3200
    spread = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{case}_uncertainty.nii.gz")))
    assert spread.shape == hu.shape and spread.max() > 0  # two different samples
    assert json.loads((tmp_path / "out" / "prediction.json").read_text())["configuration"] == CONFIG
