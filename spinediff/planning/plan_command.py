"""``spinediff plan``: fingerprint, plan and preprocess a dataset; print a table of the configurations."""

from __future__ import annotations

import argparse

from spinediff.planning.api import (
    ALL_CONFIGURATIONS,
    dataset_summary,
    default_num_processes,
    format_table,
    plan_dataset,
    summarize_plans,
)
from spinediff.planning.budget import MIN_PLAN_BUDGET_SECONDS
from spinediff.utilities.argtypes import duration, positive_float, positive_int
from spinediff.utilities.device import add_device_argument


def run_plan(args: argparse.Namespace) -> int:
    from spinediff.io import ensure_writable_folder, read_json
    from spinediff.paths import nnunet_folder

    preprocessed_root = nnunet_folder("preprocessed", args.preprocessed)
    # before any work: a read-only (or file) --preprocessed is refused, and a missing one is not made yet
    ensure_writable_folder(preprocessed_root, create=preprocessed_root.is_dir())
    plans_file = plan_dataset(
        args.dataset, configurations=args.configurations, device=args.device,
        memory_target_gb=args.memory_target_gb, preprocess=not args.no_preprocess,
        num_processes=args.num_processes, raw_folder=args.raw, preprocessed_folder=args.preprocessed,
        overwrite=args.overwrite, show_progress_bar=not args.quiet, verbose=args.verbose, budget=args.budget,
        slice_direction=args.slice_direction)
    plans = read_json(plans_file)
    facts = dataset_summary(plans)
    rows = summarize_plans(plans, args.configurations)
    print()
    print(f"{facts['dataset']}: task {facts['task']}, median shape {facts['median_shape']} at spacing "
          f"{facts['median_spacing']} mm (after transpose {facts['transpose_forward']}), "
          f"anisotropy {facts['anisotropy']}")
    print(f"planned for {facts['device']}, memory target {facts['memory_target_gb']:g} GB"
          + (f", training budget {args.budget} per fold and configuration" if args.budget else ""))
    print()
    print(format_table(rows))
    print()
    for row in rows:
        for note in row["notes"]:
            print(f"- {row['configuration']}: {note}")
    print()
    print(f"recommended diffusion configuration: {facts['recommended_configuration']}")
    print(f"plans: {plans_file}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="self-configure: fingerprint, plan (nnU-Net + diffusion configurations) and preprocess",
        description=(
            "Self-configure a dataset, as nnU-Net does, for diffusion models:\n"
            "  1. extract the dataset fingerprint with nnunetv2 (plus target-intensity statistics for\n"
            "     translation/generation datasets);\n"
            "  2. plan nnU-Net's own configurations (2d, 3d_fullres, 3d_lowres) and add 2d_diffusion and\n"
            "     3d_diffusion: a time-conditioned U-Net sized for --device and --memory-target-gb, and\n"
            "     diffusion settings for the dataset's task;\n"
            "  3. preprocess with nnunetv2's preprocessor.\n"
            "With --budget (e.g. 15m on a CPU, 12h on a GPU) the planner plans for the time at hand: the patch\n"
            "must cover the foreground (all labels, plus a margin), the spacing is coarsened until such a patch\n"
            "trains enough steps in the budget, each network's step is timed on this machine, and the plans get a\n"
            "schedule (epochs x iterations, poly learning rate) that `spinediff train` follows and ends in time.\n"
            "Writes $nnUNet_preprocessed/DatasetXXX_Name/nnUNetPlans.json and its data folders and prints a\n"
            "table of the configurations. nnU-Net's own trainer runs on the result unchanged\n"
            "(nnUNetv2_train ID 2d FOLD). See documentation/planning.md."
        ),
        epilog=(
            "examples:\n"
            "  spinediff plan -d 501                        # plan and preprocess for the detected device\n"
            "  spinediff plan -d 501 --device cpu --budget 15m   # 15 minutes of training per fold on this CPU\n"
            "  spinediff plan -d 501 --device cuda --budget 12h\n"
            "  spinediff plan -d 902 --device cpu -np 2     # small configurations that train on a CPU\n"
            "  spinediff plan -d 902 --device cuda --memory-target-gb 24 --no-preprocess\n"
            "  spinediff plan -d 501 -c 2d 2d_diffusion --overwrite"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-d", "--dataset", required=True,
                        help="dataset ID (e.g. 501), name (Dataset501_X) under $nnUNet_raw, or a folder path")
    parser.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG", choices=ALL_CONFIGURATIONS,
                        help="configurations to preprocess (default: all in the plans). The plans always hold "
                             f"all of them. Choices: {', '.join(ALL_CONFIGURATIONS)}")
    add_device_argument(parser, "plan for a GPU (cuda: what nnU-Net would choose for --memory-target-gb; this machine "
                                "need not have one) or for this CPU (cpu: small networks, a 2D training step well "
                                "under a second)", must_be_present=False)
    parser.add_argument("--memory-target-gb", type=positive_float, default=None, metavar="G",
                        help="GPU memory (cuda; default 8, as nnU-Net) or RAM (cpu; default 4) to plan for")
    parser.add_argument("--budget", metavar="TIME", type=duration(
                            MIN_PLAN_BUDGET_SECONDS, " (a shorter budget plans a network too small to learn)"),
                        help="training time per fold and configuration, e.g. 90s, 15m, 12h (a bare number: minutes). "
                             "Plans field of view, spacing, patch and a schedule that ends within it; step times are "
                             "measured with torch's current thread count (OMP_NUM_THREADS). Default: plan for memory "
                             "as nnU-Net does, with nnU-Net's 1000-epoch schedule")
    parser.add_argument("--slice-direction", choices=["axial", "coronal", "sagittal"], default=None,
                        help="write nnUNetPlans_<direction>: 2D configurations that slice the images in that plane "
                             "(from the images' orientation), beside the default plans; use them with "
                             "-p nnUNetPlans_<direction> in train/predict, and fuse directions with spinediff ensemble")
    parser.add_argument("--no-preprocess", action="store_true", help="write the plans only")
    parser.add_argument("-np", "--num-processes", type=positive_int, default=None, metavar="N",
                        help=f"worker processes for fingerprint and preprocessing (default here: "
                             f"{default_num_processes()})")
    parser.add_argument("--raw", help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("--preprocessed", help="nnU-Net preprocessed folder (default: $nnUNet_preprocessed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing nnUNetPlans.json")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or step messages")
    parser.add_argument("-v", "--verbose", action="store_true", help="show nnunetv2's own messages")
    parser.set_defaults(func=run_plan)
