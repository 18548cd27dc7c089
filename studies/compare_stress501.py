"""Stress tests of several models on the same cases: the mean level Dice per variant over the cases of the given
folds only (a model trained on fewer folds is compared on its own cases), from each model's
``stress_position.json`` (``spinediff benchmark --stress``).

    python -m studies.compare_stress501 --folds 1,2,3,4 \\
        p0.2=OLD/nnUNetTrainer__nnUNetPlans__2d_cpu/stress_position.json \\
        context=$nnUNet_results/Dataset501_LumbarVB3dev/nnUNetTrainerLevelContext__nnUNetPlans__2d_cpu/stress_position.json

Prints a Markdown table and, per model, the plain mean and the mean over the stressed variants.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def variant_means(record: dict, folds: set[str], prefix: str = "") -> dict[str, list[float]]:
    """Variant → the level Dice of the dataset's own cases held out by one of ``folds`` (and whose name starts with
    ``prefix``)."""
    means: dict[str, list[float]] = {}
    for case in record["cases"]:
        if case["source"] == record["dataset"] and set(case["folds"]) <= folds and case["case"].startswith(prefix):
            means.setdefault(case["variant"], []).append(case["level_dice"])
    return means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", required=True, help="folds whose validation cases are compared, e.g. 1,2,3,4")
    parser.add_argument("--cases", default="", metavar="PREFIX",
                        help="only the cases whose name starts with PREFIX (e.g. vb3_ for the T2w scans of Dataset505)")
    parser.add_argument("records", nargs="+", metavar="NAME=stress_position.json")
    args = parser.parse_args(argv)
    models = {}
    for item in args.records:
        name, _, path = item.partition("=")
        if not Path(path).is_file():
            print(f"{item}: no stress_position.json at {path!r} (give NAME=PATH).", file=sys.stderr)
            return 2
        models[name] = variant_means(json.loads(Path(path).read_text()), set(args.folds.split(",")), args.cases)
    empty = [name for name, means in models.items() if not means.get("plain")]
    if empty:
        print(f"{', '.join(empty)}: no plain case of folds {args.folds}"
              + (f" named {args.cases}*" if args.cases else "") + ".", file=sys.stderr)
        return 2
    names = list(models)
    variants = list(models[names[0]])
    print("| variant | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for variant in variants:
        cells = [f"{np.nanmean(models[n][variant]):.3f}" for n in names]
        print(f"| {variant} ({len(models[names[0]][variant])} cases) | " + " | ".join(cells) + " |")
    for name in names:
        stressed = [np.nanmean(models[name][v]) for v in variants if v != "plain"]
        print(f"{name}: plain {np.nanmean(models[name]['plain']):.3f}, stressed mean {np.mean(stressed):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
