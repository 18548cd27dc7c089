"""Residual diffusion on a regression's answer (issue 35, translation): the network reads the image and the same
fold's regression output, learns the scaled residual, and refines from a zero residual; at start level 0 its answer
is the regression's exactly, above it the samples differ and spread."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import nnunet_folders, planned_phantom

from spinediff.errors import SpineDiffError
from spinediff.training.api import TrainingOptions, train

TRANSLATION = "Dataset902_SpinePhantomTranslation"
TINY = TrainingOptions(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, num_inference_steps=2,
                       validation_samples=2)
REGRESSION = "RegressionTrainer__nnUNetPlans__2d_diffusion"
RESIDUAL = "ResidualRefinementTrainer__nnUNetPlans__2d_diffusion"


@pytest.fixture(scope="module")
def residual(phantom_root, tmp_path_factory):
    """Phantom 902 planned (2d_diffusion); fold 0 of the regression, then of the residual refiner."""
    with planned_phantom(phantom_root, tmp_path_factory, TRANSLATION, 902, "residual") as env:
        regression = train(902, "2d_diffusion", 0, "RegressionTrainer", TINY)
        refiner = train(902, "2d_diffusion", 0, "ResidualRefinementTrainer", TINY)
        yield {**env, "regression": regression, "refiner": refiner}


def _trainer(residual, fold=0):
    from spinediff.training.api import build_trainer

    trainer = build_trainer(902, "2d_diffusion", fold, "ResidualRefinementTrainer", device="cpu")
    trainer.initialize()
    trainer.load_checkpoint(str(residual["refiner"] / "checkpoint_final.pth"))
    return trainer


def test_residual_refiner_reads_the_regression_and_learns_its_scaled_residual(residual):
    """The network reads image + regression answer + noisy residual; a training batch's condition holds the same
    fold's regression output on that very patch, and initial answer + scale x residual gives back the target."""
    from spinediff.training.refinement import RESIDUAL_REFINE_FROM, RESIDUAL_SCALE

    record = json.loads((residual["refiner"].parent / "refinement.json").read_text())
    assert record["init_model"] == REGRESSION and record["residual_scale"] == RESIDUAL_SCALE
    assert record["refine_from"] == RESIDUAL_REFINE_FROM != 0.3  # its own start level, which prediction reads
    with nnunet_folders(residual["base"] / "raw", residual["base"]):
        trainer = _trainer(residual)
        settings = trainer.settings
        weights = [p for p in trainer.plain_network.parameters() if p.ndim >= 4][0]  # the first convolution
        assert weights.shape[1] == settings.condition_channels + 2 * settings.target_channels
        loader, _ = trainer.get_dataloaders()
        batch = next(loader)
        condition, scaled = trainer.split_batch(batch)
        image, target = super(type(trainer), trainer).split_batch(batch)  # the image and the target alone
        regression = trainer.initial_patches(image)
        assert torch.equal(condition[:, :image.shape[1]], image)
        assert torch.allclose(condition[:, image.shape[1]:], regression)
        assert torch.allclose(regression + RESIDUAL_SCALE * scaled, target, atol=1e-5)
        assert float(scaled.abs().mean()) > 0  # an untrained regression leaves a residual


def test_residual_refiner_predicts_v_where_the_plans_say_image_mode_and_its_model_says_so(residual):
    """2d_diffusion is planned in image mode (x0); the residual refiner trains v-prediction on it (a zero residual at a
    low noise level is kept by construction), its process samples v, and the checkpoint that prediction reads says so.
    Another prediction type asked for (eps) is kept, and that configuration still refines the planned one's
    regression."""
    from spinediff.inference.models import ModelFolder, load_fold_model
    from spinediff.training.api import build_trainer

    with nnunet_folders(residual["base"] / "raw", residual["base"]):
        trainer = _trainer(residual)
        assert trainer.configuration_manager.configuration["diffusion"]["prediction_type"] == "sample"
        assert trainer.settings.prediction_type == "v_prediction"
        assert trainer.process.prediction_type == "v_prediction"
        assert trainer.max_timestep() < trainer.process.num_train_timesteps - 1  # still the refinement range
        drawn = trainer.process.sample_timesteps(64, torch.Generator().manual_seed(0))
        assert int(drawn.max()) <= trainer.max_timestep()
        model = load_fold_model(ModelFolder.open(residual["refiner"].parent), 0)
        assert model.settings.prediction_type == "v_prediction"
        eps = build_trainer(902, "2d_diffusion", 0, "ResidualRefinementTrainer", prediction_type="eps", device="cpu")
        assert eps.configuration_manager.configuration["diffusion"]["prediction_type"] == "epsilon"
        assert eps.settings.prediction_type == "epsilon"
        assert eps.init_model == REGRESSION


def test_image_mode_asked_for_explicitly_is_refused_before_anything_is_written(residual, capsys):
    """`spinediff train -tr ResidualRefinementTrainer --prediction-type x0`: exit 2, the reason named, no fold
    folder."""
    from spinediff.cli import main

    with nnunet_folders(residual["base"] / "raw", residual["base"]):
        code = main(["train", "-d", "902", "-c", "2d_diffusion", "-f", "1", "-tr", "ResidualRefinementTrainer",
                     "--prediction-type", "x0", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--prediction-type x0 is not offered for ResidualRefinementTrainer" in err and "Traceback" not in err
    assert not (residual["refiner"].parent / "fold_1").exists()


def test_a_fold_trained_as_another_prediction_type_is_not_reused(residual, tmp_path):
    """A residual fold trained in image mode (before the residual refiner predicted v) is refused, naming the folder,
    whether the harness reuses it from its file or the trainer loads it (resume, --val-only); nothing is changed. The
    fold as trained now passes the same check."""
    with nnunet_folders(residual["base"] / "raw", residual["base"]):
        trainer = _trainer(residual)
    checkpoint = residual["refiner"] / "checkpoint_final.pth"
    trainer.check_trained_as(checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["spinediff"]["diffusion"]["prediction_type"] = "sample"
    old = tmp_path / "fold_0" / "checkpoint_final.pth"
    old.parent.mkdir()
    torch.save(state, old)
    before = old.read_bytes()
    with pytest.raises(SpineDiffError, match="prediction_type 'sample'.*trains 'v_prediction'.*Move or delete"):
        trainer.check_trained_as(old)
    with pytest.raises(SpineDiffError, match=f"{old}.*prediction_type 'sample'"):
        trainer.load_checkpoint(str(old))
    assert old.read_bytes() == before


def test_at_start_level_zero_the_answer_is_the_regressions_and_above_it_the_samples_differ(residual):
    """The same validation case: refine_from 0 reproduces the regression's export (every voxel); 0.3 changes it."""
    with nnunet_folders(residual["base"] / "raw", residual["base"]):
        trainer = _trainer(residual)
        trainer.refine_from = 0.0
        trainer.perform_actual_validation(False)
        case = next((residual["refiner"] / "validation").glob("*.nii.gz")).name
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(residual["refiner"] / "validation" / case)))
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(residual["regression"] / "validation" / case)))
        np.testing.assert_allclose(ours, theirs, atol=1.0)  # HU, through the same export
        trainer.refine_from = 0.3
        trainer.perform_actual_validation(False)
        refined = sitk.GetArrayFromImage(sitk.ReadImage(str(residual["refiner"] / "validation" / case)))
    assert np.abs(refined - theirs).mean() > 1.0


def test_refine_answer_adds_the_scaled_residual_to_the_estimate_and_clips():
    """refine_answer's arithmetic on a sampler whose model always answers the residual r: estimate + scale x r, clipped
    to [-1, 1]; the condition it passes holds the estimate after the image."""
    from spinediff.diffusion.process import DiffusionProcess
    from spinediff.diffusion.sampler import SlidingWindowSampler
    from spinediff.diffusion.settings import DiffusionSettings
    from spinediff.training.refinement import refine_answer

    seen = []

    class Constant(torch.nn.Module):
        def forward(self, x, t):
            seen.append(x[:, :2].clone())
            return torch.full_like(x[:, -1:], 0.8)  # x0 of the residual

    settings = DiffusionSettings.from_dict({"task": "translation", "condition_channels": 1, "target_channels": 1,
                                            "num_train_timesteps": 100}, source="test")
    sampler = SlidingWindowSampler(Constant(), DiffusionProcess.from_settings(settings), patch_size=(8, 8),
                                   device="cpu")
    image = torch.zeros(1, 3, 8, 8)
    estimate = torch.full((1, 3, 8, 8), 0.5)
    members, _ = refine_answer(sampler, image, estimate, fraction=0.3, num_inference_steps=2, num_samples=2, seed=0,
                               residual_scale=0.25)
    assert members.shape == (2, 1, 3, 8, 8)
    assert torch.allclose(members, torch.full_like(members, 0.7), atol=1e-3)
    assert torch.allclose(seen[0][:, 1], torch.full((seen[0].shape[0], 8, 8), 0.5))
    clipped, _ = refine_answer(sampler, image, torch.full((1, 3, 8, 8), 0.9), fraction=0.3, num_inference_steps=2,
                               num_samples=1, seed=0, residual_scale=0.25)
    assert float(clipped.max()) == 1.0
    same, _ = refine_answer(sampler, image, estimate, fraction=0.0, num_inference_steps=2, num_samples=1, seed=0,
                            residual_scale=0.25)
    assert torch.equal(same, estimate[None])


def test_predict_runs_the_regression_itself_and_refuses_a_missing_one(residual, tmp_path, capsys):
    """`spinediff predict` with the residual model runs the recorded regression first; at --init-noise 0 its output is
    the regression's own prediction. A refiner whose regression fold is gone is refused before training."""
    from spinediff.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    for image in (residual["raw"] / "imagesTr").glob("phantom_001_000[01].nii.gz"):
        shutil.copy(image, inputs / image.name)
    with nnunet_folders(residual["base"] / "raw", residual["base"]):
        common = ["-i", str(inputs), "-d", "902", "-c", "2d_diffusion", "-f", "0", "--device", "cpu"]
        assert main(["predict", *common, "-o", str(tmp_path / "ours"), "-tr", "ResidualRefinementTrainer",
                     "--init-noise", "0", "--samples", "1", "--steps", "1"]) == 0
        assert main(["predict", *common, "-o", str(tmp_path / "theirs"), "-tr", "RegressionTrainer"]) == 0
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ours" / "phantom_001.nii.gz")))
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "theirs" / "phantom_001.nii.gz")))
        np.testing.assert_allclose(ours, theirs, atol=1.0)
        assert main(["predict", *common, "-o", str(tmp_path / "refined"), "-tr", "ResidualRefinementTrainer",
                     "--init-noise", "0.3", "--samples", "2", "--steps", "2"]) == 0
        refined = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "refined" / "phantom_001.nii.gz")))
        assert np.abs(refined - theirs).mean() > 1.0
        trainer = _trainer(residual, fold=0)
        trainer.init_model = "RegressionTrainer__nnUNetPlans__3d_diffusion"
        with pytest.raises(SpineDiffError, match="does not exist. Train that fold first"):
            trainer.load_initial_network()


def test_tune_sampling_scores_the_residual_refiner_from_its_regressions_answers(residual):
    """tune_sampling refines the fold's regression export with the residual model: a start level that rounds to
    timestep 0 scores the regression's own answer (its validation MAE), one of 0.4 x T another."""
    from spinediff.experiments.sampling import tune_sampling

    with nnunet_folders(residual["base"] / "raw", residual["base"]):
        record = tune_sampling(902, "2d_diffusion", "ResidualRefinementTrainer", folds=[0], write=False,
                               candidates=["ddim:1@0.0004", "ddim:2@0.4"], device="cpu", progress=False)
    quality = {c["setting"]: c["quality"] for c in record["candidates"]}
    regression = json.loads((residual["regression"] / "validation_metrics.json").read_text())["mean"]["mae"]
    assert quality["ddim:1@0.0004"] == pytest.approx(regression, rel=1e-4)
    assert quality["ddim:2@0.4"] != pytest.approx(regression, rel=1e-3)


def test_residual_figure_draws_the_difference_and_refuses_other_grids(tmp_path, capsys):
    """studies.residual_figure: a PNG from images on one grid; an image on another grid, or a missing one, is refused
    with exit 2 before anything is drawn."""
    from studies.residual_figure import main

    rng = np.random.default_rng(0)
    reference = rng.normal(0, 100, (6, 16, 16)).astype(np.float32)
    paths = {}
    for name, image in {"ct": reference, "reg": reference + 20, "ref": reference + 10,
                        "small": reference[:, :8]}.items():
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(image), str(paths[name]))
    out = tmp_path / "figure.png"
    assert main(["--reference", str(paths["ct"]), "--regression", str(paths["reg"]),
                 "--refined", f"v=K 1={paths['ref']}", "-o", str(out)]) == 0
    assert out.stat().st_size > 1000
    other = tmp_path / "other.png"
    assert main(["--reference", str(paths["ct"]), "--regression", str(paths["reg"]),
                 "--refined", f"v={paths['small']}", "-o", str(other)]) == 2
    assert "not the reference's" in capsys.readouterr().err and not other.exists()
    assert main(["--reference", str(paths["ct"]), "--regression", str(tmp_path / "gone.nii.gz"),
                 "--refined", f"v={paths['ref']}", "-o", str(other)]) == 2
    assert "gone.nii.gz does not exist" in capsys.readouterr().err and not other.exists()
