"""Prediction time side by side on real MRI: nnU-Net's predictor vs ``spinediff predict`` with K samples and
uncertainty maps (issue 20's goal: K = 5 with maps at <= 2x nnU-Net's time, at equal or better Dice).

Dataset501 (14 lumbar MRI, L1-L5), the 5 folds of a finished ``spinediff benchmark -d 501``. For each fold, its
held-out cases are predicted from the raw files by

- nnU-Net: ``nnUNetPredictor`` on the fold's ``nnUNetTrainer`` (``2d_cpu``), its defaults (mirroring on: the
  plan allows no mirror axis, so it is one pass; Gaussian sliding windows, step 0.5), and
- diffusion: ``spinediff predict`` on the fold's ``DiffusionSegmentationTrainer`` (``2d_diffusion``) with
  ``--samples K --save-uncertainty``, sampling as the model folder's ``sampling.json`` says (what a user gets),

one method after the other, fold by fold (so both see the same machine load), one torch thread each, the model
loading included. Both are scored as trained (no post-processing): mean L1-L5 Dice against the manual masks.

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... OMP_NUM_THREADS=1
    python -m studies.predict_time501 --samples 5

Writes ``benchmarks/output/predict_time501/{results.json,results.md}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from studies import uncertainty_cv501 as cv  # noqa: E402 (the Dataset501 harness: names, folders)


def level_dice(prediction: Path, reference: Path) -> float:
    a, _ = cv.read_array(prediction)
    b, _ = cv.read_array(reference)
    values = []
    for level in cv.LEVELS:
        x, y = a == level, b == level
        if x.sum() + y.sum():
            values.append(2.0 * (x & y).sum() / (x.sum() + y.sum()))
    return float(np.mean(values))


def nnunet_fold(model: Path, fold: int, inputs: Path, output: Path) -> float:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(fold,),
                                                   checkpoint_name="checkpoint_final.pth")
    predictor.predict_from_files_sequential(str(inputs), str(output), save_probabilities=False, overwrite=True,
                                            folder_with_segs_from_prev_stage=None)
    return time.perf_counter() - start


def diffusion_fold(fold: int, inputs: Path, output: Path, samples: int) -> tuple[float, dict]:
    from spinediff.inference.api import predict

    trainer, configuration = cv.METHODS["diffusion"]
    start = time.perf_counter()
    report = predict(inputs, output, cv.NAME, configuration, trainer, folds=[fold], num_samples=samples,
                     save_uncertainty=True, postprocessing=False, progress=False)
    if report.failed:
        raise RuntimeError(report.failed[0].message)
    return time.perf_counter() - start, report.settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5, help="K, the diffusion samples per case")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "output" / "predict_time501"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    found = cv.dataset_folders()
    if found is None:
        return 0
    raw, results_root, splits = found
    nnunet_model = results_root / "nnUNetTrainer__nnUNetPlans__2d_cpu"
    rows, settings = [], None
    with tempfile.TemporaryDirectory(prefix="predict_time501_") as scratch:
        for fold, split in enumerate(splits):
            cases = list(split["val"])
            work = Path(scratch) / f"fold_{fold}"
            inputs = cv.link_inputs(cases, raw, work)
            nnunet_seconds = nnunet_fold(nnunet_model, fold, inputs, work / "nnunet")
            diffusion_seconds, settings = diffusion_fold(fold, inputs, work / "diffusion", args.samples)
            for case in cases:
                reference = raw / "labelsTr" / f"{case}.nii.gz"
                rows.append({"fold": fold, "case": case,
                             "nnunet_dice": level_dice(work / "nnunet" / f"{case}.nii.gz", reference),
                             "diffusion_dice": level_dice(work / "diffusion" / f"{case}.nii.gz", reference),
                             "nnunet_seconds": nnunet_seconds / len(cases),
                             "diffusion_seconds": diffusion_seconds / len(cases)})
            print(f"fold {fold}: nnU-Net {nnunet_seconds / len(cases):.1f} s/case, diffusion "
                  f"{diffusion_seconds / len(cases):.1f} s/case", flush=True)
    total = {k: float(np.sum([r[k] for r in rows])) for k in ("nnunet_seconds", "diffusion_seconds")}
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("nnunet_dice", "diffusion_dice")}
    ratio = total["diffusion_seconds"] / total["nnunet_seconds"]
    sampling = {"solver": settings.get("solver", settings.get("sampler")),  # older prediction.json: sampler, steps
                "num_inference_steps": settings.get("num_inference_steps", settings.get("steps")),
                "warm_start": settings.get("warm_start"), "sampling_from": settings.get("sampling_from")}
    result = {"samples": args.samples, "sampling": sampling,
              "cases": len(rows), "seconds_per_case": {k: v / len(rows) for k, v in total.items()},
              "time_ratio": ratio, "mean_dice": mean, "rows": rows}
    sampling = result["sampling"]
    md = (f"Command: `python -m studies.predict_time501 --samples {args.samples}`\n\n"
          f"Dataset501, {len(rows)} held-out cases (each by its own fold's models), raw files in, label maps out, "
          f"model loading included, one torch thread, the two methods one after the other per fold.\n\n"
          "| method | s / case | mean L1-L5 Dice |\n|---|---|---|\n"
          f"| nnU-Net predictor (`2d_cpu`, its defaults) | {result['seconds_per_case']['nnunet_seconds']:.1f} | "
          f"{mean['nnunet_dice']:.3f} |\n"
          f"| `spinediff predict --samples {args.samples} --save-uncertainty` ({sampling['solver']}:"
          f"{sampling['num_inference_steps']}, from {Path(str(sampling['sampling_from'])).name}) | "
          f"{result['seconds_per_case']['diffusion_seconds']:.1f} | {mean['diffusion_dice']:.3f} |\n\n"
          f"Time ratio diffusion / nnU-Net: **{ratio:.2f}x** (goal: <= 2x).\n")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
