"""``spinediff find_best``: rank the trained configurations/trainers of a dataset and print how to predict."""

from __future__ import annotations

import argparse

from spinediff.inference.find_best import find_best
from spinediff.metrics.direction import direction
from spinediff.utilities.argtypes import file_or_new, fold
from spinediff.utilities.device import add_device_argument


def run_find_best(args: argparse.Namespace) -> int:
    result = find_best(args.dataset, folds=args.folds, repredict=args.repredict, output=args.output,
                       overwrite=args.overwrite, results_folder=args.results, raw_folder=args.raw, device=args.device)
    print(f"{result.task.name}: ranked on {result.metric} ({direction(result.metric)} is better), pooled over the "
          f"validation cases of fold(s) {' '.join(result.folds)}\n")
    print(result.table())
    if result.ensemble and "skipped" in result.ensemble:
        print(f"\nensemble of ranks 1+2 not tried: {result.ensemble['skipped']}")
    elif result.ensemble:
        print(f"\nensemble of ranks 1+2 ({result.ensemble['method']}): {result.metric} "
              f"{result.ensemble['scores'][result.metric]:.4f} vs best single {result.ensemble['best_single']:.4f}"
              + (f" ({result.ensemble['best_single_postprocessed']:.4f} with its post-processing; the ensemble "
                 "is not post-processed)" if "best_single_postprocessed" in result.ensemble else ""))
    for note in result.notes:
        print(f"note: {note}")
    if result.postprocessing:
        pp = result.postprocessing
        verdict = "applied" if pp["applied"] else "not applied"
        print(f"\npost-processing (level numbering by anatomical order): {verdict}; cross-validation Dice "
              f"{pp['dice_before']:.4f} -> {pp['dice_after']:.4f} ({pp['cases']} cases)")
    print(f"\nbest: {result.winner}\npredict with:")
    for command in result.commands:
        print(f"  {command}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "find_best",
        help="rank trained configurations/trainers on their cross-validation and print the predict command",
        description=(
            "Scan $nnUNet_results/DatasetXXX for every TRAINER__PLANS__CONFIG with finished folds (diffusion "
            "trainers, baselines, nnU-Net's own), rank them on the pooled validation cases (segmentation: "
            "foreground Dice; translation/generation: MAE in the body in HU, or PSNR for non-CT targets), try the "
            "ensemble of the top two, print the table and the command that predicts with the winner, and write "
            "find_best.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or DatasetXXX_Name")
    parser.add_argument("-f", "--folds", nargs="+", type=fold,
                        help="folds to compare (default: those all candidates finished)")
    parser.add_argument("--repredict", action="store_true",
                        help="segmentation: re-predict the validation cases with probabilities to try the ensemble "
                             "when the final validations kept none (costs one cross-validation prediction per "
                             "candidate)")
    parser.add_argument("-o", "--output", type=file_or_new,
                        help="JSON to write (default: $nnUNet_results/DatasetXXX/find_best.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    add_device_argument(parser, "device for --repredict")
    parser.add_argument("--results", help="nnU-Net results folder (default: $nnUNet_results)")
    parser.add_argument("--raw", help="nnU-Net raw folder, for references and re-prediction (default: $nnUNet_raw)")
    parser.set_defaults(func=run_find_best)
