"""Stress tests of several models on the same cases: the mean level Dice per variant over the cases of the given
folds only (a model trained on fewer folds is compared on its own cases), from each model's
``stress_position.json`` (``spinediff benchmark --stress``).

    python -m studies.compare_stress501 --folds 1,2,3,4 \\
        p0.2=OLD/nnUNetTrainer__nnUNetPlans__2d_cpu/stress_position.json \\
        context=$nnUNet_results/Dataset501_LumbarVB3dev/nnUNetTrainerLevelContext__nnUNetPlans__2d_cpu/stress_position.json

Prints a Markdown table and, per model, the plain mean and the mean over the stressed variants. With ``--paired``
and two models trained on the same folds (the same cases, e.g. one recipe with and without a change): per case the
mean level Dice over its stressed variants, the two models' difference with Wilcoxon's signed-rank test over the
cases (scipy), and the stressed answers each numbers wrong (level Dice below 0.5), flagged or not.
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


def case_rows(record: dict, folds: set[str], prefix: str = "") -> dict[tuple[str, str], dict]:
    """(case, variant) → its row, for the dataset's own cases held out by one of ``folds``."""
    return {(r["case"], r["variant"]): r for r in record["cases"]
            if r["source"] == record["dataset"] and set(r["folds"]) <= folds and r["case"].startswith(prefix)}


def paired(first: dict, second: dict, folds: set[str], prefix: str = "") -> dict:
    """Two stress records of models trained on the same folds, compared case by case: each case's mean level Dice
    over its stressed variants (``cases``: case → [first, second]), Wilcoxon's signed-rank test of their differences
    (two-sided; None with fewer than two cases that differ) and each model's stressed answers below 0.5 (and of them
    flagged). Raises ValueError when the two do not hold the same case-variants."""
    from scipy.stats import wilcoxon

    a, b = case_rows(first, folds, prefix), case_rows(second, folds, prefix)
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[:3]
        raise ValueError(f"the two stress tests hold different case-variants (e.g. {missing}): compare models "
                         "trained on the same folds and stressed with the same variants")
    cases: dict[str, list[float]] = {}
    for case in sorted({c for c, _ in a}):
        means = [float(np.nanmean([rows[key]["level_dice"] for key in rows if key[0] == case and key[1] != "plain"]))
                 for rows in (a, b)]
        cases[case] = means
    differences = [y - x for x, y in cases.values()]
    test = None
    if sum(1 for d in differences if d != 0) >= 2:
        test = float(wilcoxon(differences).pvalue)

    def failures(rows):
        wrong = [r for (_, variant), r in rows.items() if variant != "plain" and not r["level_dice"] >= 0.5]
        return len(wrong), sum(1 for r in wrong if r.get("flagged"))

    return {"cases": cases, "mean_difference": float(np.mean(differences)), "wilcoxon_p": test,
            "better": sum(1 for d in differences if d > 0), "worse": sum(1 for d in differences if d < 0),
            "failures": [failures(a), failures(b)]}


def paired_markdown(names: list[str], result: dict) -> str:
    first, second = names
    lines = [f"| case | {first} | {second} | difference |", "|---|---|---|---|"]
    for case, (x, y) in result["cases"].items():
        lines.append(f"| {case} | {x:.3f} | {y:.3f} | {y - x:+.3f} |")
    p = "n/a" if result["wilcoxon_p"] is None else f"{result['wilcoxon_p']:.3f}"
    (fa, ga), (fb, gb) = result["failures"]
    lines.append("")
    lines.append(f"{second} against {first}, stressed mean per case: {result['mean_difference']:+.3f} "
                 f"({result['better']} cases better, {result['worse']} worse; Wilcoxon p {p}); stressed answers "
                 f"below 0.5: {fa} ({ga} flagged) against {fb} ({gb} flagged).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", required=True, help="folds whose validation cases are compared, e.g. 1,2,3,4")
    parser.add_argument("--cases", default="", metavar="PREFIX",
                        help="only the cases whose name starts with PREFIX (e.g. vb3_ for the T2w scans of Dataset505)")
    parser.add_argument("--paired", action="store_true",
                        help="two models trained on the same folds: compare them case by case (Wilcoxon)")
    parser.add_argument("records", nargs="+", metavar="NAME=stress_position.json")
    args = parser.parse_args(argv)
    if args.paired and len(args.records) != 2:
        parser.error(f"--paired compares two models; {len(args.records)} given. Give two NAME=stress_position.json.")
    models, records = {}, {}
    for item in args.records:
        name, _, path = item.partition("=")
        if not Path(path).is_file():
            print(f"{item}: no stress_position.json at {path!r} (give NAME=PATH).", file=sys.stderr)
            return 2
        records[name] = json.loads(Path(path).read_text())
        models[name] = variant_means(records[name], set(args.folds.split(",")), args.cases)
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
    if args.paired:
        try:
            result = paired(*records.values(), set(args.folds.split(",")), args.cases)
        except ValueError as exc:
            print(f"--paired: {exc}.", file=sys.stderr)
            return 2
        print()
        print(paired_markdown(names, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
