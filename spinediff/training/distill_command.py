"""``spinediff distill``: distil a trained diffusion fold into a 1- or 2-step student (progressive distillation)."""

from __future__ import annotations

import argparse

from spinediff.paths import DEFAULT_PLANS
from spinediff.training.distillation import distill


def run_distill(args: argparse.Namespace) -> int:
    budget = None
    if args.budget is not None:
        from spinediff.planning.budget import parse_budget

        budget = parse_budget(args.budget) / 60.0
    path = distill(args.dataset, args.configuration, args.fold, args.trainer, steps=args.steps,
                   teacher_steps=args.teacher_steps, iterations=args.iterations, budget_minutes=budget,
                   learning_rate=args.lr, plans_identifier=args.plans, device=args.device, seed=args.seed,
                   overwrite=args.overwrite, preprocessed_folder=args.preprocessed, results_folder=args.results)
    print(f"student ({args.steps} step(s)): {path}")
    print(f"predict with it: spinediff predict -i IN -o OUT -d {args.dataset} -c {args.configuration} "
          f"-tr {args.trainer} -f {args.fold} --checkpoint distilled")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from spinediff.utilities.argtypes import duration, fold, non_negative_int, positive_float, positive_int
    from spinediff.utilities.device import add_device_argument

    parser = subparsers.add_parser(
        "distill",
        help="distil a trained diffusion fold into a 1- or 2-step student",
        description=(
            "Progressive distillation (Salimans & Ho 2022): starting from the fold's final checkpoint as the "
            "teacher at --teacher-steps DDIM steps, each round trains a copy to match two teacher steps with one, "
            "halving the steps until --steps. Training patches come from the fold's training cases through "
            "nnU-Net's loader. The student is written to fold_N/checkpoint_distilled.pth (the teacher is kept) "
            "with its step count in its diffusion block, and a log to fold_N/distillation.json. Predict with "
            "`spinediff predict --checkpoint distilled`. x0 and v-prediction models only."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or name")
    parser.add_argument("-c", "--configuration", required=True, help="plans configuration, e.g. 2d_diffusion")
    parser.add_argument("-f", "--fold", required=True, type=fold, help="the trained fold to distil (0-4 or all)")
    parser.add_argument("-tr", "--trainer", required=True, help="trainer class name of the teacher")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS, help="plans identifier")
    parser.add_argument("--steps", type=int, default=1, choices=(1, 2), help="the student's DDIM steps")
    parser.add_argument("--teacher-steps", type=positive_int, default=8,
                        help="the teacher's DDIM steps in the first round (--steps times a power of two)")
    parser.add_argument("--iterations", type=positive_int, default=200, help="student updates per round")
    parser.add_argument("--budget", default=None, type=duration(), metavar="TIME",
                        help="wall-clock budget for all rounds instead of --iterations, e.g. 10m (split evenly)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="learning rate (default: a fifth of the trainer's)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the noise and timesteps")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint_distilled.pth")
    parser.add_argument("--preprocessed", default=None, help="nnUNet_preprocessed (default: the variable)")
    parser.add_argument("--results", default=None, help="nnUNet_results (default: the variable)")
    add_device_argument(parser, "where to train the student")
    parser.set_defaults(func=run_distill)
