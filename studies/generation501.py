"""Segmentation-guided generation on real MRI (issue 19, point 3): Dataset501's L1-L5 masks → MR, cross-validated,
per slice direction, in 3D, and fused (2.5D).

Needs a finished ``spinediff benchmark -d 501`` (its nnU-Net models are the auxiliary segmenters: fold f's
``nnUNetTrainer`` on ``2d_cpu`` was trained on the real MR of fold f's training cases only).

1. A generation dataset beside Dataset501 (``Dataset511_LumbarVB3devGeneration``: the same MR and masks, linked;
   ``spinediff.task: generation``), planned with ``spinediff plan --budget`` (``--plan-budget``, default the training
   budget) and Dataset501's own 5-fold split. ``-p nnUNetPlans_<direction>`` plans that slice direction
   (``spinediff plan --slice-direction``) with the same budget; a 3D configuration has its data preprocessed from the
   existing plans.
2. ``SegGuidedGenerationTrainer`` (``-c``, e.g. ``2d_diffusion_v`` or ``3d_diffusion_v``), every fold, ``-j`` folds
   side by side, ``--budget`` each.
3. Each fold's model generates an MR for each of its held-out masks (``spinediff predict``, the plans' sampler and
   steps, one sample, seed 0), scored against the real MR: PSNR and SSIM (data range: the real scan's min..max),
   Dice_gen (fold f's nnU-Net on the generated MR, mean L1-L5 Dice against the mask) beside Dice_orig (the same
   segmenter on the real MR), and the Fréchet distance in fold f's nnU-Net encoder features (generated vs real
   held-out MR of that fold; the mean over folds).

``--fuse A B C`` (the --output folders of earlier runs, e.g. the three directions) writes the 2.5D generation, the
mean image of those runs per case, scores it like a run, and writes the poster's table of every run in ``--rows``
(default: the fused ones) plus the fused row, with a figure of generated images beside the real MR and the mask.

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... OMP_NUM_THREADS=1
    python -m studies.generation501 -j 2 --budget 10m -c 2d_diffusion_v -p nnUNetPlans_coronal --output OUT_C
    python -m studies.generation501 --fuse OUT_A OUT_C OUT_S --rows OUT_A OUT_C OUT_S OUT_3D --output OUT_25D

Writes ``results.json`` and ``results.md`` into ``--output`` (and ``generation501.png`` with ``--fuse``).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from studies import uncertainty_cv501 as cv  # noqa: E402 (the Dataset501 harness: names, folders, job runner)

GENERATION = "Dataset511_LumbarVB3devGeneration"
TRAINER = "SegGuidedGenerationTrainer"
DEFAULT_PLANS = "nnUNetPlans"


def prepare(raw_root: Path, preprocessed_root: Path, plan_budget: str, plans: str, configuration: str) -> None:
    """The generation dataset, its default plans, the ``plans`` of a slice direction and the preprocessed data of
    ``configuration`` (each only when missing), and Dataset501's split."""
    from spinediff.io import read_json, write_json
    from spinediff.planning.api import plan_dataset
    from spinediff.planning.plans import SpineDiffPlans

    target = raw_root / GENERATION
    folder = preprocessed_root / GENERATION
    if not (folder / f"{DEFAULT_PLANS}.json").is_file():
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
        plan_dataset(GENERATION, configurations=["2d_diffusion"], device="cpu", num_processes=1, budget=plan_budget,
                     show_progress_bar=False)
    if plans != DEFAULT_PLANS and not (folder / f"{plans}.json").is_file():
        direction = plans[len(DEFAULT_PLANS) + 1:]
        plan_dataset(GENERATION, configurations=[configuration.split("_diffusion")[0] + "_diffusion"], device="cpu",
                     num_processes=1, budget=plan_budget, show_progress_bar=False, slice_direction=direction)
    manager = SpineDiffPlans.read(folder / f"{plans}.json").configuration(configuration).manager
    if not (folder / manager.data_identifier).is_dir():  # e.g. 3d_diffusion, planned beside 2D but not preprocessed
        manager.preprocessor_class(verbose=False).run(GENERATION, configuration, plans, num_processes=1)
    if not (folder / "splits_final.json").is_file():
        shutil.copy(preprocessed_root / cv.NAME / "splits_final.json", folder / "splits_final.json")


def row_label(preprocessed_root: Path, raw: Path, plans: str, configuration: str) -> str:
    """``axial``/``coronal``/``sagittal`` (the plane a 2D configuration slices, read from the plans' transpose and
    the images' orientation) or ``3D``."""
    from spinediff.io import read_json
    from spinediff.planning.api import SLICE_DIRECTIONS, slicing_axis

    plans_json = read_json(preprocessed_root / GENERATION / f"{plans}.json")
    if configuration.startswith("3d"):
        return "3D"
    first = plans_json["transpose_forward"][0]
    dataset_json = read_json(raw / "dataset.json")
    return next(d for d in SLICE_DIRECTIONS if slicing_axis(raw, dataset_json, d) == first)


def read(path: Path) -> np.ndarray:
    return cv.read_array(path)[0].astype(np.float32)


def score(generated_root: Path, splits: list[dict], raw: Path, segmenter: Path) -> dict:
    """Per case PSNR, SSIM, Dice_gen and Dice_orig, the Fréchet distance per fold, and their means."""
    from spinediff.experiments.downstream import segmenter_dice
    from spinediff.metrics.frechet import SegmenterFeatures, image_frechet_distance
    from spinediff.metrics.image_metrics import image_metrics

    rows, frechets = [], []
    for fold, split in enumerate(splits):
        cases = list(split["val"])
        real = {c: raw / "imagesTr" / f"{c}_0000.nii.gz" for c in cases}
        generated = {c: generated_root / f"fold_{fold}" / f"{c}.nii.gz" for c in cases}
        dice_gen = segmenter_dice(segmenter, fold, generated, raw / "labelsTr")
        dice_orig = segmenter_dice(segmenter, fold, real, raw / "labelsTr")
        frechets.append(image_frechet_distance(SegmenterFeatures(segmenter, fold), generated.values(), real.values()))
        for case in cases:
            a, b = read(generated[case]), read(real[case])
            scores = image_metrics(a, b, (float(b.min()), float(b.max())), is_ct=False)
            rows.append({"fold": fold, "case": case, "psnr": scores["psnr"], "ssim": scores["ssim"],
                         "dice_gen": dice_gen[case]["dice"], "dice_orig": dice_orig[case]["dice"]})
        print(f"fold {fold}: Dice_gen {np.mean([dice_gen[c]['dice'] for c in cases]):.3f}, Dice_orig "
              f"{np.mean([dice_orig[c]['dice'] for c in cases]):.3f}, Fréchet {frechets[-1]:.3g}", flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "dice_gen", "dice_orig")}
    mean["frechet"] = float(np.mean(frechets))
    return {"cases": len(rows), "mean": mean, "frechet_per_fold": frechets, "rows": rows}


def table(results: list[dict]) -> str:
    lines = ["| row | model | budget per fold | PSNR (dB) | SSIM | Fréchet (mean of folds) | Dice_orig | Dice_gen | "
             "Dice_gen / Dice_orig |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["mean"]
        lines.append(f"| {r['label']} | {r['model']} | {r['budget']} | {m['psnr']:.2f} | {m['ssim']:.3f} | "
                     f"{m['frechet']:.3g} | {m['dice_orig']:.3f} | {m['dice_gen']:.3f} | "
                     f"{m['dice_gen'] / m['dice_orig']:.3f} |")
    return "\n".join(lines) + "\n"


def figure(results: list[dict], splits: list[dict], raw: Path, target: Path, cases: int = 2) -> None:
    """For ``cases`` held-out cases of fold 0: the real MR, the mask and every row's generated MR, cut through the
    slice that shows the most of the mask (along the spine: Dataset501's headers cannot be trusted to name it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = list(splits[0]["val"])[:cases]
    columns = 2 + len(results)
    fig, axes = plt.subplots(len(chosen), columns, figsize=(2.1 * columns, 2.6 * len(chosen)), squeeze=False)
    for row, case in enumerate(chosen):
        mask = read(raw / "labelsTr" / f"{case}.nii.gz")
        counts = [np.sum(mask > 0, axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
        axis = int(np.argmax([c.max() for c in counts]))
        index = int(np.argmax(counts[axis]))
        real = np.take(read(raw / "imagesTr" / f"{case}_0000.nii.gz"), index, axis=axis)
        panels = [("real MR", real, "gray"), ("mask", np.take(mask, index, axis=axis), "nipy_spectral")]
        panels += [(r["label"], np.take(read(Path(r["generated"]) / "fold_0" / f"{case}.nii.gz"), index, axis=axis),
                    "gray") for r in results]
        low, high = np.percentile(real, [0.5, 99.5])
        for column, (name, image, cmap) in enumerate(panels):
            ax = axes[row][column]
            ax.imshow(image, cmap=cmap, interpolation="nearest",
                      **({} if cmap != "gray" else {"vmin": low, "vmax": high}))
            ax.set_title(f"{case}: {name}" if column == 0 else name, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)


def fuse(members: list[Path], splits: list[dict], out: Path) -> Path:
    """The 2.5D generation: per fold, ``spinediff ensemble`` (the mean image) of the members' generated MR."""
    from spinediff.inference.ensemble import ensemble_folders

    generated = out / "generated"
    for fold, split in enumerate(splits):
        target = generated / f"fold_{fold}"
        if not all((target / f"{c}.nii.gz").is_file() for c in split["val"]):
            shutil.rmtree(target, ignore_errors=True)
            ensemble_folders([m / "generated" / f"fold_{fold}" for m in members], target)
    return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--workers", type=int, default=2, help="folds trained side by side")
    parser.add_argument("--budget", default="6m", help="training budget per fold (spinediff train --budget)")
    parser.add_argument("--plan-budget", default=None,
                        help="the budget the plans are made for (spinediff plan --budget; default --budget); plans "
                             "that exist are kept")
    parser.add_argument("-c", "--configuration", default="2d_diffusion_v",
                        help="2d_diffusion_v: v-prediction (on the phantom it beat the planned noise prediction of "
                             "generation at equal steps: MAE 112 vs 508 HU); 2d_diffusion: as planned; "
                             "3d_diffusion_v: 3D")
    parser.add_argument("-p", "--plans", default=DEFAULT_PLANS,
                        help="nnUNetPlans (2D slices the first axis after nnU-Net's transpose) or "
                             "nnUNetPlans_axial|coronal|sagittal (planned here when missing)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "output" / "generation501"))
    parser.add_argument("--generation-results", default=None,
                        help="nnUNet_results folder of the generation models (default: $nnUNet_results); give another "
                             "folder to train at another --budget beside the first run's models")
    parser.add_argument("--reuse-validation", action="store_true",
                        help="take each fold's generated MR from its training's own validation export "
                             "(fold_F/validation: the same final EMA model, the plans' sampler and steps, one sample) "
                             "instead of generating them again with spinediff predict (as slow as the training's "
                             "validation: ~40 s per case for a 2D model slicing 224 planes)")
    parser.add_argument("--fuse", nargs="+", default=None, metavar="RUN",
                        help="instead of training: fuse these runs' generated MR (their --output folders) into the "
                             "2.5D row and write the combined table and figure")
    parser.add_argument("--rows", nargs="+", default=None, metavar="RUN",
                        help="with --fuse: the runs shown in the table and figure (default: the fused runs)")
    args = parser.parse_args(argv)
    found = cv.dataset_folders()
    if found is None:
        return 0
    raw, results_root, splits = found
    import torch

    from spinediff.io import read_json, write_json, write_text
    from spinediff.paths import nnunet_folder

    torch.set_num_threads(1)
    out_root = Path(args.output)
    segmenter = results_root / "nnUNetTrainer__nnUNetPlans__2d_cpu"
    generation_raw = raw.parent / GENERATION
    if args.fuse:
        members = [Path(m) for m in args.fuse]
        shown = [read_json(Path(m) / "results.json") for m in (args.rows or args.fuse)]
        fused = fuse(members, splits, out_root)
        result = {**score(fused, splits, raw, segmenter), "generated": str(fused), "budget": shown[0]["budget"],
                  "label": "2.5D", "model": "mean of " + ", ".join(
                      read_json(m / "results.json")["label"] for m in members)}
        md = (f"Command: `python -m studies.generation501 --fuse {' '.join(args.fuse)}"
              + (f" --rows {' '.join(args.rows)}" if args.rows else "") + "`\n\n"
              f"Dataset501, 5-fold CV, {result['cases']} held-out masks → MR ({TRAINER}); auxiliary segmenter: each "
              "fold's nnU-Net (2d_cpu) of the benchmark.\n\n" + table([*shown, result]))
        out_root.mkdir(parents=True, exist_ok=True)
        figure([*shown, result], splits, raw, out_root / "generation501.png")
        write_json({**result, "rows_shown": shown}, out_root / "results.json")
        write_text(md, out_root / "results.md")
        print(md)
        return 0

    raw_root, preprocessed_root = raw.parent, nnunet_folder("preprocessed")
    prepare(raw_root, preprocessed_root, args.plan_budget or args.budget, args.plans, args.configuration)
    if args.generation_results:  # the training jobs and predict read it; the segmenters keep their own folder
        os.environ["nnUNet_results"] = str(Path(args.generation_results).resolve())
    generation_results = nnunet_folder("results")
    model = generation_results / GENERATION / f"{TRAINER}__{args.plans}__{args.configuration}"
    jobs = [["-m", "spinediff", "train", "-d", GENERATION, "-c", args.configuration, "-f", str(f), "-tr", TRAINER,
             "-p", args.plans, "--budget", args.budget]
            for f in range(len(splits)) if not (model / f"fold_{f}" / "checkpoint_final.pth").is_file()]
    cv.run_jobs(jobs, args.workers)

    from spinediff.inference.api import predict
    from spinediff.inference.inputs import RUN_SUMMARY

    generated_root = out_root / "generated"
    for fold, split in enumerate(splits):
        cases = list(split["val"])
        masks = generated_root / f"masks_fold_{fold}"
        masks.mkdir(parents=True, exist_ok=True)
        for case in cases:
            link = masks / f"{case}.nii.gz"
            if not link.exists():
                os.symlink((raw / "labelsTr" / f"{case}.nii.gz").resolve(), link)
        out = generated_root / f"fold_{fold}"
        validation = model / f"fold_{fold}" / "validation"
        if args.reuse_validation and not all((out / f"{c}.nii.gz").is_file() for c in cases):
            if not all((validation / f"{c}.nii.gz").is_file() for c in cases):
                raise SystemExit(f"--reuse-validation: {validation} lacks some of fold {fold}'s cases {cases}")
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            for case in cases:
                shutil.copy(validation / f"{case}.nii.gz", out / f"{case}.nii.gz")
            write_json({"model": str(model), "task": "generation", "trainer": TRAINER,  # as spinediff predict's
                        "configuration": args.configuration, "plans": args.plans, "folds": [str(fold)],
                        "source": f"{validation} (the training's validation export)"}, out / RUN_SUMMARY)
        if not all((out / f"{c}.nii.gz").is_file() for c in cases):
            shutil.rmtree(out, ignore_errors=True)
            predict(masks, out, GENERATION, args.configuration, TRAINER, folds=[fold], num_samples=1, seed=0,
                    progress=False, tuned_sampling=False, results_folder=generation_results,
                    plans_identifier=args.plans)
    from spinediff.planning.plans import SpineDiffPlans

    diffusion = SpineDiffPlans.read(preprocessed_root / GENERATION / f"{args.plans}.json").configuration(
        args.configuration).diffusion
    result = {**score(generated_root, splits, raw, segmenter), "budget": args.budget,
              "plan_budget": args.plan_budget or args.budget, "plans": args.plans,
              "configuration": args.configuration, "generated": str(generated_root.resolve()),
              "label": row_label(preprocessed_root, generation_raw, args.plans, args.configuration),
              "model": f"{args.configuration} ({args.plans})",
              "sampling": f"{diffusion.solver}:{diffusion.num_inference_steps}",
              "prediction_type": diffusion.prediction_type}
    md = (f"Command: `python -m studies.generation501 -j {args.workers} --budget {args.budget}"
          + (f" --plan-budget {args.plan_budget}" if args.plan_budget else "") + f" -c {args.configuration}"
          + (f" -p {args.plans}" if args.plans != DEFAULT_PLANS else "")
          + (" --generation-results DIR" if args.generation_results else "")
          + (" --reuse-validation" if args.reuse_validation else "") + "`\n\n"
          f"Dataset501, 5-fold CV, {result['cases']} held-out masks → MR ({TRAINER}, {args.configuration}, "
          f"{args.plans}, {args.budget} per fold, {diffusion.prediction_type} prediction, {result['sampling']}, one "
          "sample); auxiliary segmenter: each fold's nnU-Net (2d_cpu) of the benchmark.\n\n" + table([result]))
    write_json(result, out_root / "results.json")
    write_text(md, out_root / "results.md")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
