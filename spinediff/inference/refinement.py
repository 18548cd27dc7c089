"""``spinediff predict --init-from FOLDER | --init-model TRAINER__PLANS__CONFIG``: refine another model's answers.

Each fold of the diffusion model starts from an initial answer of the case (class probabilities or a label map for
segmentation, the target image for translation; :mod:`spinediff.utilities.initial_answer`), brought onto the case's
preprocessed grid, noised to ``init_noise`` x (T - 1) and denoised in the given steps
(:mod:`spinediff.diffusion.refinement`). ``--init-from`` gives one folder for every fold; ``--init-model`` predicts
the initial model first, fold by fold (diffusion fold f refines the answer of the initial model's fold f, as in its
cross-validation): nnU-Net's own trainers with nnunetv2's ``nnUNetPredictor``, spinediff's with ``spinediff
predict``. A refinement model (``DiffusionRefinementTrainer``) names its initial model in ``refinement.json``; it is
used when neither option is given.

``combine``: ``mean`` averages the K samples' class probabilities (as every spinediff model); ``spinesegdiff``
combines each fold's samples over their last steps and writes the maximum entropy over those steps as the
uncertainty map (SpineSegDiff; :class:`~spinediff.diffusion.refinement.StepCombination`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from spinediff.diffusion.refinement import COMBINATIONS, check_fraction
from spinediff.errors import SpineDiffError
from spinediff.inference.predictor import SpineDiffPredictor
from spinediff.paths import split_model_folder_name
from spinediff.prediction.core import CaseOutputs, add_members, new_statistics
from spinediff.prediction.statistics import EnsembleStatistics, masked_mean
from spinediff.training.refinement import (
    DEFAULT_REFINE_FROM,
    answers_after_postprocessing,
    initial_estimate,
    read_refinement,
    refine_answer,
)
from spinediff.utilities.export import write_image_like_raw
from spinediff.utilities.initial_answer import InitialAnswerFolder
from spinediff.utilities.seeds import fold_seed


class RefiningPredictor(SpineDiffPredictor):
    """:class:`SpineDiffPredictor` whose folds refine initial answers instead of sampling from noise.

    ``answers``: fold → folder of initial answers; ``init_noise``: the start level (fraction of T - 1).
    """

    def __init__(self, folder, folds: Sequence[int | str], answers: dict[str, InitialAnswerFolder] | None,
                 init_noise: float, combine: str = "mean", checkpoint: str = "final",
                 device: str | torch.device = "auto") -> None:
        super().__init__(folder, folds, checkpoint, device)
        if combine not in COMBINATIONS:
            raise SpineDiffError(f"--combine must be one of {', '.join(COMBINATIONS)}, got {combine!r}.")
        if not all(m.denoising for m in self.models):
            raise SpineDiffError(f"{folder.trainer} predicts in one step; only a diffusion model refines an answer.")
        if combine == "spinesegdiff" and not self.task.task.writes_labels:
            raise SpineDiffError("--combine spinesegdiff combines class probabilities: segmentation models only.")
        self.answers: dict[str, InitialAnswerFolder] = {}
        if answers is not None:
            self.set_answers(answers)
        self.init_noise = check_fraction(init_noise)
        self.combine = combine
        #: a residual refiner's scale (ResidualRefinementTrainer, from its refinement.json); None: it denoises answers
        self.residual_scale = (read_refinement(folder.path) or {}).get("residual_scale")
        self._case: tuple[str, dict] | None = None
        self._entropy: torch.Tensor | None = None

    def set_answers(self, answers: dict[str, InitialAnswerFolder]) -> None:
        missing = [m.fold for m in self.models if m.fold not in answers]
        if missing:
            raise SpineDiffError(f"No initial answers for fold(s) {', '.join(missing)}.")
        self.answers = dict(answers)

    def check_answers(self, identifiers: Sequence[str]) -> None:
        """Every case has an answer in every fold's folder, with the model's classes (before any work)."""
        for answers in {str(a.path): a for a in self.answers.values()}.values():
            answers.check_cases(identifiers)
            if self.task.task.writes_labels:
                for identifier in identifiers:
                    answers.check_classes(identifier, self.task.num_classes)

    def set_case(self, identifier: str, properties: dict) -> None:
        """The case the next :meth:`sample` refines (its answer is found by name; ``properties`` place it on the
        preprocessed grid); :meth:`preprocess` sets it for raw inputs."""
        self._case = (identifier, properties)

    def preprocess(self, case):
        preprocessed = super().preprocess(case)
        self._case = (case.identifier, preprocessed.properties)
        return preprocessed

    def sample(self, condition: torch.Tensor, options, progress: bool = False, label: str = "") -> EnsembleStatistics:
        identifier, properties = self._case
        sampling = options.sampling
        statistics = new_statistics(self.task)
        entropies = []
        for model in self.models:
            estimate = initial_estimate(self.answers[model.fold], identifier, properties, self.task,
                                        self.plans_manager, self.configuration_manager, condition.shape[1:])
            sampler = model.volume_predictor(sampling).sampler
            members, entropy = refine_answer(sampler, condition.to(self.device), estimate.to(self.device),
                                             fraction=self.init_noise, num_inference_steps=sampling.num_inference_steps,
                                             num_samples=sampling.num_samples, seed=fold_seed(options.seed, model.fold),
                                             combination=self.combine, residual_scale=self.residual_scale)
            if entropy is not None:
                entropies.append(entropy)
            add_members(statistics, members, self.task)
        self._entropy = torch.stack(entropies).mean(0) if entropies else None
        return statistics

    def export(self, statistics, case, outputs: CaseOutputs, options) -> dict:
        summary = super().export(statistics, case, outputs, options)
        if self._entropy is None or not outputs.uncertainty:
            return summary
        # SpineSegDiff's uncertainty: the maximum entropy over the last steps (mean over folds) replaces the map
        entropy = self._revert_map(self._entropy, case.properties)
        write_image_like_raw(entropy, case.properties, outputs.uncertainty[0])
        import SimpleITK as sitk

        foreground = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs.predictions[0]))) > 0
        summary["mean_uncertainty"] = float(entropy.mean())
        summary["max_uncertainty"] = float(entropy.max())
        summary["uncertainty"] = ("SpineSegDiff: maximum over the last steps of the entropy of the samples' mean class "
                                  "probabilities (nats), mean over folds")
        summary["mean_uncertainty_foreground"] = masked_mean(entropy, foreground)
        return summary


def plan_refinement(folder, folds: Sequence[str], init_from, init_model: str | None, init_noise: float | None,
                    tuned_noise: float | None = None) -> dict | None:
    """What ``spinediff predict`` refines from, checked before any work: None (sampling from noise), or
    ``{"init_from": folder}`` / ``{"init_model": results folder}`` with the start level ``init_noise`` (the command
    line's, else the model's tuned ``sampling.json`` choice, its ``refinement.json``, the plans' ``warm_start``,
    else ``DEFAULT_REFINE_FROM``)."""
    if init_from is not None and init_model is not None:
        raise SpineDiffError("Give --init-from or --init-model, not both.")
    recorded, recorded_noise = recorded_initial_model(folder.path)
    if init_from is None and init_model is None:
        if recorded is None:
            if init_noise is not None:
                raise SpineDiffError("--init-noise needs an initial answer: --init-from FOLDER or --init-model MODEL.")
            return None
        init_model = recorded
    noise = next(v for v in (init_noise, tuned_noise, recorded_noise, folder_warm_start(folder), DEFAULT_REFINE_FROM)
                 if v is not None)
    plan = {"init_noise": check_fraction(noise)}
    if init_from is not None:
        plan["init_from"] = InitialAnswerFolder.open(init_from, folder.dataset_json["file_ending"])
    else:
        plan["init_model"] = initial_model_folds(init_model, folder.path.parent, folds)
    return plan


def folder_warm_start(folder) -> float | None:
    try:
        return folder.planned.diffusion.warm_start
    except (AttributeError, SpineDiffError):
        return None


def initial_model_folds(init_model: str, results: Path, folds: Sequence[str]) -> Path:
    """The initial model's results folder, checked to have every one of ``folds`` trained."""
    if split_model_folder_name(init_model) is None:
        raise SpineDiffError(f"--init-model {init_model!r} is not TRAINER__PLANS__CONFIG (a results folder's name).")
    folder = results / init_model
    missing = [f for f in folds if not (folder / f"fold_{f}" / "checkpoint_final.pth").is_file()]
    if missing:
        raise SpineDiffError(f"--init-model {folder}: fold(s) {', '.join(missing)} have no checkpoint_final.pth; the "
                             "diffusion model's fold f refines the answer of the initial model's fold f. Train them.")
    return folder


def predict_initial_answers(init_folder: Path, dataset: str, folds: Sequence[str], input_folder: str | Path,
                            work: Path, device: torch.device, spinediff_predict=None) -> dict[str, InitialAnswerFolder]:
    """Predict every case with each fold of the initial model into ``work/fold_F`` (probabilities kept): nnU-Net's
    trainers with nnunetv2's predictor, spinediff's with ``spinediff_predict`` (:func:`spinediff.inference.api.predict`,
    given by the caller). When the initial model's cross-validation kept a post-processing (its
    ``postprocessing.json``), its answers are post-processed into ``work/fold_F_postprocessed`` with probabilities
    that agree with it, and refined from there (as its cross-validation refines them)."""
    from spinediff.training.registry import is_spinediff_trainer

    trainer, plans, configuration = split_model_folder_name(init_folder.name)
    answers = {}
    for fold in folds:
        out = work / f"fold_{fold}"
        out.mkdir(parents=True, exist_ok=True)
        if is_spinediff_trainer(trainer):
            if spinediff_predict is None:
                raise SpineDiffError(f"the initial model {init_folder.name} is a spinediff model: give its predict")
            report = spinediff_predict(input_folder, out, dataset, configuration, trainer, folds=[fold],
                                       plans_identifier=plans, device=str(device), save_probabilities=True,
                                       overwrite=True, progress=False, results_folder=init_folder.parent.parent)
            if report.failed:
                raise SpineDiffError(f"the initial model {init_folder.name} failed on "
                                     f"{', '.join(c.identifier for c in report.failed)}: {report.failed[0].message}")
        else:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            from spinediff.utilities.in_process import predict_nnunet_files

            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=device.type != "cpu",
                                        perform_everything_on_device=device.type != "cpu", device=device,
                                        verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(init_folder), use_folds=(int(fold),),
                                                           checkpoint_name="checkpoint_final.pth")
            predict_nnunet_files(predictor, str(input_folder), str(out), save_probabilities=True)
        if answers_after_postprocessing(init_folder):  # the numbering a user of the initial model gets
            from spinediff.inference.postprocess_command import postprocess_folder

            numbered = work / f"fold_{fold}_postprocessed"
            postprocess_folder(out, numbered, init_folder, overwrite=True, progress=False, save_probabilities=True)
            out = numbered
        answers[str(fold)] = InitialAnswerFolder.open(out, predictor_ending(init_folder))
    return answers


def predictor_ending(model_folder: Path) -> str:
    from spinediff.io import read_json

    return read_json(model_folder / "dataset.json")["file_ending"]


def recorded_initial_model(model_folder: Path) -> tuple[str | None, float | None]:
    """A refinement model's initial model and start level (``refinement.json``), else (None, None)."""
    record = read_refinement(model_folder)
    if record is None:
        return None, None
    return str(record["init_model"]), float(record.get("refine_from", DEFAULT_REFINE_FROM))


def remove_work(work: Path | None) -> None:
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
