"""MR→CT translation on the phantom, Graf et al.'s comparison under one harness (issue 18): diffusion x0 / eps / v,
the regression U-Net, nnsyn's masked regression + anatomical perception loss, Pix2Pix, and CUT trained unpaired.

Every method trains the same folds of the same planned phantom translation dataset for the same wall-clock budget
(CPU), then predicts its held-out cases; PSNR, SSIM and MAE (HU, body and bone), the Fréchet distance and the
downstream Dice are compared side by side, with a Wilcoxon test per case against the regression baseline and a box
plot (``spinediff benchmark``). Results: JSON + Markdown under benchmarks/output/translation_methods/ (the table is
copied into documentation/results.md).

    python benchmarks/translation_methods.py --budget-minutes 2 --cases 20 --folds 0 1 2 --downstream
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=20.0, help="training budget per method (issue: 20)")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--dims", nargs="+", default=["2d"], choices=["2d", "3d"])
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2], help="cross-validation folds (of 5)")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset (spinediff benchmark --methods)")
    parser.add_argument("--workers", type=int, default=1, help="folds trained side by side")
    parser.add_argument("--benchmark-output", default=None,
                        help="folder of this run's benchmark.md/json (default: --output); the models stay in --output")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "output" / "translation_methods"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--downstream", action="store_true",
                        help="also train nnU-Net on the real CT (same folds and budget) and report its Dice on each "
                             "method's synthetic CT")
    args = parser.parse_args(argv)

    out = Path(args.output)
    for kind in ("raw", "preprocessed", "results"):
        (out / f"nnUNet_{kind}").mkdir(parents=True, exist_ok=True)
        os.environ[f"nnUNet_{kind}"] = str(out / f"nnUNet_{kind}")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")

    from spinediff.datasets.phantom_writer import write_phantom_datasets
    from spinediff.experiments.benchmark import run_benchmark
    from spinediff.experiments.demo import PROFILES
    from spinediff.io import write_text
    from spinediff.planning.api import plan_dataset
    from spinediff.training.api import TrainingOptions

    raw = out / "nnUNet_raw"
    if not (raw / "Dataset902_SpinePhantomTranslation").exists():
        write_phantom_datasets(raw, num_cases=args.cases, seed=args.seed, tasks=["translation"],
                               settings=PROFILES["full"].phantom)
    preprocessed = out / "nnUNet_preprocessed" / "Dataset902_SpinePhantomTranslation"
    if not all((preprocessed / f"nnUNetPlans_{d}").is_dir() for d in ("2d", *(["3d_fullres"] if "3d" in args.dims
                                                                            else []))):
        # (re)plan when a dimension's preprocessed data is missing; the plans are deterministic, the splits stay
        plan_dataset(902, configurations=[f"{d}_diffusion" for d in args.dims], device="cpu", num_processes=1,
                     overwrite=True)
    start = time.perf_counter()
    options = TrainingOptions(epochs=1000, iterations_per_epoch=40, val_iterations_per_epoch=1)
    summary = run_benchmark(902, folds=args.folds, budget_minutes=args.budget_minutes, dims=tuple(args.dims),
                            options=options, output=Path(args.benchmark_output or out), downstream=args.downstream,
                            method_names=args.methods,
                            workers=args.workers)
    command = "python benchmarks/translation_methods.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_text(f"{summary['table']}\n\nCommand: `{command}` ({(time.perf_counter() - start) / 60:.0f} min).\n",
               Path(args.benchmark_output or out) / "results.md")
    print(summary["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
