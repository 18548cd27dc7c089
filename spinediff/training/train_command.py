"""``spinediff train``: train one fold of one configuration with one trainer."""

from __future__ import annotations

import argparse

from spinediff.diffusion.refinement import COMBINATIONS
from spinediff.errors import SpineDiffError
from spinediff.paths import DEFAULT_PLANS
from spinediff.training.api import TrainingOptions, train
from spinediff.utilities.argtypes import (
    duration,
    existing_folder,
    fraction,
    int_range,
    minutes,
    positive_float,
    positive_int,
)
from spinediff.utilities.device import add_device_argument, add_precision_argument


def build_parser(prog: str = "torchrun --nproc-per-node N -m spinediff.run.train") -> argparse.ArgumentParser:
    """``spinediff train``'s parser on its own (for torchrun's entry, ``spinediff.run.train``)."""
    subparsers = argparse.ArgumentParser(add_help=False).add_subparsers()
    add_parser(subparsers)
    parser = subparsers.choices["train"]
    parser.prog = prog
    return parser


def run_train(args: argparse.Namespace) -> int:
    if args.distributed:  # every rank joins the torchrun job and trains its share of each batch
        from spinediff.training.distributed import distributed_session
        from spinediff.training.registry import is_spinediff_trainer, trainer_classes

        if not is_spinediff_trainer(args.trainer):
            names = ", ".join(trainer_classes())
            raise SpineDiffError(f"Distributed training supports the spinediff trainers ({names}), "
                                 f"not {args.trainer!r}. nnU-Net's own trainers have their own multi-GPU mode: "
                                 f"nnUNetv2_train {args.dataset} {args.configuration} {args.fold} -tr {args.trainer} "
                                 "-num_gpus N (CUDA only).")
        with distributed_session(args, build_parser()):
            return _train(args)
    return _train(args)


def _train(args: argparse.Namespace) -> int:
    options = TrainingOptions(epochs=args.epochs, iterations_per_epoch=args.iters_per_epoch,
                              val_iterations_per_epoch=args.val_iters_per_epoch, learning_rate=args.lr,
                              num_inference_steps=args.num_inference_steps,
                              mask_ablation_probability=args.mask_ablation, perception_model=args.perception_model,
                              budget_minutes=args.budget_minutes, seed=None if args.seed < 0 else args.seed,
                              save_probabilities=args.npz, validation_samples=args.val_samples,
                              precision=args.precision, device=args.device, combine=args.combine,
                              init_noise=args.init_noise)
    if args.budget is not None:
        from spinediff.planning.budget import parse_budget

        options.budget_minutes = parse_budget(args.budget) / 60.0
    folder = train(args.dataset, args.configuration, args.fold, args.trainer, options, plans_identifier=args.plans,
                   continue_training=args.c, validation_only=args.val_only,
                   prediction_type=args.prediction_type,
                   preprocessed_folder=args.preprocessed, results_folder=args.results, overwrite=args.overwrite,
                   verbose=args.verbose)
    print(f"results: {folder}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one cross-validation fold (diffusion trainers, baselines, or nnU-Net's own)",
        description=(
            "Train one fold with nnU-Net's splits (splits_final.json; '-f all' trains on every case), then "
            "predict the fold's validation cases in raw geometry and score them. Trainers: "
            "DiffusionTranslationTrainer, DiffusionSegmentationTrainer, SegGuidedGenerationTrainer, "
            "RegressionTrainer, Pix2PixTrainer, or any nnU-Net trainer such as nnUNetTrainer. Results go to "
            "$nnUNet_results/DatasetXXX/TRAINER__nnUNetPlans__CONFIG/fold_F/ with nnU-Net's log, progress plot and "
            "checkpoints. Interrupted? Run the same command with --c to resume from the last epoch."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or DatasetXXX_Name")
    parser.add_argument("-c", "--configuration", required=True,
                        help="plans configuration, e.g. 2d_diffusion, 3d_diffusion (2d/3d_fullres for nnUNetTrainer)")
    parser.add_argument("-f", "--fold", required=True, help="fold 0-4, or 'all'")
    parser.add_argument("-tr", "--trainer", default="DiffusionTranslationTrainer", help="trainer class name")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS, help="plans identifier")
    parser.add_argument("--prediction-type", choices=["x0", "eps", "v"],
                        help="what the diffusion network predicts: x0 = image mode (the plans' default), eps = noise "
                             "mode, v = velocity; a non-default choice trains a derived configuration CONFIG_eps/_v")
    parser.add_argument("--epochs", type=positive_int, help="number of epochs (nnU-Net default 1000)")
    parser.add_argument("--budget", metavar="TIME", type=duration(),
                        help="training time, e.g. 15m or 12h (default: the plans' schedule from `spinediff plan "
                             "--budget`). The number of epochs is refitted to the speed measured in the first epochs "
                             "so that training, and its learning-rate decay, end at the budget; with --epochs the "
                             "budget is only a cap")
    parser.add_argument("--budget-minutes", type=minutes(), help="the same as --budget, in minutes")
    parser.add_argument("--iters-per-epoch", type=positive_int, help="training iterations per epoch (default 250)")
    parser.add_argument("--val-iters-per-epoch", type=positive_int, help="validation batches per epoch")
    parser.add_argument("--lr", type=positive_float,
                        help="initial learning rate (diffusion default 5e-4, AdamW, poly decay)")
    parser.add_argument("--steps", dest="num_inference_steps", type=positive_int,
                        help="DDIM steps for the final validation (default: the plans' num_inference_steps)")
    parser.add_argument("--val-samples", type=positive_int,
                        help="diffusion: samples averaged per case in the final validation (default: the plans' "
                             "num_samples, as `spinediff predict`; 1 is K times faster and scores a single sample)")
    parser.add_argument("--init-noise", type=float, default=None, metavar="F",
                        help="a refinement model (DiffusionRefinementTrainer, ResidualRefinementTrainer): the start "
                             "level of its final validation, a fraction of the schedule in [0, 1) (default: the "
                             "plans' warm_start, else 0.3, 0.1 for ResidualRefinementTrainer); a reused fold is "
                             "validated again when it changed")
    parser.add_argument("--combine", choices=COMBINATIONS, default=None,
                        help="DiffusionRefinementTrainer (segmentation): how the final validation combines the "
                             "samples: mean (the default: mean class probabilities of the K samples, as `spinediff "
                             "predict`) or spinesegdiff (SpineSegDiff: each step's mean over the samples, the last "
                             "10 steps weighted towards the last; use with --val-samples 15 as SpineSegDiff). With "
                             "--val-only it re-validates a trained fold the other way")
    parser.add_argument("--mask-ablation", type=fraction,
                        help="SegGuidedGenerationTrainer: probability of dropping each class from the condition")
    parser.add_argument("--perception-model", metavar="FOLDER", type=existing_folder,
                        help="PerceptionRegressionTrainer: the model folder (TRAINER__PLANS__CONFIG) of an nnU-Net "
                             "segmenter trained on the real target images of the same folds; its frozen encoder gives "
                             "the anatomical perception loss")
    add_precision_argument(parser)
    parser.add_argument("--seed", type=int_range(-1, 2**32 - 1), default=0,
                        help="seeds network initialisation, augmentation (in the main process) and diffusion noise, "
                             "per fold: the same seed gives the same training on the CPU; -1 leaves them unseeded")
    parser.add_argument("--npz", action="store_true",
                        help="segmentation: keep the class probabilities of the final validation (CASE.npz), as "
                             "nnUNetv2_train --npz; `spinediff find_best` then also tries the level numbering on them")
    add_device_argument(parser, "where to train (with --distributed: cpu or cuda, one GPU per process)")
    parser.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--val-only", action="store_true", help="only run the final validation of a trained fold")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fold again that was already started or finished (without it, such a fold is "
                             "refused: resume with --c)")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel training on every process that torchrun starts (gloo on CPU, NCCL on "
                             "CUDA); without torchrun it prints the command to use. See documentation/distributed.md")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show nnU-Net's full training log on the console (it always goes to the fold's log file); "
                             "without it the console gets one line per epoch: steps, loss, the validation metric, "
                             "learning rate, elapsed time and the ETA")
    parser.add_argument("--preprocessed", help="nnU-Net preprocessed folder (default: $nnUNet_preprocessed)")
    parser.add_argument("--results", help="nnU-Net results folder (default: $nnUNet_results)")
    parser.set_defaults(func=run_train)
