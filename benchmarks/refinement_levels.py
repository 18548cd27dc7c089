"""Start level of the translation refinement (issue 35): MAE, PSNR, SSIM and Fréchet distance per start level.

After ``spinediff benchmark -d 902 --methods DiffusionRefinementTrainer --downstream`` (which trains the regression,
the refiner and the downstream CT segmenter on the same folds), each fold's refiner refines the *same fold's*
regression export of its validation cases (``spinediff predict --init-from``, as the benchmark's validation does) from
each start level, with K samples averaged; the outputs are scored as the benchmark scores them (body MAE, PSNR, SSIM by
``spinediff evaluate``; Fréchet distance in the fold's downstream segmenter features, averaged over the folds), beside
the regression's own exports. Run it in the nnU-Net folders of that benchmark::

    nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... \\
    python benchmarks/refinement_levels.py -d 902 -f 0 1 2 --levels 0.05 0.1 0.2 --samples 5 -o OUT

Writes OUT/levels.json and OUT/levels.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from spinediff.io import read_json, write_json, write_text

REGRESSION = "RegressionTrainer"
REFINER = "DiffusionRefinementTrainer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default="902")
    parser.add_argument("-c", "--configuration", default="2d_diffusion")
    parser.add_argument("-tr", "--trainer", default=REFINER,
                        help="the refiner (DiffusionRefinementTrainer, or ResidualRefinementTrainer)")
    parser.add_argument("-f", "--folds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--levels", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--samples", type=int, default=5, help="K samples averaged per case (the benchmark: 5)")
    parser.add_argument("--steps", type=int, default=None, help="solver steps below the start level (plans' default)")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)

    from spinediff.evaluation.evaluate import evaluate_folders
    from spinediff.experiments.downstream import SEGMENTER_TRAINER, downstream_dataset_name
    from spinediff.inference.api import predict
    from spinediff.metrics.frechet import SegmenterFeatures, image_frechet_distance
    from spinediff.paths import model_folder_name, nnunet_folder
    from spinediff.training.api import resolve_preprocessed_dataset

    raw_root, preprocessed_root, results_root = (nnunet_folder(k) for k in ("raw", "preprocessed", "results"))
    name = resolve_preprocessed_dataset(args.dataset, preprocessed_root)
    raw = raw_root / name
    dataset_json = read_json(raw / "dataset.json")
    ending, block = dataset_json["file_ending"], dataset_json["spinediff"]
    splits = read_json(preprocessed_root / name / "splits_final.json")
    regression = results_root / name / model_folder_name(REGRESSION, args.configuration)
    segmenter_name = downstream_dataset_name(raw_root, name)
    segmenter = results_root / segmenter_name / model_folder_name(SEGMENTER_TRAINER, "2d_cpu")
    from spinediff.planning.plans import SpineDiffPlans

    # PSNR and SSIM over the target's clip range, as the benchmark scores them
    intensity = SpineDiffPlans.read(preprocessed_root / name / "nnUNetPlans.json").configuration(
        args.configuration).target_intensity
    data_range = tuple(intensity.mappings[0].clip_range)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    reference = out / "reference"  # CASE.nii.gz -> the real CT, as the benchmark's reference folder
    reference.mkdir(exist_ok=True)
    target = block["target_channels"][0]
    for image in (raw / "imagesTr").glob(f"*_{target:04d}{ending}"):
        link = reference / (image.name[: -len(f"_{target:04d}{ending}")] + ending)
        if not link.exists():
            link.symlink_to(image)

    rows = {}
    settings = [("regression (its own export)", None)] + [(f"refinement from {level:g} T", level)
                                                          for level in args.levels]
    for label, level in settings:
        merged = out / (f"level_{level:g}" if level is not None else "regression") / "all"
        merged.mkdir(parents=True, exist_ok=True)
        frechet, seconds = [], []
        for fold in args.folds:
            cases = splits[int(fold)]["val"]
            exports = regression / f"fold_{fold}" / "validation"
            if level is None:
                folder = exports
            else:
                inputs = out / "inputs" / f"fold_{fold}"
                inputs.mkdir(parents=True, exist_ok=True)
                for case in cases:
                    for channel in block["source_channels"]:
                        link = inputs / f"{case}_{channel:04d}{ending}"
                        if not link.exists():
                            link.symlink_to(raw / "imagesTr" / link.name)
                folder = merged.parent / f"fold_{fold}"
                start = time.perf_counter()
                report = predict(inputs, folder, name, args.configuration, args.trainer, folds=[fold],
                                 init_from=exports, init_noise=level, num_samples=args.samples,
                                 num_inference_steps=args.steps, overwrite=True, progress=False, postprocessing=False)
                if report.failed:
                    raise SystemExit(f"{label} fold {fold}: {report.failed[0].message}")
                seconds.append((time.perf_counter() - start) / len(cases))
            synthetic = [folder / f"{case}{ending}" for case in cases]
            for path in synthetic:
                link = merged / path.name
                if not link.exists():
                    link.symlink_to(path.resolve())
            frechet.append(image_frechet_distance(SegmenterFeatures(segmenter, fold), synthetic,
                                                  [reference / p.name for p in synthetic]))
        evaluation = evaluate_folders(reference, merged, task="image", data_range=data_range, progress=False)
        per_case = {row["case"]: row for row in evaluation.rows}
        means = {m: float(np.nanmean([r[m] for r in per_case.values()])) for m in ("mae_body", "psnr", "ssim")}
        rows[label] = {**means, "frechet": float(np.mean(frechet)), "frechet_per_fold": frechet,
                       "start_level": level, "cases": len(per_case),
                       "seconds_per_case": float(np.mean(seconds)) if seconds else math.nan,
                       "per_case_mae_body": {c: r["mae_body"] for c, r in per_case.items()}}
        print(f"{label}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[label].items()
                                         if isinstance(v, float)), flush=True)

    base = rows[settings[0][0]]
    lines = ["| setting | MAE body (HU) | vs regression | PSNR | SSIM | Fréchet | s/case |",
             "|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        change = (row["mae_body"] / base["mae_body"] - 1) * 100
        lines.append(f"| {label} | {row['mae_body']:.1f} | {change:+.1f} % | {row['psnr']:.2f} | {row['ssim']:.3f} | "
                     f"{row['frechet']:.4f} | {row['seconds_per_case']:.1f} |")
    table = "\n".join(lines)
    command = "python benchmarks/refinement_levels.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json({"dataset": name, "trainer": args.trainer, "folds": args.folds, "samples": args.samples,
                "steps": args.steps, "rows": rows, "command": command}, out / "levels.json")
    write_text(f"{table}\n\nCommand: `{command}`; K = {args.samples} samples averaged per case.\n", out / "levels.md")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
