"""``spinediff tune_sampling``: choose a trained diffusion model's solver, steps and warm start on its own
cross-validation, and write the choice into its model folder (``sampling.json``).

Every candidate ``SOLVER:STEPS[@WARM]`` predicts every validation case of every fold with that fold's model
(one sample per case, the same seed for every candidate, on the preprocessed grid the model was trained on) and
is scored against the case's reference:

- segmentation: the mean foreground Dice of the argmax (each class over the cases where it is present in the
  reference or the prediction, as nnU-Net's per-case Dice);
- translation / generation: the mean absolute error in the target's units (HU for CT), lower is better.

The choice is the candidate with the fewest network calls per sample whose quality is within ``tolerance`` of
the best candidate's (segmentation: Dice >= (1 - tolerance) x best; images: MAE <= (1 + tolerance) x best).
One sample per case measures the solver, not the ensemble; K samples cost K times the calls at prediction.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from spinediff.diffusion.settings import LEGACY_SOLVER_KEY
from spinediff.diffusion.solvers import solver_class
from spinediff.errors import SpineDiffError
from spinediff.inference.sampling_choice import SAMPLING_FILE, SamplingChoice, SamplingSetting
from spinediff.paths import DEFAULT_PLANS
from spinediff.utilities.lock import LOCK_NAME, folder_lock

TOLERANCE = 0.01
#: Candidates for models of the cosine/linear schedules and of rectified flow.
DDPM_CANDIDATES = ("ddim:1", "ddim:2", "ddim:5", "ddim:10", "ddim:25", "dpm++2m:2", "dpm++2m:5", "dpm++2m:10",
                   "ddim:2@0.5")
#: A refinement model (refinement.json): SOLVER:STEPS@F refines the fold's initial answers from F x T (issue 35).
REFINE_CANDIDATES = ("ddim:1@0.1", "ddim:1@0.2", "ddim:2@0.2", "ddim:2@0.3", "ddim:3@0.3", "ddim:5@0.5")
FLOW_CANDIDATES = ("euler:1", "euler:2", "euler:5", "euler:10", "euler:25")


def _quality(predictor, statistics, data: torch.Tensor, seg: torch.Tensor) -> float:
    """Segmentation: mean foreground Dice of the argmax; images: mean absolute error in the target's units."""
    if predictor.task.task.writes_labels:
        prediction = statistics.mean.argmax(0).numpy()
        reference = seg[0].numpy()
        dices = []
        for label in range(1, statistics.mean.shape[0]):
            a, b = prediction == label, reference == label
            total = int(a.sum()) + int(b.sum())
            if total:
                dices.append(2.0 * int((a & b).sum()) / total)
        return float(np.mean(dices)) if dices else 1.0
    errors = [float((statistics.mean[i] - data[channel]).abs().mean())
              for i, channel in enumerate(predictor.task.target_channels)]
    return float(np.mean(errors))


def tune_sampling(dataset: str | int, configuration: str, trainer: str, *, folds: Sequence[int | str] | None = None,
                  candidates: Sequence[str] | None = None, tolerance: float = TOLERANCE,
                  max_cases: int | None = None, plans_identifier: str = DEFAULT_PLANS, device: str = "auto",
                  seed: int = 0, write: bool = True, overwrite: bool = False, progress: bool = True,
                  results_folder: str | None = None) -> dict:
    """Score every candidate on the folds' validation cases and write the choice (see the module docstring).

    Returns the record written to ``sampling.json``'s ``chosen`` block, with the choice itself under ``choice``.
    """
    from spinediff.inference.models import model_folder

    folder = model_folder(dataset, configuration, trainer, plans_identifier, results_folder)
    # one choice per model folder: its sampling.json's lock, before the check that it is new, held to the end
    lock = folder_lock(folder.path, name=f".{SAMPLING_FILE}{LOCK_NAME}", create=False) if write else \
        contextlib.nullcontext()
    with lock:
        return _tune(folder, configuration, trainer, folds, candidates, tolerance, max_cases, plans_identifier,
                     device, seed, write, overwrite, progress)


def _tune(folder, configuration: str, trainer: str, folds: Sequence[int | str] | None,
          candidates: Sequence[str] | None, tolerance: float, max_cases: int | None, plans_identifier: str,
          device: str, seed: int, write: bool, overwrite: bool, progress: bool) -> dict:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from spinediff.inference.api import trained_folds
    from spinediff.inference.predictor import PredictionOptions, SpineDiffPredictor
    from spinediff.io import read_json
    from spinediff.paths import nnunet_folder

    folds = [str(f) for f in (folds if folds is not None else trained_folds(folder.path))]
    if write and not overwrite and (folder.path / SAMPLING_FILE).is_file():
        raise SpineDiffError(f"{folder.path / SAMPLING_FILE} already exists; pass --overwrite to choose again (or "
                             "--dry-run to only compare).")
    probe = SpineDiffPredictor(folder, [folds[0]], device=device)
    if not probe.models[0].denoising:
        raise SpineDiffError(f"{trainer} predicts in one step; there is no sampling to tune.")
    flow = probe.settings.noise_schedule == "rflow"
    from spinediff.training.refinement import read_refinement

    refinement = read_refinement(folder.path)
    defaults = REFINE_CANDIDATES if refinement else FLOW_CANDIDATES if flow else DDPM_CANDIDATES
    settings = [SamplingSetting.parse(c) for c in (candidates or defaults)]
    wrong = [s.label() for s in settings if solver_class(s.solver).rectified_flow != flow]
    if wrong:
        raise SpineDiffError(f"Candidates {', '.join(wrong)} do not fit a model trained with the "
                             f"{probe.settings.noise_schedule!r} schedule (rflow samples with euler only).")
    preprocessed = nnunet_folder("preprocessed") / folder.dataset_name
    splits_file = preprocessed / "splits_final.json"
    if not splits_file.is_file():
        raise SpineDiffError(f"{splits_file} is missing: the folds' validation cases are read from it.")
    splits = read_json(splits_file)
    beyond = [f for f in folds if not f.isdigit() or int(f) >= len(splits)]
    if beyond:  # every fold is checked before the first is sampled
        raise SpineDiffError(f"Fold(s) {', '.join(beyond)} have no validation cases in {splits_file} (it has folds "
                             f"0-{len(splits) - 1}); choose others with -f.")
    data_folder = str(preprocessed / folder.configuration_manager.data_identifier)
    scores: dict[str, list[float]] = {s.label(): [] for s in settings}
    seconds: dict[str, float] = {s.label(): 0.0 for s in settings}
    cases: list[str] = []
    for fold in folds:
        if not fold.isdigit() or int(fold) >= len(splits):
            raise SpineDiffError(f"Fold {fold} has no validation cases in {splits_file}.")
        keys = list(splits[int(fold)]["val"])[:max_cases]
        predictor = SpineDiffPredictor(folder, [fold], device=device)
        if refinement:  # the same fold's initial answers: its initial model never saw these cases
            from spinediff.inference.refinement import RefiningPredictor
            from spinediff.training.refinement import initial_exports
            from spinediff.utilities.initial_answer import InitialAnswerFolder

            # numbered where the initial model's cross-validation keeps its level numbering, as the trainer's
            answers = InitialAnswerFolder.open(initial_exports(folder.path.parent / refinement["init_model"], fold),
                                               folder.dataset_json["file_ending"])
            answers.check_cases(list(splits[int(fold)]["val"])[:max_cases])
            predictor = RefiningPredictor(folder, [fold], {fold: answers}, refinement.get("refine_from", 0.3),
                                          device=device)
        dataset_reader = infer_dataset_class(data_folder)(data_folder, keys)
        for key in tqdm(keys, desc=f"tune sampling, fold {fold}", unit="case", disable=not progress):
            data, seg, _, properties = dataset_reader.load_case(key)
            data = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
            seg = torch.from_numpy(np.asarray(seg[:], dtype=np.int16))
            condition = predictor.task.condition(data[None], seg[None])[0]
            for setting in settings:
                sampling = predictor.sampling(num_samples=1, num_inference_steps=setting.num_inference_steps,
                                              solver=setting.solver, warm_start=setting.warm_start or 0.0)
                options = PredictionOptions(sampling, seed=seed)
                start = time.perf_counter()
                if refinement:
                    predictor.set_case(key, properties)
                    predictor.init_noise = setting.warm_start or 0.0
                statistics = predictor.sample(condition, options)
                seconds[setting.label()] += time.perf_counter() - start
                scores[setting.label()].append(_quality(predictor, statistics, data, seg))
            cases.append(key)
    higher_is_better = probe.task.task.higher_is_better  # Dice for segmentation, MAE for images
    means = {label: float(np.mean(values)) for label, values in scores.items()}
    best = max(means.values()) if higher_is_better else min(means.values())
    acceptable = [s for s in settings if (means[s.label()] >= (1 - tolerance) * best if higher_is_better
                                          else means[s.label()] <= (1 + tolerance) * best)]
    chosen = min(acceptable, key=lambda s: (s.network_calls, -means[s.label()] if higher_is_better
                                            else means[s.label()]))
    metric = "mean foreground Dice" if higher_is_better else "mean absolute error (target units)"
    record = {
        "rule": f"fewest network calls per sample with {metric} within {100 * tolerance:g} % of the best candidate",
        "metric": metric, "tolerance": tolerance, "folds": folds, "cases": cases, "samples_per_case": 1,
        "candidates": [{"setting": s.label(), "network_calls": s.network_calls, "quality": means[s.label()],
                        "seconds_per_case": seconds[s.label()] / max(len(cases), 1),
                        "per_case": scores[s.label()]} for s in settings],
        "made_by": "spinediff tune_sampling",
    }
    if write:
        path = SamplingChoice(chosen, record).write(folder.path)
        record["file"] = str(path)
        plans_file = preprocessed / f"{plans_identifier}.json"
        if plans_file.is_file():
            record_in_plans(plans_file, configuration, chosen, record, trainer)
            record["plans"] = str(plans_file)
    record["choice"] = chosen.label()
    return record


PLANS_NOTE_PREFIX = "Sampling measured:"


def record_in_plans(plans_file, configuration: str, chosen: SamplingSetting, record: dict, trainer: str) -> None:
    """Write the measured choice into the plans' diffusion block of ``configuration`` (solver, steps, warm start)
    with the reason in its notes, replacing the planner's first guess; later trainings validate with it and their
    checkpoints carry it. An earlier measured note is replaced, not repeated."""
    from spinediff.io import read_json, write_json

    plans = read_json(plans_file)
    entry = plans.get("configurations", {}).get(configuration)
    if not isinstance(entry, dict) or not isinstance(entry.get("diffusion"), dict):
        return  # an inherited configuration without its own diffusion block: the model folder's choice suffices
    diffusion = entry["diffusion"]
    planned_solver = diffusion.get("solver", diffusion.get(LEGACY_SOLVER_KEY, "ddim"))
    before = f"{planned_solver}:{diffusion.get('num_inference_steps')}"
    if diffusion.get("warm_start"):
        before += f"@{diffusion['warm_start']:g}"
    diffusion.pop(LEGACY_SOLVER_KEY, None)
    diffusion.update(solver=chosen.solver, num_inference_steps=int(chosen.num_inference_steps),
                     warm_start=chosen.warm_start)
    quality = next(c["quality"] for c in record["candidates"] if c["setting"] == chosen.label())
    notes = [n for n in entry.get("notes", []) if not str(n).startswith(PLANS_NOTE_PREFIX)]
    notes.append(f"{PLANS_NOTE_PREFIX} {chosen.label()} ({chosen.network_calls} network call(s) per sample), chosen "
                 f"by spinediff tune_sampling for {trainer} on {len(record['cases'])} validation case(s) of folds "
                 f"{', '.join(record['folds'])}: {record['rule']} ({record['metric']} {quality:.4g}, "
                 f"{len(record['candidates'])} candidates); the planned guess was {before}.")
    entry["notes"] = notes
    write_json(plans, plans_file)


def run_tune_sampling(args: argparse.Namespace) -> int:
    record = tune_sampling(args.dataset, args.configuration, args.trainer, folds=args.folds,
                           candidates=args.candidates, tolerance=args.tolerance, max_cases=args.max_cases,
                           plans_identifier=args.plans, device=args.device, write=not args.dry_run,
                           overwrite=args.overwrite)
    print(f"{'candidate':<14} {'calls':>5} {record['metric']:>36} {'s/case':>8}")
    for row in record["candidates"]:
        mark = "  <- chosen" if row["setting"] == record["choice"] else ""
        print(f"{row['setting']:<14} {row['network_calls']:>5} {row['quality']:>36.4f} "
              f"{row['seconds_per_case']:>8.1f}{mark}")
    where = record.get("file", "not written (--dry-run)")
    if "plans" in record:
        where += f"; recorded in {record['plans']}"
    print(f"chosen on {len(record['cases'])} validation case(s): {record['choice']} ({record['rule']}); {where}")
    return 0


def _candidate(text: str) -> str:
    """``--candidates``: each ``SOLVER:STEPS[@WARM]`` read while parsing, before any model is loaded."""
    try:
        SamplingSetting.parse(text)
    except SpineDiffError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from spinediff.utilities.argtypes import fold, fraction, positive_int
    from spinediff.utilities.device import add_device_argument

    parser = subparsers.add_parser(
        "tune_sampling",
        help="choose a trained diffusion model's solver and steps on its cross-validation",
        description=(
            "Predict the validation cases of each trained fold with every candidate SOLVER:STEPS[@WARM] (one "
            "sample, same seed) and keep the one with the fewest network calls per sample whose quality "
            "(segmentation: Dice; images: MAE) is within --tolerance of the best candidate's. The choice goes "
            "into the model folder as sampling.json; `spinediff predict` uses it unless --solver, --steps or "
            "--warm-start are given (or --plans-sampling)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    parser.add_argument("-c", "--configuration", required=True, help="plans configuration, e.g. 2d_diffusion")
    parser.add_argument("-tr", "--trainer", required=True, help="trainer class name")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS, help="plans identifier")
    parser.add_argument("-f", "--folds", nargs="+", type=fold, default=None, help="folds (default: every trained fold)")
    parser.add_argument("--candidates", nargs="+", metavar="SOLVER:STEPS[@WARM]", type=_candidate,
                        help=f"settings to compare (default: {' '.join(DDPM_CANDIDATES)}; rectified flow: "
                             f"{' '.join(FLOW_CANDIDATES)})")
    parser.add_argument("--tolerance", type=fraction, default=TOLERANCE, help="relative quality loss accepted")
    parser.add_argument("--max-cases", type=positive_int, default=None, help="validation cases per fold (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the comparison, write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace the model's existing sampling.json")
    add_device_argument(parser, "where to sample")
    parser.set_defaults(func=run_tune_sampling)
