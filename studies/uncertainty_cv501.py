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
    python -m studies.uncertainty_cv501 --samples 5 -j 2

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


def read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


PLANNED_STEPS = 10  # the plans' DDIM steps (2d_diffusion's num_inference_steps)


def work_folder(results_root: Path, samples: int, steps: int = PLANNED_STEPS) -> Path:
    """Where the predictions with K = ``samples`` and ``steps`` DDIM steps go (K = 5, 10 steps: the plans')."""
    name = "uncertainty_cv" if samples == 5 else f"uncertainty_cv_k{samples}"
    return results_root / (name if steps == PLANNED_STEPS else f"uncertainty_cv_k{samples}_s{steps}")


def parse_setting(text: str) -> tuple[int, int]:
    """``K`` or ``KxS`` (K samples, S DDIM steps) → (K, S)."""
    k, _, steps = text.partition("x")
    return int(k), int(steps) if steps else PLANNED_STEPS


def link_inputs(cases: list[str], raw: Path, out: Path) -> Path:
    """``out/inputs`` with a link to each case's MRI in the raw dataset (what ``spinediff predict`` reads)."""
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for case in cases:
        link = inputs / f"{case}_0000.nii.gz"
        if not link.exists():
            os.symlink(raw / "imagesTr" / f"{case}_0000.nii.gz", link)
    return inputs


def predict_fold(fold: int, cases: list[str], raw: Path, out: Path, samples: int,
                 steps: int = PLANNED_STEPS) -> float:
    """Predict the held-out ``cases`` with fold ``fold``'s diffusion model; returns seconds per case."""
    import spinediff
    from spinediff.io import read_json, write_json

    inputs = link_inputs(cases, raw, out)
    if all((out / f"{case}_uncertainty.json").is_file() for case in cases):
        summary = out / "prediction_summary.json"
        return float(read_json(summary)["seconds_per_case"]) if summary.is_file() else float("nan")
    start = time.perf_counter()
    trainer, configuration = METHODS["diffusion"]
    spinediff.predict(inputs, out, 501, configuration, trainer, folds=[fold], num_samples=samples,
                      num_inference_steps=steps,
                      save_uncertainty=True, save_probabilities=True, postprocessing=False, overwrite=True,
                      progress=False)
    seconds = (time.perf_counter() - start) / len(cases)
    write_json({"seconds_per_case": seconds}, out / "prediction_summary.json")
    return seconds


def dataset_folders() -> tuple[Path, Path, list[dict]] | None:
    """Dataset501's raw and results folders and its cross-validation splits; None (and why, printed) when this
    environment has no finished ``spinediff benchmark -d 501``."""
    from spinediff.io import read_json
    from spinediff.paths import nnunet_folder

    try:
        raw = nnunet_folder("raw") / NAME
        preprocessed, results_root = nnunet_folder("preprocessed") / NAME, nnunet_folder("results") / NAME
    except Exception as exc:  # noqa: BLE001 (the folders are the user's environment)
        print(f"skipped: {exc}")
        return None
    if not (preprocessed / "splits_final.json").is_file():
        print(f"skipped: no benchmark of {NAME} in {results_root} (run spinediff plan/benchmark first)")
        return None
    return raw, results_root, read_json(preprocessed / "splits_final.json")


def module_args(path: str) -> list[str]:
    """The interpreter arguments that run study ``path`` as a module (``-m studies.NAME``, from the repository root)."""
    return ["-m", f"studies.{Path(path).stem}"]


def run_jobs(commands: list[list[str]], workers: int) -> None:
    """Run ``commands`` (argument lists for this Python, from the repository root), ``workers`` at a time; stop at
    the first failure."""
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < workers:
            running.append(subprocess.Popen([sys.executable, *pending.pop(0)], cwd=ROOT))
        time.sleep(2)
        for process in list(running):
            if process.poll() is not None:
                running.remove(process)
                if process.returncode:
                    raise SystemExit(f"a prediction job failed (exit {process.returncode}): {process.args}")


def member_root(results_root: Path, member: int) -> Path:
    """The ``nnUNet_results`` folder of ensemble member ``member`` (member 0: the benchmark's own models)."""
    return results_root.parent if member == 0 else results_root / "ensemble_members" / f"member{member}"


def train_member(member: int, splits: list[dict]) -> None:
    """Train nnU-Net's trainer again on every fold (another random initialisation and batch order), into
    :func:`member_root`; run in a process whose ``nnUNet_results`` points there."""
    from spinediff.experiments.folds import Method, train_folds
    from spinediff.training.options import TrainingOptions

    trainer, configuration = METHODS["nnU-Net"]
    method = Method("nnU-Net", trainer, configuration, baseline=True)
    # the benchmark trained with seed 0: each member draws its own initialisation and batches
    train_folds([(method, fold) for fold in range(len(splits))], NAME, TrainingOptions(seed=member), reuse=True,
                workers=1)


def train_members(members: int, results_root: Path) -> None:
    """Members 1..members-1 side by side, one process (one thread) each."""
    running = []
    for member in range(1, members):
        root = member_root(results_root, member)
        root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, nnUNet_results=str(root), OMP_NUM_THREADS="1")
        log = open(root / "train.log", "a")  # noqa: SIM115 (closed when the process ends)
        command = [sys.executable, *module_args(__file__), "--train-member", str(member)]
        running.append((subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    for process, log in running:
        if process.wait():
            raise SystemExit(f"training an ensemble member failed (exit {process.returncode}); see {log.name}")
        log.close()


def ensemble_fold(fold: int, members: int, results_root: Path) -> tuple[Path, float | None]:
    """Fold ``fold``'s held-out cases as the ensemble of the ``members`` nnU-Net models (``spinediff ensemble
    --save-uncertainty``); returns its folder and the summed validation seconds per case of the members."""
    from spinediff.inference.ensemble import ensemble_folders
    from spinediff.io import read_json

    trainer, configuration = METHODS["nnU-Net"]
    folds = [member_root(results_root, m) / NAME / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{fold}"
             for m in range(members)]
    out = results_root / f"uncertainty_cv_ensemble{members}" / f"fold_{fold}"
    if not (out / "prediction.json").is_file():
        ensemble_folders([f / "validation" for f in folds], out, overwrite=True, save_probabilities=True,
                         save_uncertainty=True)
    timings = [read_json(f / "benchmark_timing.json").get("inference_seconds_per_case") for f in folds]
    return out, sum(timings) if all(t is not None for t in timings) else None


def ensemble_summary(members: int, results_root: Path, splits: list[dict], labels: dict) -> dict:
    """The scores of the ``members``-model nnU-Net ensemble of every fold (:func:`ensemble_fold`), with its seconds per
    case (the sum of its members')."""
    ensembles = [ensemble_fold(fold, members, results_root) for fold in range(len(splits))]
    seconds = [s for _, s in ensembles if s is not None]
    return dict(method_summary(lambda fold: ensembles[fold][0], splits, labels),
                seconds_per_case=float(np.mean(seconds)) if seconds else None)


def markdown(results: dict) -> str:
    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| method | case score | voxel AUROC of its map | AURC | e-AURC | wrong-level cases flagged | "
             "good cases flagged | ranks every wrong-level case first |", "|---|---|---|---|---|---|---|---|"]
    for method, summary in results["methods"].items():
        for row in summary["scores"]:
            lines.append(f"| {method} | `{row['score']}` | {f(row['voxel_auroc'])} | {f(row['aurc'])} | "
                         f"{f(row['e_aurc'])} | {row['wrong_level_flagged']} of {summary['wrong_level_cases']} | "
                         f"{row['good_flagged']} | {row['separates_wrong_levels']} |")
    lines += ["", "| method | mean L1-L5 Dice (as trained) | ECE | optimal AURC | wrong-level cases | s/case |",
              "|---|---|---|---|---|---|"]
    for method, summary in results["methods"].items():
        lines.append(f"| {method} | {f(summary['mean_dice'])} | {f(summary.get('ece'))} | "
                     f"{f(summary['optimal_aurc'])} | {summary['wrong_level_cases']} "
                     f"({', '.join(summary['wrong_level']) or 'none'}) | {f(summary['seconds_per_case'], 1)} |")
    return "\n".join(lines) + "\n"


def figure(results: dict, target: Path) -> None:
    from spinediff.evaluation.figures import pyplot
    from spinediff.metrics.failure_detection import risk_coverage

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results["methods"]), figsize=(5 * len(results["methods"]), 3.8), sharey=True)
    for ax, (method, summary) in zip(np.atleast_1d(axes), results["methods"].items(), strict=True):
        risks = [1 - c["mean_dice"] for c in summary["per_case"]]
        for row in summary["scores"]:
            values = [c["scores"][row["score"]] for c in summary["per_case"]]
            coverage, risk = risk_coverage(values, risks)
            ax.plot(coverage, risk, label=f"{row['score']} (AURC {row['aurc']:.3f})")
        coverage, risk = risk_coverage(risks, risks)
        ax.plot(coverage, risk, "k:", label=f"optimal ({summary['optimal_aurc']:.3f})")
        ax.set_title(method)
        ax.set_xlabel("coverage (cases accepted, most confident first)")
        ax.legend(fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("selective risk (1 - mean Dice)")
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


def method_summary(folder_of, splits: list[dict], labels: dict, cases: set[str] | None = None) -> dict:
    """The failure summary of the predictions in ``folder_of(fold)`` (of ``cases`` only, if given), each fold's
    level volumes expected from its own training labels."""
    from spinediff.evaluation.failure_detection import case_record, failure_summary
    from spinediff.metrics.case_uncertainty import expected_volumes

    records = []
    for fold, split in enumerate(splits):
        train = split["train"]
        expected = expected_volumes([labels[c][0] for c in train], [labels[c][1] for c in train], LEVELS)
        for case in split["val"]:
            if cases is not None and case not in cases:
                continue
            reference, spacing = labels[case]
            prediction = read_array(folder_of(fold) / f"{case}.nii.gz")[0]
            records.append(case_record(case, reference, prediction, spacing, folder_of(fold), ".nii.gz", LEVELS,
                                       expected))
    return failure_summary(records)


def stability(settings: list[tuple[int, int]], splits: list[dict], labels: dict, results_root: Path,
              out: Path) -> int:
    """How many samples and steps the case scores need: per (K, steps), each score's Spearman rank correlation
    over the cases against the setting with the most network calls (K x steps), its AURC and e-AURC."""
    from scipy.stats import spearmanr

    from spinediff.io import read_json, write_json

    works = {s: work_folder(results_root, *s) for s in settings}
    # the cases predicted with every setting (a long run may still be going: the comparison says how many)
    done = [{p.name.removesuffix("_uncertainty.json") for p in work.glob("fold_*/*_uncertainty.json")}
            for work in works.values()]
    cases = set.intersection(*done)
    summaries = {s: method_summary(lambda fold, work=work: work / f"fold_{fold}", splits, labels, cases)
                 for s, work in works.items()}
    best = max(settings, key=lambda s: (s[0] * s[1], s[0]))
    reference = summaries[best]
    ref_scores = {row["score"]: [c["scores"][row["score"]] for c in reference["per_case"]]
                  for row in reference["scores"]}
    rows: list[dict] = []
    lines = [f"| K | steps | score | Spearman vs K = {best[0]}, {best[1]} steps | AURC | e-AURC | mean Dice | "
             "s / case |", "|---|---|---|---|---|---|---|---|"]
    for (k, steps), summary in summaries.items():
        timing = [works[(k, steps)] / f"fold_{f}" / "prediction_summary.json" for f in range(len(splits))]
        seconds = float(np.mean([read_json(t)["seconds_per_case"] for t in timing if t.is_file()] or [np.nan]))
        for row in summary["scores"]:
            values = [c["scores"][row["score"]] for c in summary["per_case"]]
            rho = float(spearmanr(values, ref_scores[row["score"]]).statistic) if row["score"] in ref_scores else None
            rows.append({"k": k, "steps": steps, "score": row["score"], "spearman": rho, "aurc": row["aurc"],
                         "e_aurc": row["e_aurc"], "mean_dice": summary["mean_dice"], "voxel_auroc": row["voxel_auroc"],
                         "seconds_per_case": seconds, "wrong_level_cases": summary["wrong_level_cases"],
                         "separates_wrong_levels": row["separates_wrong_levels"]})
            lines.append(f"| {k} | {steps} | `{row['score']}` | {rho if rho is None else round(rho, 3)} | "
                         f"{row['aurc']:.3f} | {row['e_aurc']:.3f} | {summary['mean_dice']:.3f} | {seconds:.0f} |")
    out.mkdir(parents=True, exist_ok=True)
    lines.insert(0, f"{len(cases)} cases predicted with every setting: {', '.join(sorted(cases))}\n")
    write_json({"settings": settings, "reference": best, "cases": sorted(cases), "rows": rows},
               out / "stability.json")
    (out / "stability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5, help="diffusion samples per case (K)")
    parser.add_argument("--steps", type=int, default=PLANNED_STEPS, help="DDIM steps per sample")
    parser.add_argument("-j", "--workers", type=int, default=1, help="folds predicted side by side")
    parser.add_argument("--fold", type=int, help=argparse.SUPPRESS)  # one worker's fold
    parser.add_argument("--members", type=int, default=1,
                        help="nnU-Net models per fold (the benchmark's and members-1 more, trained side by side): "
                             "scores the ensemble's disagreement (pairwise Dice between the models) as well")
    parser.add_argument("--train-member", type=int, help=argparse.SUPPRESS)  # one member's training process
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "output" / "uncertainty_cv501"))
    parser.add_argument("--stability", nargs="+", metavar="K[xSTEPS]",
                        help="after predicting with each of these settings (--samples K --steps STEPS): how each "
                             "diffusion score's case ranking and AURC change, against the setting with the most "
                             "network calls (Spearman rank correlation), e.g. --stability 2 5 16 5x5 5x20")
    args = parser.parse_args(argv)
    from spinediff.io import read_json, write_json
    from spinediff.metrics.case_uncertainty import expected_volumes

    folders = dataset_folders()
    if folders is None:
        return 0
    raw, results_root, splits = folders
    # K = 5 and 10 steps (the plans') in uncertainty_cv; other settings (--stability) beside it
    work = work_folder(results_root, args.samples, args.steps)
    if args.train_member is not None:
        train_member(args.train_member, splits)
        return 0
    if args.members > 1:
        train_members(args.members, results_root)
    if args.fold is not None:
        predict_fold(args.fold, splits[args.fold]["val"], raw, work / f"fold_{args.fold}", args.samples, args.steps)
        return 0
    run_jobs([[*module_args(__file__), "--fold", str(fold), "--samples", str(args.samples), "--steps", str(args.steps)]
              for fold in range(len(splits))], args.workers)
    labels = {case: read_array(raw / "labelsTr" / f"{case}.nii.gz") for split in splits for case in split["val"]}
    if args.stability:
        return stability([parse_setting(t) for t in args.stability], splits, labels, results_root, Path(args.output))
    methods = {}
    for method, (trainer, configuration) in METHODS.items():
        if method == "diffusion":  # its K-sample predictions above
            folder_of = lambda fold: work / f"fold_{fold}"  # noqa: E731
            seconds = [read_json(folder_of(f) / "prediction_summary.json")["seconds_per_case"]
                       for f in range(len(splits))]
        else:  # the benchmark's validation with probabilities, and its validation time per case
            model = results_root / f"{trainer}__nnUNetPlans__{configuration}"
            folder_of = lambda fold, model=model: model / f"fold_{fold}" / "validation"  # noqa: E731
            timings = [folder_of(f).parent / "benchmark_timing.json" for f in range(len(splits))]
            seconds = [read_json(t).get("inference_seconds_per_case") for t in timings if t.is_file()]
        seconds = [s for s in seconds if s is not None]
        methods[method] = dict(method_summary(folder_of, splits, labels),
                               seconds_per_case=float(np.mean(seconds)) if seconds else None)
    if args.members > 1:  # the fold models' disagreement (Zenk et al. 2025's best detector): M seeds per fold
        methods[f"nnU-Net, {args.members} models"] = ensemble_summary(args.members, results_root, splits, labels)
    results = {"dataset": NAME, "samples": args.samples, "members": args.members, "methods": methods}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "results.json")
    (out / "results.md").write_text(markdown(results))
    figure(results, out / "risk_coverage.png")
    best = min(methods["diffusion"]["scores"], key=lambda row: row["aurc"])
    from spinediff.inference.review import ReviewRule

    all_cases = list(labels)
    volumes = expected_volumes([labels[c][0] for c in all_cases], [labels[c][1] for c in all_cases], LEVELS)
    rule = ReviewRule(best["score"], best["threshold"], volumes,
                      {"rule": "largest Youden index for wrong-level cases on the 5-fold cross-validation "
                               f"(lowest AURC of the diffusion scores: {best['aurc']:.3f})",
                       "cases": len(all_cases), "failures": methods["diffusion"]["wrong_level_cases"],
                       "made_by": "benchmarks/uncertainty_cv501.py"})
    path = rule.write(results_root / "DiffusionSegmentationTrainer__nnUNetPlans__2d_diffusion")
    print(markdown(results))
    print(f"review rule: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
