"""Run every performance benchmark and assemble ``documentation/performance.md``.

Usage::

    python benchmarks/run_all.py [--quick] [--only training_step flops ...] [--assemble-only] [--retrain]

Each measurement is its own script (``benchmarks/perf_*.py``), run here one after the other in a
fresh subprocess (never two at once: the machine has 2 shared cores), each writing
``benchmarks/output/performance/NAME.{json,md}``. The documentation is then rebuilt from those
files, so every number in it carries the command that produced it. ``--quick`` is the run the
documentation normally shows (under 10 minutes here, including training the small models once);
without it the repeats, iterations and cases grow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
OUTPUT = BENCHMARKS / "output" / "performance"
DOCUMENT = ROOT / "documentation" / "performance.md"
# order: the cheap throughput measurements first; sampling trains the diffusion models that inference reuses
MEASUREMENTS = {
    "training_step": "perf_training_step.py",
    "flops": "perf_flops.py",
    "dataloading": "perf_dataloading.py",
    "sampling_quality": "perf_sampling_quality.py",
    "inference": "perf_inference.py",
}


def run_measurement(name: str, quick: bool, retrain: bool) -> dict:
    command = [sys.executable, str(BENCHMARKS / MEASUREMENTS[name])]
    if quick:
        command.append("--quick")
    if retrain and name in ("sampling_quality", "inference"):
        command.append("--retrain")
    print(f"[run_all] {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    print(f"[run_all] {name}: exit {completed.returncode} after {seconds:.0f} s", flush=True)
    return {"name": name, "returncode": completed.returncode, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short run the documentation shows (< 10 min)")
    parser.add_argument("--only", nargs="+", choices=list(MEASUREMENTS), help="run only these measurements")
    parser.add_argument("--assemble-only", action="store_true", help="only rebuild the document from the outputs")
    parser.add_argument("--retrain", action="store_true", help="train the small models again")
    args = parser.parse_args(argv)
    runs = []
    start = time.perf_counter()
    if not args.assemble_only:
        for name in args.only or MEASUREMENTS:
            runs.append(run_measurement(name, args.quick, args.retrain))
    total = time.perf_counter() - start
    if runs:
        (OUTPUT / "run_all.json").write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/run_all.py", *(argv if argv is not None else sys.argv[1:])]),
            "runs": runs, "total_seconds": total, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
    from performance_report import write_document

    write_document(DOCUMENT, OUTPUT, MEASUREMENTS)
    print(f"[run_all] wrote {DOCUMENT.relative_to(ROOT)} ({total:.0f} s of measurements)")
    return 1 if any(r["returncode"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
