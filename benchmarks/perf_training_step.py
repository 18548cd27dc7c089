"""Training-step throughput: spinediff's diffusion trainers vs nnU-Net's ``nnUNetTrainer``.

Usage::

    python benchmarks/perf_training_step.py [--quick] [--repeats 7] [--steps-per-repeat 3]

Fair comparison, and how it is kept fair:

* the same dataset, patch size, batch size and topology: ``2d_diffusion`` vs ``2d_cpu`` and
  ``3d_diffusion`` vs ``3d_fullres_cpu`` of the tiny phantom planned with ``--device cpu`` (the
  planner gives the nnU-Net configurations the stage widths of the diffusion ones);
* each trainer's own ``train_step`` (ours: noise, FiLM U-Net, Dice+CE or L1, AdamW, gradient
  clipping, EMA; nnU-Net's: PlainConvUNet with deep supervision, DC+CE, SGD, clipping) on batches
  pre-fetched from its own nnU-Net data loader, so data loading is excluded (``perf_dataloading.py``);
* one torch thread for both (the machine is shared; two threads spin at OpenMP barriers under load);
* the two sides are interleaved (ours, nnU-Net, ours, nnU-Net, ...) after a warm-up, so a change
  of load hits both; the median of the repeats is reported, in wall time and in process CPU time
  (with one thread the CPU time of a step does not include time spent waiting for a core).

A second pass splits one step of each side into phases (forward, loss, backward, clipping,
optimiser, EMA, rest) by timing the trainer's own calls, which explains a ratio below target.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

import perf_common as pc
import torch

TARGET_RATIO = 0.85
PAIRS = {  # (ours, nnU-Net) on the same dataset
    "2d": [("DiffusionSegmentationTrainer", pc.SEGMENTATION, "2d_diffusion", "2d_cpu"),
           ("DiffusionTranslationTrainer", pc.TRANSLATION, "2d_diffusion", "2d_cpu")],
    "3d": [("DiffusionSegmentationTrainer", pc.SEGMENTATION, "3d_diffusion", "3d_fullres_cpu"),
           ("DiffusionTranslationTrainer", pc.TRANSLATION, "3d_diffusion", "3d_fullres_cpu")],
}


def time_steps(trainer, batches: list[dict], steps: int) -> tuple[float, float]:
    """Mean (wall, CPU) seconds per ``train_step`` over ``steps`` steps cycling through ``batches``."""
    with pc.Stopwatch() as watch:
        for i in range(steps):
            trainer.train_step(batches[i % len(batches)])
    return watch.wall / steps, watch.cpu / steps


class PhaseTimer:
    """CPU seconds spent in named calls of a training step (single thread: CPU time = compute)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._depth = 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._depth:  # nested call (e.g. clip inside optimizer hooks): count once, in the outer phase
            yield
            return
        self._depth += 1
        start = time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - start
            self._depth -= 1

    def wrap(self, name: str, function):
        def wrapped(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)
        return wrapped


@contextlib.contextmanager
def instrumented(trainer, timer: PhaseTimer) -> Iterator[None]:
    """Time the calls a ``train_step`` makes, for ours and nnU-Net's trainer alike."""
    patches: list[tuple[object, str, object, bool]] = []

    def patch(owner: object, attribute: str, name: str) -> None:
        # an instance whose attribute comes from its class gets a shadowing attribute, removed afterwards;
        # modules, classes and instance attributes get their original back
        shadow = not isinstance(owner, (type, type(torch))) and attribute not in vars(owner)
        original = getattr(owner, attribute)
        patches.append((owner, attribute, original, shadow))
        setattr(owner, attribute, timer.wrap(name, original))

    network = trainer.network
    patch(network, "forward", "forward")
    if hasattr(trainer, "process"):  # ours: the diffusion process owns the loss and the noising
        patch(trainer.process, "loss", "loss")
        patch(trainer.process, "prepare_training_batch", "noise + network input")
        patch(trainer, "split_batch", "condition/target from batch")
        patch(trainer.ema, "update", "EMA update")
    else:
        patch(trainer, "loss", "loss")
    patch(trainer.optimizer, "step", "optimizer step")
    patch(torch.nn.utils, "clip_grad_norm_", "gradient clipping")
    patch(torch.Tensor, "backward", "backward")
    try:
        yield
    finally:
        for owner, attribute, original, shadow in reversed(patches):
            if shadow:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)


def phase_breakdown(trainer, batches: list[dict], steps: int) -> dict[str, float]:
    """Mean CPU ms per step in each phase (``rest``: everything not in a named call)."""
    timer = PhaseTimer()
    with instrumented(trainer, timer), pc.Stopwatch() as watch:
        for i in range(steps):
            trainer.train_step(batches[i % len(batches)])
    phases = {name: 1000 * value / steps for name, value in timer.seconds.items()}
    phases["rest"] = 1000 * watch.cpu / steps - sum(phases.values())
    phases["total"] = 1000 * watch.cpu / steps
    return {k: round(v, 2) for k, v in phases.items()}


def compare(ours_name: str, dataset: int, ours_config: str, nnunet_config: str, repeats: int, steps: int,
            warmup: int, phase_steps: int) -> dict:
    pc.log(f"{ours_name} {ours_config} vs nnUNetTrainer {nnunet_config} (dataset {dataset})")
    ours = pc.build_initialized_trainer(dataset, ours_config, ours_name)
    nnunet = pc.build_initialized_trainer(dataset, nnunet_config, "nnUNetTrainer")
    batches = {"ours": pc.prefetch_batches(ours, steps), "nnunet": pc.prefetch_batches(nnunet, steps)}
    sides = {"ours": ours, "nnunet": nnunet}
    for side, trainer in sides.items():
        time_steps(trainer, batches[side], warmup)
    samples: dict[str, list[tuple[float, float]]] = {"ours": [], "nnunet": []}
    loads = []
    for repeat in range(repeats):
        # interleaved (ours, nnU-Net, nnU-Net, ours, ours, ...): a load change hits both sides, and neither
        # always runs first (right after the other side has evicted its weights from the caches)
        order = ["ours", "nnunet"] if repeat % 2 == 0 else ["nnunet", "ours"]
        for side in order:
            samples[side].append(time_steps(sides[side], batches[side], steps))
        loads.append(pc.load_average()[0])
    result = {"ours_trainer": ours_name, "dataset": pc.DATASET_NAMES[dataset],
              "ours": pc.configuration_summary(dataset, ours_config),
              "nnunet": pc.configuration_summary(dataset, nnunet_config),
              "repeats": repeats, "steps_per_repeat": steps, "warmup_steps": warmup,
              "load_average_1min_during": loads, "samples_wall_cpu_s": samples}
    for side in sides:
        result[f"{side}_wall_s"] = pc.median([w for w, _ in samples[side]])
        result[f"{side}_cpu_s"] = pc.median([c for _, c in samples[side]])
    # ratio of iterations per second = nnU-Net's step time / ours; per repeat, then the median, so a
    # load change between repeats cancels out
    result["ratio_wall"] = pc.median([n[0] / o[0] for o, n in zip(samples["ours"], samples["nnunet"], strict=True)])
    result["ratio_cpu"] = pc.median([n[1] / o[1] for o, n in zip(samples["ours"], samples["nnunet"], strict=True)])
    result["phases_cpu_ms"] = {side: phase_breakdown(trainer, batches[side], phase_steps)
                               for side, trainer in sides.items()}
    result["parameters"] = {side: sum(p.numel() for p in t.network.parameters()) for side, t in sides.items()}
    return result


def ablation_networks(dim: str) -> dict[str, tuple[torch.nn.Module, int, bool]]:
    """A ladder from nnU-Net's network to ours, one change per rung: name -> (network, inputs, timed).

    Segmentation dataset: 2 image channels; ours reads 2 + 4 (noisy one-hot) channels and outputs 4.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(pc.plans(pc.SEGMENTATION))
    ours = manager.get_configuration(f"{dim}_diffusion")
    theirs = manager.get_configuration("2d_cpu" if dim == "2d" else "3d_fullres_cpu")

    def build(configuration, inputs: int, deep_supervision: bool = False, **overrides) -> torch.nn.Module:
        kwargs = {**configuration.network_arch_init_kwargs, **overrides}
        return get_network_from_plans(configuration.network_arch_class_name, kwargs,
                                      configuration.network_arch_init_kwargs_req_import, inputs, 4,
                                      allow_init=True, deep_supervision=deep_supervision)

    group_norm = {"norm_op": "spinediff.networks.blocks.GroupNorm",
                  "norm_op_kwargs": {"num_groups": 8, "eps": 1e-5, "affine": True},
                  "nonlin": "torch.nn.SiLU", "nonlin_kwargs": {"inplace": True}}
    instance_norm = f"torch.nn.InstanceNorm{dim[0]}d"
    return {
        "nnU-Net's PlainConvUNet (2 inputs, deep supervision, InstanceNorm, LeakyReLU)": (
            build(theirs, 2, True), 2, False),
        "+ our channels (6 inputs), no deep supervision": (build(theirs, 6), 6, False),
        "+ GroupNorm and SiLU instead of InstanceNorm and LeakyReLU": (build(theirs, 6, **group_norm), 6, False),
        "+ timestep embedding and FiLM (ours without attention)": (build(ours, 6, attention_stages=[]), 6, True),
        "+ attention at the coarsest stage (ours)": (build(ours, 6), 6, True),
        "ours with InstanceNorm instead of GroupNorm": (
            build(ours, 6, norm_op=instance_norm, norm_op_kwargs={"eps": 1e-5, "affine": True}), 6, True),
    }


def network_ablation(dim: str, repeats: int) -> dict[str, float]:
    """Forward + L1 + backward CPU ms of each rung (no optimiser), interleaved, median of the repeats."""
    ours = pc.configuration_summary(pc.SEGMENTATION, f"{dim}_diffusion")
    networks = ablation_networks(dim)
    generator = torch.Generator().manual_seed(0)
    inputs = {c: torch.randn(ours["batch_size"], c, *ours["patch_size"], generator=generator) for c in (2, 6)}
    timesteps = torch.randint(0, 1000, (ours["batch_size"],), generator=generator)

    def step(network: torch.nn.Module, channels: int, timed: bool) -> None:
        network.zero_grad(set_to_none=True)
        output = network(inputs[channels], timesteps) if timed else network(inputs[channels])
        outputs = output if isinstance(output, (list, tuple)) else [output]
        sum(o.abs().mean() for o in outputs).backward()

    for network, channels, timed in networks.values():
        network.train()
        step(network, channels, timed)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in networks}
    for _ in range(repeats):
        for name, (network, channels, timed) in networks.items():
            with pc.Stopwatch() as watch:
                step(network, channels, timed)
            samples[name].append(watch.cpu)
    return {name: round(1000 * pc.median(values), 2) for name, values in samples.items()}


def markdown(results: list[dict], ablations: dict[str, dict[str, float]], command: str) -> str:
    rows = []
    for r in results:
        o = r["ours"]
        rows.append([f"{len(o['patch_size'])}D", r["ours_trainer"].replace("Trainer", ""),
                     f"{o['configuration']} vs {r['nnunet']['configuration']}",
                     "x".join(map(str, o["patch_size"])), o["batch_size"],
                     f"{o['features_per_stage'][0]}-{o['features_per_stage'][-1]}",
                     f"{1 / r['ours_wall_s']:.2f}", f"{1 / r['nnunet_wall_s']:.2f}",
                     f"{1000 * r['ours_cpu_s']:.0f} / {1000 * r['nnunet_cpu_s']:.0f}",
                     f"**{r['ratio_wall']:.2f}**", f"{r['ratio_cpu']:.2f}",
                     "yes" if r["ratio_wall"] >= TARGET_RATIO else f"no ({r['ratio_wall'] / TARGET_RATIO - 1:+.1%})",
                     f"{min(r['load_average_1min_during']):.1f}-{max(r['load_average_1min_during']):.1f}"])
    table = pc.markdown_table(
        ["dim", "ours", "configurations", "patch", "batch", "features", "ours it/s", "nnU-Net it/s",
         "CPU ms/step ours / nnU-Net", "ratio (wall)", "ratio (CPU)", f">= {TARGET_RATIO}?", "load (1 min)"], rows)
    phase_names = ["condition/target from batch", "noise + network input", "forward", "loss", "backward",
                   "gradient clipping", "optimizer step", "EMA update", "rest", "total"]
    phase_rows = []
    for r in results:
        for side in ("ours", "nnunet"):
            phases = r["phases_cpu_ms"][side]
            label = f"{len(r['ours']['patch_size'])}D {r['ours_trainer'] if side == 'ours' else 'nnUNetTrainer'}"
            phase_rows.append([label] + [phases.get(name, "-") for name in phase_names])
    phase_table = pc.markdown_table(["step (CPU ms)", *phase_names], phase_rows)
    text = (f"Command: `{command}`\n\n{table}\n\nPhases of one step (CPU ms, mean of a few steps, same "
            f"command):\n\n{phase_table}\n")
    for dim, rungs in ablations.items():
        first = next(iter(rungs.values()))
        rows = [[name, f"{ms:.0f}", f"{ms / first:.2f}"] for name, ms in rungs.items()]
        text += (f"\nNetwork only, {dim.upper()} (forward + L1 + backward, no optimiser; CPU ms, median, same "
                 f"command):\n\n{pc.markdown_table(['network', 'CPU ms', 'vs first row'], rows)}\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="7 repeats of 2 steps (the doc's default run)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--steps-per-repeat", type=int)
    parser.add_argument("--dims", nargs="+", default=["2d", "3d"], choices=["2d", "3d"])
    args = parser.parse_args(argv)
    repeats = args.repeats or (7 if args.quick else 11)
    steps = args.steps_per_repeat or (2 if args.quick else 4)
    pc.prepare_datasets()
    machine = pc.machine_info()
    # --quick: in 3D only the segmentation trainer (both diffusion trainers share the network; 3D steps are slow)
    pairs = [pair for dim in args.dims for pair in (PAIRS[dim][:1] if args.quick and dim == "3d" else PAIRS[dim])]
    results = [compare(*pair, repeats=repeats, steps=steps, warmup=2, phase_steps=2 if args.quick else 6)
               for pair in pairs]
    ablation_dims = ["2d"] if args.quick else args.dims
    ablations = {dim: network_ablation(dim, repeats) for dim in ablation_dims if dim in args.dims}
    pc.write_result("training_step", {"machine": machine, "target_ratio": TARGET_RATIO, "results": results,
                                      "network_ablation_cpu_ms": ablations},
                    markdown(results, ablations, pc.command_line()))
    return 0


if __name__ == "__main__":
    pc.run_main(main)
