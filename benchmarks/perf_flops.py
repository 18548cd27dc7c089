"""Hardware efficiency: FLOP/s achieved by a training step as a fraction of the machine's matmul peak.

Usage::

    python benchmarks/perf_flops.py [--quick] [--repeats 5]

* FLOPs of one ``train_step`` (forward, loss and backward; the optimiser and EMA do no matrix
  products) are counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, transposed
  convolutions, matrix products, attention), for our diffusion segmentation trainer and nnU-Net's
  trainer on the same patch, batch and topology (``2d_diffusion`` vs ``2d_cpu``, 3D likewise);
* the step's CPU time is the median of the repeats (one thread, batches pre-fetched);
* the peak is a large float32 matrix product (``--matmul-size``, 2 n^3 FLOPs) on the same single
  thread, measured between the steps so it sees the same machine state.
"""

from __future__ import annotations

import argparse

import perf_common as pc
import torch
from torch.utils.flop_counter import FlopCounterMode

PAIRS = [("2d", "DiffusionSegmentationTrainer", "2d_diffusion", "2d_cpu"),
         ("3d", "DiffusionSegmentationTrainer", "3d_diffusion", "3d_fullres_cpu")]


def matmul_seconds(size: int) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    with pc.Stopwatch() as watch:
        torch.mm(a, b)
    return watch.cpu


def count_flops(trainer, batch: dict) -> tuple[int, dict[str, int]]:
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(batch)
    by_operator = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_operator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--matmul-size", type=int, default=2048)
    args = parser.parse_args(argv)
    repeats = args.repeats or 5
    pc.prepare_datasets()
    machine = pc.machine_info()
    size = args.matmul_size
    matmul_seconds(size)  # warm-up (oneDNN/MKL initialisation)
    peaks: list[float] = []
    results = []
    for dim, ours_name, ours_config, nnunet_config in PAIRS:
        pc.log(f"FLOPs and step time, {dim}")
        sides = {"ours": pc.build_initialized_trainer(pc.SEGMENTATION, ours_config, ours_name),
                 "nnunet": pc.build_initialized_trainer(pc.SEGMENTATION, nnunet_config, "nnUNetTrainer")}
        batches = {side: pc.prefetch_batches(trainer, 2) for side, trainer in sides.items()}
        row = {"dim": dim}
        for side, trainer in sides.items():
            trainer.train_step(batches[side][0])  # warm-up
            row[f"{side}_flops"], row[f"{side}_flops_by_operator"] = count_flops(trainer, batches[side][1])
            row[f"{side}_configuration"] = pc.configuration_summary(pc.SEGMENTATION, ours_config if side == "ours"
                                                                    else nnunet_config)
        times: dict[str, list[float]] = {"ours": [], "nnunet": []}
        for r in range(repeats):
            for side, trainer in sides.items():  # interleaved, CPU time of one thread
                with pc.Stopwatch() as watch:
                    trainer.train_step(batches[side][r % 2])
                times[side].append(watch.cpu)
            peaks.append(2 * size**3 / matmul_seconds(size))
        for side in sides:
            row[f"{side}_step_cpu_s"] = pc.median(times[side])
            row[f"{side}_flop_per_s"] = row[f"{side}_flops"] / row[f"{side}_step_cpu_s"]
        results.append(row)
    peak = pc.median(peaks)
    for row in results:
        for side in ("ours", "nnunet"):
            row[f"{side}_fraction_of_peak"] = row[f"{side}_flop_per_s"] / peak
    markdown = render(results, peak, peaks, size, pc.command_line())
    pc.write_result("flops", {"machine": machine, "matmul_size": size, "peak_flop_per_s": peak,
                              "peak_samples_flop_per_s": peaks, "results": results}, markdown)
    return 0


def render(results: list[dict], peak: float, peaks: list[float], size: int, command: str) -> str:
    rows = []
    for r in results:
        for side, label in (("ours", "DiffusionSegmentationTrainer"), ("nnunet", "nnUNetTrainer")):
            c = r[f"{side}_configuration"]
            rows.append([r["dim"].upper(), label, c["configuration"], "x".join(map(str, c["patch_size"])),
                         c["batch_size"], f"{r[f'{side}_flops'] / 1e9:.2f}", f"{1000 * r[f'{side}_step_cpu_s']:.0f}",
                         f"{r[f'{side}_flop_per_s'] / 1e9:.1f}", f"**{100 * r[f'{side}_fraction_of_peak']:.0f} %**"])
    table = pc.markdown_table(["dim", "trainer", "configuration", "patch", "batch", "GFLOP/step", "CPU ms/step",
                               "GFLOP/s", "of peak"], rows)
    return (f"Command: `{command}`\n\nPeak: float32 matmul {size}x{size} on 1 thread, median "
            f"{peak / 1e9:.1f} GFLOP/s (range {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f} over {len(peaks)} "
            f"measurements between the steps).\n\n{table}\n")


if __name__ == "__main__":
    pc.run_main(main)
