"""One prediction core: a fold's final validation writes, for every validation case, the very file that
``spinediff predict`` writes for that case with the same model, seed and sampling settings (segmentation,
translation and generation; tiny phantom models, K = 2 samples so that the ensemble is exercised)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import nnunet_folders

from spinediff.inference.api import predict
from spinediff.prediction.sampling import SamplingRequest, SamplingSettings, resolve_sampling
from spinediff.training.api import TrainingOptions, train

CONFIG = "2d_diffusion"
SAMPLES, STEPS = 2, 2
TINY = TrainingOptions(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, num_inference_steps=STEPS,
                       validation_samples=SAMPLES)
MODELS = [(901, "Dataset901_SpinePhantomSeg", "DiffusionSegmentationTrainer"),
          (902, "Dataset902_SpinePhantomTranslation", "DiffusionTranslationTrainer"),
          (903, "Dataset903_SpinePhantomGeneration", "SegGuidedGenerationTrainer")]


@pytest.fixture(scope="module")
def trained(phantom_root, tmp_path_factory):
    from spinediff.planning.api import plan_dataset

    base = tmp_path_factory.mktemp("nnunet_prediction_core")
    with nnunet_folders(phantom_root, base) as env:
        folders = {}
        for dataset, _, trainer in MODELS:
            plan_dataset(dataset, configurations=[CONFIG], device="cpu", num_processes=1, show_progress_bar=False)
            folders[dataset] = train(dataset, CONFIG, 0, trainer, TINY)
        yield {**env, "raw": Path(phantom_root), "folders": folders}


def _inputs(raw: Path, name: str, case: str, writes_labels_as_condition: bool, folder: Path) -> None:
    folder.mkdir(parents=True)
    if writes_labels_as_condition:  # generation: the label map is the input
        shutil.copy(raw / name / "labelsTr" / f"{case}.nii.gz", folder / f"{case}.nii.gz")
        return
    for channel in (0, 1):  # segmentation: both MR channels; translation: its MR source channels
        shutil.copy(raw / name / "imagesTr" / f"{case}_{channel:04d}.nii.gz", folder)


@pytest.mark.slow  # plans and trains
@pytest.mark.parametrize("dataset,name,trainer", MODELS, ids=["segmentation", "translation", "generation"])
def test_validation_output_is_byte_identical_to_spinediff_predict(trained, tmp_path, dataset, name, trainer):
    fold = Path(trained["folders"][dataset])
    validation = fold / "validation"
    metrics = json.loads((fold / "validation_metrics.json").read_text())
    # the validation records its resolved sampling with the field names of prediction.json
    assert metrics["sampling"]["num_samples"] == SAMPLES and metrics["sampling"]["num_inference_steps"] == STEPS
    exported = sorted(validation.glob("*.nii.gz"))
    assert exported
    for path in exported:
        case = path.name[: -len(".nii.gz")]
        inputs, output = tmp_path / f"in_{case}", tmp_path / f"out_{case}"
        _inputs(trained["raw"], name, case, dataset == 903, inputs)
        output.mkdir()
        report = predict(inputs, output, dataset, CONFIG, trainer, folds=[0], num_samples=SAMPLES,
                         num_inference_steps=STEPS, seed=0, tta=False, device="cpu", progress=False)
        assert report.exit_code == 0, report.failed
        summary = json.loads(report.summary_file.read_text())
        sampling = {k: v for k, v in metrics["sampling"].items() if k != "source"}
        assert {k: summary[k] for k in sampling} == sampling  # the same settings, under the same names
        predicted = output / path.name
        assert predicted.read_bytes() == path.read_bytes(), f"{case}: validation and predict differ"


def test_sampling_settings_are_resolved_plans_then_tuned_then_flags():
    from spinediff.diffusion.settings import DiffusionSettings
    from spinediff.errors import SpineDiffError
    from spinediff.inference.sampling_choice import SamplingSetting

    plans = DiffusionSettings(task="segmentation", condition_channels=2, target_channels=4, num_inference_steps=10,
                              num_samples=5, warm_start=0.4)
    base = resolve_sampling(plans)
    assert base == SamplingSettings("ddim", 10, 5, 0.0, 0.4, "auto", False, "plans")
    tuned = SamplingSetting("dpm++2m", 4, None)
    chosen = resolve_sampling(plans, tuned=tuned, tuned_source="m/sampling.json")
    assert (chosen.solver, chosen.num_inference_steps, chosen.warm_start, chosen.source) == \
        ("dpm++2m", 4, None, "m/sampling.json")  # the tuned choice has no warm start: the plans' is off
    flags = resolve_sampling(plans, SamplingRequest.from_keywords(num_inference_steps=3, warm_start=0.0), tuned=tuned)
    assert (flags.solver, flags.num_inference_steps, flags.warm_start, flags.source) == ("ddim", 3, None,
                                                                                        "command line")
    assert resolve_sampling(plans, SamplingRequest(tuned_sampling=False), tuned=tuned) == base
    assert resolve_sampling(plans, denoising=False).num_samples == 1
    with pytest.raises(dataclasses_error()):
        base.num_samples = 2  # frozen: passed whole, never changed on the way
    with pytest.raises(SpineDiffError, match="--steps"):
        resolve_sampling(plans, SamplingRequest(num_inference_steps=5000))
    with pytest.raises(TypeError, match="num_sample"):
        SamplingRequest.from_keywords(num_sample=3)


def dataclasses_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError
