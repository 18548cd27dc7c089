"""Look at what a trainer learns from: a PNG grid of training patches with their label contours, drawn by the
trainer's own data loader (nnU-Net's augmentation plus the planned order, field-of-view and contrast parts of the
plans' ``augmentation`` block), each planned transform alone on clean validation patches, and counts of the levels
left visible, beside the same loader without the planned field-of-view and contrast parts.

    python benchmarks/augmentation_grid.py -d 501 -c 2d_cpu -o grid.png
    python benchmarks/augmentation_grid.py -d 501 -c 2d_cpu -o grid.png --block '{"contrast": {"p_remap": 0.3}}'

Needs $nnUNet_preprocessed (the planned, preprocessed dataset); trains nothing (results go to a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np


def build_trainer(args, planned: bool, override: dict):
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from spinediff.training.augmentation import apply_planned_augmentation

    trainer = get_trainer_from_args(args.dataset, args.configuration, args.fold, args.trainer, args.plans, False,
                                    torch.device("cpu"))
    block = trainer.configuration_manager.configuration.setdefault("augmentation", {})
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(block.get(key), dict):
            block[key].update(value)
        else:
            block[key] = value
    if not planned:  # the order part only (mirroring, rotation), as without issue 34's transforms
        for key in ("field_of_view", "contrast"):
            block.pop(key, None)
    apply_planned_augmentation(trainer)
    trainer.initialize()
    return trainer, block


def patches(loader, count: int) -> tuple[np.ndarray, np.ndarray]:
    images, segs = [], []
    while sum(len(i) for i in images) < count:
        batch = next(loader)
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        images.append(batch["data"][:, 0].numpy())
        segs.append(target[:, 0].numpy())
    return np.concatenate(images)[:count], np.concatenate(segs)[:count]


def middle(array: np.ndarray) -> np.ndarray:
    """A 2D view of a 2D or 3D patch (the middle slice of a 3D one)."""
    return array if array.ndim == 2 else array[array.shape[0] // 2]


def show(ax, image, seg, title=None) -> None:
    image, seg = middle(image), middle(seg)
    ax.imshow(image, cmap="gray", vmin=np.percentile(image, 1), vmax=np.percentile(image, 99))
    colours = ["r", "orange", "y", "lime", "cyan", "m", "b"]
    for i, value in enumerate(v for v in np.unique(seg) if v > 0):
        ax.contour(seg == value, levels=[0.5], colors=colours[i % len(colours)], linewidths=0.6)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=6)


def statistics(seg: np.ndarray, labels: int) -> dict:
    visible = np.asarray([len([v for v in np.unique(s) if v > 0]) for s in seg])
    return {"patches": int(len(seg)), "foreground_fraction": round(float((seg > 0).mean()), 4),
            "with_any_label": round(float(np.mean(visible > 0)), 3),
            "mean_labels_visible": round(float(visible.mean()), 2),
            "with_all_labels": round(float(np.mean(visible == labels)), 3)}


def single_transforms(block: dict) -> dict:
    from spinediff.training import augmentation as A

    fov, contrast = block.get("field_of_view") or {}, block.get("contrast") or {}
    out = {}
    if fov.get("axis") is not None:
        out["shift + zoom"] = A.SpineShiftZoomTransform(fov["axis"], fov.get("max_shift_fraction", 0.25),
                                                        tuple(fov.get("zoom_range", (0.85, 1.0))))
        out["cut"] = A.FieldOfViewCutTransform(fov["axis"], fov.get("max_cut_fraction", 0.5))
    if contrast:
        out["inversion"] = A.InvertImageTransform(p_invert_image=1.0)
        out["remap"] = A.RandomRemapTransform(tuple(contrast.get("remap_control_points", (3, 4))))
        out["gamma"] = A.contrast_transforms({"p_gamma": 1.0, "gamma_range": contrast.get("gamma_range", (0.5, 2))})[
            0].transform
        out["bias field"] = A.BiasFieldTransform(int(contrast.get("bias_field_degree", 3)),
                                                 tuple(contrast.get("bias_field_coefficients", (0.0, 0.2))))
    return out


def run(args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="augmentation_grid_")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    override = json.loads(args.block) if args.block else {}
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    plain, _ = build_trainer(args, False, override)
    train_plain, val_plain = plain.get_dataloaders()
    augmented, block = build_trainer(args, True, override)
    train_aug, _ = augmented.get_dataloaders()
    labels = len([v for v in plain.label_manager.foreground_labels])
    clean_img, clean_seg = patches(val_plain, 4 * args.columns)
    keep = [i for i in range(len(clean_seg)) if (clean_seg[i] > 0).any()][: args.columns]
    clean_img, clean_seg = clean_img[keep], clean_seg[keep]
    single = single_transforms(block)
    columns = args.columns
    rows = 1 + len(single) + 4
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.0, rows * 1.45), squeeze=False)
    for j in range(len(keep)):
        show(axes[0, j], clean_img[j], clean_seg[j], "clean (validation loader)" if j == 0 else None)
        for r, (name, transform) in enumerate(single.items(), start=1):
            np.random.seed(args.seed + 100 * r + j)
            out = transform(image=torch.from_numpy(clean_img[j][None]).clone(),
                            segmentation=torch.from_numpy(clean_seg[j][None]).clone())
            show(axes[r, j], out["image"][0].numpy(), out["segmentation"][0].numpy(), name if j == 0 else None)
    aug_img, aug_seg = patches(train_aug, 2 * columns)
    plain_img, plain_seg = patches(train_plain, 2 * columns)
    for k in range(2 * columns):
        show(axes[1 + len(single) + k // columns, k % columns], aug_img[k], aug_seg[k],
             "training: nnU-Net + planned" if k == 0 else None)
        show(axes[3 + len(single) + k // columns, k % columns], plain_img[k], plain_seg[k],
             "training: nnU-Net + order only" if k == 0 else None)
    for ax in axes.ravel():
        if not ax.has_data():
            ax.axis("off")
    fig.suptitle(f"{args.dataset} {args.configuration} fold {args.fold}: training patches and label contours",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=130)
    plt.close(fig)
    result = {"block": block, "planned": statistics(patches(train_aug, args.count)[1], labels),
              "order_only": statistics(patches(train_plain, args.count)[1], labels), "figure": str(args.output)}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="dataset ID or name (preprocessed)")
    parser.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 2d_cpu")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="trainer whose pipeline draws the patches")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")
    parser.add_argument("--block", help="JSON merged into the plans' augmentation block, e.g. other probabilities")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--count", type=int, default=270, help="patches counted for the statistics")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(run(args), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
