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

    nohup python -m studies.uncertainty_dataset501 --budget-minutes 10 > /tmp/u501.log 2>&1 &
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
    from spinediff.training.api import TrainingOptions, apply_options, build_trainer
    from spinediff.training.schedule import run_scheduled_training

    done = read_json(record) if record.is_file() else {"minutes": 0.0, "cpu_minutes": 0.0}
    trainer = build_trainer(501, CONFIG, 0, TRAINER, continue_training=record.is_file())
    remaining = budget_minutes - done["minutes"]
    if remaining < 0.5 and (Path(trainer.output_folder) / "checkpoint_final.pth").is_file():
        return done
    apply_options(trainer, TrainingOptions(epochs=1000, iterations_per_epoch=25, val_iterations_per_epoch=1))
    maybe_load_checkpoint(trainer, record.is_file(), False)
    start, cpu = time.perf_counter(), time.process_time()
    run_scheduled_training(trainer, remaining * 60, grow=False)
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


def border_statistics(values: np.ndarray, regions: np.ndarray, band_width: float) -> dict:
    """Mean of ``values`` near the borders of ``regions`` (labels; 0 = background), inside them, and outside."""
    band = boundary_band(regions, band_width)
    inside = regions > 0

    def mean(mask: np.ndarray) -> float | None:
        return float(values[mask].mean()) if mask.any() else None

    border, interior, outside = mean(band & inside), mean(inside & ~band), mean(~inside & ~band)
    return {"border_mean": border, "interior_mean": interior, "outside_mean": outside,
            "border_to_interior": border / interior if border is not None and interior else None,
            "share_of_total_within_band": float(values[band].sum() / max(values.sum(), 1e-12)),
            "band_fraction_of_inside": float((band & inside).sum() / max(inside.sum(), 1))}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def read_case(case: str, raw: Path, predictions: Path) -> dict[str, np.ndarray]:
    import SimpleITK as sitk

    def read(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    with np.load(predictions / f"{case}.npz", allow_pickle=False) as data:
        probabilities = data["probabilities"]
    return {"image": read(raw / "imagesTr" / f"{case}_0000.nii.gz").astype(np.float32),
            "truth": read(raw / "labelsTr" / f"{case}.nii.gz").astype(np.int16),
            "predicted": read(predictions / f"{case}.nii.gz").astype(np.int16),
            "entropy": read(predictions / f"{case}_uncertainty.nii.gz"),
            "variance": read(predictions / f"{case}_variance.nii.gz"),
            "foreground_probability": (1 - probabilities[0]).reshape(read(predictions / f"{case}.nii.gz").shape)}


def analyse_case(case: str, raw: Path, predictions: Path, band_width: float) -> dict:
    from spinediff.metrics.segmentation_metrics import segmentation_metrics

    c = read_case(case, raw, predictions)
    predicted, truth = c["predicted"], c["truth"]
    foreground = (c["foreground_probability"] > 0.5).astype(np.int16)  # vertebral body of any level
    dice = {str(k): m["dice"] for k, m in segmentation_metrics(predicted, truth, range(1, 6), (1, 1, 1)).items()}
    result: dict = {"dice": dice, "mean_dice": float(np.nanmean(list(dice.values()))),
                    "dice_any_level_argmax": _dice(predicted > 0, truth > 0),
                    "dice_any_level_probability": _dice(foreground > 0, truth > 0),
                    "predicted_voxels": int((predicted > 0).sum()), "foreground_voxels": int(foreground.sum()),
                    "truth_voxels": int((truth > 0).sum())}
    relevant = (predicted > 0) | (truth > 0)  # where a vertebra was predicted or is
    wrong = predicted != truth
    for name in ("entropy", "variance"):
        values = c[name]
        result[name] = {
            "predicted_labels": border_statistics(values, predicted, band_width),
            "predicted_foreground": border_statistics(values, foreground, band_width),
            "ground_truth": border_statistics(values, truth, band_width),
            "wrong_mean": float(values[relevant & wrong].mean()) if (relevant & wrong).any() else None,
            "right_mean": float(values[relevant & ~wrong].mean()) if (relevant & ~wrong).any() else None,
            "auroc_wrong_vs_right": auroc(values[relevant], wrong[relevant]),
        }
    return result


def render(cases: list[str], raw: Path, predictions: Path, target: Path) -> None:
    from matplotlib.colors import ListedColormap

    from spinediff.evaluation.figures import pyplot

    plt = pyplot()  # matplotlib defaults again: nnU-Net's training left seaborn's font scale behind

    colours = ListedColormap(["#00000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231"])
    fig, axes = plt.subplots(len(cases), 4, figsize=(16, 4.3 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        c = read_case(case, raw, predictions)
        z = int(np.argmax((c["truth"] > 0).sum(axis=(1, 2))))  # the sagittal slice through most of the vertebrae
        truth = c["truth"][z] > 0
        row[0].imshow(c["image"][z], cmap="gray")
        row[0].set_title(f"{case}: MR, slice {z}")
        row[1].imshow(c["image"][z], cmap="gray")
        row[1].imshow(np.ma.masked_equal(c["predicted"][z], 0), cmap=colours, vmin=0, vmax=5, alpha=0.6,
                      interpolation="nearest")
        row[1].contour(truth, levels=[0.5], colors="white", linewidths=0.8)
        row[1].set_title("prediction L1-L5 (colour), truth (white)")
        shown = row[2].imshow(c["foreground_probability"][z], cmap="viridis", vmin=0, vmax=1)
        row[2].contour(truth, levels=[0.5], colors="white", linewidths=0.8)
        row[2].set_title("P(vertebral body, any level)")
        fig.colorbar(shown, ax=row[2], fraction=0.046)
        shown = row[3].imshow(c["entropy"][z], cmap="magma", vmin=0, vmax=max(float(c["entropy"].max()), 1e-6))
        row[3].contour(truth, levels=[0.5], colors="white", linewidths=0.6)
        row[3].contour(c["foreground_probability"][z] > 0.5, levels=[0.5], colors="cyan", linewidths=0.6)
        row[3].set_title("uncertainty (nats); truth white, P>0.5 cyan")
        fig.colorbar(shown, ax=row[3], fraction=0.046)
        for axis in row:
            axis.axis("off")
    fig.tight_layout()
    fig.savefig(target, dpi=80)
    plt.close(fig)


def markdown(summary: dict) -> str:
    t = summary["training"]
    lines = [f"# Uncertainty of diffusion segmentation on {NAME}", "",
             f"`{TRAINER}`, `{CONFIG}`, fold 0: {t['steps']} training steps of batch {t['batch_size']} in "
             f"{t['minutes']:.0f} min wall clock ({t['cpu_minutes']:.0f} CPU-min) on the shared 2-core CPU; "
             f"{summary['samples']} samples x {summary['steps']} DDIM steps per case. Uncertainty = entropy of the "
             "mean class probabilities minus the samples' mean entropy (nats). Border = within "
             f"{summary['band']} voxels (1 mm) of a label change of the reference named in the column.", "",
             "| case | Dice L1-L5 | Dice any level (argmax) | Dice any level (P>0.5) | s/case | AUROC wrong/right |",
             "|---|---|---|---|---|---|"]
    for case, r in summary["cases"].items():
        lines.append(f"| {case} | {r['mean_dice']:.3f} | {r['dice_any_level_argmax']:.3f} | "
                     f"{r['dice_any_level_probability']:.3f} | {r['seconds']:.0f} | "
                     f"{_fmt(r['entropy']['auroc_wrong_vs_right'], 3)} |")
    lines += ["", "Mean uncertainty (nats) at the border / inside / outside, border:inside ratio, and the share of "
              "all uncertainty within the border band:", "",
              "| case | reference | border | inside | outside | ratio | share in band |",
              "|---|---|---|---|---|---|---|"]
    for case, r in summary["cases"].items():
        for reference in ("predicted_labels", "predicted_foreground", "ground_truth"):
            e = r["entropy"][reference]
            lines.append(f"| {case} | {reference.replace('_', ' ')} | {_fmt(e['border_mean'])} | "
                         f"{_fmt(e['interior_mean'])} | {_fmt(e['outside_mean'])} | "
                         f"{_fmt(e['border_to_interior'], 2)} | "
                         f"{_fmt(e['share_of_total_within_band'], 2)} |")
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
        predict(inputs, predictions, 501, CONFIG, TRAINER, folds=[0], num_samples=args.samples,
                num_inference_steps=args.steps,
                seed=0, save_uncertainty=True, save_probabilities=True)
    timing = read_json(predictions / "prediction.json")["cases"]
    out.mkdir(parents=True, exist_ok=True)
    results = {case: {**analyse_case(case, raw, predictions, args.band), "seconds": timing[case]["seconds"]}
               for case in cases}
    render(cases, raw, predictions, out / "overlay.png")
    command = "python -m studies.uncertainty_dataset501 " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = {"dataset": NAME, "trainer": TRAINER, "configuration": CONFIG, "fold": 0,
               "training": training, "samples": args.samples, "steps": args.steps, "band": args.band,
               "cases": results, "command": command.strip()}
    write_json(summary, out / "results.json")
    write_text(markdown(summary), out / "results.md")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
