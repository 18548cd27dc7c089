"""``spinediff ensemble``: average the predictions of several configurations or trainers."""

from __future__ import annotations

import argparse

from spinediff.inference.ensemble import ensemble_folders
from spinediff.utilities.argtypes import existing_folder


def run_ensemble(args: argparse.Namespace) -> int:
    report = ensemble_folders(args.input, args.output, overwrite=args.overwrite,
                              save_probabilities=args.save_probabilities,
                              save_uncertainty=args.save_uncertainty)
    print(f"{report.task}: ensembled {len(report.written)} prediction(s) into {report.output_folder}")
    for problem in report.problems:
        print(f"  PROBLEM {problem}")
    return report.exit_code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ensemble",
        help="combine the predictions of several configurations or trainers",
        description=(
            "Average, case by case, the outputs of several `spinediff predict` runs on the same inputs: class "
            "probabilities (CASE.npz, from predict --save-probabilities) for segmentation, then argmax; images "
            "(e.g. HU) for translation and generation. The exit status is 2 if any case could not be combined."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-i", "--input", nargs="+", required=True, type=existing_folder,
                        help="two or more prediction folders")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--save-probabilities", action="store_true", help="segmentation: also write CASE.npz")
    parser.add_argument("--save-uncertainty", action="store_true",
                        help="segmentation: also write the members' disagreement, as predict --save-uncertainty "
                             "does: CASE_uncertainty (mutual information map) and CASE_uncertainty.json (case "
                             "scores, among them sample_disagreement = 1 - the mean pairwise Dice between the "
                             "members; for nnU-Net's fold models the best failure detector in Zenk et al. 2025)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.set_defaults(func=run_ensemble)
