"""``spinediff report``: the HTML report of a benchmark or evaluation folder."""

from __future__ import annotations

import argparse

from spinediff.utilities.argtypes import existing_folder


def run_report(args: argparse.Namespace) -> int:
    from spinediff.evaluation.folder_report import write_folder_report

    page = write_folder_report(args.input, args.output, results=args.results, raw=args.raw,
                               overwrite=args.overwrite)
    print(f"[report] {page} (self-contained: open it in a browser or mail it; report.md beside it links the same "
          "figures)")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="HTML report (tables, box plots, cases, training curves) of a benchmark or evaluation folder",
        description="Render one self-contained HTML page for the output folder of `spinediff benchmark` "
                    "(benchmark.json: method table, Dice per label before and after post-processing, the schedule "
                    "each fold trained, box plots per case, training curves of the first fold, and the worst, "
                    "median and best case with every method's prediction and entropy maps where probabilities were "
                    "kept) or of `spinediff evaluate -o` (summary.json + per_case.csv: tables, box plots and the "
                    "worst, median and best case with the uncertainty map where predict wrote one). Figures are "
                    "embedded, so the page can be mailed or opened offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-i", "--input", required=True, type=existing_folder,
                        help="a benchmark or evaluation output folder")
    parser.add_argument("-o", "--output", help="report folder (default: INPUT/report); holds report.html, "
                                               "report.md and figures/")
    parser.add_argument("--results", help="models' folder of a benchmark whose benchmark.json does not record it "
                                          "(default: nnUNet_results)")
    parser.add_argument("--raw", help="raw datasets' folder for the case images (default: the benchmark's record, "
                                      "then nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    parser.set_defaults(func=run_report)
