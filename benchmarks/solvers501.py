"""Network calls vs Dice on real MRI: DDIM, the multistep solvers, warm starts and rectified flow (issue 20).

Dataset501 5-fold CV. Reads a finished ``spinediff benchmark -d 501`` (``DiffusionSegmentationTrainer`` on
``2d_diffusion``), predicts each fold's held-out cases with its own model (``spinediff predict``,
post-processing off) for every setting ``[CONFIGURATION/]SOLVER:STEPS[@WARM]`` (one sample, the same seed, so
the initial noise is the same for every setting) and scores the mean L1-L5 Dice of each case against its
manual labels. Network calls per sample = steps (no guidance, no mirroring on the CPU), plus one with a warm
start (``@0.5``: sampling starts at t = 0.5 T from the network's one-call estimate, ``spinediff predict
--warm-start 0.5``). The configuration defaults to ``2d_diffusion``; ``2d_diffusion_rflow/euler:5`` reads
the rectified-flow models that ``--train-rflow`` trains with the same budget, folds and side-by-side workers
as the benchmark's. The reference is cold DDIM on ``2d_diffusion`` with the most steps given.

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... OMP_NUM_THREADS=1
    python benchmarks/solvers501.py --settings ddim:1 ddim:2 ddim:5 ddim:10 ddim:25 dpm++2m:2 dpm++2m:5 -j 2

Writes ``benchmarks/output/solvers501/{results.json,results.md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import uncertainty_cv501 as cv  # noqa: E402 (the Dataset501 harness: names, reader)

TOLERANCE = 0.01  # "within 1 % of the reference Dice"


def parse(text: str) -> tuple[str, str, int, float]:
    """``[CONFIGURATION/]SOLVER:STEPS[@WARM]`` → (configuration, solver, steps, warm start; 0 = cold)."""
    configuration, _, text = text.rpartition("/")
    solver, _, rest = text.partition(":")
    steps, _, warm = rest.partition("@")
    return configuration or cv.METHODS["diffusion"][1], solver, int(steps), float(warm or 0)


def work_folder(results_root: Path, configuration: str, solver: str, steps: int, warm: float, samples: int) -> Path:
    prefix = "" if configuration == cv.METHODS["diffusion"][1] else f"{configuration}_"
    return results_root / "solvers" / (f"{prefix}{solver}_s{steps}_k{samples}" + (f"_w{warm:g}" if warm else ""))


def train_rflow(workers: int) -> None:
    """Rectified flow on the benchmark's folds with the same trainer, budget, schedule and side-by-side workers as
    its cosine-schedule diffusion model: the plans' ``2d_diffusion_rflow`` (added to plans made before it was
    planned, as ``spinediff plan`` now adds it)."""
    from spinediff.experiments.folds import Method, train_folds
    from spinediff.io import read_json, write_json
    from spinediff.paths import nnunet_folder
    from spinediff.planning.plans import derived_configurations
    from spinediff.training.options import TrainingOptions

    plans_file = nnunet_folder("preprocessed") / cv.NAME / "nnUNetPlans.json"
    plans = read_json(plans_file)
    if "2d_diffusion_rflow" not in plans["configurations"]:
        added = {k: v for k, v in derived_configurations(plans["configurations"]).items() if k.endswith("_rflow")}
        plans["configurations"].update(added)
        write_json(plans, plans_file)
        print(f"added {', '.join(added)} to {plans_file}")
    trainer = cv.METHODS["diffusion"][0]
    method = Method("diffusion (rectified flow)", trainer, "2d_diffusion_rflow")
    train_folds([(method, fold) for fold in range(5)], cv.NAME, TrainingOptions(validation_samples=1), reuse=True,
                workers=workers)


def predict_fold(fold: int, cases: list[str], raw: Path, out: Path, configuration: str, solver: str, steps: int,
                 warm: float, samples: int) -> None:
    import spinediff
    from spinediff.io import write_json

    if all((out / f"{case}.nii.gz").is_file() for case in cases) and (out / "timing.json").is_file():
        return
    inputs = cv.link_inputs(cases, raw, out)
    trainer = cv.METHODS["diffusion"][0]
    start = time.perf_counter()
    spinediff.predict(inputs, out, 501, configuration, trainer, folds=[fold], num_samples=samples,
                      num_inference_steps=steps, sampler=solver, warm_start=warm, postprocessing=False, overwrite=True,
                      progress=False)
    write_json({"seconds_per_case": (time.perf_counter() - start) / len(cases)}, out / "timing.json")


def case_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    from spinediff.metrics.segmentation_metrics import case_dice as dice

    values = [v for v in dice(prediction, reference, cv.LEVELS).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", required=True, metavar="[CONFIGURATION/]SOLVER:STEPS[@WARM]",
                        help="e.g. ddim:10 dpm++2m:5 unipc:5 ddim:2@0.5 2d_diffusion_rflow/euler:5")
    parser.add_argument("--train-rflow", action="store_true",
                        help="first train 2d_diffusion_rflow on the five folds (-j at a time, 10-minute budget each)")
    parser.add_argument("--samples", type=int, default=1, help="samples per case (K)")
    parser.add_argument("-j", "--workers", type=int, default=1, help="(setting, fold) jobs side by side")
    parser.add_argument("--job", nargs=2, help=argparse.SUPPRESS)  # one worker: SETTING FOLD
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "output" / "solvers501"))
    args = parser.parse_args(argv)
    from spinediff.io import read_json, write_json

    folders = cv.dataset_folders()
    if folders is None:
        return 0
    raw, results_root, splits = folders
    if args.job:
        (configuration, solver, steps, warm), fold = parse(args.job[0]), int(args.job[1])
        out = work_folder(results_root, configuration, solver, steps, warm, args.samples) / f"fold_{fold}"
        predict_fold(fold, splits[fold]["val"], raw, out, configuration, solver, steps, warm, args.samples)
        return 0
    if args.train_rflow:
        train_rflow(args.workers)
    settings = [parse(t) for t in args.settings]
    cv.run_jobs([[__file__, "--settings", t, "--samples", str(args.samples), "--job", t, str(f)]
                 for t in args.settings for f in range(len(splits))], args.workers)
    labels = {case: cv.read_array(raw / "labelsTr" / f"{case}.nii.gz")[0] for s in splits for case in s["val"]}
    rows = []
    for configuration, solver, steps, warm in settings:
        work = work_folder(results_root, configuration, solver, steps, warm, args.samples)
        per_case = {case: case_dice(cv.read_array(work / f"fold_{fold}" / f"{case}.nii.gz")[0], labels[case])
                    for fold, split in enumerate(splits) for case in split["val"]}
        seconds = [read_json(work / f"fold_{f}" / "timing.json")["seconds_per_case"] for f in range(len(splits))]
        rows.append({"configuration": configuration, "solver": solver, "steps": steps, "warm_start": warm or None,
                     "network_calls_per_sample": steps + (1 if warm else 0),
                     "mean_dice": float(np.mean(list(per_case.values()))), "per_case": per_case,
                     "seconds_per_case": float(np.mean(seconds))})
    cold_ddim = [r for r in rows if r["solver"] == "ddim" and not r["warm_start"]
                 and r["configuration"] == cv.METHODS["diffusion"][1]]
    reference = max(cold_ddim, key=lambda r: r["steps"], default=rows[0])
    lines = [f"Dataset501 5-fold CV, {len(labels)} held-out cases, K = {args.samples}; reference "
             f"{reference['solver']} {reference['steps']} steps (mean Dice {reference['mean_dice']:.3f}).", "",
             "| configuration | solver | steps | warm start | network calls per sample | mean L1-L5 Dice | "
             "vs reference | within 1 % | s / case |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["vs_reference"] = r["mean_dice"] / reference["mean_dice"] - 1
        r["within_1_percent"] = bool(r["mean_dice"] >= (1 - TOLERANCE) * reference["mean_dice"])
        warm = f"t = {r['warm_start']:g} T" if r["warm_start"] else "-"
        lines.append(f"| {r['configuration']} | {r['solver']} | {r['steps']} | {warm} | "
                     f"{r['network_calls_per_sample']} | {r['mean_dice']:.3f} | {100 * r['vs_reference']:+.1f} % | "
                     f"{'yes' if r['within_1_percent'] else 'no'} | {r['seconds_per_case']:.1f} |")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json({"dataset": cv.NAME, "samples": args.samples, "reference": [reference["solver"], reference["steps"]],
                "rows": rows}, out / "results.json")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
