"""``predict``: the typed function behind ``spinediff predict`` (a folder of raw cases → a folder of results)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from spinediff.errors import SpineDiffError
from spinediff.inference.inputs import RUN_SUMMARY, discover_cases, part_name, select_part
from spinediff.inference.models import model_folder
from spinediff.inference.predictor import CaseResult, PredictionOptions, SpineDiffPredictor
from spinediff.inference.review import REVIEW_TABLE, ReviewRule, flagged_cases, write_review_table
from spinediff.inference.review_sheet import REVIEW_SHEET, SheetCase, write_review_sheet
from spinediff.inference.sampling_choice import SAMPLING_FILE, SamplingChoice
from spinediff.io import ensure_writable_folder, write_json
from spinediff.paths import DEFAULT_PLANS
from spinediff.prediction.sampling import SamplingRequest
from spinediff.utilities.lock import LOCK_NAME, PART_LOCK_PREFIX, folder_lock, other_holders


@dataclass
class PredictionReport:
    """What a prediction run did: its settings and one result per case (failed cases with the reason)."""

    output_folder: Path
    settings: dict
    cases: list[CaseResult] = field(default_factory=list)
    review_table: Path | None = None  # review.csv, when the model has a review rule (review.json)
    review_sheet: Path | None = None  # review.png: the flagged cases drawn (None: none flagged)
    summary_file: Path | None = None  # prediction.json (prediction_partIofN.json for one part of a split run)
    flagged: list[str] = field(default_factory=list)  # cases above the model's review threshold, most doubtful first

    @property
    def failed(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.ok]

    @property
    def exit_code(self) -> int:
        """0 when every case was predicted, 2 (as for user errors) when any failed."""
        return 2 if self.failed else 0

    def to_dict(self) -> dict:
        return {**self.settings, "num_cases": len(self.cases), "num_failed": len(self.failed),
                "review_flagged": self.flagged, "review_sheet": str(self.review_sheet) if self.review_sheet else None,
                "cases": {c.identifier: asdict(c) for c in self.cases}}


def trained_folds(path: Path, checkpoint: str = "final") -> list[str]:
    """The folds of a results folder (``fold_0`` ... ``fold_all``) that hold ``checkpoint_<checkpoint>.pth``."""
    names = [p.name[len("fold_"):] for p in path.glob("fold_*") if (p / f"checkpoint_{checkpoint}.pth").is_file()]
    folds = sorted(names, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    if not folds:
        raise SpineDiffError(f"No trained fold in {path} (no fold_*/checkpoint_{checkpoint}.pth). Train one with "
                             "`spinediff train`, or name the folds with -f.")
    return folds


@contextlib.contextmanager
def _output_lock(output: Path, num_parts: int, part_id: int) -> Iterator[None]:
    """The output folder's lock; the parts of one prediction (``--num-parts``) each hold their own, and a whole
    run and a part run exclude each other."""
    name = LOCK_NAME if num_parts == 1 else f"{PART_LOCK_PREFIX}{part_id}of{num_parts}.lock"
    with folder_lock(output, name=name):
        others = other_holders(output, PART_LOCK_PREFIX if num_parts == 1 else LOCK_NAME)
        if others:
            raise SpineDiffError(f"{output} is in use by another spinediff run (PID {others[0].get('pid', '?')}, "
                                 f"lock file {others[0]['lock']}). Wait for it to finish or choose another output "
                                 "folder.")
        yield


def predict(input_folder: str | os.PathLike, output_folder: str | os.PathLike, dataset: str | int,
            configuration: str, trainer: str, *, folds: Sequence[int | str] | None = None,
            plans_identifier: str = DEFAULT_PLANS, checkpoint: str = "final", device: str = "auto",
            sampling: SamplingRequest | None = None, seed: int = 0, save_uncertainty: bool = False,
            save_probabilities: bool = False, overwrite: bool = False,
            results_folder: str | os.PathLike | None = None, progress: bool = True, postprocessing: bool = True,
            num_parts: int = 1, part_id: int = 0, init_from: str | os.PathLike | None = None,
            init_model: str | None = None, init_noise: float | None = None, combine: str = "mean",
            **sampling_keywords) -> PredictionReport:
    """Predict every case of ``input_folder`` with the ensemble of ``folds`` and write the results.

    Args:
        input_folder: raw cases in nnU-Net naming (``CASE_XXXX.nii.gz``; generation: ``CASE.nii.gz``).
        output_folder: where ``CASE.nii.gz`` (and maps, summaries) go; created if needed.
        dataset, configuration, trainer, plans_identifier: which trained model
            (``$nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIG``).
        folds: the folds to ensemble (their x0 estimates / class probabilities are averaged); None: every
            fold of the results folder that has the checkpoint (e.g. just fold 0 after a single-fold training).
        checkpoint: ``final`` or ``best``.
        sampling, sampling_keywords: how to sample, a :class:`~spinediff.prediction.sampling.SamplingRequest` and/or
            its fields as keywords (``num_samples``, ``num_inference_steps``, ``eta``, ``solver``, ``warm_start``,
            ``precision``, ``tta``, ``tuned_sampling``; None: the model's). The model's plans, its ``sampling.json``
            (chosen on the cross-validation by ``spinediff tune_sampling``, used when none of ``solver``,
            ``num_inference_steps`` and ``warm_start`` is given and ``tuned_sampling`` is True) and the request are
            combined once (:func:`~spinediff.prediction.sampling.resolve_sampling`); ``warm_start`` 0 starts from
            pure noise; ``tta`` None mirrors on GPUs only.
        seed: the base seed; the same seed gives the same output.
        save_uncertainty: write ``CASE_uncertainty`` (and ``CASE_variance`` for segmentation) and
            ``CASE_uncertainty.json``.
        save_probabilities: segmentation: write the mean class probabilities ``CASE.npz`` (raw geometry)
            for ``spinediff ensemble``.
        overwrite: replace existing outputs (otherwise any existing output stops the run before it starts).
        postprocessing: segmentation: apply the model folder's ``postprocessing.json`` (``spinediff find_best``
            decides it on the cross-validation) when it has one.
        num_parts, part_id: predict only part ``part_id`` of the input cases split in ``num_parts`` (nnU-Net's
            convention: one process or GPU per part, all writing into one output folder; run-level files get a
            ``_partIofN`` suffix).
        init_from, init_model, init_noise, combine: refine another model's answers instead of sampling from noise
            (:mod:`spinediff.inference.refinement`): a folder of its predictions, or its results folder name
            ``TRAINER__PLANS__CONFIG`` (predicted first, fold by fold); the start level as a fraction of T; ``mean``
            or ``spinesegdiff`` (SpineSegDiff's combination of the last steps and max-entropy map). A refinement
            model (``refinement.json``) runs its initial model itself when neither is given.

    Returns:
        The report; ``exit_code`` is 2 if any case failed (each failure is in ``cases`` with its reason).
    """
    if Path(output_folder).resolve() == Path(input_folder).resolve():
        raise SpineDiffError(f"The output folder must differ from the input folder {input_folder} (a generation "
                             "output CASE.nii.gz would replace its input label map).")
    ensure_writable_folder(output_folder, create=False)
    select_part([], num_parts, part_id)  # the part is checked before anything is loaded
    folder = model_folder(dataset, configuration, trainer, plans_identifier, results_folder)
    if folds is None:
        folds = trained_folds(folder.path, checkpoint)
    from spinediff.inference.refinement import RefiningPredictor, plan_refinement, predict_initial_answers

    folds = [str(f) for f in folds]
    request = SamplingRequest.from_keywords(sampling, **sampling_keywords)
    choice = SamplingChoice.read(folder.path) if request.tuned_sampling and not request.names_sampling else None
    refinement = plan_refinement(folder, folds, init_from, init_model, init_noise,
                                 choice.setting.warm_start if choice is not None else None)
    if refinement is None:
        predictor = SpineDiffPredictor(folder, folds, checkpoint, device)
    else:
        answers = {f: refinement["init_from"] for f in folds} if "init_from" in refinement else None
        predictor = RefiningPredictor(folder, folds, answers, refinement["init_noise"], combine, checkpoint, device)
    if postprocessing:
        from spinediff.inference.postprocessing import Postprocessing

        predictor.postprocessing = Postprocessing.load(folder.path)
    if predictor.task.task.writes_labels:  # review flags on by default: the rule the cross-validation wrote
        predictor.review = ReviewRule.read(folder.path)
    # the student samples at the steps it was distilled for (its checkpoint's diffusion block), not sampling.json's
    distilled = checkpoint == "distilled"
    tuned = None if distilled or choice is None else choice.setting
    resolved = predictor.sampling(request, tuned=tuned, tuned_source=str(folder.path / SAMPLING_FILE),
                                  plans_source="distilled checkpoint" if distilled else "plans")
    options = PredictionOptions(resolved, seed, save_uncertainty, save_probabilities)
    cases, problems = discover_cases(input_folder, predictor.layout)
    if not cases and not problems:
        raise SpineDiffError(f"No input images in {input_folder}; expected {predictor.layout.describe()} "
                             f"(any of .nii.gz, .nii, .mha, .nrrd).")
    part = select_part([c.identifier for c in cases] + [p.identifier for p in problems], num_parts, part_id)
    cases, problems = [c for c in cases if c.identifier in part], [p for p in problems if p.identifier in part]
    if refinement is not None and "init_from" in refinement:  # every answer there, with the model's classes
        predictor.check_answers([c.identifier for c in cases])
    run_summary, review_table, review_sheet = (part_name(name, num_parts, part_id)
                                               for name in (RUN_SUMMARY, REVIEW_TABLE, REVIEW_SHEET))
    output = Path(output_folder)
    with _output_lock(output, num_parts, part_id):  # held to the end: no other run writes here meanwhile
        planned = {case.identifier: predictor.output_paths(case, output, options) for case in cases}
        existing = [p for paths in planned.values() for p in paths.all() if p.exists()]
        existing += [output / name for name in (run_summary, review_table, review_sheet) if (output / name).exists()]
        if existing and not overwrite:  # checked under the lock: no other run can add outputs now
            shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
            raise SpineDiffError(f"{len(existing)} output file(s) already exist ({shown}). Choose another output "
                                 "folder or pass --overwrite to replace them.")
        output.mkdir(parents=True, exist_ok=True)
        work = None
        if refinement is not None and "init_model" in refinement:  # the initial model first, fold by fold
            import tempfile

            work = Path(tempfile.mkdtemp(prefix=".initial_answers_", dir=output))
            try:
                predictor.set_answers(predict_initial_answers(refinement["init_model"], folder.dataset_name, folds,
                                                              input_folder, work, predictor.device, predict))
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        sampled = options.sampling.to_dict()
        settings = {"model": str(folder.path), "task": predictor.task.task.name, "trainer": folder.trainer,
                    "configuration": folder.configuration, "plans": folder.plans_identifier,
                    "folds": [m.fold for m in predictor.models], "checkpoint": checkpoint, "device": str(device),
                    **{k: v for k, v in sampled.items() if k != "source"}, "sampling_from": sampled["source"],
                    "seed": seed, "denoising": predictor.models[0].denoising, "input_folder": str(input_folder),
                    "postprocessing": predictor.postprocessing.to_dict() if predictor.postprocessing.active else None,
                    "part": {"part_id": part_id, "num_parts": num_parts}}
        if refinement is not None:
            source = refinement["init_from"].path if "init_from" in refinement else refinement["init_model"]
            settings["refinement"] = {"initial_answers": str(source), "init_noise": refinement["init_noise"],
                                      "combine": combine}
        report = PredictionReport(output, settings)
        report.cases += [CaseResult(p.identifier, False, p.message) for p in problems]
        for problem in problems:
            tqdm.write(f"skipped {problem.identifier}: {problem.message}")
        bar = tqdm(cases, desc=f"predict ({len(predictor.models)} fold(s))", unit="case", disable=not progress)
        for case in bar:
            bar.set_postfix_str(case.identifier)
            result = predictor.predict_case(case, planned[case.identifier], options, progress)
            if not result.ok:
                tqdm.write(f"failed {case.identifier}: {result.message}")
            report.cases.append(result)
        flags = {c.identifier: c.uncertainty["review"] for c in report.cases
                 if c.ok and (c.uncertainty or {}).get("review")}
        if flags:
            report.review_table = write_review_table(flags, output / review_table)
            report.flagged = flagged_cases(flags)
        if report.flagged:  # the flagged cases drawn on their images
            inputs = {c.identifier: c for c in cases}
            report.review_sheet = write_review_sheet(
                [SheetCase(case, planned[case].predictions[0], inputs[case].files[0], tuple(flags[case]["reasons"]))
                 for case in report.flagged], predictor.dataset_json, output / review_sheet)
        else:
            (output / review_sheet).unlink(missing_ok=True)  # an overwritten run's sheet names cases not flagged now
        report.summary_file = output / run_summary
        write_json(report.to_dict(), report.summary_file)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        return report
