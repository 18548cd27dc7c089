"""``spinediff demo``: the main job, end to end on the built-in synthetic phantom.

generate → register (landmarks) → validate → plan (CPU target) → preprocess → train tiny models
(diffusion segmentation vs nnU-Net; translation image mode vs regression) on fold 0 → predict the
held-out cases with sample ensembles and uncertainty → evaluate → report (Markdown + HTML).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinediff.datasets.phantom import PhantomSettings
from spinediff.datasets.phantom_writer import write_phantom_datasets
from spinediff.datasets.validate import validate_dataset
from spinediff.errors import SpineDiffError
from spinediff.evaluation.report import write_report
from spinediff.experiments.demo_report import BASELINE_GLOBAL, BASELINE_ORACLE, build_sections
from spinediff.inference.inputs import RUN_SUMMARY, read_run_summary
from spinediff.io import ensure_new_output, ensure_writable_folder, read_json, write_json
from spinediff.paths import DEFAULT_PLANS, model_folder_name
from spinediff.planning.plans import SpineDiffPlans
from spinediff.tasks import get_task
from spinediff.utilities.argtypes import non_negative_int
from spinediff.utilities.device import add_device_argument
from spinediff.utilities.lock import folder_lock


@dataclass(frozen=True)
class DemoProfile:
    phantom: PhantomSettings
    cases: int
    epochs: int
    iterations_per_epoch: int
    budget_minutes: float | None
    num_inference_steps: int | None
    samples: int


PROFILES = {
    # --quick: tiny volumes, a few iterations: checks the whole pipeline in about two minutes.
    "quick": DemoProfile(PhantomSettings(mr_shape=(48, 64, 8), mr_spacing=(3.2, 3.2, 7.0), ct_spacing=(3.0, 3.0, 3.0)),
                         cases=5, epochs=2, iterations_per_epoch=4, budget_minutes=None, num_inference_steps=2,
                         samples=2),
    # default: small clinical-like volumes, 600 training steps per model (about 2 minutes each on 2 idle
    # cores; < 15 minutes in all). A fixed number of steps keeps the results independent of machine load;
    # the 2.5-minute budget per model (five models: two segmenters, two translators, the CT segmenter of the
    # downstream Dice) only caps the run time on a busy machine.
    "full": DemoProfile(PhantomSettings(mr_shape=(64, 96, 12), mr_spacing=(2.4, 2.2, 4.5), ct_spacing=(2.0, 2.0, 2.0)),
                        cases=10, epochs=15, iterations_per_epoch=40, budget_minutes=2.5, num_inference_steps=None,
                        samples=3),
}
SEG_ID, TRANSLATION_ID, REGISTERED_ID = 901, 902, 904


@dataclass
class DemoResult:
    output: Path
    stages: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    report_html: Path | None = None


#: Seconds per stage measured on an idle 2-core machine (full: the run of 2026-12-05 in documentation/results.md,
#: 11:53 in all; quick: the test suite's runs), for the remaining-time estimate printed after each stage.
EXPECTED_STAGE_SECONDS = {
    "quick": {"phantom": 2, "register": 2, "validate": 1, "plan + preprocess": 10,
              "train + validate (segmentation)": 25, "train + validate (translation)": 45,
              "predict with uncertainty": 5, "evaluate + report": 10},
    "full": {"phantom": 7, "register": 3, "validate": 1, "plan + preprocess": 10,
             "train + validate (segmentation)": 285, "train + validate (translation)": 395,
             "predict with uncertainty": 10, "evaluate + report": 3},
}


CONSOLE_LOG = "demo_console.log"
#: What the quiet console lets through: the demo's own lines and the trainings' epoch lines.
QUIET_CONSOLE_LINES = re.compile(r"^\[demo\] |^\[[^\]]+, fold [^\]]+\] epoch ")


class ConsoleFilter(io.TextIOBase):
    """A text stream that writes everything to ``log`` and only the complete lines matching ``keep`` to
    ``console`` (progress bars' carriage-return updates count as lines, so they are dropped too)."""

    def __init__(self, console, log, keep: re.Pattern) -> None:
        super().__init__()
        self.console, self.log, self.keep = console, log, keep
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        *lines, self.pending = re.split(r"[\r\n]", self.pending)
        for line in lines:
            if self.keep.search(line):
                self.console.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()


#: Stages whose time scales with the machine's compute speed (network steps and sampling). The others (writing the
#: phantom, registration, validation, planning and preprocessing: seconds, mostly I/O) say nothing about the rest;
#: scaling by them made the ETA after planning half the time actually left (issue 36).
COMPUTE_STAGES = ("train + validate (segmentation)", "train + validate (translation)", "predict with uncertainty",
                  "evaluate + report")
#: Trainings per stage (the budget per model caps their time on a slow machine).
TRAININGS_PER_STAGE = {"train + validate (segmentation)": 2, "train + validate (translation)": 3}


def remaining_seconds(expected: dict[str, float], done: dict[str, float], budget_minutes: float | None = None) -> float:
    """The expected seconds of the stages not yet done.

    Each remaining stage costs its own expected seconds, scaled only by how much slower (or faster) than expected the
    finished *compute* stages ran (``COMPUTE_STAGES``; between 0.5x and 4x); the short I/O-bound first stages never
    scale the rest. A training stage is capped by its trainings' time budget (``budget_minutes`` per model, plus its
    expected validation time), since the budget ends a training on a slow machine.
    """
    finished = [name for name in done if name in COMPUTE_STAGES and expected.get(name, 0) > 0]
    spent = sum(done[name] for name in finished)
    planned = sum(expected[name] for name in finished)
    speed = min(4.0, max(0.5, spent / planned)) if planned > 0 and spent > 0 else 1.0
    left = 0.0
    for name, seconds in expected.items():
        if name in done:
            continue
        estimate = seconds * speed if name in COMPUTE_STAGES else seconds
        trainings = TRAININGS_PER_STAGE.get(name)
        if trainings and budget_minutes:
            estimate = min(estimate, trainings * budget_minutes * 60 + 0.15 * seconds)
        left += estimate
    return left


def eta_accuracy(etas: dict[str, float], stages: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per finished stage: the ETA printed after it, the time that was actually left, and their ratio."""
    names = list(stages)
    rows = {}
    for index, name in enumerate(names):
        if name not in etas:
            continue
        actual = sum(stages[later] for later in names[index + 1:])
        rows[name] = {"eta_seconds": etas[name], "actual_seconds": actual,
                      "ratio": etas[name] / actual if actual > 0 else float("nan")}
    return rows


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class _Stopwatch:
    """One console line per finished stage: its time, the elapsed time and an estimate of the time left."""

    def __init__(self, result: DemoResult, expected: dict[str, float], budget_minutes: float | None = None) -> None:
        self.result = result
        self.expected = expected
        self.budget_minutes = budget_minutes
        self.etas: dict[str, float] = {}
        self.started = time.perf_counter()

    def __call__(self, name: str):
        result, expected, started, watch = self.result, self.expected, self.started, self

        class _Stage:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                result.stages[name] = time.perf_counter() - self.start
                if exc[0] is not None:
                    return
                number = list(expected).index(name) + 1 if name in expected else len(result.stages)
                left = remaining_seconds(expected, result.stages, watch.budget_minutes)
                watch.etas[name] = left
                print(f"[demo] {number}/{len(expected)} {name:<32} {result.stages[name]:6.1f} s | elapsed "
                      f"{_clock(time.perf_counter() - started)} | ETA {_clock(left)}", flush=True)

        return _Stage()


def _environment(out: Path) -> dict[str, Path]:
    folders = {kind: out / f"nnUNet_{kind}" for kind in ("raw", "preprocessed", "results")}
    for key, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[f"nnUNet_{key}"] = str(folder)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    return folders


def _register(folders: dict[str, Path]) -> tuple[Path, list]:
    from spinediff.registration.api import RegistrationSettings, register_dataset
    from spinediff.registration.inputs import find_unaligned_cases, labels_from_parent_dataset

    unaligned = folders["raw"] / "Dataset902_SpinePhantomTranslation" / "unaligned"
    output = folders["raw"] / f"Dataset{REGISTERED_ID}_SpinePhantomRegistered"
    outcome = register_dataset(find_unaligned_cases(unaligned), output, RegistrationSettings(),
                               label_names=labels_from_parent_dataset(unaligned))
    if outcome.failures:
        print(f"[demo] registration failed for {[r.case for r in outcome.failures]}")
    return output, outcome.reports


def _linear_mr_baselines(raw: Path, training: list[str], cases: list[str],
                         data_range: tuple[float, float]) -> dict[str, dict[str, dict]]:
    """The MR-as-CT baselines translation must clearly beat: the MR channels mapped to HU by one linear map
    fitted on the training cases (what an intensity mapping without anatomy achieves), and the best linear
    map fitted on each held-out case's own CT (an oracle: an upper bound for any global intensity mapping)."""
    from spinediff.metrics.image_metrics import image_metrics

    def load(case: str) -> tuple[np.ndarray, np.ndarray]:
        channels = [sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / f"{case}_{c:04d}.nii.gz")))
                    for c in range(3)]
        ct = channels[2].astype(np.float64)
        return np.stack([channels[0].ravel(), channels[1].ravel(), np.ones(ct.size)], axis=1), ct

    pairs = [load(case) for case in training]
    shared, *_ = np.linalg.lstsq(np.concatenate([d for d, _ in pairs]), np.concatenate([c.ravel() for _, c in pairs]),
                                 rcond=None)
    scores: dict[str, dict[str, dict]] = {BASELINE_GLOBAL: {}, BASELINE_ORACLE: {}}
    for case in cases:
        design, ct = load(case)
        own, *_ = np.linalg.lstsq(design, ct.ravel(), rcond=None)
        for name, coefficients in ((BASELINE_GLOBAL, shared), (BASELINE_ORACLE, own)):
            scores[name][case] = image_metrics((design @ coefficients).reshape(ct.shape), ct, data_range)
    return scores


def run_demo(output: str | Path, *, quick: bool = False, seed: int = 0, overwrite: bool = False,
             verbose: bool = False, device: str | object = "auto") -> DemoResult:
    """Run the whole pipeline into ``output``; returns timings, the summary and the report path. Without
    ``verbose`` the console shows one line per stage and per training epoch; everything else (nnU-Net's banners,
    progress bars, warnings) goes to ``OUTPUT/demo_console.log``."""
    profile = PROFILES["quick" if quick else "full"]
    out = Path(output).expanduser().resolve()
    ensure_writable_folder(out, create=False)
    with folder_lock(out):  # one demo per folder, held to the end; the folder is checked under it
        ensure_new_output(out, overwrite=overwrite)
        ensure_writable_folder(out)
        if verbose:
            return _run_stages(out, profile, quick, seed, overwrite, verbose, device)
        # Quiet console: every line still goes to demo_console.log; the console shows ours only (stages, epochs).
        with open(out / CONSOLE_LOG, "a", encoding="utf-8") as log:
            console = ConsoleFilter(sys.stdout, log, QUIET_CONSOLE_LINES)
            with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
                try:
                    return _run_stages(out, profile, quick, seed, overwrite, verbose, device)
                finally:
                    console.flush()


def _run_stages(out: Path, profile: DemoProfile, quick: bool, seed: int, overwrite: bool,
                verbose: bool, device: object = "auto") -> DemoResult:
    from spinediff.experiments.benchmark import Method, run_benchmark
    from spinediff.planning.api import plan_dataset
    from spinediff.training.api import TrainingOptions

    result = DemoResult(out)
    expected = EXPECTED_STAGE_SECONDS["quick" if quick else "full"]
    print(f"[demo] {len(expected)} stages, about {_clock(sum(expected.values()))} (min:s) on 2 idle cores; one line "
          f"per stage, then the results", flush=True)
    stage = _Stopwatch(result, expected, profile.budget_minutes)
    folders = _environment(out)
    started = time.perf_counter()

    with stage("phantom"):
        datasets = write_phantom_datasets(folders["raw"], num_cases=profile.cases, seed=seed, settings=profile.phantom,
                                          tasks=("segmentation", "translation"), preview=True, overwrite=overwrite)
    with stage("register"):
        registered, registration_reports = _register(folders)
    with stage("validate"):
        for folder in (datasets["segmentation"], registered):
            report = validate_dataset(folder)
            if not report.ok:
                raise SpineDiffError(f"demo dataset failed validation:\n{report.summary()}")
    with stage("plan + preprocess"):
        plan_dataset(SEG_ID, configurations=["2d_diffusion", "2d_cpu"], device="cpu", num_processes=1,
                     show_progress_bar=False, overwrite=overwrite)
        plan_dataset(REGISTERED_ID, configurations=["2d_diffusion"], device="cpu", num_processes=1,
                     show_progress_bar=False, overwrite=overwrite)

    options = TrainingOptions(epochs=profile.epochs, iterations_per_epoch=profile.iterations_per_epoch,
                              val_iterations_per_epoch=1, num_inference_steps=profile.num_inference_steps,
                              validation_samples=1, console_log=verbose, device=device)
    benchmarks = {}
    with stage("train + validate (segmentation)"):
        benchmarks["segmentation"] = run_benchmark(
            SEG_ID, folds=[0], budget_minutes=profile.budget_minutes or 1e6, options=options,
            methods=[Method("nnU-Net 2D", "nnUNetTrainer", "2d_cpu", baseline=True),
                     Method("Diffusion segmentation 2D", "DiffusionSegmentationTrainer", "2d_diffusion")])
    with stage("train + validate (translation)"):
        benchmarks["translation"] = run_benchmark(
            REGISTERED_ID, folds=[0], budget_minutes=profile.budget_minutes or 1e6, options=options,
            methods=[Method("Regression U-Net 2D", "RegressionTrainer", "2d_diffusion", baseline=True),
                     Method("Diffusion image mode (x0) 2D", "DiffusionTranslationTrainer", "2d_diffusion")],
            downstream=True)
    with stage("predict with uncertainty"):
        predictions = _predict_with_uncertainty(folders, profile, device)
    with stage("evaluate + report"):
        result.summary = _summarise(folders, benchmarks, registration_reports, predictions)
        result.summary["stages_seconds"] = result.stages
        result.summary["total_seconds"] = time.perf_counter() - started
        result.report_html = _report(out, folders, datasets, registered, benchmarks, registration_reports,
                                     predictions, result)
    result.summary["stages_seconds"] = result.stages
    result.summary["total_seconds"] = time.perf_counter() - started
    result.summary["eta_accuracy"] = eta_accuracy(stage.etas, result.stages)
    write_json(result.summary, out / "demo_summary.json")
    return result


def _validation_cases(results: Path, dataset: str, trainer: str, configuration: str) -> list[str]:
    folder = results / dataset / model_folder_name(trainer, configuration) / "fold_0" / "validation"
    return sorted(p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz"))


def _predict_with_uncertainty(folders: dict[str, Path], profile: DemoProfile, device: object = "auto") -> dict:
    """Sample ensembles of the diffusion models on the held-out cases, with uncertainty maps."""
    try:
        from spinediff.inference.api import predict
    except ImportError:  # the predictor is optional for older checkouts
        return {"skipped": "spinediff.inference.api.predict is not available"}
    outputs = {}
    for task, dataset, trainer, raw_name, channels in (
            ("segmentation", "Dataset901_SpinePhantomSeg", "DiffusionSegmentationTrainer",
             "Dataset901_SpinePhantomSeg", (0, 1)),
            ("translation", f"Dataset{REGISTERED_ID}_SpinePhantomRegistered", "DiffusionTranslationTrainer",
             f"Dataset{REGISTERED_ID}_SpinePhantomRegistered", (0, 1))):
        cases = _validation_cases(folders["results"], dataset, trainer, "2d_diffusion")
        inputs = folders["results"].parent / "predict_inputs" / task
        inputs.mkdir(parents=True, exist_ok=True)
        for case in cases:
            for c in channels:
                source = folders["raw"] / raw_name / "imagesTr" / f"{case}_{c:04d}.nii.gz"
                link = inputs / source.name
                if not link.exists():
                    os.symlink(source, link)
        target = folders["results"].parent / "predictions" / task
        predict(inputs, target, dataset, "2d_diffusion", trainer, folds=[0], num_samples=profile.samples,
                num_inference_steps=profile.num_inference_steps, save_uncertainty=True, seed=0, device=device)
        outputs[task] = {"folder": str(target), "cases": cases}
    return outputs


def _summarise(folders, benchmarks, registration_reports, predictions) -> dict:
    seg, trans = benchmarks["segmentation"], benchmarks["translation"]
    ok = [r for r in registration_reports if r.status == "ok"]
    tre = [r.tre_mm.get("mean", np.nan) for r in ok if r.tre_mm]
    summary = {
        "registration": {"cases": len(registration_reports), "failed": len(registration_reports) - len(ok),
                         "median_tre_mm": float(np.median(tre)) if tre else None},
        "segmentation": {row["method"]: {"dice": row.get("dice"), "train_minutes": row["train_minutes"]}
                         for row in seg["methods"]},
        "translation": {row["method"]: {"psnr": row.get("psnr"), "mae_body": row.get("mae_body"),
                                        "ssim": row.get("ssim")} for row in trans["methods"]},
        "predictions": predictions,
    }
    raw = folders["raw"] / f"Dataset{REGISTERED_ID}_SpinePhantomRegistered"
    cases = list(next(iter(trans["per_case"].values())).keys())
    plans = SpineDiffPlans.read(folders["preprocessed"] / raw.name / f"{DEFAULT_PLANS}.json")
    clip = plans.configuration("2d_diffusion").target_intensity.mappings[0].clip_range
    training = read_json(folders["preprocessed"] / raw.name / "splits_final.json")[0]["train"]
    for name, scores in _linear_mr_baselines(raw, training, cases, clip).items():
        summary["translation"][name] = {m: float(np.mean([b[m] for b in scores.values()]))
                                        for m in ("psnr", "mae_body", "ssim", "mae_bone")}
    summary.update(_ensemble_scores(folders, predictions, raw, clip))
    downstream = trans.get("downstream")
    if downstream:
        for row in trans["methods"]:
            summary["translation"][row["method"]]["dice_downstream"] = row.get("dice_downstream")
        summary["translation_downstream_dice_real_ct"] = downstream["dice_real_ct"]
    return summary


def ensemble_name(method: str, samples: int) -> str:
    return f"{method}, mean of K = {samples} samples"


def _ensemble_scores(folders: dict[str, Path], predictions: dict, registered: Path,
                     clip: tuple[float, float]) -> dict:
    """Scores of the predict stage's outputs (the ensemble of K samples per case), beside the single-sample
    validation rows: SpineSegDiff averages the class probabilities of its samples, and the mean of K
    translation samples is the ensemble estimate of the CT."""
    from spinediff.evaluation.evaluate import dice_per_case, evaluate_folders
    from spinediff.experiments.benchmark import reference_folder

    segmentation, translation = get_task("segmentation"), get_task("translation")
    scores: dict[str, dict] = {segmentation.name: {}, translation.name: {}}
    for task, method, reference in (
            (segmentation, "Diffusion segmentation 2D",
             folders["raw"] / "Dataset901_SpinePhantomSeg" / "labelsTr"),
            (translation, "Diffusion image mode (x0) 2D",
             reference_folder(registered, translation, 2, folders["results"].parent / "ensemble_scores"))):
        entry = predictions.get(task.name)
        if not isinstance(entry, dict):
            continue
        folder = Path(entry["folder"])
        samples = read_run_summary(folder / RUN_SUMMARY).get("num_samples") or None
        rows = evaluate_folders(reference, folder, task=task.evaluation_kind, data_range=clip, progress=False).rows
        if task.writes_labels:
            scores[task.name][ensemble_name(method, samples)] = {
                "dice": float(np.nanmean([c["dice"] for c in dice_per_case(rows).values()]))}
        else:
            scores[task.name][ensemble_name(method, samples)] = {
                m: float(np.mean([r[m] for r in rows])) for m in ("psnr", "mae_body", "ssim", "mae_bone")}
    return {"ensembles": scores}


def _report(out, folders, datasets, registered, benchmarks, registration_reports, predictions, result) -> Path:
    sections = build_sections(out, folders, datasets, registered, benchmarks, registration_reports, predictions,
                              result)
    _, page = write_report("spinediff demo report", sections, out)
    return page


def _run(args: argparse.Namespace) -> int:
    result = run_demo(args.output, quick=args.quick, seed=args.seed, overwrite=args.overwrite, verbose=args.verbose,
                      device=args.device)
    print(f"[demo] results in {result.output}")
    log = result.output / CONSOLE_LOG
    print(f"[demo] total {result.summary['total_seconds']:.1f} s (per stage: above, and in demo_summary.json)"
          + (f"; full console log: {log}" if log.is_file() else ""))
    for method, scores in result.summary["segmentation"].items():
        print(f"[demo] segmentation {method}: Dice {scores['dice']:.3f}")
    for method, scores in result.summary["translation"].items():
        downstream = scores.get("dice_downstream")
        print(f"[demo] translation {method}: PSNR {scores['psnr']:.2f} dB, MAE(body) {scores['mae_body']:.1f} HU"
              + (f", downstream Dice {downstream:.3f}" if downstream is not None else ""))
    for task, rows in result.summary.get("ensembles", {}).items():
        for method, scores in rows.items():
            text = (f"Dice {scores['dice']:.3f}" if "dice" in scores
                    else f"PSNR {scores['psnr']:.2f} dB, MAE(body) {scores['mae_body']:.1f} HU")
            print(f"[demo] {task} {method}: {text}")
    if "translation_downstream_dice_real_ct" in result.summary:
        print(f"[demo] CT segmenter on the real CT: Dice {result.summary['translation_downstream_dice_real_ct']:.3f}")
    print(f"[demo] report: {result.report_html}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the main job end to end on the built-in synthetic phantom",
        description="Generate the synthetic spine phantom, register MR/CT with landmarks, plan for the CPU, train "
                    "diffusion segmentation vs nnU-Net and diffusion MR->CT translation vs a regression U-Net on fold "
                    "0, predict held-out cases with sample ensembles and uncertainty maps, evaluate, and write "
                    "report.md / report.html. 10-14 minutes on 2 CPU cores, under 15 on a busy machine (--quick: "
                    "about 2 minutes); one console line per stage with the time left and one per training epoch "
                    "(everything else goes to OUTPUT/demo_console.log).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-o", "--output", default="demo_output", help="output folder (nnU-Net folders, report)")
    parser.add_argument("--quick", action="store_true", help="tiny volumes and a few iterations (pipeline check)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="phantom seed")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo output")
    add_device_argument(parser, "where the demo trains and predicts (the plans stay CPU-sized: the demo's "
                                "profile fixes its size and schedule)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show nnU-Net's training log on the console (it is always in each fold's "
                             "training_log_*.txt); default: one line per stage and per training epoch")
    parser.set_defaults(func=_run)
