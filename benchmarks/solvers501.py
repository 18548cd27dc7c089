"""Network calls vs Dice on real MRI: DDIM against the multistep solvers (issue 20), Dataset501 5-fold CV.

Reads a finished ``spinediff benchmark -d 501`` (``DiffusionSegmentationTrainer`` on ``2d_diffusion``), predicts
each fold's held-out cases with its own model (``spinediff predict``, post-processing off) for every setting
``SOLVER:STEPS[@WARM]`` (one sample, the same seed, so the initial noise is the same for every setting) and scores
the mean L1-L5 Dice of each case against its manual labels. Network calls per sample = steps (no guidance, no
mirroring on the CPU), plus one with a warm start (``@0.5``: sampling starts at t = 0.5 T from the network's
one-call estimate, ``spinediff predict --warm-start 0.5``). The reference is cold DDIM with the most steps given.

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


def parse(text: str) -> tuple[str, int, float]:
    """``SOLVER:STEPS[@WARM]`` → (solver, steps, warm start; 0 = cold)."""
    solver, _, rest = text.partition(":")
    steps, _, warm = rest.partition("@")
    return solver, int(steps), float(warm or 0)


def work_folder(results_root: Path, solver: str, steps: int, warm: float, samples: int) -> Path:
    return results_root / "solvers" / (f"{solver}_s{steps}_k{samples}" + (f"_w{warm:g}" if warm else ""))


def predict_fold(fold: int, cases: list[str], raw: Path, out: Path, solver: str, steps: int, warm: float,
                 samples: int) -> None:
    import spinediff
    from spinediff.io import write_json

    if all((out / f"{case}.nii.gz").is_file() for case in cases) and (out / "timing.json").is_file():
        return
    inputs = cv.link_inputs(cases, raw, out)
    trainer, configuration = cv.METHODS["diffusion"]
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
    parser.add_argument("--settings", nargs="+", required=True, metavar="SOLVER:STEPS[@WARM]",
                        help="e.g. ddim:10 dpm++2m:5 unipc:5 ddim:2@0.5")
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
        (solver, steps, warm), fold = parse(args.job[0]), int(args.job[1])
        predict_fold(fold, splits[fold]["val"], raw, work_folder(results_root, solver, steps, warm, args.samples) /
                     f"fold_{fold}", solver, steps, warm, args.samples)
        return 0
    settings = [parse(t) for t in args.settings]
    cv.run_jobs([[__file__, "--settings", t, "--samples", str(args.samples), "--job", t, str(f)]
                 for t in args.settings for f in range(len(splits))], args.workers)
    labels = {case: cv.read_array(raw / "labelsTr" / f"{case}.nii.gz")[0] for s in splits for case in s["val"]}
    rows = []
    for solver, steps, warm in settings:
        work = work_folder(results_root, solver, steps, warm, args.samples)
        per_case = {case: case_dice(cv.read_array(work / f"fold_{fold}" / f"{case}.nii.gz")[0], labels[case])
                    for fold, split in enumerate(splits) for case in split["val"]}
        seconds = [read_json(work / f"fold_{f}" / "timing.json")["seconds_per_case"] for f in range(len(splits))]
        rows.append({"solver": solver, "steps": steps, "warm_start": warm or None,
                     "network_calls_per_sample": steps + (1 if warm else 0),
                     "mean_dice": float(np.mean(list(per_case.values()))), "per_case": per_case,
                     "seconds_per_case": float(np.mean(seconds))})
    cold_ddim = [r for r in rows if r["solver"] == "ddim" and not r["warm_start"]]
    reference = max(cold_ddim, key=lambda r: r["steps"], default=rows[0])
    lines = [f"Dataset501 5-fold CV, {len(labels)} held-out cases, K = {args.samples}; reference "
             f"{reference['solver']} {reference['steps']} steps (mean Dice {reference['mean_dice']:.3f}).", "",
             "| solver | steps | warm start | network calls per sample | mean L1-L5 Dice | vs reference | "
             "within 1 % | s / case |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r["vs_reference"] = r["mean_dice"] / reference["mean_dice"] - 1
        r["within_1_percent"] = bool(r["mean_dice"] >= (1 - TOLERANCE) * reference["mean_dice"])
        warm = f"t = {r['warm_start']:g} T" if r["warm_start"] else "-"
        lines.append(f"| {r['solver']} | {r['steps']} | {warm} | {r['network_calls_per_sample']} | "
                     f"{r['mean_dice']:.3f} | {100 * r['vs_reference']:+.1f} % | "
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
