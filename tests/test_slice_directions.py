"""2D configurations per slice direction (issue 19, point 1): ``spinediff plan --slice-direction`` writes
``nnUNetPlans_<direction>`` with nnU-Net's transpose putting the slicing axis first, found from the images'
orientation; a model of such plans trains and predicts raw cases in their own geometry; ``find_best`` scores the
2.5D fusion of the directions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import nnunet_folders

from spinediff.errors import SpineDiffError

SEG = "Dataset901_SpinePhantomSeg"


def test_slice_directions_plan_train_and_predict(phantom_root, tmp_path):
    from spinediff.cli import main
    from spinediff.inference.api import predict
    from spinediff.planning.api import plan_dataset, slicing_axis
    from spinediff.training.api import TrainingOptions, train

    raw = phantom_root / SEG
    spec = json.loads((raw / "dataset.json").read_text())
    # the phantom MR is acquired sagittally: its index axis 2 (8 slices of 7 mm) runs along physical x (left-right)
    image = sitk.ReadImage(str(raw / "imagesTr" / "phantom_000_0000.nii.gz"))
    assert image.GetSize()[2] == 8 and abs(np.asarray(image.GetDirection()).reshape(3, 3)[0, 2]) == 1
    axes = {d: slicing_axis(raw, spec, d) for d in ("axial", "coronal", "sagittal")}
    assert axes["sagittal"] == 0 and sorted(axes.values()) == [0, 1, 2]
    with pytest.raises(SpineDiffError, match="must be one of"):
        slicing_axis(raw, spec, "oblique")
    with nnunet_folders(phantom_root, tmp_path) as env:
        plans = {}
        for direction in (None, "sagittal", "coronal"):
            path = plan_dataset(901, configurations=["2d_diffusion"], device="cpu", num_processes=1,
                                show_progress_bar=False, slice_direction=direction)
            plans[direction] = json.loads(Path(path).read_text())
        assert Path(path).name == "nnUNetPlans_coronal.json"
        # sagittal slicing of a sagittal acquisition is nnU-Net's own choice (the coarse axis first)
        assert plans["sagittal"]["transpose_forward"] == plans[None]["transpose_forward"]
        assert plans["sagittal"]["transpose_forward"][0] == 0
        forward = plans["coronal"]["transpose_forward"]
        assert forward[0] == axes["coronal"] and sorted(forward) == [0, 1, 2]
        assert [forward[i] for i in plans["coronal"]["transpose_backward"]] == [0, 1, 2]
        coronal = plans["coronal"]["configurations"]["2d_diffusion"]
        assert any("coronal plane" in note for note in coronal["notes"])
        # the median shape, untransposed from the default plans, transposed as the coronal plans say
        default = plans[None]["original_median_shape_after_transp"]
        untransposed = [default[i] for i in plans[None]["transpose_backward"]]
        assert plans["coronal"]["original_median_shape_after_transp"] == [untransposed[a] for a in forward]
        assert len(coronal["patch_size"]) == 2
        data = Path(env["nnUNet_preprocessed"]) / SEG / "nnUNetPlans_coronal_2d"
        assert data.is_dir() and any(data.iterdir())
        with pytest.raises(SpineDiffError, match="already exists"):
            plan_dataset(901, configurations=["2d_diffusion"], device="cpu", num_processes=1, show_progress_bar=False,
                         slice_direction="coronal")
        with pytest.raises(SystemExit) as refused:  # argparse refuses an unknown direction
            main(["plan", "-d", "901", "--slice-direction", "oblique"])
        assert refused.value.code == 2

        options = TrainingOptions(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, num_inference_steps=2,
                                  validation_samples=1, save_probabilities=True)
        for direction in ("coronal", "sagittal"):
            train(901, "2d_diffusion", 0, "DiffusionSegmentationTrainer", options,
                  plans_identifier=f"nnUNetPlans_{direction}")
        # find_best tries the 2.5D fusion of the two directions (mean of their saved validation probabilities)
        from spinediff.inference.find_best import find_best

        result = find_best(901, folds=[0])
        fused = result.fused
        assert sorted(fused["members"]) == sorted(c.name for c in result.ranking) and fused["cases"] >= 1
        assert 0.0 <= fused["scores"]["dice"] <= 1.0
        # each member's Dice from its saved probabilities is its cross-validation Dice (the label map is their argmax)
        for candidate in result.ranking:
            assert fused["singles"][candidate.name] == pytest.approx(candidate.scores["dice"], abs=0.02)
        if result.winner.startswith("2.5D fusion"):
            assert result.commands[-1] == "spinediff ensemble -i OUTPUT_FOLDER_1 OUTPUT_FOLDER_2 -o OUTPUT_FOLDER"
            assert fused["scores"]["dice"] > max(c.scores["dice_pp"] for c in result.ranking)
        assert "2.5D fusion of 2 slice directions" in result.table()
        inputs = tmp_path / "in"
        inputs.mkdir()
        for channel in (0, 1):
            name = f"phantom_001_{channel:04d}.nii.gz"
            (inputs / name).symlink_to(raw / "imagesTr" / name)
        report = predict(inputs, tmp_path / "out", 901, "2d_diffusion", "DiffusionSegmentationTrainer", folds=[0],
                         plans_identifier="nnUNetPlans_coronal", num_samples=1, num_inference_steps=1,
                         save_probabilities=True, progress=False)
        assert report.exit_code == 0
        predicted = sitk.ReadImage(str(tmp_path / "out" / "phantom_001.nii.gz"))
        reference = sitk.ReadImage(str(raw / "imagesTr" / "phantom_001_0000.nii.gz"))
        for name in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert np.allclose(getattr(predicted, name)(), getattr(reference, name)()), name
        probabilities = np.load(tmp_path / "out" / "phantom_001.npz")["probabilities"]
        assert probabilities.shape[1:] == sitk.GetArrayFromImage(reference).shape
