"""``spinediff benchmark``: the competing methods of a dataset's task under one harness."""

from __future__ import annotations

import argparse

from spinediff.diffusion.refinement import COMBINATIONS
from spinediff.experiments.benchmark import run_benchmark
from spinediff.training.api import TrainingOptions
from spinediff.utilities.argtypes import duration, fold, int_range, minutes, positive_int
from spinediff.utilities.device import add_device_argument, add_precision_argument


def run(args: argparse.Namespace) -> int:
    folds = [f if f == "all" else int(f) for f in args.folds]
    options = TrainingOptions(epochs=args.epochs, iterations_per_epoch=args.iters_per_epoch,
                              val_iterations_per_epoch=args.val_iters_per_epoch,
                              num_inference_steps=args.num_inference_steps, validation_samples=args.val_samples,
                              device=args.device, precision=args.precision, combine=args.combine,
                              init_noise=args.init_noise, seed=None if args.seed < 0 else args.seed)
    budget = args.budget_minutes
    if args.budget is not None:
        from spinediff.planning.budget import parse_budget

        budget = parse_budget(args.budget) / 60.0
    summary = run_benchmark(args.dataset, folds=folds, budget_minutes=budget,
                            dims=tuple(args.dims), options=options, output=args.output, reuse=not args.retrain,
                            downstream=args.downstream, workers=args.workers, method_names=args.methods,
                            stress=args.stress)
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
    parser.add_argument("-f", "--folds", nargs="+", type=fold, default=["0", "1", "2", "3", "4"], help="folds to run")
    parser.add_argument("--budget", metavar="TIME", type=duration(),
                        help="training time per method and fold, e.g. 15m (a bare number: minutes). Default: the "
                             "plans' schedule (spinediff plan --budget), else 10 minutes. Each run's learning-rate "
                             "schedule is fitted to end with it")
    parser.add_argument("--budget-minutes", type=minutes(), default=None, help=argparse.SUPPRESS)
    add_device_argument(parser, "where every method trains and validates")
    add_precision_argument(parser)
    parser.add_argument("-j", "--workers", type=positive_int, default=1,
                        help="folds trained side by side, one process and one torch thread each (e.g. 2 on two "
                             "cores); with --stress, also the scans the stress test predicts")
    parser.add_argument("--methods", nargs="+", metavar="TRAINER",
                        help="a subset of the task's methods, by trainer class (e.g. RegressionTrainer CUTTrainer "
                             "DiffusionTranslationTrainer DiffusionTranslationTrainer:eps DiffusionTranslationTrainer:v"
                             " PerceptionRegressionTrainer Pix2PixTrainer); default: all of them")
    parser.add_argument("--dims", nargs="+", choices=["2d", "3d"], default=["2d"], help="2D and/or 3D configurations")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="epochs (default: the plans' schedule, fitted to the budget); with a budget, a cap")
    parser.add_argument("--iters-per-epoch", type=positive_int, default=None,
                        help="training iterations per epoch (default: the plans' schedule, else 50)")
    parser.add_argument("--val-iters-per-epoch", type=positive_int, default=None,
                        help="validation batches per epoch (default: the plans' schedule, else 2)")
    parser.add_argument("--steps", dest="num_inference_steps", type=positive_int,
                        help="DDIM steps at validation (default: the plans' num_inference_steps)")
    parser.add_argument("--val-samples", type=positive_int,
                        help="diffusion: samples averaged per validation case (default: the plans' num_samples, as "
                             "`spinediff predict` does; 1 scores a single sample, K times faster)")
    parser.add_argument("--init-noise", type=float, default=None, metavar="F",
                        help="a refinement model (DiffusionRefinementTrainer, ResidualRefinementTrainer): the start "
                             "level of its final validation, a fraction of the schedule in [0, 1) (default: the "
                             "plans' warm_start, else 0.3, 0.1 for ResidualRefinementTrainer); a reused fold is "
                             "validated again when it changed")
    parser.add_argument("--combine", choices=COMBINATIONS, default=None,
                        help="segmentation, the refinement row (DiffusionRefinementTrainer): combine its validation "
                             "samples as SpineSegDiff does (spinesegdiff: the last 10 steps' estimates weighted "
                             "towards the last) instead of their mean; its folds are validated again when their last "
                             "validation combined otherwise (the training is reused). Run the benchmark once with "
                             "each into two -o folders to compare them")
    parser.add_argument("-o", "--output", help="output folder (default: $nnUNet_results/DATASET/spinediff_benchmark)")
    parser.add_argument("--stress", action="store_true",
                        help="segmentation of ordered levels (e.g. L1-L5): after the cross-validation, predict each "
                             "fold's validation scans also cropped, padded and shifted along the spine and report "
                             "dice_stress (mean level Dice over the variants, plain included) and its worst variant; "
                             "each model folder gets stress_position.json, on which spinediff find_best then ranks")
    parser.add_argument("--downstream", action="store_true",
                        help="translation: also train nnU-Net on the real CT (same folds and budget) and report its "
                             "Dice on each method's synthetic CT (downstream Dice) next to its Dice on the real CT")
    parser.add_argument("--retrain", action="store_true", help="do not reuse timing/validation of finished folds")
    parser.add_argument("--seed", type=int_range(-1, 2**32 - 1), default=0,
                        help="seeds each fold's network initialisation and augmentation (as `spinediff train --seed`): "
                             "another seed repeats the benchmark with another draw, to see how much of a difference "
                             "the seed alone makes; a finished fold is reused whatever its seed, so give --retrain or "
                             "another nnUNet_results; -1 leaves them unseeded")
    parser.set_defaults(func=run)
