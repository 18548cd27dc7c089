"""Network calls vs quality on the phantom, for translation and segmentation: DDIM, the multistep solvers, warm
starts, rectified flow and the distilled students (issue 20).

Usage::

    python -m studies.steps_phantom [--iterations 600] [--distill-iterations 150] [--tasks translation ...]

* Models: the tiny phantom's ``2d_diffusion`` (cosine schedule, x0 prediction) of ``perf_common``, trained for
  ``--iterations`` steps on fold 0, and the same network, data and iterations with rectified flow
  (``2d_diffusion_rflow``, the planner's derived configuration): equal training budget in steps.
* Students: ``spinediff distill`` of the cosine model (progressive distillation from 8 teacher steps to 2, and to
  1), ``--distill-iterations`` student updates per round on the fold's training patches.
* Cases: the fold's validation cases, each predicted whole (every slice, the same per-slice seeds for every
  setting; one sample), scored on the preprocessed grid: translation by the MAE in HU over the volume and the PSNR
  (data range = the plans' target range), segmentation by the mean foreground Dice of the argmax.
* Reference: DDIM with 50 steps. Network calls per sample = steps (warm start: + 1 for its first estimate).

Writes ``benchmarks/output/performance/steps_phantom.{json,md}``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from benchmarks import perf_common as pc

DDPM_SETTINGS = [("ddim", s, None) for s in (1, 2, 5, 10, 25, 50)] + \
    [("dpm++2m", s, None) for s in (2, 5, 10, 25)] + [("unipc", s, None) for s in (2, 5, 10)] + \
    [("ddim", 1, 0.5), ("ddim", 4, 0.5)]
FLOW_SETTINGS = [("euler", s, None) for s in (1, 2, 5, 10, 25, 50)]
DISTILLED = (2, 1)
REFERENCE = "ddim:50"
TOLERANCE = 0.01

pc.MODEL_RECIPES.setdefault("translation_rflow", dict(pc.MODEL_RECIPES["translation"],
                                                      configuration="2d_diffusion_rflow"))
pc.MODEL_RECIPES.setdefault("segmentation_rflow", dict(pc.MODEL_RECIPES["segmentation"],
                                                       configuration="2d_diffusion_rflow"))


def label(solver: str, steps: int, warm: float | None, distilled: bool = False) -> str:
    text = f"{solver}:{steps}" + (f"@{warm:g}" if warm else "")
    return f"distilled {text}" if distilled else text


def predictor(trainer, solver: str, warm: float | None):
    from spinediff.diffusion.volume import VolumePredictor

    return VolumePredictor(trainer.inference_network, process=trainer.process,
                           patch_size=trainer.configuration_manager.patch_size,
                           window_batch_size=4 * max(1, trainer.configuration_manager.batch_size),
                           solver=solver, warm_start=warm)


def scores(trainer, x0: torch.Tensor, data: torch.Tensor, seg: torch.Tensor) -> dict:
    """Segmentation: mean foreground Dice; translation: MAE (HU) and PSNR (dB) of the sample."""
    from spinediff.metrics.image_metrics import psnr

    if trainer.task.task.writes_labels:
        prediction = trainer.task.probabilities(x0, channel_axis=1).mean(0).argmax(0).numpy()
        reference = seg[0].numpy()
        dice = []
        for c in range(1, x0.shape[1]):
            a, b = prediction == c, reference == c
            if a.sum() + b.sum():
                dice.append(2.0 * (a & b).sum() / (a.sum() + b.sum()))
        return {"dice": float(np.mean(dice))}
    hu = trainer.task.to_original_units(x0, channel_axis=1).mean(0)[0].numpy()
    real = data[trainer.task.target_channels[0]].numpy()
    mapping = trainer.task.target_intensity.mappings[0]
    return {"mae_hu": float(np.abs(hu - real).mean()), "psnr": psnr(hu, real, tuple(mapping.clip_range))}


def distilled_students(name: str, model: dict, iterations: int) -> dict[int, Path]:
    """``spinediff distill`` of the model's fold to each step count of DISTILLED (kept under the benchmark's work
    folder; the fold's ``checkpoint_distilled.pth`` is the last one made)."""
    from spinediff.training.distillation import DISTILLED_CHECKPOINT, distill

    recipe = model["recipe"]
    fold_folder = Path(model["folder"])
    out = {}
    for steps in DISTILLED:
        keep = pc.WORK / "students" / f"{name}_{recipe['iterations']}it_{steps}step_{iterations}.pth"
        if not keep.is_file():
            pc.log(f"distilling {name} to {steps} step(s), {iterations} updates per round")
            with pc.Stopwatch() as watch:
                distill(recipe["dataset"], recipe["configuration"], pc.FOLD, recipe["trainer"], steps=steps,
                        teacher_steps=8, iterations=iterations, overwrite=True, progress=False,
                        results_folder=str(fold_folder.parents[2]))
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(fold_folder / DISTILLED_CHECKPOINT, keep)
            pc.log(f"  {watch.wall:.0f} s")
        out[steps] = keep
    return out


def evaluate(name: str, iterations: int, distill_iterations: int, flow: bool) -> dict:
    model = pc.trained_model(name, iterations)
    trainer = pc.load_trainer_for_prediction(name, model["folder"])
    settings = [(s, n, w, None) for s, n, w in (FLOW_SETTINGS if flow else DDPM_SETTINGS)]
    if not flow:
        for steps, path in distilled_students(name, model, distill_iterations).items():
            settings.append(("ddim", steps, None, path))
    keys = pc.validation_cases(model["recipe"]["dataset"])
    teacher_weights = {k: v.clone() for k, v in trainer.inference_network.state_dict().items()}
    rows = []
    for solver, steps, warm, student in settings:
        weights = torch.load(student, weights_only=True)["network_weights"] if student else teacher_weights
        trainer.inference_network.load_state_dict(weights)
        per_case, seconds = [], []
        for key in keys:
            dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, [key])
            data, seg, _, _ = dataset.load_case(key)
            data = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
            seg = torch.from_numpy(np.asarray(seg[:], dtype=np.int16))
            condition = trainer.task.condition(data[None], seg[None])[0]
            with pc.Stopwatch() as watch:
                x0 = predictor(trainer, solver, warm).predict(condition, num_inference_steps=steps, seed=0,
                                                               num_samples=1)
            seconds.append(watch.wall)
            per_case.append(scores(trainer, x0, data, seg))
        row = {"setting": label(solver, steps, warm, student is not None), "network_calls": steps + (1 if warm else 0),
               "seconds_per_volume": float(np.mean(seconds)), "per_case": per_case,
               **{m: float(np.mean([c[m] for c in per_case])) for m in per_case[0]}}
        pc.log(f"{name} {row['setting']}: " + ", ".join(f"{m} {row[m]:.4g}" for m in per_case[0]))
        rows.append(row)
    return {"name": name, "task": trainer.task.task.name, "model": model, "cases": keys, "rows": rows,
            "distill_iterations_per_round": None if flow else distill_iterations}


def within_tolerance(value: float, reference: float, metric: str) -> bool:
    """Dice at least 99 % of the reference's, or MAE at most 101 %."""
    if metric == "dice":
        return value >= (1 - TOLERANCE) * reference
    return value <= (1 + TOLERANCE) * reference


def render(results: list[dict], command: str) -> str:
    parts = [f"Command: `{command}`\n", "One sample per case; quality relative to cold DDIM with 50 steps of the "
             "cosine model. Network calls per sample (a 2D model makes them once per slice).\n"]
    tasks = sorted({r["task"] for r in results}, key=lambda t: t != "translation")
    for task in tasks:
        group = [r for r in results if r["task"] == task]
        reference = next(row for r in group if not r["name"].endswith("rflow") for row in r["rows"]
                         if row["setting"] == REFERENCE)
        metric = "dice" if task == "segmentation" else "mae_hu"
        header = ["model", "setting", "network calls", "Dice" if task == "segmentation" else "MAE (HU)"]
        header += [] if task == "segmentation" else ["PSNR (dB)"]
        header += ["vs DDIM 50", "s / volume"]
        rows = []
        for r in group:
            kind = "rectified flow" if r["name"].endswith("rflow") else "cosine DDPM"
            for row in r["rows"]:
                change = 100 * (row[metric] / reference[metric] - 1)
                cells = [kind, f"`{row['setting']}`", row["network_calls"], f"{row[metric]:.3f}" if metric == "dice"
                         else f"{row[metric]:.1f}"]
                cells += [] if task == "segmentation" else [f"{row['psnr']:.2f}"]
                cells += [f"{change:+.1f} %", f"{row['seconds_per_volume']:.2f}"]
                rows.append(cells)
        good = [(row["network_calls"], row["setting"]) for r in group for row in r["rows"]
                if within_tolerance(row[metric], reference[metric], metric)]
        cheapest = min(good) if good else None
        model = group[0]["model"]
        parts.append(f"**{task}** ({model['recipe']['iterations']} training iterations per model, validation cases "
                     f"{', '.join(group[0]['cases'])}); cheapest setting within 1 % of DDIM 50: "
                     f"{f'`{cheapest[1]}` ({cheapest[0]} call(s))' if cheapest else 'none'}.\n\n"
                     + pc.markdown_table(header, rows) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=pc.FULL_ITERATIONS, help="training iterations per model")
    parser.add_argument("--distill-iterations", type=int, default=150, help="student updates per distillation round")
    parser.add_argument("--tasks", nargs="+", default=["translation", "segmentation"])
    parser.add_argument("--no-flow", action="store_true", help="skip the rectified-flow models")
    args = parser.parse_args(argv)
    pc.prepare_datasets()
    results = []
    for task in args.tasks:
        results.append(evaluate(task, args.iterations, args.distill_iterations, flow=False))
        if not args.no_flow:
            results.append(evaluate(f"{task}_rflow", args.iterations, args.distill_iterations, flow=True))
    pc.write_result("steps_phantom", {"machine": pc.machine_info(), "results": results},
                    render(results, pc.command_line()))
    return 0


if __name__ == "__main__":
    pc.run_main(main)
