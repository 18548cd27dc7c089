"""Sampling cost vs quality: PSNR (translation) and Dice (segmentation) against DDIM steps and ensemble size.

Usage::

    python benchmarks/perf_sampling_quality.py [--quick] [--iterations N] [--retrain]

* Models: ``DiffusionTranslationTrainer`` and ``DiffusionSegmentationTrainer`` on the tiny phantom's
  ``2d_diffusion`` configuration (fold 0), trained for a fixed number of iterations by
  ``perf_common.trained_model`` (reused on later runs while the recipe is unchanged).
* Cases: the fold's validation cases, predicted whole by the trainer's ``predict_volume`` (every
  slice sampled with the sliding-window DDIM sampler, EMA weights), scored in the preprocessed
  geometry against the preprocessed reference: PSNR in HU over the volume (data range = the plans'
  target range) for translation, mean foreground Dice of the argmax for segmentation.
* Steps: DDIM 2, 5, 10, 25, 50 with one sample and the same seed (so the initial noise is the same
  for every step count). Reference: ancestral DDPM with all 1000 timesteps (monai's
  ``DDPMScheduler`` behind the same sliding-window loop), compared with DDIM 50 on the same slices;
  in ``--quick`` mode only for segmentation, on the central slice of one case.
* Ensembles: K = 1, 3, 5, 10 at the plans' step count; translation averages the K samples in HU,
  segmentation averages the class probabilities. Member k does not depend on K (per-member seeds),
  so one 10-sample draw gives every K.
"""

from __future__ import annotations

import argparse

import numpy as np
import perf_common as pc
import torch
from monai.networks.schedulers import DDPMScheduler

STEPS = (2, 5, 10, 25, 50)
ENSEMBLE_SIZES = (1, 3, 5, 10)
TOLERANCE = 0.01  # "within 1 % of the 50-step quality"
TARGET_STEPS = 10


class AncestralDDPMScheduler:
    """monai's ``DDPMScheduler`` with the call signature the sliding-window sampler uses for DDIM."""

    def __init__(self, process) -> None:
        self.scheduler = DDPMScheduler(process.num_train_timesteps, process.schedule_name, clip_sample=True,
                                       prediction_type=process.prediction_type)
        self.set_timesteps(process.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.scheduler.set_timesteps(num_inference_steps)
        self.timesteps = self.scheduler.timesteps

    def step(self, model_output, timestep, sample, eta=0.0, generator=None):
        return self.scheduler.step(model_output, int(timestep), sample, generator=generator)


def load_case(trainer, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Condition, preprocessed image data and label map of one case, as the final validation reads them."""
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, [key])
    data, seg, _, properties = dataset.load_case(key)
    data = torch.from_numpy(np.asarray(data[:], dtype=np.float32))
    seg = torch.from_numpy(np.asarray(seg[:], dtype=np.int16))
    return trainer.task.condition(data[None], seg[None])[0], data, seg, properties


def score(trainer, x0: torch.Tensor, data: torch.Tensor, seg: torch.Tensor, spacing) -> float:
    """Quality of an ensemble ``x0`` (K, C, *spatial): PSNR in HU of the mean, or Dice of the mean probabilities."""
    from spinediff.metrics.image_metrics import psnr
    from spinediff.metrics.segmentation_metrics import segmentation_metrics

    if trainer.task.task == "segmentation":
        probabilities = trainer.task.probabilities(x0, channel_axis=1).mean(0)
        prediction = probabilities.argmax(0).numpy()
        reference = seg[0].numpy()
        classes = list(range(1, x0.shape[1]))
        per_class = segmentation_metrics(prediction, reference, classes, spacing)
        dice = [v["dice"] for v in per_class.values() if not np.isnan(v["dice"])]
        return float(np.mean(dice)) if dice else float("nan")
    hu = trainer.task.to_original_units(x0, channel_axis=1).mean(0)[0].numpy()
    channel = trainer.task.target_channels[0]
    mapping = trainer.task.target_intensity.mappings[0]
    return psnr(hu, data[channel].numpy(), tuple(mapping.clip_range))


def sample_slices(trainer, condition: torch.Tensor, steps: int, slices: list[int], seed: int = 0,
                  scheduler=None) -> torch.Tensor:
    """``predict_volume``'s slice loop (same per-slice seeds) on some slices, optionally another scheduler."""
    sampler = trainer.make_predictor().sampler
    if scheduler is not None:
        sampler.scheduler = scheduler
    return torch.stack([sampler.sample(condition[:, z], 1, generator=seed + z, num_inference_steps=steps)
                        for z in slices], dim=2)


def evaluate_task(name: str, iterations: int, retrain: bool, max_cases: int, ddpm_slices: int | None,
                  ddpm: bool = True) -> dict:
    model = pc.trained_model(name, iterations, retrain)
    trainer = pc.load_trainer_for_prediction(name, model["folder"])
    dataset = model["recipe"]["dataset"]
    keys = pc.validation_cases(dataset)[:max_cases]
    metric = "dice" if trainer.task.task == "segmentation" else "psnr_hu"
    plans_steps = trainer.settings.num_inference_steps
    steps_quality: dict[int, list[float]] = {s: [] for s in STEPS}
    steps_seconds: dict[int, list[float]] = {s: [] for s in STEPS}
    ensemble_quality: dict[int, list[float]] = {k: [] for k in ENSEMBLE_SIZES}
    ensemble_seconds: list[float] = []
    reference_rows = []
    shapes = []
    for index, key in enumerate(keys):
        condition, data, seg, properties = load_case(trainer, key)
        spacing = trainer.configuration_manager.spacing
        spacing = [properties.get("spacing", spacing)[0], *spacing] if len(spacing) == 2 else spacing
        shapes.append(list(condition.shape[1:]))
        pc.log(f"{name} {key}: DDIM {STEPS}")
        for steps in STEPS:
            with pc.Stopwatch() as watch:
                x0 = trainer.predict_volume(condition, seed=0, num_inference_steps=steps, num_samples=1)
            steps_seconds[steps].append(watch.wall)
            steps_quality[steps].append(score(trainer, x0, data, seg, spacing))
        pc.log(f"{name} {key}: ensembles K={ENSEMBLE_SIZES} at {plans_steps} steps")
        with pc.Stopwatch() as watch:
            members = trainer.predict_volume(condition, seed=0, num_inference_steps=plans_steps,
                                             num_samples=max(ENSEMBLE_SIZES))
        ensemble_seconds.append(watch.wall)
        for k in ENSEMBLE_SIZES:
            ensemble_quality[k].append(score(trainer, members[:k], data, seg, spacing))
        if ddpm and index == 0:  # DDPM 1000 reference: costly, on the first case (its central slice in --quick)
            depth = condition.shape[1]
            count = depth if ddpm_slices is None else min(ddpm_slices, depth)
            slices = list(range((depth - count) // 2, (depth - count) // 2 + count))
            pc.log(f"{name} {key}: DDPM 1000 on slices {slices}")
            with pc.Stopwatch() as watch:
                ddpm = sample_slices(trainer, condition, 1000, slices,
                                     scheduler=AncestralDDPMScheduler(trainer.process))
            ddpm_seconds = watch.wall
            ddim = sample_slices(trainer, condition, 50, slices)
            sub = (slice(None), slices)
            reference_rows.append({
                "case": key, "slices": slices, "ddpm_1000": score(trainer, ddpm, data[sub], seg[sub], spacing),
                "ddim_50": score(trainer, ddim, data[sub], seg[sub], spacing), "ddpm_seconds": ddpm_seconds})
    mean = {s: float(np.mean(v)) for s, v in steps_quality.items()}
    reference = mean[50]
    within = [s for s in STEPS if mean[s] >= (1 - TOLERANCE) * reference]
    slices_per_case = float(np.mean([s[0] for s in shapes]))
    return {
        "task": trainer.task.task, "metric": metric, "model": model, "cases": keys, "case_shapes": shapes,
        "plans_steps": plans_steps, "ensemble_sizes": list(ENSEMBLE_SIZES),
        "steps_quality_per_case": {str(k): v for k, v in steps_quality.items()},
        "steps_quality": {str(k): v for k, v in mean.items()},
        "steps_seconds_per_volume": {str(k): float(np.mean(v)) for k, v in steps_seconds.items()},
        "network_evaluations_per_volume": {str(s): int(s * slices_per_case) for s in STEPS},
        "ensemble_quality": {str(k): float(np.mean(v)) for k, v in ensemble_quality.items()},
        "ensemble_quality_per_case": {str(k): v for k, v in ensemble_quality.items()},
        "ensemble_seconds_per_volume_k10": float(np.mean(ensemble_seconds)),
        "reference": reference_rows,
        "smallest_steps_within_1_percent_of_50": min(within),
        "target_steps": TARGET_STEPS,
    }


def render(results: list[dict], command: str, quick: bool) -> str:
    parts = [f"Command: `{command}`\n"]
    for r in results:
        unit = "Dice" if r["metric"] == "dice" else "PSNR (dB, HU)"
        fmt = (lambda v: f"{v:.3f}") if r["metric"] == "dice" else (lambda v: f"{v:.2f}")
        rows = [[f"DDIM {s}", r["network_evaluations_per_volume"][str(s)], fmt(r["steps_quality"][str(s)]),
                 f"{100 * (r['steps_quality'][str(s)] / r['steps_quality']['50'] - 1):+.1f} %",
                 f"{r['steps_seconds_per_volume'][str(s)]:.1f}"] for s in STEPS]
        for ref in r["reference"]:
            rows.append([f"DDPM 1000 (case {ref['case']}, slices {ref['slices'][0]}-{ref['slices'][-1]})",
                         1000 * len(ref["slices"]), fmt(ref["ddpm_1000"]),
                         f"DDIM 50 on the same slices: {fmt(ref['ddim_50'])}", f"{ref['ddpm_seconds']:.1f}"])
        model = r["model"]
        steps_table = pc.markdown_table(["sampler", "network calls / volume", unit, "vs DDIM 50",
                                         "s / volume (wall)"], rows)
        ensemble_rows = [[k, fmt(r["ensemble_quality"][str(k)]),
                          f"{100 * (r['ensemble_quality'][str(k)] / r['ensemble_quality']['1'] - 1):+.1f} %",
                          f"{r['ensemble_seconds_per_volume_k10'] * k / 10:.1f}"] for k in r["ensemble_sizes"]]
        ensemble_table = pc.markdown_table(["K", unit, "vs K = 1", "s / volume (wall, pro rata)"], ensemble_rows)
        smallest = r["smallest_steps_within_1_percent_of_50"]
        verdict = "meets" if smallest <= r["target_steps"] else f"misses (by {smallest - r['target_steps']} steps)"
        parts.append(
            f"**{r['task']}** ({model['recipe']['trainer']}, {model['recipe']['configuration']}, "
            f"{model['recipe']['iterations']} training iterations, validation cases {', '.join(r['cases'])}, "
            f"shapes {r['case_shapes']}): smallest DDIM step count within 1 % of the 50-step {unit}: "
            f"**{smallest}** ({verdict} the target <= {r['target_steps']}).\n\n{steps_table}\n\n"
            f"Ensembles at the plans' {r['plans_steps']} steps:\n\n{ensemble_table}\n")
    if quick:
        parts.append("`--quick`: one validation case; DDPM 1000 runs for segmentation only, on the central slice "
                     "of that case.\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iterations", type=int, help="training iterations of the models (default 200 quick, 600)")
    parser.add_argument("--retrain", action="store_true", help="train the models again even if reusable")
    parser.add_argument("--tasks", nargs="+", default=["translation", "segmentation"])
    args = parser.parse_args(argv)
    iterations = args.iterations or (pc.QUICK_ITERATIONS if args.quick else pc.FULL_ITERATIONS)
    pc.prepare_datasets()
    machine = pc.machine_info()
    # --quick: one case; the DDPM reference only for segmentation (translation's image-mode curve is flat)
    # and only on the central slice (1000 network calls per slice)
    results = [evaluate_task(task, iterations, args.retrain, max_cases=1 if args.quick else 2,
                             ddpm_slices=1 if args.quick else None, ddpm=not args.quick or task == "segmentation")
               for task in args.tasks]
    pc.write_result("sampling_quality", {"machine": machine, "quick": args.quick, "tolerance": TOLERANCE,
                                         "results": results}, render(results, pc.command_line(), args.quick))
    return 0


if __name__ == "__main__":
    pc.run_main(main)
