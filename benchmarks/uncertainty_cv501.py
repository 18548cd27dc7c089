"""Does uncertainty catch the errors? Dataset501 (real lumbar MRI, L1-L5) 5-fold cross-validation (issue 17).

Reads a finished ``spinediff benchmark -d 501`` (nnU-Net's ``nnUNetTrainer`` on ``2d_cpu`` and
``DiffusionSegmentationTrainer`` on ``2d_diffusion``, both with their validation probabilities), predicts each
fold's held-out cases again with its diffusion model and K samples (``spinediff predict --save-uncertainty
--save-probabilities``, post-processing off: both methods are judged as trained), and scores every uncertainty
score against the truth:

- voxel level, within 5 voxels of the predicted or true vertebrae: AUROC of the map for wrong voxels, and the
  expected calibration error (ECE) of the probability of the predicted class;
- case level: AURC and e-AURC with 1 - mean L1-L5 Dice as the risk, and, at the threshold with the best Youden
  index on these same 14 cases, how many *wrong-level* cases (mean level Dice < 0.5 while the merged
  vertebral-body Dice is >= 0.5) are flagged and how many good cases with them.

Expected label volumes for ``level_anomaly`` come from each fold's training labels only. The review rule of the
best diffusion score (threshold, expected volumes from all 14 cases) is written to the diffusion model folder
(``review.json``), so ``spinediff predict --save-uncertainty`` flags cases with it.

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=... OMP_NUM_THREADS=1
    python benchmarks/uncertainty_cv501.py --samples 5 -j 2

Writes ``benchmarks/output/uncertainty_cv501/{results.json,results.md,risk_coverage.png}``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NAME = "Dataset501_LumbarVB3dev"
LEVELS = [1, 2, 3, 4, 5]
METHODS = {"nnU-Net": ("nnUNetTrainer", "2d_cpu"), "diffusion": ("DiffusionSegmentationTrainer", "2d_diffusion")}
NEAR_VOXELS = 5


def read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


def predict_fold(fold: int, cases: list[str], raw: Path, out: Path, samples: int) -> float:
    """Predict the held-out ``cases`` with fold ``fold``'s diffusion model; returns seconds per case."""
    import spinediff
    from spinediff.io import read_json, write_json

    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for case in cases:
        link = inputs / f"{case}_0000.nii.gz"
        if not link.exists():
            os.symlink(raw / "imagesTr" / f"{case}_0000.nii.gz", link)
    if all((out / f"{case}_uncertainty.json").is_file() for case in cases):
        summary = out / "prediction_summary.json"
        return float(read_json(summary)["seconds_per_case"]) if summary.is_file() else float("nan")
    start = time.perf_counter()
    trainer, configuration = METHODS["diffusion"]
    spinediff.predict(inputs, out, 501, configuration, trainer, folds=[fold], num_samples=samples,
                      save_uncertainty=True, save_probabilities=True, postprocessing=False, overwrite=True,
                      progress=False)
    seconds = (time.perf_counter() - start) / len(cases)
    write_json({"seconds_per_case": seconds}, out / "prediction_summary.json")
    return seconds


def case_record(case: str, reference: np.ndarray, spacing, folder: Path, expected: dict, mi: bool) -> dict:
    """Dice, failure, case scores and the voxels near the spine (for the pooled voxel metrics)."""
    from scipy.ndimage import binary_dilation

    from spinediff.io import read_json
    from spinediff.metrics.case_uncertainty import case_scores
    from spinediff.metrics.segmentation_metrics import case_dice

    with np.load(folder / f"{case}.npz") as data:
        probabilities = data["probabilities"].astype(np.float32)
    predicted = probabilities.argmax(0)
    uncertainty = read_array(folder / f"{case}_uncertainty.nii.gz")[0] if mi else None
    scores = case_scores(probabilities, spacing, LEVELS, expected=expected, uncertainty=uncertainty)
    summary = folder / f"{case}_uncertainty.json"
    if summary.is_file():  # sample disagreement: from the members, which only the predictor saw
        extra = read_json(summary).get("scores", {})
        if "sample_disagreement" in extra:
            scores["sample_disagreement"] = extra["sample_disagreement"]
    dice = case_dice(predicted, reference, LEVELS)
    mean_dice = float(np.nanmean(list(dice.values())))
    merged = case_dice((predicted > 0).astype(int), (reference > 0).astype(int), [1])["1"]
    near = binary_dilation((predicted > 0) | (reference > 0), iterations=NEAR_VOXELS)
    entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(0)
    voxels = {"wrong": (predicted != reference)[near], "confidence": probabilities.max(0)[near],
              "entropy": entropy[near]}
    if uncertainty is not None:
        voxels["mutual_information"] = uncertainty[near]
    return {"case": case, "dice": dice, "mean_dice": mean_dice, "merged_dice": merged,
            "wrong_level": bool(mean_dice < 0.5 <= merged), "scores": scores, "voxels": voxels}


def analyse(records: list[dict], method: str, seconds: float) -> dict:
    from spinediff.metrics.case_uncertainty import SCORES
    from spinediff.metrics.failure_detection import (
        aurc,
        error_auroc,
        expected_calibration_error,
        optimal_aurc,
        review_threshold,
    )

    wrong = np.concatenate([r["voxels"]["wrong"] for r in records])
    confidence = np.concatenate([r["voxels"]["confidence"] for r in records])
    risks = [1 - r["mean_dice"] for r in records]
    failures = [r["wrong_level"] for r in records]
    rows = []
    for score in SCORES:
        if not all(score in r["scores"] for r in records):
            continue
        values = [r["scores"][score] for r in records]
        voxel_map = {"entropy": "entropy", "mutual_information": "mutual_information"}.get(score)
        auroc = (error_auroc(np.concatenate([r["voxels"][voxel_map] for r in records]), wrong)
                 if voxel_map else None)
        chosen = review_threshold(values, failures)
        flagged = np.asarray(values) > chosen["threshold"]
        failed_values = [v for v, failed in zip(values, failures, strict=True) if failed]
        good_values = [v for v, failed in zip(values, failures, strict=True) if not failed]
        rows.append({"method": method, "score": score, "voxel_auroc": auroc,
                     "aurc": aurc(values, risks), "e_aurc": aurc(values, risks) - optimal_aurc(risks),
                     "threshold": chosen["threshold"],
                     "wrong_level_caught": int(flagged[np.asarray(failures)].sum()),
                     "wrong_level_cases": int(sum(failures)),
                     "good_flagged": int(flagged[~np.asarray(failures)].sum()),
                     # every wrong-level case above every other case
                     "perfect_ranking": min(failed_values) > max(good_values) if failed_values and good_values
                     else None})
    return {"method": method, "ece": expected_calibration_error(confidence, ~wrong),
            "seconds_per_case": seconds, "mean_dice": float(np.mean([r["mean_dice"] for r in records])),
            "optimal_aurc": optimal_aurc(risks), "rows": rows,
            "cases": [{k: v for k, v in r.items() if k != "voxels"} for r in records]}


def markdown(results: dict) -> str:
    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| method | score | voxel AUROC | ECE | AURC | e-AURC | wrong-level cases caught | good cases flagged |",
             "|---|---|---|---|---|---|---|---|"]
    for method in results["methods"]:
        for row in method["rows"]:
            lines.append(f"| {row['method']} | `{row['score']}` | {f(row['voxel_auroc'])} | {f(method['ece'])} | "
                         f"{f(row['aurc'])} | {f(row['e_aurc'])} | {row['wrong_level_caught']} of "
                         f"{row['wrong_level_cases']} | {row['good_flagged']} |")
    lines.append("")
    lines.append("| method | mean L1-L5 Dice (as trained) | optimal AURC | s/case |")
    lines.append("|---|---|---|---|")
    for method in results["methods"]:
        lines.append(f"| {method['method']} | {f(method['mean_dice'])} | {f(method['optimal_aurc'])} | "
                     f"{f(method['seconds_per_case'], 1)} |")
    return "\n".join(lines) + "\n"


def figure(results: dict, target: Path) -> None:
    from spinediff.evaluation.figures import pyplot
    from spinediff.metrics.failure_detection import risk_coverage

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in results["methods"]:
        risks = [1 - c["mean_dice"] for c in method["cases"]]
        for row in method["rows"]:
            values = [c["scores"][row["score"]] for c in method["cases"]]
            coverage, risk = risk_coverage(values, risks)
            ax.plot(coverage, risk, label=f"{method['method']}: {row['score']} (AURC {row['aurc']:.3f})")
        coverage, risk = risk_coverage(risks, risks)
        ax.plot(coverage, risk, "k:", label=f"{method['method']}: optimal")
    ax.set_xlabel("coverage (cases accepted, most confident first)")
    ax.set_ylabel("selective risk (1 - mean Dice)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5, help="diffusion samples per case (K)")
    parser.add_argument("-j", "--workers", type=int, default=1, help="folds predicted side by side")
    parser.add_argument("--fold", type=int, help=argparse.SUPPRESS)  # one worker's fold
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "output" / "uncertainty_cv501"))
    args = parser.parse_args(argv)
    from spinediff.io import read_json, write_json
    from spinediff.metrics.case_uncertainty import expected_volumes
    from spinediff.paths import nnunet_folder

    try:
        raw = nnunet_folder("raw") / NAME
        preprocessed, results_root = nnunet_folder("preprocessed") / NAME, nnunet_folder("results") / NAME
    except Exception as exc:  # noqa: BLE001 (the folders are the user's environment)
        print(f"skipped: {exc}")
        return 0
    if not (preprocessed / "splits_final.json").is_file():
        print(f"skipped: no benchmark of {NAME} in {results_root} (run spinediff plan/benchmark first)")
        return 0
    splits = read_json(preprocessed / "splits_final.json")
    work = results_root / "uncertainty_cv"
    if args.fold is not None:
        predict_fold(args.fold, splits[args.fold]["val"], raw, work / f"fold_{args.fold}", args.samples)
        return 0
    pending = list(range(len(splits)))
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < args.workers:
            running.append(subprocess.Popen([sys.executable, __file__, "--fold", str(pending.pop(0)),
                                             "--samples", str(args.samples)]))
        time.sleep(5)
        for process in list(running):
            if process.poll() is not None:
                running.remove(process)
                if process.returncode:
                    raise SystemExit(f"a fold's prediction failed (exit {process.returncode})")
    labels = {case: read_array(raw / "labelsTr" / f"{case}.nii.gz") for split in splits for case in split["val"]}
    methods = []
    for method, (trainer, configuration) in METHODS.items():
        records, seconds = [], []
        for fold, split in enumerate(splits):
            train = split["train"]
            expected = expected_volumes([labels[c][0] for c in train], [labels[c][1] for c in train], LEVELS)
            if method == "diffusion":
                folder = work / f"fold_{fold}"
                seconds.append(read_json(folder / "prediction_summary.json")["seconds_per_case"])
            else:
                folder = results_root / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{fold}" / "validation"
                timing = folder.parent / "benchmark_timing.json"  # the benchmark's validation time per case
                if timing.is_file():
                    seconds.append(read_json(timing).get("inference_seconds_per_case"))
            for case in split["val"]:
                reference, spacing = labels[case]
                records.append(case_record(case, reference, spacing, folder, expected, method == "diffusion"))
        seconds = [s for s in seconds if s is not None]
        methods.append(analyse(records, method, float(np.mean(seconds)) if seconds else None))
    results = {"dataset": NAME, "samples": args.samples, "near_voxels": NEAR_VOXELS, "methods": methods}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "results.json")
    (out / "results.md").write_text(markdown(results))
    figure(results, out / "risk_coverage.png")
    diffusion = next(m for m in methods if m["method"] == "diffusion")
    best = min(diffusion["rows"], key=lambda row: row["aurc"])
    from spinediff.inference.review import ReviewRule

    all_cases = list(labels)
    volumes = expected_volumes([labels[c][0] for c in all_cases], [labels[c][1] for c in all_cases], LEVELS)
    rule = ReviewRule(best["score"], best["threshold"], volumes,
                      {"rule": "largest Youden index for wrong-level cases on the 5-fold cross-validation "
                               f"(lowest AURC of the diffusion scores: {best['aurc']:.3f})",
                       "cases": len(all_cases), "failures": best["wrong_level_cases"],
                       "made_by": "benchmarks/uncertainty_cv501.py"})
    path = rule.write(results_root / "DiffusionSegmentationTrainer__nnUNetPlans__2d_diffusion")
    print(markdown(results))
    print(f"review rule: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
