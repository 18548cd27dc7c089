"""``spinediff validate``: check a raw dataset and list every problem."""

from __future__ import annotations

import argparse
import sys

from spinediff.datasets.validate import validate_dataset
from spinediff.paths import resolve_raw_dataset


def run_validate(args: argparse.Namespace) -> int:
    folder = resolve_raw_dataset(args.dataset, args.raw)
    report = validate_dataset(folder, progress=not args.quiet)
    if report.ok:
        print(report.summary())
        return 0
    print(report.summary(), file=sys.stderr)
    return 2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a raw dataset (dataset.json, files, geometry, labels) before planning",
        description=(
            "Check a dataset in nnU-Net raw layout and list every problem found: dataset.json schema and "
            "its spinediff block, every case has all channels and a label file, files readable, identical "
            "size/spacing/origin/direction across the channels and labels of a case, no NaN/Inf, label "
            "values declared, non-empty foreground. Exit status 0 when clean, 2 otherwise. Writes nothing."
        ),
    )
    parser.add_argument("-d", "--dataset", required=True,
                        help="dataset ID (e.g. 901), name (Dataset901_X) under $nnUNet_raw, or a folder path")
    parser.add_argument("--raw", help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_validate)
