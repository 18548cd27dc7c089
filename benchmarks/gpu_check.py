"""GPU check: every diffusion trainer for a few hundred steps on the phantom, with and without mixed precision
and torch.compile; speed, peak memory, a validation metric, and whether the planned batch fits.

Usage::

    python benchmarks/gpu_check.py                 # on a GPU: plans for it, fp32 vs auto (bf16/fp16), compile
    python benchmarks/gpu_check.py --quick         # tiny phantom, a few steps (what runs on a CPU)

Runnable by any user with a GPU (nothing downloaded). The phantom is written and planned for the device under
``benchmarks/output/gpu_check/work`` (``2d_diffusion`` and, on CUDA, ``3d_diffusion``: the plans a user of that
GPU gets). Each variant trains from the same seed on the same pre-fetched batches (data loading excluded), after
two warm-up steps; the variants of one trainer run back to back, so their speed ratio is measured side by side
in one run. On the CPU the variants are float32 and bfloat16 autocast (compile is not tried: nnU-Net never
compiles on the CPU and neither do we). Writes ``benchmarks/output/performance/gpu_check.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time

import numpy as np
import perf_common as pc
import torch

WORK = pc.OUTPUT.parent / "gpu_check" / "work"
TRAINERS = [("DiffusionSegmentationTrainer", 901), ("DiffusionTranslationTrainer", 902),
            ("SegGuidedGenerationTrainer", 903)]


def prepare(device: torch.device, quick: bool) -> list[str]:
    """Write the phantom and plan it for ``device``; returns the diffusion configurations to check."""
    from spinediff.datasets.phantom_writer import write_phantom_datasets
    from spinediff.planning.api import plan_dataset

    os.environ["nnUNet_raw"] = str(WORK / "raw")
    os.environ["nnUNet_preprocessed"] = str(WORK / "preprocessed")
    os.environ["nnUNet_results"] = str(WORK / "results")
    configurations = ["2d_diffusion"] + (["3d_diffusion"] if device.type == "cuda" else [])
    marker = WORK / f"ready_{device.type}_{'quick' if quick else 'full'}"
    if not marker.exists():
        write_phantom_datasets(WORK / "raw", num_cases=6, seed=pc.PHANTOM_SEED,
                               settings=pc.phantom_settings() if quick else None, overwrite=True, progress=False)
        for _, dataset in TRAINERS:
            plan_dataset(dataset, configurations=configurations, device=device.type, num_processes=1,
                         overwrite=True, show_progress_bar=False)
        marker.write_text("ok")
    return configurations


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak, KiB on Linux


def validation_metric(trainer, batch: dict) -> tuple[str, float]:
    """The trainer's own per-epoch validation on one batch: pseudo-Dice (segmentation) or PSNR."""
    from spinediff.metrics.segmentation_metrics import dice_from_counts

    trainer.network.eval()
    with torch.no_grad():
        out = trainer.validation_step(batch)
    trainer.network.train()
    if "tp_hard" in out:
        tp, fp, fn = (np.atleast_2d(out[k]).sum(0) for k in ("tp_hard", "fp_hard", "fn_hard"))
        dice = [float(d) for d in dice_from_counts(tp, fp, fn) if not np.isnan(d)]
        return "pseudo Dice", float(sum(dice) / max(len(dice), 1))
    return "PSNR dB", float(out["psnr"])


def run_variant(name: str, dataset: int, configuration: str, device: torch.device, precision: str, compile_: bool,
                steps: int) -> dict:
    from spinediff.training.api import TrainingOptions, apply_options, build_trainer

    os.environ["nnUNet_compile"] = "true" if compile_ else "false"
    trainer = build_trainer(dataset, configuration, pc.FOLD, name, device=device)
    apply_options(trainer, TrainingOptions(precision=precision, seed=0))
    record = {"trainer": name, "configuration": configuration, "precision": precision,
              "autocast": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "float32",
              "compile": compile_, "batch_size": int(trainer.configuration_manager.batch_size),
              "patch_size": list(trainer.configuration_manager.patch_size)}
    try:
        trainer.initialize()
        trainer.network.train()
        batches = pc.prefetch_batches(trainer, min(steps, 8))
        losses = []
        for batch in batches[:2]:  # warm-up (and compilation)
            trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for step in range(steps):
            losses.append(float(trainer.train_step(batches[step % len(batches)])["loss"]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        metric, value = validation_metric(trainer, batches[0])
        record.update({"fits": True, "steps": steps, "it_per_s": steps / seconds,
                       "peak_memory_mb": peak_memory_mb(device), "final_loss": float(sum(losses[-5:]) / 5)
                       if len(losses) >= 5 else losses[-1], "finite": all(math.isfinite(v) for v in losses),
                       "metric": metric, "value": value})
    except torch.cuda.OutOfMemoryError as exc:
        record.update({"fits": False, "error": str(exc)[:200]})
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (GPU 300, CPU 20)")
    parser.add_argument("--quick", action="store_true", help="tiny phantom and 5 steps (a pipeline check)")
    args = parser.parse_args(argv)
    from spinediff.utilities.device import parse_device

    device = parse_device(args.device)
    steps = args.steps or (5 if args.quick else 300 if device.type == "cuda" else 20)
    configurations = prepare(device, args.quick)
    variants = ([("fp32", False), ("auto", False), ("auto", True)] if device.type == "cuda"
                else [("fp32", False), ("bf16", False)])
    rows, records = [], []
    for name, dataset in TRAINERS:
        for configuration in configurations:
            base = None
            for precision, compile_ in variants:
                pc.log(f"{name} {configuration} precision={precision} compile={compile_}")
                record = run_variant(name, dataset, configuration, device, precision, compile_, steps)
                base = base or record
                if record.get("fits") and base.get("fits"):
                    record["speed_vs_fp32"] = record["it_per_s"] / base["it_per_s"]
                records.append(record)
                rows.append([name, configuration, record["autocast"], "yes" if compile_ else "no",
                             record["batch_size"], "x".join(map(str, record["patch_size"])),
                             record.get("it_per_s", "-"), record.get("speed_vs_fp32", "-"),
                             record.get("peak_memory_mb", "-"), record.get("final_loss", "-"),
                             f"{record.get('metric', '')} {record.get('value', float('nan')):.3f}"
                             if record.get("fits") else "-", "yes" if record.get("fits") else "OOM"])
    header = ["trainer", "configuration", "autocast", "compile", "batch", "patch", "it/s", "speed vs fp32",
              "peak memory MB", "loss (last 5)", "validation", "planned batch fits"]
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else pc.cpu_model()
    markdown = (f"GPU check on {device} ({hardware}), {steps} timed steps per variant:\n\n"
                + pc.markdown_table(header, rows))
    pc.write_result("gpu_check", {"device": str(device), "steps": steps, "records": records}, markdown)
    return 0 if all(r.get("finite", True) for r in records) else 1


if __name__ == "__main__":
    pc.run_main(main)
