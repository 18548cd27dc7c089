"""Do two `spinediff demo` runs give the same numbers? (e.g. before and after a refactoring, same --seed)

    python benchmarks/demo_same_numbers.py OLD_DEMO_FOLDER NEW_DEMO_FOLDER [-o RESULT.json]

Compares every number of the two demo_summary.json files except times (``*seconds*``, ``*minutes*``) and
writes the comparison to JSON and a Markdown table (default: NEW_DEMO_FOLDER/same_numbers.{json,md}).
Exit status 1 when a number differs by more than --tolerance (relative).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def numbers(tree, prefix: str = "") -> dict[str, float]:
    """Flattened numeric leaves of a JSON tree, timings left out."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if "seconds" not in key and "minutes" not in key:
                out.update(numbers(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix] = float(tree)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="result JSON (a .md table is written beside it)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="allowed relative difference (default 0)")
    args = parser.parse_args(argv)
    old, new = (numbers(json.loads((f / "demo_summary.json").read_text())) for f in (args.old, args.new))
    rows = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, math.nan), new.get(key, math.nan)
        same = (math.isnan(a) and math.isnan(b)) or (abs(a - b) <= args.tolerance * max(abs(a), abs(b)))
        rows.append({"number": key, "old": a, "new": b, "same": same})
    result = {"old": str(args.old), "new": str(args.new), "tolerance": args.tolerance,
              "compared": len(rows), "differ": sum(not r["same"] for r in rows), "rows": rows}
    target = args.output or args.new / "same_numbers.json"
    target.write_text(json.dumps(result, indent=1))
    table = ["| number | old | new | same |", "|---|---|---|---|"]
    table += [f"| {r['number']} | {r['old']:.6g} | {r['new']:.6g} | {'yes' if r['same'] else '**no**'} |" for r in rows]
    target.with_suffix(".md").write_text("\n".join(table) + "\n")
    print(f"{result['compared']} numbers compared, {result['differ']} differ (tolerance {args.tolerance:g}); "
          f"{target}")
    return 1 if result["differ"] else 0


if __name__ == "__main__":
    sys.exit(main())
