"""Network calls vs Dice on real MRI: DDIM, the multistep solvers, warm starts and rectified flow (issue 20).

Dataset501 (14 lumbar MRI, L1-L5), 5-fold cross-validation. Needs a finished ``spinediff benchmark -d 501``
(``DiffusionSegmentationTrainer`` on ``2d_diffusion``, the cosine schedule). Steps:

1. ``--train-rflow``: rectified flow (``2d_diffusion_rflow``: the same network, patch, batch and 10-minute
   budget) on the same folds with the benchmark's harness and side-by-side workers; plans made before the
   planner wrote ``2d_diffusion_rflow`` get it added, as ``spinediff plan`` now adds it.
2. ``spinediff tune_sampling`` on each model (``--configurations``): every candidate ``SOLVER:STEPS[@WARM]``
   predicts every held-out case of every fold with its fold's model (one sample, the same seed), scored by the
   mean L1-L5 Dice on the preprocessed grid; the choice (fewest calls within 1 % of the best candidate) is
   written to the model folder's ``sampling.json``, which ``spinediff predict`` then uses.
3. The table of both models' candidates, against cold 25-step DDIM on the cosine model as the reference.

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... OMP_NUM_THREADS=1
    python -m studies.solvers501 --train-rflow -j 2

Writes ``benchmarks/output/solvers501/{results.json,results.md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from studies import uncertainty_cv501 as cv  # noqa: E402 (the Dataset501 harness: names, folders, job runner)

TRAINER = cv.METHODS["diffusion"][0]
CANDIDATES = {
    "2d_diffusion": ["ddim:1", "ddim:2", "ddim:3", "ddim:5", "ddim:10", "ddim:25", "dpm++2m:2", "dpm++2m:3",
                     "dpm++2m:5", "dpm++2m:10", "unipc:3", "unipc:5", "ddim:2@0.5", "ddim:3@0.5", "dpm++2m:3@0.5"],
    "2d_diffusion_rflow": ["euler:1", "euler:2", "euler:3", "euler:5", "euler:10", "euler:25", "euler:2@0.5"],
}
REFERENCE = ("2d_diffusion", "ddim:25")


def train_rflow(workers: int) -> None:
    """Step 1 (module docstring)."""
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
    method = Method("diffusion (rectified flow)", TRAINER, "2d_diffusion_rflow")
    train_folds([(method, fold) for fold in range(5)], cv.NAME, TrainingOptions(validation_samples=1), reuse=True,
                workers=workers)


def tune(configuration: str) -> None:
    """Step 2 for one model (one process, one thread)."""
    from spinediff.experiments.sampling import tune_sampling

    tune_sampling(501, configuration, TRAINER, folds=[0, 1, 2, 3, 4], candidates=CANDIDATES[configuration],
                  overwrite=True, progress=False)


def table(results_root: Path, out: Path) -> int:
    """Step 3."""
    from spinediff.inference.sampling_choice import SamplingChoice
    from spinediff.io import write_json

    records = {}
    for configuration in CANDIDATES:
        choice = SamplingChoice.read(results_root / f"{TRAINER}__nnUNetPlans__{configuration}")
        if choice is not None:
            records[configuration] = dict(choice.chosen, choice=choice.setting.label())
    if REFERENCE[0] not in records:
        print(f"skipped: no sampling.json for {REFERENCE[0]} yet")
        return 0
    rows = {(c, row["setting"]): row for c, record in records.items() for row in record["candidates"]}
    reference = rows[REFERENCE]["quality"]
    lines = [f"Dataset501 5-fold CV, {len(records[REFERENCE[0]]['cases'])} held-out cases, one sample per case, "
             f"mean L1-L5 Dice on the preprocessed grid; reference: {REFERENCE[1]} on {REFERENCE[0]} "
             f"({reference:.3f}). Chosen by `spinediff tune_sampling`: "
             + ", ".join(f"{c}: **{r['choice']}**" for c, r in records.items()) + ".", "",
             "| model | solver:steps[@warm start] | network calls per sample | mean Dice | vs reference | "
             "s / case |", "|---|---|---|---|---|---|"]
    for (configuration, setting), row in rows.items():
        chosen = " (chosen)" if records[configuration]["choice"] == setting else ""
        lines.append(f"| {configuration} | `{setting}`{chosen} | {row['network_calls']} | {row['quality']:.3f} | "
                     f"{100 * (row['quality'] / reference - 1):+.1f} % | {row['seconds_per_case']:.1f} |")
    out.mkdir(parents=True, exist_ok=True)
    write_json({"dataset": cv.NAME, "reference": list(REFERENCE), "records": records}, out / "results.json")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rflow", action="store_true", help="step 1 first (-j folds side by side)")
    parser.add_argument("--configurations", nargs="*", default=list(CANDIDATES),
                        help="models to tune (step 2; none: only the table)")
    parser.add_argument("-j", "--workers", type=int, default=1, help="processes side by side")
    parser.add_argument("--tune", help=argparse.SUPPRESS)  # one tuning process
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "output" / "solvers501"))
    args = parser.parse_args(argv)
    folders = cv.dataset_folders()
    if folders is None:
        return 0
    _, results_root, _ = folders
    if args.tune:
        tune(args.tune)
        return 0
    if args.train_rflow:
        train_rflow(args.workers)
    cv.run_jobs([[*cv.module_args(__file__), "--tune", c] for c in args.configurations], args.workers)
    return table(results_root, Path(args.output))


if __name__ == "__main__":
    sys.exit(main())
