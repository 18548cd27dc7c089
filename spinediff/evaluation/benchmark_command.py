"""``spinediff benchmark``: the competing methods of a dataset's task under one harness."""

from __future__ import annotations

import argparse

from spinediff.evaluation.benchmark import run_benchmark
from spinediff.training.api import TrainingOptions


def run(args: argparse.Namespace) -> int:
    folds = [f if f == "all" else int(f) for f in args.folds]
    options = TrainingOptions(epochs=args.epochs, iterations_per_epoch=args.iters_per_epoch,
                              val_iterations_per_epoch=args.val_iters_per_epoch, sampling_steps=args.steps)
    summary = run_benchmark(args.dataset, folds=folds, budget_minutes=args.budget_minutes,
                            dims=tuple(args.dims), options=options, output=args.output, reuse=not args.retrain,
                            downstream=args.downstream)
    print(summary["table"])
    print(f"\nwritten: {summary['output']}/benchmark.md, benchmark.csv, benchmark.json, benchmark.png")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="train/reuse and cross-validate the competing methods of a dataset's task on the same folds",
        description="Segmentation: nnU-Net (nnUNetTrainer, CPU-sized configuration) vs DiffusionSegmentationTrainer. "
                    "Translation: diffusion image mode vs noise mode vs regression U-Net vs Pix2Pix. Every method gets "
                    "the same folds, schedule and wall-clock budget; finished folds are reused. Writes benchmark.md, "
                    "benchmark.csv, benchmark.json and benchmark.png with the metrics per class, training time, "
                    "inference time per case, network evaluations, and a paired Wilcoxon test against the baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or name (planned with `spinediff plan`)")
    parser.add_argument("-f", "--folds", nargs="+", default=["0", "1", "2", "3", "4"], help="folds to run")
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="wall-clock training budget per method/fold")
    parser.add_argument("--dims", nargs="+", choices=["2d", "3d"], default=["2d"], help="2D and/or 3D configurations")
    parser.add_argument("--epochs", type=int, default=1000, help="epoch limit (the budget usually stops earlier)")
    parser.add_argument("--iters-per-epoch", type=int, default=50, help="training iterations per epoch")
    parser.add_argument("--val-iters-per-epoch", type=int, default=2, help="validation batches per epoch")
    parser.add_argument("--steps", type=int, help="DDIM steps at validation (default: the plans')")
    parser.add_argument("-o", "--output", help="output folder (default: $nnUNet_results/DATASET/spinediff_benchmark)")
    parser.add_argument("--downstream", action="store_true",
                        help="translation: also train nnU-Net on the real CT (same folds and budget) and report its "
                             "Dice on each method's synthetic CT (downstream Dice) next to its Dice on the real CT")
    parser.add_argument("--retrain", action="store_true", help="do not reuse timing/validation of finished folds")
    parser.set_defaults(func=run)
