"""Network calls vs quality for segmentation-guided generation (mask → CT) on the phantom, with Dice_gen (issue 20).

Usage::

    python -m studies.steps_generation [--iterations 600] [--distill-iterations 200] [--segmenter-epochs 8]

* Data: the tiny phantom's generation dataset (``Dataset903_SpinePhantomGeneration``: label map → CT), 6 cases,
  nnU-Net's 5-fold split; fold 0 (4 training, 2 validation cases). Its own folders under
  ``benchmarks/output/performance/generation_work``.
* Models, each ``--iterations`` training steps on fold 0 (equal budget in steps): the planned ``2d_diffusion``
  (noise prediction, the DDPM objective of Konz et al.), the same with v-prediction (``2d_diffusion_v``, which
  can be distilled) and rectified flow (``2d_diffusion_rflow``: v of the flow).
* Students: ``spinediff distill`` of the v model to 2 and to 1 DDIM steps (8 teacher steps, ``--distill-iterations``
  updates per round; a noise-prediction model cannot be distilled as it is).
* Dice_gen: nnU-Net's own trainer (``2d_cpu``) trained on the *real* CT of fold 0's training cases (a copy of
  the dataset without its generation block), run on each generated CT; Dice_orig: the same on the real CT.
* Every setting: ``spinediff predict`` from the validation cases' label maps (one sample, seed 0), scored in the raw
  CT geometry: MAE (HU) and PSNR (data range -1024..3071 HU) against the real CT, Dice_gen, and the Fréchet distance
  between the generated and the real CT of those cases in the segmenter's encoder features
  (:mod:`spinediff.metrics.frechet`; every sliding window of every slice is one sample, so the sets are small).

Writes ``benchmarks/output/performance/steps_generation.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import perf_common as pc

WORK = pc.OUTPUT / "generation_work"
os.environ["nnUNet_raw"] = str(WORK / "raw")  # before nnunetv2 is imported (it reads them once)
os.environ["nnUNet_preprocessed"] = str(WORK / "preprocessed")
os.environ["nnUNet_results"] = str(WORK / "results")  # main(): results_<iterations>it, models of one budget

GENERATION = "Dataset903_SpinePhantomGeneration"
SEGMENTER = "Dataset913_SpinePhantomGenerationCTSegmenter"
TRAINER = "SegGuidedGenerationTrainer"
MODELS = {"eps": "2d_diffusion", "v": "2d_diffusion_v", "rflow": "2d_diffusion_rflow"}
SETTINGS = {
    "eps": [("ddim", s, None) for s in (1, 2, 5, 10, 25, 50)] + [("dpm++2m", s, None) for s in (2, 5, 10, 25)]
    + [("unipc", s, None) for s in (2, 5, 10)] + [("ddim", 1, 0.5), ("ddim", 4, 0.5)],
    "v": [("ddim", s, None) for s in (1, 2, 5, 10, 25, 50)],
    "rflow": [("euler", s, None) for s in (1, 2, 5, 10, 25, 50)],
}
DISTILLED = (2, 1)
ITERATIONS_PER_EPOCH = 75


def prepare() -> None:
    """The phantom's generation dataset, its CT-segmentation copy, both planned (once)."""
    from spinediff.datasets.phantom_writer import write_phantom_datasets
    from spinediff.experiments.downstream import write_segmenter_dataset
    from spinediff.io import read_json, write_json
    from spinediff.planning.api import plan_dataset

    marker = WORK / "ready.json"
    recipe = {"cases": pc.NUM_CASES, "seed": pc.PHANTOM_SEED, "settings": repr(pc.phantom_settings())}
    if marker.is_file() and read_json(marker) == recipe:
        return
    pc.log("writing the phantom's generation dataset and planning it (once)")
    raw = WORK / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_phantom_datasets(raw, num_cases=pc.NUM_CASES, seed=pc.PHANTOM_SEED, tasks=("generation",),
                           settings=pc.phantom_settings(), overwrite=True, progress=False)
    write_segmenter_dataset(raw / GENERATION, raw / SEGMENTER)
    plan_dataset(903, configurations=["2d_diffusion"], device="cpu", num_processes=1, overwrite=True,
                 show_progress_bar=False)
    plan_dataset(913, configurations=["2d_cpu"], device="cpu", num_processes=1, overwrite=True,
                 show_progress_bar=False)
    write_json(recipe, marker)


def trained(dataset: int, configuration: str, trainer: str, epochs: int) -> Path:
    """Train fold 0 (or reuse it when its final checkpoint exists); returns the fold folder."""
    from spinediff.paths import model_folder_name
    from spinediff.training.api import TrainingOptions, train

    name = GENERATION if dataset == 903 else SEGMENTER
    fold = Path(os.environ["nnUNet_results"]) / name / model_folder_name(trainer, configuration) / "fold_0"
    if (fold / "checkpoint_final.pth").is_file():
        return fold
    pc.log(f"training {trainer} {configuration} on {name}: {epochs} x {ITERATIONS_PER_EPOCH} iterations")
    train(dataset, configuration, 0, trainer, TrainingOptions(epochs=epochs, iterations_per_epoch=ITERATIONS_PER_EPOCH,
                                                              val_iterations_per_epoch=1, validation_samples=1,
                                                              seed=0), overwrite=True)
    return fold


def students(fold: Path, iterations: int) -> dict[int, Path]:
    from spinediff.training.distillation import DISTILLED_CHECKPOINT, distill

    out = {}
    for steps in DISTILLED:
        keep = fold / f"student_{steps}step_{iterations}.pth"
        if not keep.is_file():
            pc.log(f"distilling the v model to {steps} step(s), {iterations} updates per round")
            distill(903, MODELS["v"], 0, TRAINER, steps=steps, teacher_steps=8, iterations=iterations,
                    overwrite=True, progress=False)
            shutil.copy(fold / DISTILLED_CHECKPOINT, keep)
        out[steps] = keep
    return out


def image_scores(predicted: Path, real: Path) -> dict:
    import SimpleITK as sitk

    from spinediff.metrics.image_metrics import psnr

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted))).astype(np.float64)
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(real))).astype(np.float64)
    return {"mae_hu": float(np.abs(a - b).mean()), "psnr": float(psnr(a, b, (-1024.0, 3071.0)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=pc.FULL_ITERATIONS, help="training iterations per model")
    parser.add_argument("--distill-iterations", type=int, default=200, help="student updates per round")
    parser.add_argument("--segmenter-epochs", type=int, default=8, help="epochs of 75 iterations of the CT segmenter")
    args = parser.parse_args(argv)
    os.environ["nnUNet_results"] = str(WORK / f"results_{args.iterations}it")
    from spinediff.experiments.downstream import segmenter_dice
    from spinediff.inference.api import predict
    from spinediff.io import read_json
    from spinediff.paths import model_folder_name

    prepare()
    epochs = max(1, args.iterations // ITERATIONS_PER_EPOCH)
    folds = {kind: trained(903, configuration, TRAINER, epochs) for kind, configuration in MODELS.items()}
    segmenter = trained(913, "2d_cpu", "nnUNetTrainer", args.segmenter_epochs).parent
    distilled = students(folds["v"], args.distill_iterations)
    raw = WORK / "raw" / GENERATION
    cases = read_json(WORK / "preprocessed" / GENERATION / "splits_final.json")[0]["val"]
    real = {c: raw / "imagesTr" / f"{c}_0000.nii.gz" for c in cases}
    orig = segmenter_dice(segmenter, 0, real, raw / "labelsTr")
    from spinediff.metrics.frechet import SegmenterFeatures, image_frechet_distance

    encoder = SegmenterFeatures(segmenter, 0)
    rows = []
    with tempfile.TemporaryDirectory(dir=WORK) as scratch:
        inputs = Path(scratch) / "in"
        inputs.mkdir()
        for c in cases:
            os.symlink((raw / "labelsTr" / f"{c}.nii.gz").resolve(), inputs / f"{c}.nii.gz")
        runs = [(kind, solver, steps, warm, None) for kind, settings in SETTINGS.items()
                for solver, steps, warm in settings]
        runs += [("v", "ddim", steps, None, path) for steps, path in distilled.items()]
        for index, (kind, solver, steps, warm, student) in enumerate(runs):
            out = Path(scratch) / f"run_{index}"
            fold = folds[kind]
            if student is not None:  # the student as the fold's distilled checkpoint, as spinediff distill leaves it
                shutil.copy(student, fold / "checkpoint_distilled.pth")
            with pc.Stopwatch() as watch:
                report = predict(inputs, out, 903, MODELS[kind], TRAINER, folds=[0], num_samples=1, seed=0,
                                 checkpoint="distilled" if student else "final",
                                 solver=None if student else solver, num_inference_steps=None if student else steps,
                                 warm_start=None if student else (warm or 0.0), progress=False, tuned_sampling=False)
            if report.failed:
                raise RuntimeError(report.failed[0].message)
            generated = {c: out / f"{c}.nii.gz" for c in cases}
            gen = segmenter_dice(segmenter, 0, generated, raw / "labelsTr")
            images = [image_scores(generated[c], real[c]) for c in cases]
            frechet = image_frechet_distance(encoder, generated.values(), real.values())
            setting = f"{solver}:{steps}" + (f"@{warm:g}" if warm else "")
            row = {"model": kind, "setting": f"distilled {setting}" if student else setting,
                   "network_calls": steps + (1 if warm else 0), "seconds_per_case": watch.wall / len(cases),
                   "mae_hu": float(np.mean([i["mae_hu"] for i in images])),
                   "psnr": float(np.mean([i["psnr"] for i in images])),
                   "dice_gen": float(np.mean([gen[c]["dice"] for c in cases])), "frechet": frechet, "per_case": {
                       c: {**images[i], "dice_gen": gen[c]["dice"]} for i, c in enumerate(cases)}}
            pc.log(f"{kind} {row['setting']}: MAE {row['mae_hu']:.1f} HU, PSNR {row['psnr']:.2f}, "
                   f"Dice_gen {row['dice_gen']:.3f}, Fréchet {frechet:.3g}")
            rows.append(row)
    dice_orig = float(np.mean([orig[c]["dice"] for c in cases]))
    reference = next(r for r in rows if r["model"] == "eps" and r["setting"] == "ddim:50")
    names = {"eps": "noise prediction (planned)", "v": "v-prediction", "rflow": "rectified flow"}
    table = pc.markdown_table(
        ["model", "setting", "network calls", "MAE (HU)", "PSNR (dB)", "Fréchet", "Dice_gen", "Dice_gen / Dice_orig",
         "MAE vs eps DDIM 50", "s / case"],
        [[names[r["model"]], f"`{r['setting']}`", r["network_calls"], f"{r['mae_hu']:.1f}", f"{r['psnr']:.2f}",
          f"{r['frechet']:.3g}",
          f"{r['dice_gen']:.3f}", f"{r['dice_gen'] / dice_orig:.3f}",
          f"{100 * (r['mae_hu'] / reference['mae_hu'] - 1):+.1f} %", f"{r['seconds_per_case']:.2f}"] for r in rows])
    markdown = (f"Command: `{pc.command_line()}`\n\nGeneration (mask → CT) on the phantom, fold 0, validation cases "
                f"{', '.join(cases)}; {args.iterations} training iterations per model; Dice_orig (the CT segmenter "
                f"on the real CT) = {dice_orig:.3f}; one sample per case.\n\n{table}\n")
    pc.write_result("steps_generation", {"machine": pc.machine_info(), "cases": cases, "dice_orig": dice_orig,
                                         "dice_orig_per_case": orig, "rows": rows,
                                         "iterations": args.iterations, "segmenter": str(segmenter),
                                         "models": {k: str(v) for k, v in folds.items()},
                                         "segmenter_model": model_folder_name("nnUNetTrainer", "2d_cpu")}, markdown)
    return 0


if __name__ == "__main__":
    pc.run_main(main)
