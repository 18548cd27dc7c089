"""Refinement of another model's answer (issue 35): the initial-answer loader on nnU-Net's own export format, the
refiner's cross-validation from the same fold's nnU-Net model, predict --init-from, SpineSegDiff's combination."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import nnunet_folders, planned_phantom

from spinediff.errors import SpineDiffError
from spinediff.training.api import TrainingOptions, ensure_splits, train

SEG = "Dataset901_SpinePhantomSeg"
TINY = TrainingOptions(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, num_inference_steps=2,
                       validation_samples=1)
NNUNET = "nnUNetTrainer__nnUNetPlans__2d_cpu"


@pytest.fixture(scope="module")
def refined(phantom_root, tmp_path_factory):
    """Phantom 901 planned (2d_diffusion, 2d_cpu); fold 0 of nnU-Net (validation with probabilities, as --npz) and of
    the refiner, whose validation refines nnU-Net fold 0's answers."""
    from spinediff.planning.api import plan_dataset

    base = tmp_path_factory.mktemp("refinement")
    raw = base / "raw"
    raw.mkdir()
    (raw / SEG).symlink_to(phantom_root / SEG, target_is_directory=True)
    with nnunet_folders(raw, base) as env:
        plan_dataset(901, configurations=["2d_diffusion", "2d_cpu"], device="cpu", num_processes=1,
                     show_progress_bar=False)
        ensure_splits(base / "preprocessed" / SEG)
        nnunet = train(901, "2d_cpu", 0, "nnUNetTrainer", TrainingOptions(
            epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, save_probabilities=True))
        refiner = train(901, "2d_diffusion", 0, "DiffusionRefinementTrainer", TINY)
        yield {**env, "base": base, "raw": raw / SEG, "nnunet": nnunet, "refiner": refiner}


def _preprocessed_case(base, key):
    folder = base / "preprocessed" / SEG
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    data_folder = str(folder / "nnUNetPlans_2d")
    data, seg, _, properties = infer_dataset_class(data_folder)(data_folder, [key]).load_case(key)
    return np.asarray(data[:]), np.asarray(seg[:]), properties


def _managers(base):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(str(base / "preprocessed" / SEG / "nnUNetPlans.json"))
    return plans, plans.get_configuration("2d_diffusion")


def test_loader_puts_nnunet_probabilities_on_the_preprocessed_grid(refined, tmp_path):
    """A hand-built npz in nnU-Net's export layout (one-hot of the raw label map, reader's axis order) comes back on the
    preprocessed grid as the preprocessed labels; nnU-Net's own validation export loads with the same shape."""
    from spinediff.utilities.initial_answer import InitialAnswerFolder, raw_shape, to_preprocessed_grid

    validation = refined["nnunet"] / "validation"
    key = sorted(p.name[:-4] for p in validation.glob("*.npz"))[0]
    data, seg, properties = _preprocessed_case(refined["base"], key)
    plans, configuration = _managers(refined["base"])
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(refined["raw"] / "labelsTr" / f"{key}.nii.gz")))
    classes = int(seg.max()) + 1
    folder = tmp_path / "hand"
    folder.mkdir()
    one_hot = np.eye(classes, dtype=np.float32)[label].transpose(3, 0, 1, 2)
    np.savez_compressed(folder / f"{key}.npz", probabilities=one_hot)
    answers = InitialAnswerFolder.open(folder)
    values = answers.raw_probabilities(key, classes, properties, raw_shape(properties, plans))
    grid = to_preprocessed_grid(values, properties, plans, configuration, data.shape[1:])
    assert grid.shape == (classes, *data.shape[1:])
    np.testing.assert_allclose(grid.sum(0), 1, atol=1e-4)
    agreement = (grid.argmax(0) == np.clip(seg[0], 0, None)).mean()
    assert agreement > 0.97, agreement
    real = InitialAnswerFolder.open(validation)  # written by nnunetv2's export_prediction_from_logits (+ .pkl)
    loaded = real.raw_probabilities(key, classes, properties, raw_shape(properties, plans))
    assert loaded.shape == one_hot.shape
    assert (validation / f"{key}.pkl").is_file()


def test_loader_refuses_missing_cases_wrong_classes_and_wrong_grids(refined, tmp_path):
    from spinediff.utilities.initial_answer import InitialAnswerFolder, raw_shape

    validation = refined["nnunet"] / "validation"
    key = sorted(p.name[:-4] for p in validation.glob("*.npz"))[0]
    _, seg, properties = _preprocessed_case(refined["base"], key)
    plans, _ = _managers(refined["base"])
    shape = raw_shape(properties, plans)
    classes = int(np.load(validation / f"{key}.npz")["probabilities"].shape[0])
    folder = tmp_path / "bad"
    folder.mkdir()
    answers = InitialAnswerFolder.open(folder)
    with pytest.raises(SpineDiffError, match="no initial answer for 1 case"):
        answers.check_cases([key])
    np.savez_compressed(folder / f"{key}.npz", probabilities=np.ones((classes + 1, *shape), np.float32))
    with pytest.raises(SpineDiffError, match=f"has {classes + 1} class channel"):
        answers.raw_probabilities(key, classes, properties, shape)
    np.savez_compressed(folder / f"{key}.npz", probabilities=np.ones((classes, *shape[:-1], shape[-1] - 2), np.float32))
    with pytest.raises(SpineDiffError, match="has the grid"):
        answers.raw_probabilities(key, classes, properties, shape)
    shutil.copy(validation / f"{key}.npz", folder / f"{key}.npz")
    with open(validation / f"{key}.pkl", "rb") as handle:
        saved = pickle.load(handle)
    saved["sitk_stuff"] = {**saved["sitk_stuff"], "spacing": tuple(2 * s for s in saved["sitk_stuff"]["spacing"])}
    with open(folder / f"{key}.pkl", "wb") as handle:
        pickle.dump(saved, handle)
    with pytest.raises(SpineDiffError, match="geometry"):
        answers.raw_probabilities(key, classes, properties, shape)
    with pytest.raises(SpineDiffError, match="no such folder"):
        InitialAnswerFolder.open(tmp_path / "absent")


def test_cross_validation_refines_the_same_folds_nnunet_answers(refined):
    """The refiner's fold 0 validation starts from nnU-Net fold 0's export (never from a model that saw the case);
    at init noise 0 its validation is nnU-Net's answer itself, case by case."""
    import json

    from spinediff.training.api import build_trainer
    from spinediff.training.refinement import read_refinement

    record = read_refinement(refined["refiner"].parent)
    assert record["init_model"] == NNUNET
    with nnunet_folders(refined["base"] / "raw", refined["base"]):
        trainer = build_trainer(901, "2d_diffusion", 0, "DiffusionRefinementTrainer", device="cpu")
        trainer.initialize()
        assert trainer.initial_answers_folder() == refined["nnunet"] / "validation"
        trainer.load_checkpoint(str(refined["refiner"] / "checkpoint_final.pth"))
        trainer.refine_from = 0.0
        trainer.perform_actual_validation(False)
    ours = json.loads((refined["refiner"] / "validation" / "summary.json").read_text())["metric_per_case"]
    theirs = json.loads((refined["nnunet"] / "validation" / "summary.json").read_text())["metric_per_case"]
    dice = {e["prediction_file"].rsplit("/", 1)[-1]: {k: v["Dice"] for k, v in e["metrics"].items()} for e in ours}
    for entry in theirs:
        name = entry["prediction_file"].rsplit("/", 1)[-1]
        for label, value in entry["metrics"].items():
            assert dice[name][label] == pytest.approx(value["Dice"], abs=0.02, nan_ok=True)


def test_refiner_trains_only_the_refinement_range(refined):
    from spinediff.training.api import build_trainer
    from spinediff.training.refinement import REFINE_TRAIN_FRACTION

    with nnunet_folders(refined["base"] / "raw", refined["base"]):
        trainer = build_trainer(901, "2d_diffusion", 0, "DiffusionRefinementTrainer", device="cpu")
    draws = trainer.process.sample_timesteps(4000, torch.Generator().manual_seed(0))
    highest = round(REFINE_TRAIN_FRACTION * (trainer.process.num_train_timesteps - 1))
    assert int(draws.min()) == 0 and int(draws.max()) == highest


def _inputs(refined, tmp_path, key):
    folder = tmp_path / "inputs"
    folder.mkdir(exist_ok=True)
    for image in (refined["raw"] / "imagesTr").glob(f"{key}_*.nii.gz"):
        shutil.copy(image, folder / image.name)
    return folder


def test_predict_init_from_keeps_the_answer_at_noise_zero_and_changes_it_at_high_noise(refined, tmp_path):
    from spinediff.cli import main

    validation = refined["nnunet"] / "validation"
    key = sorted(p.name[:-4] for p in validation.glob("*.npz"))[0]
    inputs = _inputs(refined, tmp_path, key)
    answer = sitk.GetArrayFromImage(sitk.ReadImage(str(refined["raw"] / "labelsTr" / f"{key}.nii.gz")))
    init = tmp_path / "init"
    init.mkdir()
    shutil.copy(refined["raw"] / "labelsTr" / f"{key}.nii.gz", init / f"{key}.nii.gz")  # a label map answer
    common = ["predict", "-i", str(inputs), "-d", "901", "-c", "2d_diffusion", "-tr", "DiffusionRefinementTrainer",
              "-f", "0", "--init-from", str(init), "--steps", "2", "--samples", "2", "--no-postprocessing"]
    with nnunet_folders(refined["base"] / "raw", refined["base"]):
        assert main([*common, "-o", str(tmp_path / "low"), "--init-noise", "0"]) == 0
        assert main([*common, "-o", str(tmp_path / "high"), "--init-noise", "0.95", "--save-uncertainty",
                     "--combine", "spinesegdiff"]) == 0
    low = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "low" / f"{key}.nii.gz")))
    high = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "high" / f"{key}.nii.gz")))
    assert (low == answer).mean() > 0.99
    assert (high != answer).mean() > 0.01
    entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "high" / f"{key}_uncertainty.nii.gz")))
    assert entropy.max() > 0 and entropy.min() >= 0


def test_predict_refuses_bad_initial_answers_with_exit_2_and_writes_nothing(refined, tmp_path):
    from spinediff.cli import main

    validation = refined["nnunet"] / "validation"
    key = sorted(p.name[:-4] for p in validation.glob("*.npz"))[0]
    inputs = _inputs(refined, tmp_path, key)
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    probabilities = np.load(validation / f"{key}.npz")["probabilities"]
    np.savez_compressed(wrong / f"{key}.npz", probabilities=np.concatenate([probabilities, probabilities[:1]]))
    common = ["predict", "-i", str(inputs), "-d", "901", "-c", "2d_diffusion", "-tr", "DiffusionRefinementTrainer",
              "-f", "0", "--steps", "1", "--samples", "1"]
    with nnunet_folders(refined["base"] / "raw", refined["base"]):
        for name, folder in (("missing", empty), ("classes", wrong), ("absent", tmp_path / "absent")):
            out = tmp_path / f"out_{name}"
            try:
                status = main([*common, "-o", str(out), "--init-from", str(folder)])
            except SystemExit as refused:  # a folder that does not exist is refused while parsing (argparse)
                status = refused.code
            assert status == 2, name
            assert not out.exists() or not any(out.iterdir())
        out = tmp_path / "out_model"
        assert main([*common, "-o", str(out), "--init-model", "nnUNetTrainer__nnUNetPlans__3d_fullres"]) == 2
        assert not out.exists() or not any(out.iterdir())


def test_predict_runs_the_recorded_nnunet_model_itself(refined, tmp_path):
    """No --init-*: the refinement model's refinement.json names nnU-Net 2d_cpu, which is predicted first (fold 0 for
    fold 0) and removed afterwards; at init noise 0 the result is nnU-Net's own prediction of the case (nnunetv2's
    predictor with the same settings)."""
    from spinediff.cli import main

    validation = refined["nnunet"] / "validation"
    key = sorted(p.name[:-4] for p in validation.glob("*.npz"))[0]
    inputs = _inputs(refined, tmp_path, key)
    out = tmp_path / "auto"
    with nnunet_folders(refined["base"] / "raw", refined["base"]):
        assert main(["predict", "-i", str(inputs), "-o", str(out), "-d", "901", "-c", "2d_diffusion", "-tr",
                     "DiffusionRefinementTrainer", "-f", "0", "--init-noise", "0", "--samples", "1",
                     "--no-postprocessing"]) == 0
        from spinediff.inference.refinement import predict_initial_answers

        direct = predict_initial_answers(refined["nnunet"].parent, SEG, ["0"], inputs, tmp_path / "direct",
                                         torch.device("cpu"))["0"].path
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{key}.nii.gz")))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(direct / f"{key}.nii.gz")))
    assert (ours == theirs).mean() > 0.99
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".initial")) == []


def test_tune_sampling_chooses_the_start_level_on_the_folds_own_answers(refined):
    from spinediff.experiments.sampling import tune_sampling

    with nnunet_folders(refined["base"] / "raw", refined["base"]):
        record = tune_sampling(901, "2d_diffusion", "DiffusionRefinementTrainer", folds=[0], write=False,
                               candidates=["ddim:1@0.05", "ddim:1@0.9"], device="cpu", progress=False)
    quality = {c["setting"]: c["quality"] for c in record["candidates"]}
    assert set(quality) == {"ddim:1@0.05", "ddim:1@0.9"} and all(0 <= q <= 1 for q in quality.values())
    assert quality["ddim:1@0.05"] != quality["ddim:1@0.9"]  # the start level changes the answer
    assert record["choice"] in quality


def test_spinesegdiff_combination_weights_the_last_steps_and_takes_the_maximum_entropy():
    from spinediff.diffusion.refinement import StepCombination

    combination = StepCombination(last_steps=3)
    weights = combination.weights(3)
    assert weights == sorted(weights) and sum(weights) == pytest.approx(1.0)
    certain = torch.tensor([[1.0, -1.0]]).reshape(1, 2, 1, 1).expand(2, 2, 1, 1)  # p = (1, 0)
    unsure = torch.zeros(2, 2, 1, 1)  # p = (0.5, 0.5)
    for index, x0 in enumerate([unsure, unsure, certain, certain]):  # four steps: the first is left out
        combination(index, x0)
    combined, entropy = combination.result()
    p = (combined + 1) / 2
    expected = weights[0] * 0.5 + weights[1] + weights[2]
    assert float(p[0, 0, 0]) == pytest.approx(expected, abs=1e-5)
    assert float(entropy[0, 0]) == pytest.approx(np.log(2), abs=1e-4)


def test_translation_refiner_starts_from_the_same_folds_regression(phantom_root, tmp_path_factory):
    """Translation: the refiner's fold 0 validation refines RegressionTrainer fold 0's synthetic CT; at init noise 0 its
    MAE is the regression's own (smoke test of the phantom pipeline)."""
    import json

    from spinediff.planning.api import plan_dataset
    from spinediff.training.api import build_trainer

    name = "Dataset902_SpinePhantomTranslation"
    base = tmp_path_factory.mktemp("refine_translation")
    raw = base / "raw"
    raw.mkdir()
    (raw / name).symlink_to(phantom_root / name, target_is_directory=True)
    with nnunet_folders(raw, base):
        plan_dataset(902, configurations=["2d_diffusion"], device="cpu", num_processes=1, show_progress_bar=False)
        ensure_splits(base / "preprocessed" / name)
        regression = train(902, "2d_diffusion", 0, "RegressionTrainer", TINY)
        refiner = train(902, "2d_diffusion", 0, "DiffusionRefinementTrainer", TINY)
        trainer = build_trainer(902, "2d_diffusion", 0, "DiffusionRefinementTrainer", device="cpu")
        trainer.initialize()
        assert trainer.initial_answers_folder() == regression / "validation"
        trainer.load_checkpoint(str(refiner / "checkpoint_final.pth"))
        trainer.refine_from = 0.0
        trainer.perform_actual_validation(False)
    ours = json.loads((refiner / "validation_metrics.json").read_text())["mean"]
    theirs = json.loads((regression / "validation_metrics.json").read_text())["mean"]
    assert ours["mae"] == pytest.approx(theirs["mae"], rel=0.02)


TRANSLATION = "Dataset902_SpinePhantomTranslation"
REGRESSION = "RegressionTrainer__nnUNetPlans__2d_diffusion"
REFINER = "DiffusionRefinementTrainer__nnUNetPlans__2d_diffusion"


@pytest.fixture(scope="module")
def translation_benchmark(phantom_root, tmp_path_factory):
    """The benchmark of the translation refinement row alone on folds 0 and 1 of the tiny phantom (3 cases, one
    validation case per fold), one epoch of two steps per fold: the regression is added and trained first."""
    from spinediff.experiments.benchmark import run_benchmark

    with planned_phantom(phantom_root, tmp_path_factory, TRANSLATION, 902, "refine_benchmark") as env:
        base = env["base"]
        options = TrainingOptions(**{**TINY.__dict__, "device": "cpu"})
        summary = run_benchmark(902, folds=[0, 1], options=options, output=base / "bench",
                                method_names=["DiffusionRefinementTrainer"])
        yield {**env, "summary": summary, "results": base / "results" / TRANSLATION}


def test_benchmark_refines_each_folds_regression_after_it_and_counts_its_time(translation_benchmark):
    """Two waves: every fold of the regression is trained and validated before any fold of the refiner starts, and the
    refiner's fold f refines the regression's fold f export (at start level 0 its validation is that export, case by
    case); the refinement row's training time is its own plus the regression's, its time per case both."""
    import json

    from spinediff.training.api import build_trainer

    summary, results = translation_benchmark["summary"], translation_benchmark["results"]
    rows = {row["method"]: row for row in summary["methods"]}
    assert list(rows) == ["Regression U-Net 2D", "Regression + diffusion refinement 2D"]  # the regression was added
    timing = {(name, f): json.loads((results / name / f"fold_{f}" / "benchmark_timing.json").read_text())
              for name in (REGRESSION, REFINER) for f in (0, 1)}
    validated = max((results / REGRESSION / f"fold_{f}" / "validation_metrics.json").stat().st_mtime for f in (0, 1))
    started = min((results / REFINER / f"fold_{f}" / "debug.json").stat().st_mtime for f in (0, 1))
    assert validated <= started
    refiner_seconds = sum(timing[(REFINER, f)]["train_seconds"] for f in (0, 1))
    regression_seconds = sum(timing[(REGRESSION, f)]["train_seconds"] for f in (0, 1))
    row = rows["Regression + diffusion refinement 2D"]
    assert row["train_minutes"] * 60 == pytest.approx(refiner_seconds + regression_seconds, rel=1e-9)
    assert rows["Regression U-Net 2D"]["train_minutes"] * 60 == pytest.approx(regression_seconds, rel=1e-9)
    assert row["inference_s_per_case"] == pytest.approx(timing[(REFINER, 1)]["inference_seconds_per_case"]
                                                        + timing[(REGRESSION, 1)]["inference_seconds_per_case"])
    with nnunet_folders(translation_benchmark["base"] / "raw", translation_benchmark["base"]):
        for fold in (0, 1):
            trainer = build_trainer(902, "2d_diffusion", fold, "DiffusionRefinementTrainer", device="cpu")
            trainer.initialize()
            assert trainer.initial_answers_folder() == results / REGRESSION / f"fold_{fold}" / "validation"
            trainer.load_checkpoint(str(results / REFINER / f"fold_{fold}" / "checkpoint_final.pth"))
            trainer.refine_from = 0.0
            trainer.perform_actual_validation(False)
            ours = json.loads((results / REFINER / f"fold_{fold}" / "validation_metrics.json").read_text())
            theirs = json.loads((results / REGRESSION / f"fold_{fold}" / "validation_metrics.json").read_text())
            assert ours["per_case"].keys() == theirs["per_case"].keys()
            for case, metrics in theirs["per_case"].items():
                assert ours["per_case"][case]["mae_body"] == pytest.approx(metrics["mae_body"], rel=0.02)


def test_find_best_ranks_the_refinement_and_its_command_runs_the_regression_itself(translation_benchmark, tmp_path):
    """find_best ranks the refinement model beside the regression; its predict command (the one find_best gives when
    it wins) names no initial answers and runs the regression's folds itself, in one command."""
    import json
    import shlex

    from spinediff.cli import main
    from spinediff.inference.find_best import find_best, predict_command

    with nnunet_folders(translation_benchmark["base"] / "raw", translation_benchmark["base"]):
        result = find_best(902, folds=[0, 1], output=tmp_path / "find_best.json")
        ranked = {c.name: c for c in result.ranking}
        assert set(ranked) == {REGRESSION, REFINER}
        command = predict_command("902", ranked[REFINER])
        if result.winner == REFINER:
            assert result.commands == [command]
        assert "--init" not in command and "-tr DiffusionRefinementTrainer" in command and "-f 0 1" in command
        key = "phantom_001"
        inputs = tmp_path / "in"
        inputs.mkdir()
        for image in (translation_benchmark["raw"] / "imagesTr").glob(f"{key}_000[01].nii.gz"):
            shutil.copy(image, inputs / image.name)
        argv = shlex.split(command.replace("INPUT_FOLDER", str(inputs)).replace("OUTPUT_FOLDER", str(tmp_path / "out")))
        assert argv[:2] == ["spinediff", "predict"]
        assert main([*argv[1:], "--steps", "1", "--samples", "1"]) == 0
    settings = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert settings["refinement"]["initial_answers"] == str(translation_benchmark["results"] / REGRESSION)
    synthetic = sitk.ReadImage(str(tmp_path / "out" / f"{key}.nii.gz"))
    reference = sitk.ReadImage(str(translation_benchmark["raw"] / "imagesTr" / f"{key}_0002.nii.gz"))
    assert synthetic.GetSize() == reference.GetSize()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".initial")]


def test_combine_spinesegdiff_is_refused_where_it_does_not_apply(translation_benchmark, tmp_path):
    """--combine spinesegdiff combines class probabilities of a refiner: a translation benchmark and a trainer that
    is not a refiner are refused before any work, naming the option."""
    from spinediff.cli import main
    from spinediff.experiments.benchmark import run_benchmark

    options = TrainingOptions(**{**TINY.__dict__, "device": "cpu", "combine": "spinesegdiff"})
    with nnunet_folders(translation_benchmark["base"] / "raw", translation_benchmark["base"]):
        with pytest.raises(SpineDiffError, match="--combine spinesegdiff.*translation dataset"):
            run_benchmark(902, folds=[0], options=options, output=tmp_path / "bench",
                          method_names=["DiffusionRefinementTrainer"])
        assert main(["train", "-d", "902", "-c", "2d_diffusion", "-f", "2", "-tr", "RegressionTrainer",
                     "--combine", "spinesegdiff", "--epochs", "1"]) == 2
        assert not (translation_benchmark["results"] / REGRESSION / "fold_2").exists()
        assert main(["train", "-d", "902", "-c", "2d_diffusion", "-f", "2", "-tr", "DiffusionRefinementTrainer",
                     "--combine", "spinesegdiff", "--epochs", "1"]) == 2
        assert not (translation_benchmark["results"] / REFINER / "fold_2").exists()
    with pytest.raises(SpineDiffError, match="--combine must be one of"):
        TrainingOptions(combine="median")


def test_refining_predictor_honours_precision(refined, tmp_path):
    """--precision reaches the refining network: bf16 autocast (also on the CPU) changes the refined class
    probabilities a little against fp32, the same seed and start; fp32 twice gives the same probabilities."""
    from spinediff.cli import main

    validation = refined["nnunet"] / "validation"
    key = sorted(p.name[:-4] for p in validation.glob("*.npz"))[0]
    inputs = _inputs(refined, tmp_path, key)
    common = ["predict", "-i", str(inputs), "-d", "901", "-c", "2d_diffusion", "-tr", "DiffusionRefinementTrainer",
              "-f", "0", "--init-from", str(validation), "--init-noise", "0.5", "--steps", "2", "--samples", "1",
              "--no-postprocessing", "--save-probabilities"]
    probabilities = {}
    with nnunet_folders(refined["base"] / "raw", refined["base"]):
        for name, precision in (("fp32", "fp32"), ("again", "fp32"), ("bf16", "bf16")):
            assert main([*common, "-o", str(tmp_path / name), "--precision", precision]) == 0
            probabilities[name] = np.load(tmp_path / name / f"{key}.npz")["probabilities"]
    assert np.array_equal(probabilities["fp32"], probabilities["again"])
    difference = np.abs(probabilities["bf16"] - probabilities["fp32"])
    assert difference.max() > 0 and difference.mean() < 0.05


def test_cross_validation_combines_the_samples_as_spinesegdiff_on_request(refined, tmp_path):
    """benchmark --combine spinesegdiff validates the refiner's reused fold again with SpineSegDiff's combination
    (other class probabilities than the mean of the same K samples, recorded in its timing and metrics), keeps its
    training record and leaves nnU-Net's fold as it was."""
    import json

    from spinediff.experiments.benchmark import run_benchmark

    options = {**TINY.__dict__, "device": "cpu", "validation_samples": 3}
    methods = ["nnUNetTrainer", "DiffusionRefinementTrainer"]
    key = sorted(p.name[:-4] for p in (refined["nnunet"] / "validation").glob("*.npz"))[0]
    with nnunet_folders(refined["base"] / "raw", refined["base"]):
        mean = run_benchmark(901, folds=[0], options=TrainingOptions(**options), output=tmp_path / "mean",
                             method_names=methods)
        averaged = np.load(refined["refiner"] / "validation" / f"{key}.npz")["probabilities"]
        combined = run_benchmark(901, folds=[0], options=TrainingOptions(**{**options, "combine": "spinesegdiff"}),
                                 output=tmp_path / "spinesegdiff", method_names=methods)
    weighted = np.load(refined["refiner"] / "validation" / f"{key}.npz")["probabilities"]
    assert averaged.shape == weighted.shape and not np.allclose(averaged, weighted)
    np.testing.assert_allclose(weighted.sum(0), 1, atol=1e-3)
    for name in ("benchmark_timing.json", "validation_metrics.json"):
        record = json.loads((refined["refiner"] / name).read_text())
        assert (record["combine"], record["validation_samples"], record["initial_answers"]) == ("spinesegdiff", 3,
                                                                                                 "validation")
    trained_steps = json.loads((refined["refiner"] / "benchmark_timing.json").read_text())["steps"]
    # fewer steps: validated again (other probabilities), recorded
    with nnunet_folders(refined["base"] / "raw", refined["base"]):
        run_benchmark(901, folds=[0], options=TrainingOptions(**{**options, "combine": "spinesegdiff",
                                                                 "num_inference_steps": 1}),
                      output=tmp_path / "one_step", method_names=methods)
    timing = json.loads((refined["refiner"] / "benchmark_timing.json").read_text())
    assert (timing["validation_steps"], timing["steps"]) == (1, trained_steps)  # the training's record is kept
    # another start level: validated again, recorded; refused for a model that refines nothing, before any work
    with nnunet_folders(refined["base"] / "raw", refined["base"]):
        run_benchmark(901, folds=[0], options=TrainingOptions(**{**options, "combine": "spinesegdiff",
                                                                 "num_inference_steps": 1, "init_noise": 0.05}),
                      output=tmp_path / "low_start", method_names=methods)
        with pytest.raises(SpineDiffError, match="--init-noise"):
            train(901, "2d_cpu", 2, "nnUNetTrainer", TrainingOptions(epochs=1, init_noise=0.1))
        with pytest.raises(SpineDiffError, match="--init-noise"):
            TrainingOptions(init_noise=1.0)
    assert json.loads((refined["refiner"] / "benchmark_timing.json").read_text())["refine_from"] == 0.05
    assert not (refined["base"] / "results" / SEG / NNUNET.replace("fold_0", "") / "fold_2").exists()
    assert not np.allclose(weighted, np.load(refined["refiner"] / "validation" / f"{key}.npz")["probabilities"])
    rows = [{row["method"]: row for row in run["methods"]} for run in (mean, combined)]
    for method in rows[0]:
        assert rows[0][method]["train_minutes"] == rows[1][method]["train_minutes"]
    nnunet = "nnU-Net 2D"
    assert rows[0][nnunet]["dice"] == rows[1][nnunet]["dice"]
    assert "combined as SpineSegDiff does" in (tmp_path / "spinesegdiff" / "benchmark.md").read_text()
    with nnunet_folders(refined["base"] / "raw", refined["base"]), pytest.raises(SpineDiffError, match="--combine"):
        train(901, "2d_cpu", 1, "nnUNetTrainer", TrainingOptions(epochs=1, combine="spinesegdiff"))


def test_refiner_starts_from_nnunets_numbered_answers_when_its_postprocessing_keeps_the_numbering(refined, tmp_path):
    """When nnU-Net's postprocessing.json keeps a level numbering, the refiner's cross-validation starts from nnU-Net's
    answers after it (fold_0/validation_postprocessed), which it refuses to guess when absent; the benchmark writes
    them (labels and probabilities that agree, nnU-Net's .pkl beside them), keeping the decision that is there;
    ``spinediff postprocess --save-probabilities`` refuses inputs without probabilities (exit 2, nothing written)."""
    import json

    from spinediff.cli import main
    from spinediff.experiments.benchmark import postprocessed_answers
    from spinediff.experiments.folds import Method
    from spinediff.inference.postprocessing import grouped_argmax
    from spinediff.training.api import build_trainer

    folder = refined["nnunet"].parent
    labels = sorted(v for v in json.loads((refined["raw"] / "dataset.json").read_text())["labels"].values() if v)
    decision = {"level_order": {"labels": labels, "direction": [0.0, 0.0, 1.0]}, "foreground": "probabilities",
                "channel_labels": [0, *labels]}
    (folder / "postprocessing.json").write_text(json.dumps(decision))
    numbered = refined["nnunet"] / "validation_postprocessed"
    try:
        with nnunet_folders(refined["base"] / "raw", refined["base"]):
            trainer = build_trainer(901, "2d_diffusion", 0, "DiffusionRefinementTrainer", device="cpu")
            assert trainer.initial_answers_folder() == numbered
            with pytest.raises(SpineDiffError, match="spinediff postprocess"):
                trainer.check_initial_answers()
            postprocessed_answers(Method("nnU-Net 2D", "nnUNetTrainer", "2d_cpu", baseline=True), [0],
                                  refined["base"] / "results" / SEG, refined["raw"], labels)
            assert json.loads((folder / "postprocessing.json").read_text()) == decision  # kept, not re-decided
            cases = sorted(p.name[:-4] for p in (refined["nnunet"] / "validation").glob("*.npz"))
            assert cases and sorted(p.name[:-4] for p in numbered.glob("*.npz")) == cases
            for case in cases:
                assert (numbered / f"{case}.pkl").is_file()
                written = sitk.GetArrayFromImage(sitk.ReadImage(str(numbered / f"{case}.nii.gz")))
                probabilities = np.load(numbered / f"{case}.npz")["probabilities"]
                assert grouped_argmax(probabilities, labels).tolist() == written.tolist()
            assert trainer.check_initial_answers().path == numbered
        bare = tmp_path / "bare"
        bare.mkdir()
        shutil.copy(refined["nnunet"] / "validation" / f"{cases[0]}.nii.gz", bare)
        assert main(["postprocess", "-i", str(bare), "-o", str(tmp_path / "out"), "-m", str(folder),
                     "--save-probabilities"]) == 2
        assert not (tmp_path / "out").exists()
        # an existing probability file in the output is not replaced without --overwrite
        shutil.copy(refined["nnunet"] / "validation" / f"{cases[0]}.npz", bare)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / f"{cases[0]}.npz").write_bytes(b"keep")
        assert main(["postprocess", "-i", str(bare), "-o", str(tmp_path / "out"), "-m", str(folder),
                     "--save-probabilities"]) == 2
        assert (tmp_path / "out" / f"{cases[0]}.npz").read_bytes() == b"keep"
        assert not (tmp_path / "out" / f"{cases[0]}.nii.gz").exists()
    finally:
        (folder / "postprocessing.json").unlink()
        shutil.rmtree(numbered, ignore_errors=True)
