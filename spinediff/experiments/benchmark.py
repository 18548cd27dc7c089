"""``spinediff benchmark``: competing methods of a dataset's task, same folds, same budget, one table.

Segmentation: nnU-Net's own ``nnUNetTrainer`` (CPU-sized configuration ``2d_cpu``/``3d_fullres_cpu``
when the plans have it, i.e. the same topology as the diffusion network) vs
``DiffusionSegmentationTrainer``. Translation: diffusion image mode (x0) vs noise mode (epsilon) vs
``RegressionTrainer`` vs ``Pix2PixTrainer``. Every method is trained (or reused) on the same folds with
the same schedule and wall-clock budget, its fold validation exports (raw geometry) are scored with
:mod:`spinediff.evaluation.evaluate`, and each method is compared with the baseline by a paired
Wilcoxon signed-rank test over cases.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy import stats

from spinediff.datasets.dataset_json import check_ignore_label, foreground_labels, ignore_label
from spinediff.errors import SpineDiffError
from spinediff.evaluation.evaluate import dice_per_case, evaluate_folders, summarise
from spinediff.evaluation.report import csv_text, schedule_cell
from spinediff.experiments.folds import Method, MethodResult, collect_result, train_folds
from spinediff.io import ensure_writable_folder, read_json, write_json, write_text
from spinediff.paths import DEFAULT_PLANS
from spinediff.tasks import Task
from spinediff.utilities.environment import describe, software_environment
from spinediff.utilities.lock import folder_lock


def methods_for(task: Task, configurations: list[str], dims: tuple[str, ...] = ("2d",),
                ordered: tuple[str, ...] = ()) -> list[Method]:
    """The competing methods of ``task`` for the planned configurations (2D and/or 3D): the task's methods on the
    diffusion configuration, nnU-Net's own on its CPU (else its default) configuration of the same dimension.
    ``ordered``: the configurations whose plans know the labels' order along the spine (methods that need it are
    offered on those only)."""
    methods: list[Method] = []
    for dim in dims:
        diffusion = f"{dim}_diffusion"
        if diffusion not in configurations:
            continue
        nnunet = next((c for c in (f"{dim}_cpu", f"{dim}_fullres_cpu", dim, f"{dim}_fullres") if c in configurations),
                      None)
        for spec in task.benchmark_methods(dim.upper()):
            if spec.nnunet and nnunet is None:
                continue
            if spec.needs_level_order and (nnunet if spec.nnunet else diffusion) not in ordered:
                continue
            methods.append(Method(spec.label, spec.trainer, nnunet if spec.nnunet else diffusion, spec.prediction_type,
                                  spec.baseline, spec.opt_in))
    return methods


def select_methods(methods: list[Method], names: list[str] | None) -> list[Method]:
    """The methods named in ``names`` (a trainer class, ``TRAINER:eps|v`` for a prediction-type variant, or a
    configuration-qualified ``TRAINER@CONFIG``); all but the opt-in ones when ``names`` is empty."""
    if not names:
        return [m for m in methods if not m.opt_in]

    def keys(method: Method) -> set[str]:
        base = method.trainer + (f":{method.prediction_type}" if method.prediction_type else "")
        return {base, f"{base}@{method.configuration}"}

    unknown = [n for n in names if not any(n in keys(m) for m in methods)]
    if unknown:
        offered = sorted({k for m in methods for k in keys(m) if "@" not in k})
        raise SpineDiffError(f"--methods: no method {', '.join(unknown)}; this task offers {', '.join(offered)}.")
    return [m for m in methods if keys(m) & set(names)]


def refinement_initials(methods: list[Method], offered: list[Method], plans, task: Task) -> dict[str, Method]:
    """Each refiner among ``methods`` (a trainer that refines another model's fold exports,
    ``DiffusionRefinementTrainer``) → the method whose answers it refines: the one among ``offered`` whose results
    folder is the refiner's initial model (nnU-Net's for segmentation, the regression of the same configuration for
    translation). Its folds are trained first and its training time counts in the refiner's row."""
    from spinediff.training.refinement import initial_model_for
    from spinediff.training.registry import is_refiner

    initials = {}
    for method in methods:
        if not is_refiner(method.trainer):
            continue
        patch_dims = len(plans.configuration(method.configuration).manager.patch_size)
        name = initial_model_for(plans.planned_names, method.configuration, task, patch_dims)
        initial = next((m for m in offered if m.folder_name == name), None)
        if initial is None:
            raise SpineDiffError(f"{method.name} refines the answers of {name}, which this benchmark does not offer; "
                                 "plan its configuration (spinediff plan).")
        initials[method.name] = initial
    return initials


def reference_folder(raw_dataset: Path, task: Task, target_channel: int | None, work: Path) -> Path:
    """Segmentation: labelsTr. Images: a folder of links CASE.nii.gz → imagesTr/CASE_{target}.nii.gz."""
    if task.writes_labels:
        return raw_dataset / "labelsTr"
    ending = read_json(raw_dataset / "dataset.json")["file_ending"]
    folder = work / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    for image in (raw_dataset / "imagesTr").glob(f"*_{target_channel:04d}{ending}"):
        link = folder / (image.name[: -len(f"_{target_channel:04d}{ending}")] + ending)
        if not link.exists():
            os.symlink(image, link)
    return folder


def score_method(result: MethodResult, results_root: Path, reference: Path, task: Task,
                 data_range: tuple[float, float], masks: Path | None = None, ignore: int | None = None,
                 labels: list[int] | None = None) -> None:
    """Per-case metrics of a method's fold validation exports (a translation's also the SynthRAD challenges' metrics,
    inside the body masks of ``masks``, else inside the reference > -500 HU); a segmentation's without the voxels of
    the references' ``ignore`` label (nnU-Net's), over ``labels`` (default: those in each reference; a level the
    reference lacks but the prediction has then counts, as in nnU-Net's summary)."""
    for fold in result.folds:
        folder = (results_root / result.method.folder_name
                  / f"fold_{fold}" / "validation")
        evaluation = evaluate_folders(reference, folder, task=task.evaluation_kind, labels=labels,
                                      data_range=data_range, progress=False, challenge=task.challenge_metrics,
                                      mask_folder=masks if task.challenge_metrics else None, ignore_label=ignore)
        if task.writes_labels:
            for case, dices in dice_per_case(evaluation.rows).items():
                result.per_case.setdefault(case, {}).update(dices)
            for row in evaluation.rows:
                result.per_case[row["case"]][f"hd95_{row['label']}"] = row["hd95"]
            for case, scores in result.per_case.items():
                hd95 = [v for k, v in scores.items() if k.startswith("hd95_") and k != "hd95" and math.isfinite(v)]
                scores["hd95"] = float(np.mean(hd95)) if hd95 else float("nan")
                prediction = next(iter(sorted(folder.glob(f"{case}.*"))), None)
                reference_file = next(iter(sorted(reference.glob(f"{case}.*"))), None)
                if prediction is not None and reference_file is not None:
                    scores["dice_merged"] = merged_foreground_dice(reference_file, prediction, ignore)
        else:
            for row in evaluation.rows:
                result.per_case[row["case"]] = {k: v for k, v in row.items() if k != "case"}


def covers_every_fold(folder: Path, folds) -> bool:
    """Whether ``folds`` hold every fold of the model ``folder`` with a finished validation: a decision made on them
    then rests on all the cross-validation there is and replaces one made on fewer folds or older results (a run on
    some of the folds keeps the decision it finds)."""
    validated = {p.parent.parent.name[len("fold_"):] for p in folder.glob("fold_*/validation/summary.json")}
    return validated <= {str(f) for f in folds}


def score_postprocessing(result: MethodResult, results_root: Path, raw: Path, labels: list[int], out: Path,
                         ending: str = ".nii.gz", ignore: int | None = None) -> None:
    """Decide the level-numbering post-processing on the method's cross-validation (as ``find_best`` does), write
    it next to the model (replacing another decision only when this run's folds are all the model's,
    :func:`covers_every_fold`) and add each case's Dice after it (``dice_pp``, and
    per label ``dice_pp_L``; the plain Dice where it is not kept)."""
    from spinediff.inference.postprocessing import determine_postprocessing, validation_pairs, write_decision

    folder = results_root / result.method.folder_name
    pairs = validation_pairs(folder, [str(f) for f in result.folds], raw)
    slug = "".join(ch if ch.isalnum() else "_" for ch in result.method.name).strip("_")
    decision, dice = determine_postprocessing(pairs, labels, out / f"postprocessing_{slug}.json", ignore)
    result.postprocessing = decision.to_dict()
    if not write_decision(result.postprocessing, folder, overwrite=covers_every_fold(folder, result.folds)):
        result.postprocessing["note"] = (f"{folder} holds another postprocessing.json and was kept; this run's "
                                         f"decision is in {out / f'postprocessing_{slug}.json'}")
        print(f"[benchmark] {result.method.name}: the model folder's postprocessing.json was made on other folds "
              f"or results and is kept (this run's folds {', '.join(map(str, result.folds))} are not all the "
              f"folds it has validated); this run's decision: {out / f'postprocessing_{slug}.json'}; `spinediff "
              "find_best --overwrite` replaces it", flush=True)
    from spinediff.inference.review import write_cross_validation_rule

    write_cross_validation_rule(folder, pairs, labels, raw if raw is not None and raw.is_dir() else None)
    for prediction, _ in pairs:
        case = prediction.name[:-len(ending)]
        if case in result.per_case:
            per_label = dice["after"][prediction.name]
            values = list(per_label.values())
            result.per_case[case]["dice_pp"] = float(np.nanmean(values)) if values else float("nan")
            for label, value in per_label.items():
                result.per_case[case][f"dice_pp_{label}"] = value


def postprocessed_answers(initial: Method, folds: list, results_root: Path, raw: Path, labels: list[int],
                          ignore: int | None = None) -> None:
    """Before its refiners validate: the initial model's post-processing decided on its cross-validation (as
    :func:`score_postprocessing` and ``find_best`` decide it) and, when one is kept, each fold's validation answers
    post-processed with probabilities that agree with it, into ``fold_F/validation_postprocessed``: a refiner starts
    from the answers a user of the initial model gets (``DiffusionRefinementTrainer.initial_answers_folder``)."""
    from spinediff.inference.postprocess_command import postprocess_folder
    from spinediff.inference.postprocessing import (
        Postprocessing,
        determine_postprocessing,
        validation_pairs,
        write_decision,
    )
    from spinediff.training.refinement import POSTPROCESSED_ANSWERS

    folder = results_root / initial.folder_name
    decision, _ = determine_postprocessing(validation_pairs(folder, [str(f) for f in folds], raw), labels,
                                           ignore=ignore)
    write_decision(decision.to_dict(), folder)  # an existing decision is kept, and used below
    if not Postprocessing.load(folder).active:
        return
    print(f"[benchmark] {initial.name}: its cross-validation keeps the level numbering; its refiners start from its "
          "answers numbered", flush=True)
    for fold in folds:
        fold_folder = folder / f"fold_{fold}"
        postprocess_folder(fold_folder / "validation", fold_folder / POSTPROCESSED_ANSWERS, folder, overwrite=True,
                           progress=False, save_probabilities=True)


def stress_methods(outcomes: list[MethodResult], results: Path, folds: list, options, workers: int = 1) -> None:
    """The stress test of every method's folds (``spinediff benchmark --stress``), with the validation's sampling
    settings, ``workers`` scans side by side (:func:`~spinediff.experiments.stress.stress_shares`); adds
    ``dice_stress`` and ``dice_stress_worst`` to its row."""
    from spinediff.experiments.stress import StressSettings, stress_test
    from spinediff.inference.models import ModelFolder

    settings = StressSettings(folds=tuple(str(f) for f in folds), steps=options.num_inference_steps,
                              samples=options.validation_samples, device=str(options.device or "auto"),
                              command="spinediff benchmark --stress", workers=workers)
    for result in outcomes:
        print(f"[benchmark] stress test of position and field of view: {result.method.name}", flush=True)
        record = stress_test(ModelFolder.open(results / result.method.folder_name), settings)
        result.set_metrics["dice_stress"] = record["stress_dice"]
        result.set_metrics["dice_stress_worst"] = record["stress_dice_worst"]


def merged_foreground_dice(reference: Path, prediction: Path, ignore: int | None = None) -> float:
    """Dice of all foreground labels merged into one (e.g. the vertebral bodies regardless of level number):
    tells a wrong level number (high merged, low per-level Dice) from a missed structure. The reference's voxels
    of the ``ignore`` label (nnU-Net's) are left out."""
    import SimpleITK as sitk

    from spinediff.metrics.segmentation_metrics import case_dice, without_ignored

    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(reference)))
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction)))
    predicted, truth = without_ignored(predicted, truth, ignore)
    return case_dice((predicted > 0).astype(np.uint8), (truth > 0).astype(np.uint8), [1])["1"]


def paired_test(values: dict[str, float], baseline: dict[str, float]) -> tuple[float, int]:
    """Two-sided Wilcoxon signed-rank p-value over cases both methods scored (NaN if < 2 or all equal)."""
    cases = [c for c in values if c in baseline and math.isfinite(values[c]) and math.isfinite(baseline[c])]
    if len(cases) < 2:
        return float("nan"), len(cases)
    a, b = np.array([values[c] for c in cases]), np.array([baseline[c] for c in cases])
    if np.allclose(a, b):
        return 1.0, len(cases)
    return float(stats.wilcoxon(a, b).pvalue), len(cases)


def benchmark_table(results: list[MethodResult], task: Task) -> tuple[list[dict], str]:
    """Rows (one per method) and the Markdown table."""
    metric, higher_is_better = task.primary_metric, task.higher_is_better
    baseline = next((r for r in results if r.method.baseline), results[0])
    names = sorted({k for r in results for case in r.per_case.values() for k in case})
    rows = []
    for r in results:
        row = {"method": r.method.name, "trainer": r.method.trainer, "configuration": r.method.folder_configuration,
               "cases": len(r.per_case), "epochs": r.epochs, "train_minutes": r.train_seconds / 60,
               "inference_s_per_case": r.inference_seconds_per_case,
               "network_evals_per_window": r.network_evaluations_per_window}
        for name in names:
            row[name] = summarise([case.get(name, float("nan")) for case in r.per_case.values()])["mean"]
        row.update(r.set_metrics)
        p, n = paired_test({c: v[metric] for c, v in r.per_case.items()},
                           {c: v[metric] for c, v in baseline.per_case.items()})
        row[f"wilcoxon_p_vs_{baseline.method.name}"] = float("nan") if r is baseline else p
        if any("dice_pp" in case for case in r.per_case.values()):  # the same test after each one's post-processing
            p_pp, _ = paired_test({c: v["dice_pp"] for c, v in r.per_case.items() if "dice_pp" in v},
                                  {c: v["dice_pp"] for c, v in baseline.per_case.items() if "dice_pp" in v})
            row[f"wilcoxon_p_pp_vs_{baseline.method.name}"] = float("nan") if r is baseline else p_pp
        rows.append(row)
    shown = [m for m in ("dice", "dice_pp", "dice_1", "dice_2", "dice_3", "dice_4", "dice_5", "dice_merged", "hd95",
                         "psnr", "ssim", "mae", "mae_body", "mae_bone", "synthrad_mae", "synthrad_psnr",
                         "synthrad_ms_ssim", "dice_downstream", "adjacent_ratio_z",
                         "adjacent_ratio_y", "adjacent_ratio_x") if m in names]
    shown += [m for m in ("frechet", "dice_stress", "dice_stress_worst") if any(m in r.set_metrics for r in results)]
    post_processed = any(f"wilcoxon_p_pp_vs_{baseline.method.name}" in row for row in rows)
    header = ["method", *shown, "train min", "epochs", "s/case", "NFE/window", "Wilcoxon p",
              *(["Wilcoxon p (dice_pp)"] if post_processed else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        p = row[f"wilcoxon_p_vs_{baseline.method.name}"]
        cells = [row["method"], *[f"{row.get(m, float('nan')):.3g}" if m == "frechet" else
                                  f"{row.get(m, float('nan')):.3f}"
                                  for m in shown], f"{row['train_minutes']:.1f}", str(row["epochs"]),
                 f"{row['inference_s_per_case']:.1f}", str(row["network_evals_per_window"]),
                 "baseline" if math.isnan(p) and row["method"] == baseline.method.name else f"{p:.3g}"]
        if post_processed:
            p_pp = row.get(f"wilcoxon_p_pp_vs_{baseline.method.name}", float("nan"))
            cells.append("baseline" if row["method"] == baseline.method.name else f"{p_pp:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    folds = sorted({f for r in results for f in r.per_fold}, key=str)
    if folds and any(r.per_fold for r in results):
        lines += ["", "Schedule per fold (steps trained / final learning rate):", "",
                  "| method | " + " | ".join(f"fold {f}" for f in folds) + " |", "|---|" + "---|" * len(folds)]
        for r in results:
            cells = [schedule_cell(r.per_fold.get(f)) for f in folds]
            lines.append(f"| {r.method.name} | " + " | ".join(cells) + " |")
    levels = sorted((n for n in names if n.startswith("dice_pp_")), key=lambda n: int(n.rsplit("_", 1)[1]))
    if levels:
        lines += ["", "After the post-processing (per label):", "",
                  "| method | dice_pp | " + " | ".join(levels) + " |", "|---|---|" + "---|" * len(levels)]
        for row in rows:
            lines.append(f"| {row['method']} | {row['dice_pp']:.3f} | "
                         + " | ".join(f"{row[n]:.3f}" for n in levels) + " |")
    direction = "higher" if higher_is_better else "lower"
    lines.append("")
    lines.append(f"Primary metric: {metric} ({direction} is better); Wilcoxon signed-rank test over cases against "
                 f"{baseline.method.name}" + (" (and on dice_pp, each method after its own post-processing)"
                                              if post_processed else "")
                 + ". NFE/window: network evaluations per window position at inference.")
    if "adjacent_ratio_z" in shown:
        lines.append("adjacent_ratio_z|y|x: through-plane consistency, the mean absolute difference between "
                     "neighbouring voxels along that array axis in the body, synthetic / real (1: as smooth as the "
                     "real image; a 2D model slicing that axis samples each slice with its own noise).")
    if "synthrad_ms_ssim" in shown:
        lines.append("synthrad_mae|psnr|ms_ssim: the SynthRAD challenges' metrics as their public code defines them "
                     "(in the body mask; HU clipped to [-1024, 3000] for PSNR and MS-SSIM), comparable to the "
                     "leaderboards (documentation/evaluation.md).")
    if "frechet" in shown:
        lines.append("frechet: Fréchet distance between the synthetic and the real CT of the validation cases in the "
                     "downstream segmenter's encoder features (per fold, averaged over the folds; lower is better).")
    if "dice_stress" in shown:
        lines.append("dice_stress: mean level Dice of the validation scans cropped, padded and shifted along the spine "
                     "and as they are (the stress test of position and field of view, each model's "
                     "stress_position.json; spinediff find_best ranks on it); dice_stress_worst: its worst variant.")
    if "dice_pp" in shown:
        lines.append("dice_pp: mean Dice after the level-numbering post-processing where the method's cross-validation "
                     "keeps it (spinediff find_best's rule), else the plain Dice; dice_1.. are before it.")
    return rows, "\n".join(lines)


def run_benchmark(dataset: str | int, *, folds: list | None = None, budget_minutes: float | None = None,
                  dims: tuple[str, ...] = ("2d",), options=None, output: str | os.PathLike | None = None,
                  reuse: bool = True, methods: list[Method] | None = None, downstream: bool = False,
                  workers: int = 1, method_names: list[str] | None = None, stress: bool = False) -> dict:
    """Train/reuse every method of the dataset's task and write benchmark.md/.csv/.json and a figure.

    ``downstream`` (translation): also train nnU-Net on the real CT of the same folds and budget and score
    every method's synthetic CT by that segmenter's Dice (``dice_downstream``), next to its Dice on the
    real CT (:mod:`spinediff.experiments.downstream`).

    ``budget_minutes``: training time per method and fold; None uses the plans' schedule (``spinediff plan
    --budget``), or 10 minutes for plans made without one. ``workers``: folds trained side by side, each in
    its own process with one torch thread. ``method_names``: a subset of the task's methods (:func:`select_methods`).

    ``stress`` (segmentation of ordered levels): after the cross-validation, each method's folds also predict their
    validation scans cropped, padded and shifted along the spine (:mod:`spinediff.experiments.stress`); the table gains
    ``dice_stress`` (mean level Dice over the variants, plain included) and ``dice_stress_worst``, and each model
    folder a ``stress_position.json``, on which ``spinediff find_best`` then ranks.
    """
    from spinediff.paths import nnunet_folder
    from spinediff.planning.plans import SpineDiffPlans
    from spinediff.tasks import task_spec
    from spinediff.training.api import TrainingOptions, resolve_preprocessed_dataset, setup_environment

    preprocessed, results = setup_environment(None, None)
    name = resolve_preprocessed_dataset(dataset, preprocessed)
    plans = SpineDiffPlans.read(preprocessed / name / f"{DEFAULT_PLANS}.json")
    dataset_json = read_json(preprocessed / name / "dataset.json")
    spec = task_spec(dataset_json)
    ordered = tuple(c for c in plans.planned_names if plans.configuration(c).levels_axis is not None)
    offered = methods_for(spec.task, plans.planned_names, dims, ordered)
    methods = methods or select_methods(offered, method_names)
    if ignore_label(dataset_json) is not None:
        check_ignore_label(spec.task, name)
    if not methods:
        raise SpineDiffError(f"No method to benchmark for {name}: plan 2d_diffusion/3d_diffusion first.")
    # a refiner's initial model is trained first (and shown) even when --methods names the refiner alone
    initials = refinement_initials(methods, offered + methods, plans, spec.task)
    if getattr(options, "combine", None) == "spinesegdiff" and not (spec.task.writes_labels and initials):
        raise SpineDiffError("--combine spinesegdiff combines a segmentation refiner's class probabilities "
                             "(DiffusionRefinementTrainer on a segmentation dataset); "
                             + (f"{name} is a {spec.task.name} dataset." if not spec.task.writes_labels else
                                "--methods names no refiner."))
    added = [m for m in dict.fromkeys(initials.values()) if m not in methods]
    if added:
        print(f"[benchmark] also training {', '.join(m.name for m in added)}: the refinement row refines its "
              "answers", flush=True)
        methods = added + methods
    from spinediff.planning.completion import verify_for_training

    for method in methods:  # an interrupted or damaged preprocessing is refused before any fold starts
        if method.configuration in plans:
            identifier = plans.configuration(method.configuration).manager.data_identifier
            verify_for_training(preprocessed / name, identifier, dataset, method.configuration)
    options = options or TrainingOptions()
    planned = any(m.configuration in plans and plans.configuration(m.configuration).schedule for m in methods)
    if not planned:  # plans made without --budget: the schedule this harness always used
        budget_minutes = 10.0 if budget_minutes is None else budget_minutes
        options.iterations_per_epoch = options.iterations_per_epoch or 50
        options.val_iterations_per_epoch = options.val_iterations_per_epoch or 2
    options.budget_minutes = budget_minutes
    folds = folds if folds is not None else [0, 1, 2, 3, 4]
    splits_file = preprocessed / name / "splits_final.json"  # every fold is checked before the first is trained
    count = len(read_json(splits_file)) if splits_file.is_file() else 5
    beyond = [str(f) for f in folds if str(f) != "all" and not (str(f).isdigit() and int(f) < count)]
    if beyond:
        where = splits_file if splits_file.is_file() else "nnU-Net's default split"
        raise SpineDiffError(f"Fold(s) {', '.join(beyond)} do not exist: {where} has folds 0-{count - 1}. Choose "
                             "among them with -f (or 'all').")
    if stress:  # checked before any training: a task with ordered levels
        if not spec.task.writes_labels:
            raise SpineDiffError(f"--stress moves the labelled levels of a segmentation dataset; {name} is a "
                                 f"{spec.task.name} dataset.")
        from spinediff.experiments.stress import dataset_level_order

        dataset_level_order(nnunet_folder("raw") / name)
    out = ensure_writable_folder(Path(output) if output else results / name / "spinediff_benchmark")
    with folder_lock(out):  # one benchmark per output folder, held to the end
        raw = nnunet_folder("raw") / name
        target = spec.target_channels[0] if spec.target_channels else None
        reference = reference_folder(raw, spec.task, target, out)
        # a dataset made by `spinediff convert` keeps the body mask as labelsTr > 0 (the challenge metrics' mask)
        masks = raw / "labelsTr" if (dataset_json.get("spinediff") or {}).get("body_mask") == "labels" else None
        data_range = (-1024.0, 3071.0)
        if spec.task.has_image_target:
            intensity = plans.configuration("2d_diffusion").target_intensity if "2d_diffusion" in plans else None
            if intensity:
                data_range = intensity.mappings[0].clip_range
        from spinediff.training.registry import find_trainer, is_spinediff_trainer

        if any(is_spinediff_trainer(m.trainer) and find_trainer(m.trainer).needs_target_segmenter for m in methods):
            # the perception loss's frozen segmenter: the downstream segmenter of the same folds, trained first
            from spinediff.experiments.downstream import train_downstream_segmenter

            segmenter_folder, _ = train_downstream_segmenter(name, folds, options, reuse=reuse)
            options.perception_model = str(segmenter_folder)
        # every (method, fold) in one queue, so that side-by-side workers never wait for a method to finish
        # a refiner validates from its initial model's fold exports (nnU-Net's, the regression's): refiners run in a
        # second wave, after every fold of the initial model is trained and validated
        refiners = [m for m in methods if m.name in initials]
        labels, ignore = foreground_labels(dataset_json), ignore_label(dataset_json)
        timings = {}
        for wave in ([m for m in methods if m not in refiners], refiners):
            if wave is refiners and refiners and spec.task.writes_labels:  # refiners start after its post-processing
                for initial in {m.name: m for m in initials.values()}.values():
                    postprocessed_answers(initial, folds, results / name, raw, labels, ignore)
            jobs = [(method, fold) for fold in folds for method in wave]
            timings.update(zip([(m.name, str(f)) for m, f in jobs], train_folds(jobs, name, options, reuse, workers)
                               if jobs else [], strict=True))
        outcomes = []
        for method in methods:
            result = collect_result(method, folds, [timings[(method.name, str(f))] for f in folds])
            initial = initials.get(method.name)
            if initial is not None:  # the row's cost includes the model whose answers it refines
                result.train_seconds += sum(timings[(initial.name, str(f))]["train_seconds"] for f in folds)
                result.inference_seconds_per_case += timings[(initial.name, str(folds[-1]))][
                    "inference_seconds_per_case"]
            score_method(result, results / name, reference, spec.task, data_range, masks, ignore,
                         labels if spec.task.writes_labels else None)
            if spec.task.writes_labels:
                score_postprocessing(result, results / name, raw, labels, out, dataset_json["file_ending"], ignore)
            outcomes.append(result)
        if stress:
            stress_methods(outcomes, results / name, folds, options, workers)
        extra = {}
        if downstream and spec.task.has_downstream_dice:
            from spinediff.experiments.downstream import score_downstream

            extra = score_downstream(name, folds, outcomes, options, reference, reuse=reuse)
        rows, table = benchmark_table(outcomes, spec.task)
        if extra:
            table += (f"\n\nDownstream Dice (dice_downstream): {extra['segmenter']}, trained on the real CT of the "
                      f"same folds ({extra['epochs']} epochs, {extra['train_minutes']:.1f} min), segments each "
                      f"method's synthetic CT of the validation cases; on the real CT it reaches Dice "
                      f"{extra['dice_real_ct']:.3f}.")
        summary = {"dataset": name, "task": spec.task.name, "folds": folds, "budget_minutes": budget_minutes,
                   "options": asdict(options), "methods": rows,
                   "per_fold": {r.method.name: r.per_fold for r in outcomes},
                   "postprocessing": {r.method.name: r.postprocessing for r in outcomes},
                   "per_case": {r.method.name: r.per_case for r in outcomes}, "downstream": extra or None,
                   # where `spinediff report` finds the models, images and references of this benchmark
                   "results_folder": str(results), "raw_folder": str(raw.parent), "reference_folder": str(reference),
                   "model_folders": {r.method.name: r.method.folder_name
                                     for r in outcomes},
                   "environment": software_environment()}  # what a repeat needs to train the same draw
        write_json(summary, out / "benchmark.json")
        write_text(csv_text(rows), out / "benchmark.csv")
        budget_text = f"{budget_minutes:g} min" if budget_minutes is not None else "the plans' schedule"
        combined = (" The refinement's validation samples are combined as SpineSegDiff does (--combine "
                    "spinesegdiff), not averaged." if options.combine == "spinesegdiff" else "")
        write_text(f"# Benchmark: {name} ({spec.task.name})\n\nFolds {folds}, budget {budget_text} per method and "
                   f"fold.{combined}\n\n{table}\n\n{describe(summary['environment'])}\n", out / "benchmark.md")
        from spinediff.evaluation.figures import metric_boxplot

        metric = spec.task.primary_metric
        metric_boxplot({r.method.name: [c[metric] for c in r.per_case.values()] for r in outcomes}, metric,
                       out / "benchmark.png", title=f"{name}: {metric} per case")
        summary["table"] = table
        summary["output"] = str(out)
        return summary
