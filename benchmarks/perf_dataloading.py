"""Data loading vs compute: the share of a training iteration spent in ``train_step``.

Usage::

    python benchmarks/perf_dataloading.py [--quick] [--steps N]

For our diffusion segmentation trainer and nnU-Net's trainer (same patch, batch, topology; 2D and
3D), nnU-Net's training loop is replayed: ``next(dataloader_train)`` (waiting for an augmented batch)
then ``train_step``. Reported per iteration: the wait, the step, and the compute share
``step / (wait + step)``, after a warm-up of a few iterations.

Two data-loading modes:

* ``nnUNet_n_proc_DA=0`` (what the tests use): augmentation runs in the main process, so the wait is
  the augmentation's own cost and the share is what one core achieves;
* nnU-Net's default worker count on this machine (``get_allowed_n_proc_DA()``: min(12, cores) = 2
  here), background processes that augment while the main process trains. On a 2-core machine
  they compete with the training thread for the cores, which this measures too.
"""

from __future__ import annotations

import argparse
import os

import perf_common as pc

PAIRS = [("2d", "DiffusionSegmentationTrainer", "2d_diffusion"), ("2d", "nnUNetTrainer", "2d_cpu"),
         ("3d", "DiffusionSegmentationTrainer", "3d_diffusion"), ("3d", "nnUNetTrainer", "3d_fullres_cpu")]


def measure(trainer_name: str, configuration: str, workers: int | None, warmup: int, steps: int) -> dict:
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    if workers is None:
        os.environ.pop("nnUNet_n_proc_DA", None)  # nnU-Net's own default for this machine
    else:
        os.environ["nnUNet_n_proc_DA"] = str(workers)
    allowed = get_allowed_n_proc_DA()
    trainer = pc.build_initialized_trainer(pc.SEGMENTATION, configuration, trainer_name)
    loader_train, loader_val = trainer.get_dataloaders()
    waits, computes = [], []
    try:
        for i in range(warmup + steps):
            with pc.Stopwatch() as wait:
                batch = next(loader_train)
            with pc.Stopwatch() as compute:
                trainer.train_step(batch)
            if i >= warmup:
                waits.append(wait.wall)
                computes.append(compute.wall)
    finally:
        for loader in (loader_train, loader_val):
            finish = getattr(loader, "_finish", None)
            if callable(finish):
                finish()
        os.environ["nnUNet_n_proc_DA"] = "0"
    wait_s, step_s = sum(waits) / steps, sum(computes) / steps
    return {"trainer": trainer_name, "configuration": configuration, "n_proc_DA": allowed,
            "mode": "main process" if allowed == 0 else f"{allowed} worker processes",
            "wait_s": wait_s, "step_s": step_s, "compute_share": step_s / (wait_s + step_s),
            "median_wait_s": pc.median(waits), "median_step_s": pc.median(computes), "steps": steps,
            "load_average": pc.load_average()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int)
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.quick else 30)
    warmup = 2 if args.quick else 3
    pc.prepare_datasets()
    machine = pc.machine_info()
    results = []
    for workers in (0, None):
        for dim, trainer_name, configuration in PAIRS:
            pc.log(f"data loading: {trainer_name} {configuration}, nnUNet_n_proc_DA={workers}")
            results.append({"dim": dim, **measure(trainer_name, configuration, workers, warmup=warmup, steps=steps)})
    rows = [[r["dim"].upper(), r["trainer"], r["configuration"], r["mode"], f"{1000 * r['wait_s']:.0f}",
             f"{1000 * r['step_s']:.0f}", f"**{100 * r['compute_share']:.0f} %**", f"{r['load_average'][0]:.1f}"]
            for r in results]
    table = pc.markdown_table(["dim", "trainer", "configuration", "augmentation", "wait for batch (ms)",
                               "train_step (ms)", "compute share", "load (1 min)"], rows)
    markdown = (f"Command: `{pc.command_line()}`\n\nMean over {steps} iterations after {warmup} warm-up iterations, "
                f"wall time, 1 torch thread in the training process.\n\n{table}\n")
    pc.write_result("dataloading", {"machine": machine, "results": results}, markdown)
    return 0


if __name__ == "__main__":
    pc.run_main(main)
