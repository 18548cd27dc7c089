"""The sections of the demo report: data, registration, segmentation, translation, training, timing."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import SimpleITK as sitk

from spinediff.evaluation.figures import checkpoint_logging, optional_image, qualitative_panel, training_curves
from spinediff.evaluation.report import Section, Table, fmt
from spinediff.paths import model_folder_name

#: The demo's two MR-as-CT reference rows (no network): one linear map for all cases, and the best per case.
BASELINE_GLOBAL = "MR as CT (linear map fitted on the training cases)"
BASELINE_ORACLE = "Linear MR→HU map fitted per case (oracle)"
#: The demo's trained models (results folders).
SEG_NNUNET = model_folder_name("nnUNetTrainer", "2d_cpu")
SEG_DIFFUSION = model_folder_name("DiffusionSegmentationTrainer", "2d_diffusion")
TRANS_DIFFUSION = model_folder_name("DiffusionTranslationTrainer", "2d_diffusion")
TRANS_REGRESSION = model_folder_name("RegressionTrainer", "2d_diffusion")


def _benchmark_table(benchmark: dict, metrics: list[str]) -> Table:
    rows = [[row["method"], *[fmt(row.get(m)) for m in metrics], fmt(row["train_minutes"], 1), str(row["epochs"]),
             fmt(row["inference_s_per_case"], 1)] for row in benchmark["methods"]]
    return Table(["method", *metrics, "train min", "epochs", "s/case"], rows,
                 f"Fold 0 held-out cases of {benchmark['dataset']}; same schedule and wall-clock budget per method.")


def _curves(results: Path, dataset: str, runs: dict[str, str], target: Path) -> Path | None:
    curves = {}
    for name, folder in runs.items():
        checkpoint = results / dataset / folder / "fold_0" / "checkpoint_final.pth"
        if checkpoint.is_file():
            curves[name] = checkpoint_logging(checkpoint)
    if not curves:
        return None
    training_curves(curves, target)
    return target


def build_sections(out, folders, datasets, registered, benchmarks, registration_reports, predictions,
                   result) -> list[Section]:
    results, raw = folders["results"], folders["raw"]
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    summary = result.summary
    sections = [Section("What ran", [
        "The demo generated a synthetic lumbar spine phantom (MR T1w/T2w sagittal and CT with a random rigid "
        "misalignment), registered CT to MR with two landmarks per vertebra, planned CPU-sized configurations with "
        "SpineDiffPlanner, trained fold 0 of four models with the same schedule and wall-clock budget, sampled the "
        "held-out cases with DDIM, and scored them against the ground truth.",
        f"Machine: {machine_description()}. Total time {summary['total_seconds'] / 60:.1f} min.",
    ], [Table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in result.stages.items()])])]

    sections.append(Section("Data", ["Mid-sagittal slices of the first phantom cases: T1w, T2w, CT aligned to the MR, "
                                     "labels (vertebra yellow, disc cyan, canal pink) and the raw misaligned CT."],
                            figures=[(datasets["segmentation"] / "preview.png", "Phantom cases")]))

    ok = [r for r in registration_reports if r.status == "ok"]
    rows = [[r.case, fmt((r.residual_before_mm or {}).get("mean"), 2),
             fmt((r.residual_after_mm or {}).get("mean"), 2), fmt((r.tre_mm or {}).get("mean"), 2),
             fmt(r.rotation_error_deg, 2)] for r in registration_reports]
    overlays = sorted((registered / "registration").glob("*.png"))[:1] if (registered / "registration").is_dir() else []
    sections.append(Section("Registration (landmark-based, 2 landmarks per vertebra, rigid)", [
        f"{len(ok)} of {len(registration_reports)} cases registered; median target registration error "
        f"{fmt(summary['registration']['median_tre_mm'], 2)} mm over the vertebra voxels (the true transform is "
        "known for the phantom)."],
        [Table(["case", "landmark residual before (mm)", "after (mm)", "TRE (mm)", "rotation error (deg)"], rows)],
        [(p, f"QA overlay: {p.stem}") for p in overlays]))

    seg = benchmarks["segmentation"]
    seg_name = seg["dataset"]
    seg_table = _benchmark_table(seg, ["dice", "dice_1", "dice_2", "dice_3", "hd95_1"])
    for name, scores in summary.get("ensembles", {}).get("segmentation", {}).items():
        seg_table.rows.append([name, fmt(scores["dice"]), "–", "–", "–", "–", "–", "–", "–"])
    panel_rows = []
    prediction_folder = Path(predictions.get("segmentation", {}).get("folder", "")) if isinstance(
        predictions.get("segmentation"), dict) else None
    for case in list(next(iter(seg["per_case"].values())).keys())[:3]:
        row = {"_name": case,
               "image": optional_image(raw / seg_name / "imagesTr" / f"{case}_0001.nii.gz"),
               "truth": optional_image(raw / seg_name / "labelsTr" / f"{case}.nii.gz"),
               "nnunet": optional_image(results / seg_name / SEG_NNUNET / "fold_0" / "validation"
                               / f"{case}.nii.gz"),
               "diffusion": optional_image(results / seg_name / SEG_DIFFUSION
                                  / "fold_0" / "validation" / f"{case}.nii.gz"),
               "uncertainty": optional_image(prediction_folder / f"{case}_uncertainty.nii.gz")
               if prediction_folder else None}
        panel_rows.append(row)
    qualitative_panel(panel_rows, [("T2w", "image", {"cmap": "gray"}),
                                   ("ground truth", "truth", {"overlay_on": "image"}),
                                   ("nnU-Net", "nnunet", {"overlay_on": "image"}),
                                   ("diffusion", "diffusion", {"overlay_on": "image"}),
                                   ("uncertainty (entropy)", "uncertainty", {"cmap": "magma"})],
                      figures / "segmentation_cases.png", "Segmentation of held-out cases")
    sections.append(Section("Segmentation: diffusion vs nnU-Net", [
        "Dice per class (1 vertebra, 2 disc, 3 spinal canal), HD95 of the vertebra class in mm, of one DDIM sample "
        "per case (fold validation); the ensemble row scores `spinediff predict`'s mean of K samples. The uncertainty "
        "map is the voxel-wise entropy of the mean class probabilities over the diffusion samples (SpineSegDiff)."],
        [seg_table], [(figures / "segmentation_cases.png", "Held-out cases: image, truth, predictions, uncertainty"),
                      (Path(seg["output"]) / "benchmark.png", "Dice per case")]))

    trans = benchmarks["translation"]
    trans_name = trans["dataset"]
    metrics = ["psnr", "ssim", "mae_body", "mae_bone"] + (["dice_downstream"] if trans.get("downstream") else [])
    trans_table = _benchmark_table(trans, metrics)
    for name in (BASELINE_GLOBAL, BASELINE_ORACLE):
        baseline = summary["translation"].get(name)
        if baseline:
            trans_table.rows.append([name, *[fmt(baseline.get(m)) if m in baseline else "–" for m in metrics],
                                     "–", "–", "–"])
    for name, scores in summary.get("ensembles", {}).get("translation", {}).items():
        trans_table.rows.append([name, *[fmt(scores[m]) if m in scores else "–" for m in metrics], "–", "–", "–"])
    if trans.get("downstream"):
        segmenter = trans["downstream"]
        trans_table.rows.append(["Real CT (the CT segmenter's Dice_orig)", *["–"] * (len(metrics) - 1),
                                 fmt(segmenter["dice_real_ct"]), fmt(segmenter["train_minutes"], 1),
                                 str(segmenter["epochs"]), "–"])
    translation_folder = Path(predictions.get("translation", {}).get("folder", "")) if isinstance(
        predictions.get("translation"), dict) else None
    panel_rows = []
    for case in list(next(iter(trans["per_case"].values())).keys())[:3]:
        diffusion_path = (results / trans_name / TRANS_DIFFUSION / "fold_0"
                          / "validation" / f"{case}.nii.gz")
        real = optional_image(raw / trans_name / "imagesTr" / f"{case}_0002.nii.gz")
        synthetic = optional_image(diffusion_path)
        error = None
        if real is not None and synthetic is not None:
            error = sitk.Abs(sitk.Cast(synthetic, sitk.sitkFloat32) - sitk.Cast(real, sitk.sitkFloat32))
        panel_rows.append({
            "_name": case, "mr": optional_image(raw / trans_name / "imagesTr" / f"{case}_0000.nii.gz"), "real": real,
            "synthetic": synthetic, "error": error,
            "regression": optional_image(results / trans_name / TRANS_REGRESSION / "fold_0"
                                / "validation" / f"{case}.nii.gz"),
            "std": optional_image(translation_folder / f"{case}_uncertainty.nii.gz") if translation_folder else None})
    ct_window = {"cmap": "gray", "vmin": -250, "vmax": 1250}
    qualitative_panel(panel_rows, [("MR T1w", "mr", {"cmap": "gray"}), ("real CT", "real", ct_window),
                                   ("synthetic CT (diffusion)", "synthetic", ct_window),
                                   ("|error| (HU)", "error", {"cmap": "magma", "vmin": 0, "vmax": 500}),
                                   ("regression U-Net", "regression", ct_window),
                                   ("sample std (HU)", "std", {"cmap": "magma"})],
                      figures / "translation_cases.png", "MR → CT translation of held-out cases")
    sections.append(Section("MR → CT translation: diffusion (image mode) vs regression", [
        "PSNR and SSIM over the volume (clipped to the planned HU range), MAE in HU inside the body (> -500 HU) and in "
        "bone (> 200 HU). 'MR as CT' maps the MR intensities to HU with one linear map fitted on the training cases; "
        "the oracle row fits the best linear map on each held-out case's own CT (an upper bound for any intensity "
        "mapping): a model must beat them to have learned anatomy rather than intensities. dice_downstream: an "
        "nnU-Net trained on the real CT of the training cases segments the synthetic CT (vertebra, disc, canal; "
        "mean Dice); the last row is its Dice on the real CT (Graf et al.'s and Konz et al.'s Dice_orig)."]
        + ([f"CT segmenter: {trans['downstream']['segmenter']}, trained on the real CT of fold 0's training cases."]
           if trans.get("downstream") else []),
        [trans_table], [(figures / "translation_cases.png", "Held-out cases: MR, real CT, synthetic CT, error"),
                        (Path(trans["output"]) / "benchmark.png", "MAE in the body per case")]))

    curve_figures = []
    for name, dataset, runs in (
            ("segmentation", seg_name, {"nnU-Net": SEG_NNUNET,
                                        "diffusion": SEG_DIFFUSION}),
            ("translation", trans_name, {"regression": TRANS_REGRESSION,
                                         "diffusion": TRANS_DIFFUSION})):
        path = _curves(results, dataset, runs, figures / f"curves_{name}.png")
        if path:
            curve_figures.append((path, f"Training curves ({name})"))
    sections.append(Section("Training", ["Loss per epoch and the per-epoch validation score (pseudo-Dice for "
                                         "segmentation, SSIM of DDIM samples for translation)."],
                            figures=curve_figures))
    sections.append(Section("Caveats", [
        "All numbers come from one fold of a small synthetic dataset and a CPU budget of minutes; they show that the "
        "pipeline works and how methods compare under equal budgets, not clinical performance.",
        "Wilcoxon p-values need more cases than one fold of the demo gives; see documentation/results.md for "
        "benchmarks with more folds."]))
    return sections


def machine_description() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")
