"""Diffusion segmentation uncertainty on real MRI (Dataset501_LumbarVB3dev: L1-L5 vertebral bodies).

Plans the dataset for the CPU, trains fold 0 of ``DiffusionSegmentationTrainer`` for a wall-clock
budget (no final validation: the held-out cases are predicted below instead), predicts a few of
fold 0's validation cases with ``spinediff predict --samples K --save-uncertainty``, and checks
whether the uncertainty lies on the vertebra borders: mean uncertainty within ``--band`` voxels of
the predicted boundary (any label change) vs elsewhere in the predicted foreground, and how well
the uncertainty separates wrong from right voxels (AUROC). Renders image | prediction | uncertainty.

Everything runs in a work folder outside the repository (the raw data is copied there); JSON,
Markdown and the PNG go to ``benchmarks/output/uncertainty_dataset501/``. Each stage is reused if
its results exist, so an interrupted run continues. Skips with a message if the data is absent.

    nohup python benchmarks/uncertainty_dataset501.py --budget-minutes 10 > /tmp/u501.log 2>&1 &
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "Dataset501_LumbarVB3dev"
NAME = "Dataset501_LumbarVB3dev"
TRAINER, CONFIG = "DiffusionSegmentationTrainer", "2d_diffusion"


def train_fold(budget_minutes: float, record: Path) -> dict:
    """Train fold 0 until ``budget_minutes`` of wall clock are spent in all (resuming an earlier run, reusing a
    finished one); returns the cumulative minutes, epochs and steps."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from spinediff.io import read_json, write_json
    from spinediff.training.api import TrainingOptions, apply_options, build_trainer, run_training_with_budget

    done = read_json(record) if record.is_file() else {"minutes": 0.0, "cpu_minutes": 0.0}
    trainer = build_trainer(501, CONFIG, 0, TRAINER, continue_training=record.is_file())
    remaining = budget_minutes - done["minutes"]
    if remaining < 0.5 and (Path(trainer.output_folder) / "checkpoint_final.pth").is_file():
        return done
    apply_options(trainer, TrainingOptions(epochs=1000, iterations_per_epoch=25, val_iterations_per_epoch=1))
    maybe_load_checkpoint(trainer, record.is_file(), False)
    start, cpu = time.perf_counter(), time.process_time()
    run_training_with_budget(trainer, remaining * 60)
    done = {"minutes": done["minutes"] + (time.perf_counter() - start) / 60,
            "cpu_minutes": done.get("cpu_minutes", 0.0) + (time.process_time() - cpu) / 60,
            "epochs": trainer.current_epoch, "steps": trainer.current_epoch * trainer.num_iterations_per_epoch,
            "batch_size": trainer.batch_size, "last_pseudo_dice": trainer.logger.get_value("mean_fg_dice", step=-1)}
    write_json(done, record)
    return done


def boundary_band(labels: np.ndarray, width: float) -> np.ndarray:
    """Voxels within ``width`` voxels (Euclidean) of a label change between face neighbours."""
    from scipy.ndimage import distance_transform_edt

    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        change = np.diff(labels, axis=axis) != 0
        lower = [slice(None)] * labels.ndim
        upper = [slice(None)] * labels.ndim
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        boundary[tuple(lower)] |= change
        boundary[tuple(upper)] |= change
    return distance_transform_edt(~boundary) <= width


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a random positive voxel scores higher than a random negative one (ties count half)."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def analyse_case(case: str, raw: Path, predictions: Path, band_width: float) -> dict:
    import SimpleITK as sitk

    from spinediff.evaluation.segmentation_metrics import segmentation_metrics

    def read(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    predicted = read(predictions / f"{case}.nii.gz").astype(np.int16)
    truth = read(raw / "labelsTr" / f"{case}.nii.gz").astype(np.int16)
    entropy = read(predictions / f"{case}_uncertainty.nii.gz")
    variance = read(predictions / f"{case}_variance.nii.gz")
    dice = {str(c): m["dice"] for c, m in segmentation_metrics(predicted, truth, range(1, 6), (1, 1, 1)).items()}
    foreground = predicted > 0
    band = boundary_band(predicted, band_width)
    result: dict = {"dice": dice, "mean_dice": float(np.nanmean(list(dice.values()))),
                    "foreground_voxels": int(foreground.sum()),
                    "band_fraction_of_foreground": float((band & foreground).sum() / max(foreground.sum(), 1))}
    relevant = foreground | (truth > 0)  # where a vertebra was predicted or is
    wrong = predicted != truth
    for name, values in (("entropy", entropy), ("variance", variance)):
        border = values[band & foreground]
        interior = values[foreground & ~band]
        result[name] = {
            "border_mean": float(border.mean()) if border.size else None,
            "interior_mean": float(interior.mean()) if interior.size else None,
            "border_to_interior": float(border.mean() / interior.mean()) if border.size and interior.size and
            interior.mean() > 0 else None,
            "share_of_total_within_band": float(values[band].sum() / max(values.sum(), 1e-12)),
            "wrong_mean": float(values[relevant & wrong].mean()) if (relevant & wrong).any() else None,
            "right_mean": float(values[relevant & ~wrong].mean()) if (relevant & ~wrong).any() else None,
            "auroc_wrong_vs_right": auroc(values[relevant], wrong[relevant]),
        }
    return result


def render(cases: list[str], raw: Path, predictions: Path, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    from matplotlib.colors import ListedColormap

    def read(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    colours = ListedColormap(["#00000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231"])
    fig, axes = plt.subplots(len(cases), 3, figsize=(12, 4.3 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        image = read(raw / "imagesTr" / f"{case}_0000.nii.gz").astype(np.float32)
        predicted = read(predictions / f"{case}.nii.gz")
        truth = read(raw / "labelsTr" / f"{case}.nii.gz")
        entropy = read(predictions / f"{case}_uncertainty.nii.gz")
        z = int(np.argmax((truth > 0).sum(axis=(1, 2))))  # the sagittal slice through most of the vertebrae
        row[0].imshow(image[z], cmap="gray")
        row[0].set_title(f"{case}: MR, slice {z}")
        row[1].imshow(image[z], cmap="gray")
        row[1].imshow(np.ma.masked_equal(predicted[z], 0), cmap=colours, vmin=0, vmax=5, alpha=0.55,
                      interpolation="nearest")
        row[1].contour(truth[z] > 0, levels=[0.5], colors="white", linewidths=0.8)
        row[1].set_title("prediction (colour), ground truth (white line)")
        shown = row[2].imshow(entropy[z], cmap="magma", vmin=0, vmax=max(float(entropy.max()), 1e-6))
        row[2].contour(predicted[z] > 0, levels=[0.5], colors="cyan", linewidths=0.5)
        row[2].set_title("uncertainty (nats), predicted border (cyan)")
        fig.colorbar(shown, ax=row[2], fraction=0.046)
        for axis in row:
            axis.axis("off")
    fig.tight_layout()
    fig.savefig(target, dpi=80)
    plt.close(fig)


def markdown(summary: dict) -> str:
    lines = [f"# Uncertainty of diffusion segmentation on {NAME}", "",
             f"`{TRAINER}`, `{CONFIG}`, fold 0 trained {summary['training']['minutes']:.1f} min on the CPU "
             f"({summary['training']['steps']} steps of batch {summary['training']['batch_size']}); "
             f"{summary['samples']} samples x {summary['steps']} DDIM steps per case; uncertainty = entropy of the "
             "mean class probabilities minus the samples' mean entropy (nats); border = within "
             f"{summary['band']} voxels (1 mm) of a predicted label change.", "",
             "| case | mean Dice | s/case | entropy border | entropy interior | ratio | share in band | "
             "AUROC wrong/right | variance ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for case, r in summary["cases"].items():
        e, v = r["entropy"], r["variance"]
        lines.append(f"| {case} | {r['mean_dice']:.3f} | {r['seconds']:.0f} | {_fmt(e['border_mean'])} | "
                     f"{_fmt(e['interior_mean'])} | {_fmt(e['border_to_interior'], 1)} | "
                     f"{_fmt(e['share_of_total_within_band'], 2)} | {_fmt(e['auroc_wrong_vs_right'], 3)} | "
                     f"{_fmt(v['border_to_interior'], 1)} |")
    lines += ["", "Dice per class (L1-L5), per case: " + "; ".join(
        f"{c}: " + ", ".join(f"{d:.2f}" for d in r["dice"].values()) for c, r in summary["cases"].items()),
        "", "![overlay](overlay.png)", "", f"Command: `{summary['command']}`"]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="training budget (wall clock)")
    parser.add_argument("--cases", type=int, default=2, help="held-out cases of fold 0 to predict")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps per sample")
    parser.add_argument("--band", type=float, default=2.0, help="border band half-width in voxels")
    parser.add_argument("--work", default="/tmp/spinediff_uncertainty501", help="work folder (outside the repo)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "output" / "uncertainty_dataset501"))
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"SKIPPED: the real MRI dataset {DATA} is absent (../shared/data beside the repository).")
        return 0
    work, out = Path(args.work), Path(args.output)
    for kind in ("raw", "preprocessed", "results"):
        (work / f"nnUNet_{kind}").mkdir(parents=True, exist_ok=True)
        os.environ[f"nnUNet_{kind}"] = str(work / f"nnUNet_{kind}")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    from spinediff.inference.api import predict
    from spinediff.io import read_json, write_json, write_text
    from spinediff.planning.api import plan_dataset

    raw = work / "nnUNet_raw" / NAME
    if not raw.is_dir():
        shutil.copytree(DATA, raw)
    splits = work / "nnUNet_preprocessed" / NAME / "splits_final.json"
    if not (work / "nnUNet_preprocessed" / NAME / "nnUNetPlans.json").is_file():
        plan_dataset(501, configurations=[CONFIG], device="cpu", num_processes=1)
    training = train_fold(args.budget_minutes, work / "training.json")
    cases = read_json(splits)[0]["val"][: args.cases]
    inputs, predictions = work / "inputs", work / "predictions"
    inputs.mkdir(exist_ok=True)
    for case in cases:
        if not (inputs / f"{case}_0000.nii.gz").exists():
            shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", inputs)
    if not (predictions / "prediction.json").is_file():
        predict(inputs, predictions, 501, CONFIG, TRAINER, folds=[0], num_samples=args.samples, steps=args.steps,
                seed=0, save_uncertainty=True)
    timing = read_json(predictions / "prediction.json")["cases"]
    out.mkdir(parents=True, exist_ok=True)
    results = {case: {**analyse_case(case, raw, predictions, args.band), "seconds": timing[case]["seconds"]}
               for case in cases}
    render(cases, raw, predictions, out / "overlay.png")
    command = "python benchmarks/uncertainty_dataset501.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = {"dataset": NAME, "trainer": TRAINER, "configuration": CONFIG, "fold": 0,
               "training": training, "samples": args.samples, "steps": args.steps, "band": args.band,
               "cases": results, "command": command.strip()}
    write_json(summary, out / "results.json")
    write_text(markdown(summary), out / "results.md")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
