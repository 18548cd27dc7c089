"""Segmentation-guided generation on real MRI (issue 19, point 3): Dataset501's L1-L5 masks → MR, cross-validated.

Needs a finished ``spinediff benchmark -d 501`` (its nnU-Net models are the auxiliary segmenters: fold f's
``nnUNetTrainer`` on ``2d_cpu`` was trained on the real MR of fold f's training cases only).

1. A generation dataset beside Dataset501 (``Dataset511_LumbarVB3devGeneration``: the same MR and masks, linked;
   ``spinediff.task: generation``), planned with ``spinediff plan --budget`` (default 6 minutes per fold) and
   Dataset501's own 5-fold split.
2. ``SegGuidedGenerationTrainer`` (``2d_diffusion``), every fold, ``-j`` folds side by side.
3. Each fold's model generates an MR for each of its held-out masks (``spinediff predict``, the plans' sampler and
   steps, one sample, seed 0), scored against the real MR: PSNR and SSIM (data range: the real scan's min..max),
   Dice_gen (fold f's nnU-Net on the generated MR, mean L1-L5 Dice against the mask) beside Dice_orig (the same
   segmenter on the real MR), and the Fréchet distance in fold f's nnU-Net encoder features (generated vs real
   held-out MR of that fold; the mean over folds).

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... OMP_NUM_THREADS=1
    python benchmarks/generation501.py -j 2 --budget 6m -c 2d_diffusion_v

Writes ``benchmarks/output/generation501/{results.json,results.md,generation501.png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import uncertainty_cv501 as cv  # noqa: E402 (the Dataset501 harness: names, folders, job runner)

GENERATION = "Dataset511_LumbarVB3devGeneration"
TRAINER = "SegGuidedGenerationTrainer"


def prepare(raw_root: Path, preprocessed_root: Path, budget: str) -> None:
    from spinediff.io import read_json, write_json
    from spinediff.planning.api import plan_dataset

    target = raw_root / GENERATION
    if (preprocessed_root / GENERATION / "nnUNetPlans.json").is_file():
        return
    source = raw_root / cv.NAME
    shutil.rmtree(target, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True)
        for path in (source / sub).iterdir():
            os.symlink(path.resolve(), target / sub / path.name)
    spec = read_json(source / "dataset.json")
    spec["spinediff"] = {"task": "generation", "source_channels": [], "target_channels": [0]}
    spec["name"] = GENERATION.split("_", 1)[1]
    write_json(spec, target / "dataset.json")
    plan_dataset(GENERATION, configurations=["2d_diffusion"], device="cpu", num_processes=1, budget=budget,
                 show_progress_bar=False)
    shutil.copy(preprocessed_root / cv.NAME / "splits_final.json", preprocessed_root / GENERATION / "splits_final.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--workers", type=int, default=2, help="folds trained side by side")
    parser.add_argument("--budget", default="6m", help="training budget per fold (spinediff plan --budget)")
    parser.add_argument("-c", "--configuration", default="2d_diffusion_v",
                        help="2d_diffusion_v: v-prediction (on the phantom it beat the planned noise prediction of "
                             "generation at equal steps: MAE 112 vs 508 HU); 2d_diffusion: as planned")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "output" / "generation501"))
    parser.add_argument("--generation-results", default=None,
                        help="nnUNet_results folder of the generation models (default: $nnUNet_results); give another "
                             "folder to train at another --budget beside the first run's models")
    args = parser.parse_args(argv)
    found = cv.dataset_folders()
    if found is None:
        return 0
    raw, results_root, splits = found
    from spinediff.paths import nnunet_folder

    raw_root, preprocessed_root = raw.parent, nnunet_folder("preprocessed")
    prepare(raw_root, preprocessed_root, args.budget)
    if args.generation_results:  # the training jobs and predict read it; the segmenters keep their own folder
        os.environ["nnUNet_results"] = str(Path(args.generation_results).resolve())
    generation_results = nnunet_folder("results")
    model = generation_results / GENERATION / f"{TRAINER}__nnUNetPlans__{args.configuration}"
    jobs = [["-m", "spinediff", "train", "-d", GENERATION, "-c", args.configuration, "-f", str(f), "-tr", TRAINER,
             "--budget", args.budget]
            for f in range(len(splits)) if not (model / f"fold_{f}" / "checkpoint_final.pth").is_file()]
    cv.run_jobs(jobs, args.workers)

    import SimpleITK as sitk
    import torch

    from spinediff.experiments.downstream import segmenter_dice
    from spinediff.inference.api import predict
    from spinediff.metrics.frechet import SegmenterFeatures, image_frechet_distance
    from spinediff.metrics.image_metrics import image_metrics

    torch.set_num_threads(1)
    segmenter = results_root / "nnUNetTrainer__nnUNetPlans__2d_cpu"
    out_root = Path(args.output)
    generated_root = out_root / "generated"
    rows, frechets = [], []
    for fold, split in enumerate(splits):
        cases = list(split["val"])
        masks = generated_root / f"masks_fold_{fold}"
        masks.mkdir(parents=True, exist_ok=True)
        for case in cases:
            link = masks / f"{case}.nii.gz"
            if not link.exists():
                os.symlink((raw / "labelsTr" / f"{case}.nii.gz").resolve(), link)
        out = generated_root / f"fold_{fold}"
        if not all((out / f"{c}.nii.gz").is_file() for c in cases):
            shutil.rmtree(out, ignore_errors=True)
            predict(masks, out, GENERATION, args.configuration, TRAINER, folds=[fold], num_samples=1, seed=0,
                    progress=False, tuned_sampling=False, results_folder=generation_results)
        real = {c: raw / "imagesTr" / f"{c}_0000.nii.gz" for c in cases}
        generated = {c: out / f"{c}.nii.gz" for c in cases}
        dice_gen = segmenter_dice(segmenter, fold, generated, raw / "labelsTr")
        dice_orig = segmenter_dice(segmenter, fold, real, raw / "labelsTr")
        encoder = SegmenterFeatures(segmenter, fold)
        frechets.append(image_frechet_distance(encoder, generated.values(), real.values()))
        for case in cases:
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(generated[case]))).astype(np.float32)
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(real[case]))).astype(np.float32)
            scores = image_metrics(a, b, (float(b.min()), float(b.max())), is_ct=False)
            rows.append({"fold": fold, "case": case, "psnr": scores["psnr"], "ssim": scores["ssim"],
                         "dice_gen": dice_gen[case]["dice"], "dice_orig": dice_orig[case]["dice"]})
        print(f"fold {fold}: Dice_gen {np.mean([dice_gen[c]['dice'] for c in cases]):.3f}, Dice_orig "
              f"{np.mean([dice_orig[c]['dice'] for c in cases]):.3f}, Fréchet {frechets[-1]:.3g}", flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "dice_gen", "dice_orig")}
    mean["frechet"] = float(np.mean(frechets))
    plans = json.loads((preprocessed_root / GENERATION / "nnUNetPlans.json").read_text())
    diffusion = dict(plans["configurations"]["2d_diffusion"]["diffusion"],
                     **plans["configurations"].get(args.configuration, {}).get("diffusion", {}))
    result = {"budget": args.budget, "cases": len(rows), "mean": mean, "frechet_per_fold": frechets, "rows": rows,
              "sampling": f"{diffusion['sampler']}:{diffusion['num_inference_steps']}",
              "prediction_type": diffusion["prediction_type"]}
    md = (f"Command: `python benchmarks/generation501.py -j {args.workers} --budget {args.budget} -c "
          f"{args.configuration}" + (" --generation-results DIR" if args.generation_results else "") + "`\n\n"
          f"Dataset501, 5-fold CV, {len(rows)} held-out masks → MR ({TRAINER}, {args.configuration}, {args.budget} "
          "per fold, "
          f"{diffusion['prediction_type']} prediction, {result['sampling']}, one sample); auxiliary segmenter: each "
          "fold's nnU-Net (2d_cpu) of the benchmark.\n\n"
          "| PSNR (dB) | SSIM | Fréchet (mean of folds) | Dice_orig | Dice_gen | Dice_gen / Dice_orig |\n"
          "|---|---|---|---|---|---|\n"
          f"| {mean['psnr']:.2f} | {mean['ssim']:.3f} | {mean['frechet']:.3g} | {mean['dice_orig']:.3f} | "
          f"{mean['dice_gen']:.3f} | {mean['dice_gen'] / mean['dice_orig']:.3f} |\n")
    (out_root / "results.json").write_text(json.dumps(result, indent=2))
    (out_root / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
