"""The stress test in one process against its shares predicted side by side (``spinediff benchmark --stress -j N``,
``benchmarks/stress_position.py -j N``): the wall time of each, measured in turn in one run (one process, then
N, then one, ...), their ratio round by round, and whether the two give the same rows. With ``--in-order-too``
each round also times the side-by-side run with the shares handed out in their order instead of the largest first, and
gives that ratio too. Writes JSON + Markdown.

    python benchmarks/stress_workers.py -d 505 -c 2d_cpu -tr nnUNetTrainer -f 3 4 --variants plain crop_bottom_20 \\
        -j 2 --pairs 2 --in-order-too -o results/stress_workers

Run it on an otherwise idle machine with ``OMP_NUM_THREADS=1`` (the one-process run then uses one core, as the
workers do each).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from stress_position import add_model_arguments

from spinediff.experiments.stress import StressSettings, stress_test
from spinediff.experiments.stress_variants import VARIANTS_HELP, variant_argument
from spinediff.utilities.argtypes import positive_int


def same_rows(one: dict, two: dict) -> bool:
    """Both runs scored the same case-variants in the same order with the same level Dice and review flags."""
    if len(one["cases"]) != len(two["cases"]):
        return False
    for a, b in zip(one["cases"], two["cases"], strict=True):
        if (a["case"], a["variant"], a["folds"], a["flagged"]) != (b["case"], b["variant"], b["folds"], b["flagged"]):
            return False
        x, y = a["level_dice"], b["level_dice"]
        if not (math.isnan(x) and math.isnan(y)) and abs(x - y) > 1e-9:
            return False
    return True


def markdown(result: dict) -> str:
    in_order = "in_order" in result["pairs"][0]
    lines = ["# The stress test: one process against shares side by side", "",
             f"Command: `{result['command']}`", "",
             f"{result['case_variants']} case-variants (folds {' '.join(result['folds'])}; variants "
             f"{', '.join(result['variants'])}); {result['cores']} cores, load average at the start "
             f"{result['load_average_start']}.", ""]
    head = f"| round | one process (s) | {result['workers']} side by side, the largest share first (s) | ratio |"
    if in_order:
        head += " side by side, the shares in their order (s) | in their order / largest first |"
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for index, pair in enumerate(result["pairs"], 1):
        line = f"| {index} | {pair['one']:.1f} | {pair['side_by_side']:.1f} | {pair['ratio']:.2f} |"
        if in_order:
            line += f" {pair['in_order']:.1f} | {pair['order_ratio']:.2f} |"
        lines.append(line)
    lines += ["", f"Median ratio (one process / side by side): **{result['median_ratio']:.2f}**"]
    if in_order:
        lines[-1] += f"; in their order / the largest first: **{result['median_order_ratio']:.2f}**"
    lines[-1] += (f"; the same rows (level Dice and flags of every case-variant) in every run: "
                  f"**{result['same_rows']}**.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--variants", nargs="+", type=variant_argument, metavar="VARIANT", help=VARIANTS_HELP)
    parser.add_argument("-j", "--workers", type=positive_int, default=2, help="workers of the side-by-side run")
    parser.add_argument("--pairs", type=positive_int, default=2,
                        help="rounds timed, each one process then side by side (then in order, --in-order-too)")
    parser.add_argument("--in-order-too", action="store_true",
                        help="in each round, also time the side-by-side run with the shares handed out in their order "
                             "(scan by scan, fold by fold) instead of the largest first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", required=True, help="folder for stress_workers.json and .md")
    args = parser.parse_args(argv)
    from spinediff.inference.models import model_folder
    from spinediff.io import write_json, write_text

    model = model_folder(args.dataset, args.configuration, args.trainer, args.plans)
    command = " ".join(["python benchmarks/stress_workers.py", *(sys.argv[1:] if argv is None else argv)])
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    pairs, results = [], []
    with tempfile.TemporaryDirectory(prefix="stress_workers_") as scratch:
        for index in range(args.pairs):
            seconds = {}
            runs = [("one", 1, True), ("side_by_side", args.workers, True)]
            if args.in_order_too:
                runs.append(("in_order", args.workers, False))
            for key, workers, largest_first in runs:
                settings = StressSettings(tuple(args.folds) if args.folds else None,
                                          tuple(args.variants) if args.variants else None, device=args.device,
                                          command=command, workers=workers, largest_first=largest_first)
                start = time.perf_counter()
                results.append(stress_test(model, settings, Path(scratch) / f"{key}_{index}"))
                seconds[key] = time.perf_counter() - start
            pair = {**seconds, "ratio": seconds["one"] / seconds["side_by_side"]}
            if args.in_order_too:
                pair["order_ratio"] = seconds["in_order"] / seconds["side_by_side"]
            pairs.append(pair)
    result = {"command": command, "model": str(model.path), "folds": results[0]["folds"],
              "variants": list(results[0]["variants"]), "case_variants": len(results[0]["cases"]),
              "workers": args.workers, "pairs": pairs, "median_ratio": statistics.median(p["ratio"] for p in pairs),
              "median_order_ratio": statistics.median(p["order_ratio"] for p in pairs) if args.in_order_too else None,
              "same_rows": all(same_rows(results[0], other) for other in results[1:]), "cores": os.cpu_count(),
              "load_average_start": load, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    write_json(result, output / "stress_workers.json")
    write_text(markdown(result), output / "stress_workers.md")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
