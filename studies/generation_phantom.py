"""Segmentation-guided generation measured as Konz et al.'s poster did (issue 19): CT and MR, every slice direction,
3D and the fused 2.5D, across modalities, and a mask ablation, on the phantom.

Usage::

    python -m studies.generation_phantom [--iterations 600] [--cases 15] [--models axial,coronal,sagittal]
    python -m studies.generation_phantom --models 3D --iterations-3d 225   # beside it, in a second process

* Data: the phantom's ``Dataset903`` (mask → CT) and ``Dataset904`` (mask → T2w MR, with ``labelsFromCT``), ``--cases``
  subjects, nnU-Net's 5-fold split, fold 0. Folders under ``benchmarks/output/performance/generation_phantom_work``.
* Models per modality (``SegGuidedGenerationTrainer``, ``--iterations`` steps each): ``2d_diffusion`` of the plans
  ``nnUNetPlans_axial|coronal|sagittal`` (``spinediff plan --slice-direction``) and ``3d_diffusion`` of the default
  plans; "2.5D" is ``spinediff ensemble`` of the three directions (the mean image).
* Auxiliary segmenter per modality: nnU-Net's trainer (``2d_cpu``) on the real images of fold 0's training cases.
  Dice_gen: its mean foreground Dice on the generated image against the mask the image was generated from;
  Dice_orig: the same on the real image. Fréchet: :mod:`spinediff.metrics.frechet` in that segmenter's encoder
  features, generated vs real validation images.
* Cross-modal: the MR models generate from ``labelsFromCT`` (the CT's labels on the MR grid).
* Mask ablation: the label ``--ablate`` (2: discs) removed from the mask (its voxels become background); Dice_gen of
  the other labels, and a figure.
* Every prediction: ``spinediff predict`` with the plans' sampler and steps, one sample, seed 0.

Writes ``benchmarks/output/performance/generation_phantom.{json,md}`` and ``generation_phantom.png`` /
``generation_ablation.png`` beside them.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np

from benchmarks import perf_common as pc

WORK = pc.OUTPUT / "generation_phantom_work"
os.environ["nnUNet_raw"] = str(WORK / "raw")  # before nnunetv2 is imported (it reads them once)
os.environ["nnUNet_preprocessed"] = str(WORK / "preprocessed")
os.environ["nnUNet_results"] = str(WORK / "results")

TRAINER = "SegGuidedGenerationTrainer"
MODALITIES = {"CT": (903, "Dataset903_SpinePhantomGeneration", 913),
              "MR": (904, "Dataset904_SpinePhantomGenerationMR", 914)}
DIRECTIONS = ("axial", "coronal", "sagittal")
ITERATIONS_PER_EPOCH = 75


def segmenter_name(modality: str) -> str:
    return f"Dataset{MODALITIES[modality][2]}_Phantom{modality}Segmenter"


def prepare(cases: int) -> None:
    from spinediff.datasets.phantom_writer import write_phantom_datasets
    from spinediff.experiments.downstream import write_segmenter_dataset
    from spinediff.io import read_json, write_json
    from spinediff.planning.api import plan_dataset

    marker = WORK / "ready.json"
    recipe = {"cases": cases, "seed": pc.PHANTOM_SEED, "planner": 2, "settings": repr(pc.phantom_settings())}
    if marker.is_file() and read_json(marker) == recipe:
        return
    pc.log("writing the phantom's generation datasets and planning them (once)")
    raw = WORK / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_phantom_datasets(raw, num_cases=cases, seed=pc.PHANTOM_SEED, tasks=("generation", "generation_mr"),
                           settings=pc.phantom_settings(), overwrite=True, progress=False)
    for modality, (dataset, name, segmenter_id) in MODALITIES.items():
        shutil.rmtree(raw / segmenter_name(modality), ignore_errors=True)
        write_segmenter_dataset(raw / name, raw / segmenter_name(modality))
        plan_dataset(dataset, configurations=["3d_diffusion"], device="cpu", num_processes=1, overwrite=True,
                     show_progress_bar=False)
        for direction in DIRECTIONS:
            plan_dataset(dataset, configurations=["2d_diffusion"], device="cpu", num_processes=1, overwrite=True,
                         show_progress_bar=False, slice_direction=direction)
        plan_dataset(segmenter_id, configurations=["2d_cpu"], device="cpu", num_processes=1, overwrite=True,
                     show_progress_bar=False)
    write_json(recipe, marker)


def trained(dataset: int | str, configuration: str, trainer: str, iterations: int, plans: str = "nnUNetPlans") -> dict:
    """Fold 0 of the model trained for ``iterations`` steps (trained now unless it is there); its folder and the
    training wall time in minutes. A model trained for the same iterations by an earlier run of this benchmark
    (another results folder; its timing file is written last) is reused: it depends on the data, its plans and its
    iterations only."""
    import time

    from spinediff.io import read_json, write_json
    from spinediff.paths import model_folder_name
    from spinediff.training.api import TrainingOptions, train

    names = {i: n for i, n, _ in MODALITIES.values()}
    names.update({s: segmenter_name(m) for m, (_, _, s) in MODALITIES.items()})
    name = names[dataset]
    model = model_folder_name(trainer, configuration, plans)
    results = Path(os.environ["nnUNet_results"])
    folder = results / name / model
    timing = folder / "fold_0" / "benchmark_training.json"
    wanted = max(1, iterations // ITERATIONS_PER_EPOCH) * ITERATIONS_PER_EPOCH
    if timing.is_file() and read_json(timing)["iterations"] != wanted:  # trained for another budget: train again
        shutil.rmtree(folder) if not folder.is_symlink() else folder.unlink()
    if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
        for other in sorted(WORK.glob("results_*")):
            earlier = other / name / model
            done = earlier / "fold_0" / "benchmark_training.json"
            if other != results and done.is_file() and read_json(done)["iterations"] == wanted:
                (results / name).mkdir(parents=True, exist_ok=True)
                shutil.rmtree(folder, ignore_errors=True)
                folder.symlink_to(earlier.resolve(), target_is_directory=True)
                pc.log(f"reusing {earlier}")
                break
    if not timing.is_file():
        epochs = max(1, iterations // ITERATIONS_PER_EPOCH)
        pc.log(f"training {trainer} {configuration} ({plans}) on {name}: {epochs} x {ITERATIONS_PER_EPOCH} iterations")
        options = TrainingOptions(epochs=epochs, iterations_per_epoch=ITERATIONS_PER_EPOCH, val_iterations_per_epoch=1,
                                  validation_samples=1, seed=0)
        start = time.perf_counter()
        train(dataset, configuration, 0, trainer, options, plans_identifier=plans, overwrite=True)
        write_json({"iterations": epochs * ITERATIONS_PER_EPOCH,
                    "minutes": (time.perf_counter() - start) / 60.0}, timing)
    return {"folder": folder, **read_json(timing)}


def read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)


def masks_folder(source: Path, cases: list[str], target: Path, drop: int | None = None) -> Path:
    """``CASE.nii.gz`` masks of ``cases`` (a label removed when ``drop``)."""
    import SimpleITK as sitk

    target.mkdir(parents=True, exist_ok=True)
    for case in cases:
        image = sitk.ReadImage(str(source / f"{case}.nii.gz"))
        if drop is not None:
            array = sitk.GetArrayFromImage(image)
            array[array == drop] = 0
            edited = sitk.GetImageFromArray(array)
            edited.CopyInformation(image)
            image = edited
        sitk.WriteImage(image, str(target / f"{case}.nii.gz"))
    return target


def score(folder: Path, real: dict[str, Path], masks: Path, modality: str, segmenter: Path, encoder) -> dict:
    from spinediff.experiments.downstream import segmenter_dice
    from spinediff.metrics.frechet import image_frechet_distance
    from spinediff.metrics.image_metrics import image_metrics

    rows = {}
    for case, path in real.items():
        reference, generated = read(path), read(folder / f"{case}.nii.gz")
        data_range = (-1024.0, 3071.0) if modality == "CT" else (float(reference.min()), float(reference.max()))
        rows[case] = image_metrics(generated.astype(np.float32), reference.astype(np.float32), data_range,
                                   is_ct=modality == "CT")
    dice = segmenter_dice(segmenter, 0, {c: folder / f"{c}.nii.gz" for c in real}, masks)
    for case in real:
        rows[case]["dice_gen"] = dice[case]["dice"]
    frechet = image_frechet_distance(encoder, [folder / f"{c}.nii.gz" for c in real], list(real.values()))
    return {"psnr": float(np.mean([r["psnr"] for r in rows.values()])),
            "ssim": float(np.mean([r["ssim"] for r in rows.values()])),
            "mae": float(np.mean([r["mae"] for r in rows.values()])),
            "dice_gen": float(np.mean([r["dice_gen"] for r in rows.values()])), "frechet": frechet,
            "per_case": rows}


def figure(panels: list[tuple[str, list[tuple[str, np.ndarray]]]], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(p[1]) for p in panels)
    fig, axes = plt.subplots(len(panels), columns, figsize=(2.2 * columns, 2.4 * len(panels)), squeeze=False)
    for row, (title, images) in enumerate(panels):
        for column in range(columns):
            ax = axes[row][column]
            ax.axis("off")
            if column < len(images):
                name, image = images[column]
                ax.imshow(image, cmap="nipy_spectral" if "mask" in name else "gray", interpolation="nearest")
                ax.set_title(f"{title}: {name}" if column == 0 else name, fontsize=7)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def best_slice(mask: np.ndarray, label: int) -> tuple[int, int]:
    """The (axis, index) of the slice that shows the most voxels of ``label`` (the figures' slice: the discs, say,
    are absent from the middle axial slice of a CT)."""
    counts = [(np.sum(mask == label, axis=tuple(a for a in range(3) if a != axis)), axis) for axis in range(3)]
    per_axis = [(int(c.max()), axis, int(c.argmax())) for c, axis in counts]
    _, axis, index = max(per_axis)
    return axis, index


def cut(array: np.ndarray, where: tuple[int, int]) -> np.ndarray:
    return np.take(array, where[1], axis=where[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=450, help="training iterations per generation model")
    parser.add_argument("--cases", type=int, default=8, help="phantom subjects (fold 0 holds out a fifth)")
    parser.add_argument("--segmenter-epochs", type=int, default=15, help="epochs of 75 iterations of each segmenter")
    parser.add_argument("--ablate", type=int, default=2, help="the label removed for the mask ablation")
    parser.add_argument("--models", default="axial,coronal,sagittal,3D",
                        help="comma-separated subset of axial, coronal, sagittal, 3D (a 3D model on the CPU is slow: "
                             "run it in a second process with its own --iterations-3d)")
    parser.add_argument("--iterations-3d", type=int, default=None, help="training iterations of the 3D models "
                        "(default: --iterations)")
    parser.add_argument("--modalities", default="CT,MR", help="comma-separated subset of CT, MR")
    args = parser.parse_args(argv)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(chosen) - {*DIRECTIONS, "3D"})
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from axial, coronal, sagittal, 3D")
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if set(modalities) - set(MODALITIES):
        parser.error("--modalities: choose from CT, MR")
    iterations_3d = args.iterations if args.iterations_3d is None else args.iterations_3d
    tag = f"{args.iterations}it" + (f"_3d{iterations_3d}it" if "3D" in chosen else "")
    os.environ["nnUNet_results"] = str(WORK / f"results_{tag}")
    from spinediff.inference.api import predict
    from spinediff.inference.ensemble import ensemble_folders
    from spinediff.io import read_json
    from spinediff.metrics.frechet import SegmenterFeatures
    from spinediff.training.api import ensure_splits

    prepare(args.cases)
    segmenters = {m: trained(MODALITIES[m][2], "2d_cpu", "nnUNetTrainer", args.segmenter_epochs * ITERATIONS_PER_EPOCH)
                  ["folder"] for m in modalities}
    out_root = WORK / f"predictions_{tag}_{'_'.join(chosen)}"
    shutil.rmtree(out_root, ignore_errors=True)
    results, panels, ablation_panels, ablations = {}, [], [], {}
    for modality in modalities:
        dataset, name, segmenter_id = MODALITIES[modality]
        raw = WORK / "raw" / name
        ensure_splits(WORK / "preprocessed" / name, write_five_folds=True)  # nnU-Net's split, before training
        cases = read_json(WORK / "preprocessed" / name / "splits_final.json")[0]["val"]
        real = {c: raw / "imagesTr" / f"{c}_0000.nii.gz" for c in cases}
        segmenter = segmenters[modality]
        encoder = SegmenterFeatures(segmenter, 0)
        masks = masks_folder(raw / "labelsTr", cases, out_root / modality / "masks")
        from spinediff.experiments.downstream import segmenter_dice

        orig = segmenter_dice(segmenter, 0, real, masks)
        models = {d: ("2d_diffusion", f"nnUNetPlans_{d}", args.iterations) for d in DIRECTIONS if d in chosen}
        if "3D" in chosen:
            models["3D"] = ("3d_diffusion", "nnUNetPlans", iterations_3d)
        rows, outputs = {}, {}
        for label, (configuration, plans, iterations) in models.items():
            training = trained(dataset, configuration, TRAINER, iterations, plans)
            out = out_root / modality / label
            with pc.Stopwatch() as watch:
                predict(masks, out, dataset, configuration, TRAINER, folds=[0], plans_identifier=plans,
                        num_samples=1, seed=0, progress=False, tuned_sampling=False)
            outputs[label] = out
            rows[label] = {**score(out, real, masks, modality, segmenter, encoder),
                           "seconds_per_case": watch.wall / len(cases), "iterations": training["iterations"],
                           "training_minutes": training["minutes"]}
            pc.log(f"{modality} {label}: PSNR {rows[label]['psnr']:.2f}, Dice_gen {rows[label]['dice_gen']:.3f}")
        fused = out_root / modality / "2.5D"
        if all(d in outputs for d in DIRECTIONS):
            ensemble_folders([outputs[d] for d in DIRECTIONS], fused)
            rows["2.5D (mean of the 3 directions)"] = {
                **score(fused, real, masks, modality, segmenter, encoder), "iterations": 3 * args.iterations,
                "training_minutes": sum(rows[d]["training_minutes"] for d in DIRECTIONS)}
        acquisition = "sagittal" if modality == "MR" else "axial"
        case = cases[0]
        where = best_slice(read(masks / f"{case}.nii.gz"), args.ablate)
        panels.append((modality, [("mask", cut(read(masks / f"{case}.nii.gz"), where)),
                                  ("real", cut(read(real[case]), where))]
                       + [(label, cut(read(outputs[label] / f"{case}.nii.gz"), where)) for label in outputs]
                       + ([("2.5D", cut(read(fused / f"{case}.nii.gz"), where))] if fused.is_dir() else [])))
        results[modality] = {"cases": cases, "dice_orig": float(np.mean([orig[c]["dice"] for c in cases])),
                             "rows": rows}
        if acquisition not in outputs:
            continue
        if modality == "MR":  # a mask taken from the CT → MR, by the MR model of the acquisition plane
            from_ct = masks_folder(raw / "labelsFromCT", cases, out_root / modality / "masks_from_ct")
            out = out_root / modality / "from_ct"
            predict(from_ct, out, dataset, "2d_diffusion", TRAINER, folds=[0],
                    plans_identifier="nnUNetPlans_sagittal", num_samples=1, seed=0, progress=False,
                    tuned_sampling=False)
            rows["sagittal, mask from the CT"] = score(out, real, from_ct, modality, segmenter, encoder)
        ablated = masks_folder(raw / "labelsTr", cases, out_root / modality / "masks_ablated", drop=args.ablate)
        out = out_root / modality / "ablated"
        predict(ablated, out, dataset, "2d_diffusion", TRAINER, folds=[0],
                plans_identifier=f"nnUNetPlans_{acquisition}", num_samples=1, seed=0, progress=False,
                tuned_sampling=False)
        rows[f"{acquisition}, label {args.ablate} removed"] = score(out, real, ablated, modality, segmenter, encoder)
        # mask-following: the segmenter's Dice of each label against the full mask, on the image generated from the
        # full mask and on the one generated from the mask without the label (it should vanish, the rest stay)
        full = segmenter_dice(segmenter, 0, {c: outputs[acquisition] / f"{c}.nii.gz" for c in cases}, masks)
        without = segmenter_dice(segmenter, 0, {c: out / f"{c}.nii.gz" for c in cases}, masks)
        removed, kept = f"dice_{args.ablate}", [k for k in full[cases[0]] if k.startswith("dice_") and
                                                k != f"dice_{args.ablate}"]

        def mean_of(scores: dict, keys: list[str]) -> float:
            return float(np.nanmean([case.get(k, np.nan) for case in scores.values() for k in keys]))

        ablations[modality] = {"direction": acquisition, "label": args.ablate,
                               "removed_label_dice_full_mask": mean_of(full, [removed]),
                               "removed_label_dice_ablated_mask": mean_of(without, [removed]),
                               "other_labels_dice_full_mask": mean_of(full, kept),
                               "other_labels_dice_ablated_mask": mean_of(without, kept)}
        ablation_panels.append((modality, [
            ("mask", cut(read(masks / f"{case}.nii.gz"), where)),
            (acquisition, cut(read(outputs[acquisition] / f"{case}.nii.gz"), where)),
            (f"mask without {args.ablate}", cut(read(ablated / f"{case}.nii.gz"), where)),
            ("generated from it", cut(read(out / f"{case}.nii.gz"), where))]))
    name = f"generation_phantom_{tag}_{'_'.join(chosen)}"
    figure(panels, pc.OUTPUT / f"{name}.png")
    if ablation_panels:
        figure(ablation_panels, pc.OUTPUT / f"{name}_ablation.png")
    lines = [f"Command: `{pc.command_line()}`", "",
             f"Phantom, fold 0 of {args.cases} subjects, one sample per case; Dice_gen / Dice_orig: the modality's "
             "nnU-Net segmenter on the generated / real image. Rows without iterations reuse the model above them.",
             "",
             "| modality | model | iterations | training min | PSNR (dB) | SSIM | MAE | Fréchet | Dice_orig | Dice_gen "
             "| Dice_gen / Dice_orig | s / case |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for modality, result in results.items():
        for label, row in result["rows"].items():
            iterations = f"{row['iterations']}" if "iterations" in row else ""
            minutes = f"{row['training_minutes']:.1f}" if "training_minutes" in row else ""
            seconds = f"{row['seconds_per_case']:.1f}" if "seconds_per_case" in row else ""
            lines.append(f"| {modality} | {label} | {iterations} | {minutes} | {row['psnr']:.2f} | {row['ssim']:.3f} | "
                         f"{row['mae']:.1f} | {row['frechet']:.3g} | {result['dice_orig']:.3f} | {row['dice_gen']:.3f} "
                         f"| {row['dice_gen'] / result['dice_orig']:.3f} | {seconds} |")
    if ablations:
        lines += ["", "Mask ablation: the segmenter's Dice of each label against the full mask, on the image "
                  "generated from the full mask and on the one generated from the mask without the label "
                  "(mask-following: the removed label's Dice should fall to about 0, the others should stay).", "",
                  "| modality | model | label removed | its Dice: full mask | its Dice: mask without it | "
                  "other labels: full mask | other labels: mask without it |", "|---|---|---|---|---|---|---|"]
        for modality, a in ablations.items():
            lines.append(f"| {modality} | {a['direction']} | {a['label']} | {a['removed_label_dice_full_mask']:.3f} | "
                         f"{a['removed_label_dice_ablated_mask']:.3f} | {a['other_labels_dice_full_mask']:.3f} | "
                         f"{a['other_labels_dice_ablated_mask']:.3f} |")
    pc.write_result(name, {"machine": pc.machine_info(), "iterations": args.iterations,
                           "iterations_3d": iterations_3d, "models": chosen, "results": results,
                           "ablation": ablations},
                    "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    pc.run_main(main)
