"""``spinediff report``: one self-contained HTML page for a benchmark or an evaluation folder.

A ``spinediff benchmark`` folder (``benchmark.json``) gets its tables (methods, levels after post-processing,
the schedule each fold trained), box plots per case, the training curves of each method's first fold and a
panel of the best, median and worst cases (image, reference, every method's prediction and, where a method
kept its class probabilities, their entropy as an uncertainty map). A ``spinediff evaluate`` folder
(``summary.json`` + ``per_case.csv``) gets its tables, a box plot per label and the same kind of panel.
The renderer is the demo's (:mod:`spinediff.evaluation.report`).
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from spinediff.errors import SpineDiffError
from spinediff.evaluation.figures import (
    checkpoint_logging,
    metric_boxplot,
    optional_image,
    qualitative_panel,
    training_curves,
)
from spinediff.evaluation.report import Section, Table, fmt, schedule_cell, write_report
from spinediff.io import read_json
from spinediff.metrics.direction import higher_is_better
from spinediff.paths import model_folder_name
from spinediff.tasks import SEGMENTATION_KIND, Task, get_task
from spinediff.utilities.lock import LOCK_NAME, folder_lock

#: Summary columns of a benchmark table (in this order, where present); per-level columns go to their own table.
SUMMARY_METRICS = ("dice", "dice_pp", "dice_merged", "dice_stress", "dice_stress_worst", "hd95", "dice_downstream",
                   "psnr", "ssim", "mae_body", "mae_bone", "synthrad_mae", "synthrad_psnr", "synthrad_ms_ssim",
                   "frechet", "adjacent_ratio_z", "fid")
#: Colour range (HU) of the translation error maps: errors beyond it saturate.
ERROR_MAP_HU = 500
CASE_COUNT = 3


def report_kind(folder: Path) -> str:
    """'benchmark' or 'evaluation', from the files the folder holds."""
    if (folder / "benchmark.json").is_file():
        return "benchmark"
    if (folder / "summary.json").is_file() and (folder / "per_case.csv").is_file():
        return "evaluation"
    raise SpineDiffError(f"{folder} is neither a `spinediff benchmark` folder (benchmark.json) nor a `spinediff "
                         "evaluate` output (summary.json and per_case.csv). Point -i at one of them.")


def write_folder_report(folder: str | os.PathLike, output: str | os.PathLike | None = None,
                        results: str | os.PathLike | None = None, raw: str | os.PathLike | None = None,
                        overwrite: bool = False) -> Path:
    """Write ``report.html`` (and ``report.md`` with ``figures/``) for ``folder``; returns the HTML page.

    ``output`` defaults to ``FOLDER/report``. ``results``/``raw``: where a benchmark's models and raw dataset
    are, for benchmark files that do not record them (default: nnUNet_results / nnUNet_raw).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SpineDiffError(f"{folder} is not a folder. Give a benchmark or evaluation output folder.")
    kind = report_kind(folder)
    out = Path(output) if output else folder / "report"
    out.parent.mkdir(parents=True, exist_ok=True)
    # the report folder is replaced as a whole, so its lock lies beside it; taken before the check that it is new
    with folder_lock(out.parent, name=f".{out.name}{LOCK_NAME}"):
        if out.exists() and not overwrite:
            raise SpineDiffError(f"{out} already exists. Choose another output folder (-o) or pass --overwrite.")
        # Built in a sibling folder and moved into place at the end: an error leaves no half-written report.
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            figures = work / "figures"
            figures.mkdir()
            source = folder / ("benchmark.json" if kind == "benchmark" else "summary.json")
            try:
                if kind == "benchmark":
                    title, sections = benchmark_sections(folder, figures, results, raw)
                else:
                    title, sections = evaluation_sections(folder, figures)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise SpineDiffError(f"{source} (or per_case.csv beside it) does not have the layout spinediff writes "
                                     f"({type(error).__name__}: {error}). Run `spinediff {kind}` again to rewrite "
                                     "it.") from None
            write_report(title, sections, work)
            if out.exists():
                shutil.rmtree(out)
            work.rename(out)
        finally:
            if work.exists():
                shutil.rmtree(work)
    return out / "report.html"


# ---------------------------------------------------------------------------------------------- benchmark
def _folder(recorded: str | None, given, variable: str) -> Path | None:
    for candidate in (given, recorded, os.environ.get(variable)):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def benchmark_sections(folder: Path, figures: Path, results=None, raw=None) -> tuple[str, list[Section]]:
    bench = read_json(folder / "benchmark.json")
    name, task, methods = bench["dataset"], bench["task"], bench["methods"]
    if not methods:
        raise SpineDiffError(f"{folder / 'benchmark.json'} lists no method; run the benchmark again.")
    results_root = _folder(bench.get("results_folder"), results, "nnUNet_results")
    raw_root = _folder(bench.get("raw_folder"), raw, "nnUNet_raw")
    model_folders = {row["method"]: (bench.get("model_folders") or {}).get(
        row["method"], model_folder_name(row["trainer"], row["configuration"])) for row in methods}
    budget = f"{bench['budget_minutes']:g} min" if bench.get("budget_minutes") else "the plans' schedule"
    intro = [f"{name} ({task}): folds {bench['folds']}, training budget {budget} per method and fold; every "
             f"case is scored once, by the fold that held it out (cross-validation)."]
    columns = [m for m in SUMMARY_METRICS if any(m in row for row in methods)]
    summary = Table(["method", *columns, "train min", "epochs", "s/case"],
                    [[row["method"], *[fmt(row.get(m)) for m in columns], fmt(row.get("train_minutes"), 1),
                      str(row.get("epochs", "–")), fmt(row.get("inference_s_per_case"), 1)] for row in methods],
                    "Means over the cross-validation cases. dice_pp: after the post-processing that the "
                    "cross-validation kept (level numbering); dice_merged: all foreground labels as one.")
    tables = [summary]
    levels = sorted({int(m.group(1)) for row in methods for k in row if (m := re.fullmatch(r"dice_(\d+)", k))})
    if levels:
        header = ["method", *[f"label {k}" for k in levels]]
        rows = [[row["method"], *[fmt(row.get(f"dice_{k}")) for k in levels]] for row in methods]
        rows += [[f"{row['method']} (post-processed)", *[fmt(row.get(f"dice_pp_{k}")) for k in levels]]
                 for row in methods if any(f"dice_pp_{k}" in row for k in levels)]
        tables.append(Table(header, rows, "Dice per label."))
    sections = [Section("Summary", intro, tables)]

    per_fold = bench.get("per_fold") or {}
    folds = [str(f) for f in bench["folds"]]
    if per_fold:
        rows = []
        for method, entries in per_fold.items():
            rows.append([method, *[schedule_cell(entries.get(fold)) for fold in folds]])
        sections.append(Section("Training schedule", [
            "Steps trained and the learning rate of the last epoch, per fold: a schedule that ended within the "
            "budget has annealed its learning rate to near zero."],
            [Table(["method", *[f"fold {f}" for f in folds]], rows)]))

    per_case = bench.get("per_case") or {}
    box_figures = []
    for metric in [m for m in ("dice", "dice_pp", "psnr", "mae_body") if any(
            m in case for cases in per_case.values() for case in cases.values())]:
        target = figures / f"box_{metric}.png"
        metric_boxplot({method: [c.get(metric, float("nan")) for c in cases.values()]
                        for method, cases in per_case.items()}, metric, target, title=f"{name}: {metric} per case")
        box_figures.append((target, f"{metric} per case (dots: cases)"))
    sections.append(Section("Per case", [], [], box_figures))

    if results_root is not None:
        stress = stress_section(name, model_folders, results_root, figures)
        if stress is not None:
            sections.append(stress)
        curves = {}
        for method, model in model_folders.items():
            checkpoint = results_root / name / model / f"fold_{folds[0]}" / "checkpoint_final.pth"
            if checkpoint.is_file():
                curves[method] = checkpoint_logging(checkpoint)
        if curves:
            target = figures / "training_curves.png"
            training_curves(curves, target)
            sections.append(Section("Training curves", [
                f"Fold {folds[0]}: loss per epoch and the per-epoch validation score (pseudo-Dice on patches for "
                "segmentation, SSIM of DDIM samples for image tasks)."], figures=[(target, "Training curves")]))
        panel = _benchmark_panel(bench, model_folders, results_root, raw_root, folder, figures)
        if panel is not None:
            sections.append(panel)
    else:
        sections.append(Section("Cases", ["The models' folder was not found (the benchmark file records none and "
                                          "nnUNet_results is not set): give --results to draw the cases and the "
                                          "training curves."]))
    return f"Benchmark report: {name}", sections


def stress_section(name: str, model_folders: dict, results_root: Path, figures: Path) -> Section | None:
    """The stress test of each method whose model folder has one (``spinediff benchmark --stress``), drawn
    (:func:`~spinediff.evaluation.stress_figure.stress_figure`); None when no method has one."""
    from spinediff.evaluation.stress_figure import stress_figure
    from spinediff.inference.find_best import STRESS_FILE

    drawn = []
    for method, model in model_folders.items():
        record = results_root / name / model / STRESS_FILE
        if record.is_file():
            target = figures / f"stress_{re.sub(r'[^A-Za-z0-9_.-]', '_', method)}.png"
            stress_figure(read_json(record), target)
            drawn.append((target, f"{method}: the stress test of position and field of view"))
    if not drawn:
        return None
    return Section("Stress test", [
        "Each validation scan predicted by the fold that held it out, as it is and cropped, padded or shifted along "
        "the spine: every scan's mean L1-L5 Dice per variant (red crosses: below 0.5, the levels numbered wrong; "
        "rings: flagged by the model's review rule), the variant's mean (bar), the plain cross-validation (dashed) "
        "and the target of plain - 0.05 (dotted)."], figures=drawn)


def _ranked_cases(per_case: dict, task: Task) -> list[str]:
    """Worst, median and best case by the mean over methods of the primary metric."""
    metric = "dice_pp" if any("dice_pp" in c for cases in per_case.values() for c in cases.values()) else (
        task.primary_metric)
    higher = higher_is_better(metric, default=True)
    scores: dict[str, list[float]] = {}
    for cases in per_case.values():
        for case, values in cases.items():
            value = values.get(metric)
            if value is not None and math.isfinite(value):
                scores.setdefault(case, []).append(value)
    ordered = sorted(scores, key=lambda c: np.mean(scores[c]), reverse=not higher)  # worst first
    if len(ordered) <= CASE_COUNT:
        return ordered
    return [ordered[0], ordered[len(ordered) // 2], ordered[-1]]


def _entropy_map(probabilities_file: Path, like: sitk.Image | None) -> sitk.Image | None:
    """Voxel-wise entropy (nats) of a saved ``CASE.npz``'s class probabilities on ``like``'s grid."""
    if like is None or not probabilities_file.is_file():
        return None
    from spinediff.inference.postprocessing import load_probabilities
    from spinediff.prediction.statistics import class_entropy

    try:
        probabilities = load_probabilities(probabilities_file).astype(np.float32)
    except SpineDiffError:
        return None
    if probabilities.shape[1:] != sitk.GetArrayFromImage(like).shape:
        return None
    entropy = class_entropy(torch.from_numpy(probabilities), channel_axis=0).numpy()
    image = sitk.GetImageFromArray(entropy.astype(np.float32))
    image.CopyInformation(like)
    return image


def _error_map(prediction: sitk.Image | None, reference: sitk.Image | None) -> sitk.Image | None:
    """Voxel-wise absolute error |prediction - reference| (HU), where both exist on the same grid."""
    if prediction is None or reference is None or prediction.GetSize() != reference.GetSize():
        return None
    error = np.abs(sitk.GetArrayFromImage(prediction).astype(np.float32)
                   - sitk.GetArrayFromImage(reference).astype(np.float32))
    image = sitk.GetImageFromArray(error)
    image.CopyInformation(reference)
    return image


def _find_validation(results_root: Path, name: str, model: str, case: str, ending: str) -> Path | None:
    for path in sorted((results_root / name / model).glob(f"fold_*/validation/{case}{ending}")):
        return path
    return None


def _benchmark_panel(bench: dict, model_folders: dict, results_root: Path, raw_root: Path | None, folder: Path,
                     figures: Path) -> Section | None:
    name, task = bench["dataset"], get_task(bench["task"], "benchmark.json")
    cases = _ranked_cases(bench.get("per_case") or {}, task)
    if not cases:
        return None
    ending = ".nii.gz"
    raw_dataset = raw_root / name if raw_root is not None else None
    if raw_dataset is not None and (raw_dataset / "dataset.json").is_file():
        ending = read_json(raw_dataset / "dataset.json").get("file_ending", ending)
    segmentation = task.writes_labels
    if segmentation:
        references = raw_dataset / "labelsTr" if raw_dataset else None
    else:
        references = Path(bench["reference_folder"]) if bench.get("reference_folder") else folder / "reference"
    rows = []
    for label, case in zip(("worst", "median", "best"), cases, strict=False):
        row: dict = {"_name": f"{case} ({label})",
                     "image": optional_image(raw_dataset / "imagesTr" / f"{case}_0000{ending}")
                     if raw_dataset else None,
                     "reference": optional_image(references / f"{case}{ending}") if references else None}
        for i, model in enumerate(model_folders.values()):
            prediction = _find_validation(results_root, name, model, case, ending)
            row[f"m{i}"] = optional_image(prediction)
            if segmentation and prediction is not None:
                row[f"u{i}"] = _entropy_map(prediction.with_name(f"{case}.npz"), row[f"m{i}"])
        rows.append(row)
    if all(value is None for row in rows for key, value in row.items() if key != "_name"):
        return None
    if segmentation:
        columns = [("image", "image", {"cmap": "gray"}), ("reference", "reference", {"overlay_on": "image"})]
        for i, method in enumerate(model_folders):
            columns.append((method, f"m{i}", {"overlay_on": "image"}))
        for i, method in enumerate(model_folders):
            if any(row.get(f"u{i}") is not None for row in rows):
                columns.append((f"{method}: entropy", f"u{i}", {"cmap": "magma"}))
        text = ("Mid-sagittal slices of the worst, median and best case (mean over methods of the Dice), label "
                "overlays on the image. Entropy maps (nats) of a method's class probabilities appear where its "
                "validation kept them (`spinediff train --npz`; `spinediff predict --save-uncertainty` writes the "
                "diffusion samples' uncertainty for new cases).")
    else:
        window = {"cmap": "gray", "vmin": -250, "vmax": 1250}
        columns = [("input", "image", {"cmap": "gray"}), ("reference", "reference", window)]
        columns += [(method, f"m{i}", window) for i, method in enumerate(model_folders)]
        text = "Mid-sagittal slices of the worst, median and best case (mean over methods of the MAE in the body)."
    target = figures / "cases.png"
    qualitative_panel(rows, columns, target, f"{name}: held-out cases")
    shown = [(target, "Worst, median and best case")]
    if not segmentation:
        for row in rows:
            for i in range(len(model_folders)):
                row[f"e{i}"] = _error_map(row.get(f"m{i}"), row.get("reference"))
        if any(row.get(f"e{i}") is not None for row in rows for i in range(len(model_folders))):
            errors = [("reference", "reference", window)]
            errors += [(f"{method}: |error|", f"e{i}", {"cmap": "magma", "vmin": 0, "vmax": ERROR_MAP_HU})
                       for i, method in enumerate(model_folders)]
            target = figures / "case_errors.png"
            qualitative_panel(rows, errors, target, f"{name}: absolute error of each method (HU)")
            shown.append((target, "Absolute error per method"))
            text += (f" The second figure shows each method's absolute error against the real CT on the same slices "
                     f"(0 to {ERROR_MAP_HU} HU; larger errors saturate).")
    return Section("Cases", [text], figures=shown)


# --------------------------------------------------------------------------------------------- evaluation
def evaluation_sections(folder: Path, figures: Path) -> tuple[str, list[Section]]:
    summary = read_json(folder / "summary.json")
    with open(folder / "per_case.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SpineDiffError(f"{folder / 'per_case.csv'} holds no case; run `spinediff evaluate` again.")
    prediction_folder = Path(summary["prediction_folder"]) if summary.get("prediction_folder") else None
    reference_folder = Path(summary["reference_folder"]) if summary.get("reference_folder") else None
    intro = [f"{summary.get('num_cases', '?')} cases scored"
             + (f": predictions in {prediction_folder}, references in {reference_folder}." if prediction_folder
                else ".")]
    if summary.get("missing_predictions"):
        intro.append(f"Without a prediction: {', '.join(summary['missing_predictions'])}.")
    sections = []
    box_figures = []
    if summary.get("task") == SEGMENTATION_KIND:
        metrics = [m for m in ("dice", "hd95", "assd", "volume_difference") if any(
            m in stats for stats in summary["per_label"].values())]
        table = Table(["label", *[f"{m} mean ± sd" for m in metrics]],
                      [[label, *[f"{fmt(stats[m]['mean'])} ± {fmt(stats[m]['std'])}" for m in metrics]]
                       for label, stats in summary["per_label"].items()]
                      + [["mean over labels", *[fmt(summary["mean_over_labels"].get(m)) for m in metrics]]])
        values = {f"label {label}": [_number(r["dice"]) for r in rows if r["label"] == label]
                  for label in summary["per_label"]}
        target = figures / "box_dice.png"
        metric_boxplot(values, "dice", target, "Dice per case and label")
        box_figures.append((target, "Dice per case and label"))
        case_scores: dict[str, list[float]] = {}
        for r in rows:
            case_scores.setdefault(r["case"], []).append(_number(r["dice"]))
        ranked = sorted(case_scores, key=lambda c: np.nanmean(case_scores[c]))
        case_table = Table(["case", "mean Dice over labels"], [[c, fmt(float(np.nanmean(case_scores[c])))]
                                                                for c in ranked], "Worst first.")
    else:
        metrics = list(summary["metrics"])
        table = Table(["metric", "mean", "sd", "95% CI"],
                      [[m, fmt(s["mean"]), fmt(s["std"]), f"{fmt(s['ci95_low'])} – {fmt(s['ci95_high'])}"]
                       for m, s in summary["metrics"].items()])
        for metric in metrics[:3]:
            target = figures / f"box_{metric}.png"
            metric_boxplot({metric: [_number(r[metric]) for r in rows]}, metric, target, f"{metric} per case")
            box_figures.append((target, f"{metric} per case"))
        first = "mae_body" if "mae_body" in metrics else metrics[0]
        sign = -1.0 if first.startswith("mae") else 1.0  # worst first: the largest error, the lowest score
        ranked = [r["case"] for r in sorted(rows, key=lambda r: sign * _number(r[first]))]
        case_table = Table(["case", *metrics], [[r["case"], *[fmt(_number(r[m])) for m in metrics]] for r in rows])
    sections.append(Section("Summary", intro, [table], box_figures))
    sections.append(Section("Per case", [], [case_table]))
    if prediction_folder is not None and reference_folder is not None:
        panel = _evaluation_panel(ranked, prediction_folder, reference_folder, summary.get("task"), figures)
        if panel is not None:
            sections.append(panel)
    return f"Evaluation report: {prediction_folder.name if prediction_folder else folder.name}", sections


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def _evaluation_panel(ranked: list[str], predictions: Path, references: Path, task: str | None,
                      figures: Path) -> Section | None:
    if len(ranked) > CASE_COUNT:
        ranked = [ranked[0], ranked[len(ranked) // 2], ranked[-1]]
    images = references.parent / "imagesTr"
    rows = []
    for label, case in zip(("worst", "median", "best"), ranked, strict=False):
        ending = next((p.name[len(case):] for p in references.glob(f"{case}.*")), ".nii.gz")
        rows.append({"_name": f"{case} ({label})", "image": optional_image(images / f"{case}_0000{ending}"),
                     "reference": optional_image(references / f"{case}{ending}"),
                     "prediction": optional_image(predictions / f"{case}{ending}"),
                     "uncertainty": optional_image(predictions / f"{case}_uncertainty{ending}")})
    if all(row["prediction"] is None for row in rows):
        return None
    if task == SEGMENTATION_KIND:
        base = "image" if any(row["image"] is not None for row in rows) else None
        overlay = {"overlay_on": base} if base else {"cmap": "tab10", "vmin": 0, "vmax": 9}
        columns = ([("image", "image", {"cmap": "gray"})] if base else []) + [
            ("reference", "reference", overlay), ("prediction", "prediction", overlay)]
    else:
        window = {"cmap": "gray", "vmin": -250, "vmax": 1250}
        columns = [("reference", "reference", window), ("prediction", "prediction", window)]
    if any(row["uncertainty"] is not None for row in rows):
        columns.append(("uncertainty", "uncertainty", {"cmap": "magma"}))
    target = figures / "cases.png"
    qualitative_panel(rows, columns, target, "Worst, median and best case")
    return Section("Cases", ["Mid-sagittal slices of the worst, median and best case; the uncertainty map where "
                             "`spinediff predict --save-uncertainty` wrote one (CASE_uncertainty)."],
                   figures=[(target, "Worst, median and best case")])
