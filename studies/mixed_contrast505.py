"""Build the mixed-contrast dataset of issue 34: Dataset501's 14 T2w scans and Dataset504's 5 T1w scans in one
nnU-Net raw dataset (``Dataset505_LumbarVB3VB2mixed``), with the folds that hold one T1w scan each.

Dataset504's masks outline the right bodies under the wrong numbers (documentation/results.md); here each body
takes the level of the centre placed by hand (:func:`studies.t1w_levels501.reference_from_hand_placed`), T11 and T12
stay background, and the levels the source dropped (two per scan) are marked with nnU-Net's **ignore label**: a
band across the image from the centroid of the body above the missing level to the centroid of the body below it
(to the image's edge where there is none), except on the bodies that are labelled. The loss, the Dice of the
validation and spinediff's level scores leave those voxels out, so the missing bodies are neither taught as
background nor scored.

The folds (``splits_final.json``) put one T1w scan in each validation set and spread the T2w scans round robin, so
the five-fold cross-validation is the leave-one-out over the five T1w scans the issue asks for, each predicted by
a model trained on the other four and about eleven T2w scans::

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...
    python -m studies.mixed_contrast505            # writes $nnUNet_raw/Dataset505_* and the splits
    spinediff plan -d 505 --budget 8m --device cpu
    spinediff benchmark -d 505 --methods nnUNetTrainer -j 2
    python -m studies.mixed_contrast505 --score $nnUNet_results/Dataset505_LumbarVB3VB2mixed/MODEL -o OUT

``--score`` post-processes each fold's validation answers of the T1w scans as a user's answers are (``spinediff
postprocess`` with the model's decision and review rule) and scores them as ``studies.t1w_levels501`` does: levels
right at the hand-placed centres, and the Dice of the levels Dataset504's masks hold (``OUT/loo.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from studies.t1w_levels501 import HAND_PLACED_CENTRES_MM, centroid_y_mm, reference_from_hand_placed

NAME = "Dataset505_LumbarVB3VB2mixed"
IGNORE = 6


def with_ignored_levels(source: np.ndarray, image, centres) -> np.ndarray:
    """The renumbered reference of one T1w scan with every level the source dropped marked :data:`IGNORE`.

    The band of a missing level runs along y (the rows) from the centroid of the nearest source body above its
    hand-placed centre to that of the nearest one below (T11 and T12 count as bodies); labelled voxels keep their
    label."""
    reference = reference_from_hand_placed(source, image, centres)
    bodies = sorted(centroid_y_mm(source == v, image) for v in np.unique(source[source > 0]))
    origin, spacing = image.GetOrigin()[1], image.GetSpacing()[1]
    rows = origin + spacing * np.arange(source.shape[1])
    for level, centre in enumerate(centres, start=1):
        if (reference == level).any():
            continue
        above = [y for y in bodies if y < centre]
        below = [y for y in bodies if y > centre]
        top = above[-1] if above else -np.inf
        bottom = below[0] if below else np.inf
        band = (rows >= top) & (rows <= bottom)
        region = np.zeros(source.shape, bool)
        region[:, band, :] = True
        reference[region & (source == 0)] = IGNORE
    return reference


def folds(t2w: list[str], t1w: list[str], count: int = 5) -> list[dict]:
    """nnU-Net's splits: fold k validates T1w scan k and every count-th T2w scan from k."""
    cases = t2w + t1w
    splits = []
    for k in range(count):
        val = sorted([c for i, c in enumerate(t1w) if i % count == k]
                     + [c for i, c in enumerate(t2w) if i % count == k])
        splits.append({"train": sorted(c for c in cases if c not in val), "val": val})
    return splits


def score_leave_one_out(model: Path, t1w_root: Path, out: Path) -> dict:
    """Each T1w scan as its validation fold answered it, numbered by the model's post-processing: levels right and
    the Dice of the levels its mask holds, before (``*_network``) and after the numbering."""
    import SimpleITK as sitk

    from spinediff.inference.postprocess_command import postprocess_folder
    from studies.t1w_levels501 import dice_at_reference_levels, levels_right

    cases = {}
    for fold_folder in sorted(model.glob("fold_*")):
        validation = fold_folder / "validation"
        here = [c for c in HAND_PLACED_CENTRES_MM if (validation / f"{c}.nii.gz").is_file()]
        if not here:
            continue
        target = out / fold_folder.name
        postprocess_folder(validation, target, model, overwrite=True, progress=False, review=True)
        for case in here:
            centres = HAND_PLACED_CENTRES_MM[case]
            image = sitk.ReadImage(str(t1w_root / "imagesTr" / f"{case}_0000.nii.gz"))
            source = sitk.GetArrayFromImage(sitk.ReadImage(str(t1w_root / "labelsTr" / f"{case}.nii.gz")))
            reference = reference_from_hand_placed(source, image, centres)
            network = sitk.GetArrayFromImage(sitk.ReadImage(str(validation / f"{case}.nii.gz")))
            numbered = sitk.GetArrayFromImage(sitk.ReadImage(str(target / f"{case}.nii.gz")))
            cases[case] = {"fold": fold_folder.name, "right_network": levels_right(network, image, centres),
                           "right": levels_right(numbered, image, centres),
                           "dice_network": dice_at_reference_levels(network, reference),
                           "dice": dice_at_reference_levels(numbered, reference)}
    draw_leave_one_out(out, t1w_root, cases)
    dice = [v for c in cases.values() for v in c["dice"].values()]
    network = [v for c in cases.values() for v in c["dice_network"].values()]
    record = {"model": str(model), "cases": cases, "levels_right": sum(c["right"] for c in cases.values()),
              "levels_right_network": sum(c["right_network"] for c in cases.values()), "levels_scored": len(dice),
              "mean_dice": float(np.mean(dice)) if dice else float("nan"),
              "mean_dice_network": float(np.mean(network)) if network else float("nan")}
    (out / "loo.json").write_text(json.dumps(record, indent=2))
    return record


def draw_leave_one_out(out: Path, t1w_root: Path, cases: dict) -> None:
    """``OUT/t1w_loo.png``: per T1w scan, the sagittal slice with the most vertebra, the numbered levels outlined and
    named, and the hand-placed centres of L1-L5 as ticks on the left edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    from studies.t1w_levels501 import draw_levels

    if not cases:
        return
    fig, axes = plt.subplots(1, len(cases), figsize=(2.6 * len(cases), 3.0), squeeze=False)
    for ax, (case, row) in zip(axes[0], sorted(cases.items()), strict=True):
        image = sitk.ReadImage(str(t1w_root / "imagesTr" / f"{case}_0000.nii.gz"))
        array = sitk.GetArrayFromImage(image)
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["fold"] / f"{case}.nii.gz")))
        index = int(np.argmax((labels > 0).sum(axis=(1, 2)))) if labels.any() else array.shape[0] // 2
        draw_levels(ax, array[index], labels[index])
        for level, centre in enumerate(HAND_PLACED_CENTRES_MM[case], start=1):
            y = (centre - image.GetOrigin()[1]) / image.GetSpacing()[1]
            ax.plot([0, 12], [y, y], color="cyan", linewidth=2)
            ax.text(14, y + 4, f"L{level}", color="cyan", fontsize=6)
        mean = np.mean(list(row["dice"].values())) if row["dice"] else float("nan")
        ax.set_title(f"{case} ({row['fold']}): {row['right']}/5, Dice {mean:.2f}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "t1w_loo.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t2w", default="../shared/data/Dataset501_LumbarVB3dev", help="Dataset501 (raw layout)")
    parser.add_argument("--t1w", default="../shared/data/Dataset504_LumbarVB2T1dev", help="Dataset504 (raw layout)")
    parser.add_argument("--raw", default=os.environ.get("nnUNet_raw"), help="nnUNet_raw (default: the variable)")
    parser.add_argument("--preprocessed", default=os.environ.get("nnUNet_preprocessed"),
                        help="nnUNet_preprocessed, where the splits go (default: the variable)")
    parser.add_argument("--score", metavar="MODEL", help="score the leave-one-out of this trained model folder "
                                                         "(TRAINER__PLANS__CONFIG) instead of building the dataset")
    parser.add_argument("-o", "--output", help="with --score: output folder (created)")
    args = parser.parse_args(argv)
    import SimpleITK as sitk

    if args.score:
        model = Path(args.score)
        if not (model / "dataset.json").is_file() or not args.output:
            print(f"error: --score needs a trained model folder (with dataset.json; got {model}) and -o OUT",
                  file=sys.stderr)
            return 2
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        record = score_leave_one_out(model, Path(args.t1w), out)
        for case, row in record["cases"].items():
            print(f"  {case} ({row['fold']}): levels right {row['right']}/5 (network {row['right_network']}/5), "
                  f"Dice {row['dice']}")
        print(f"levels right {record['levels_right']}/{5 * len(record['cases'])} (network "
              f"{record['levels_right_network']}); mean Dice over {record['levels_scored']} levels "
              f"{record['mean_dice']:.3f} (network {record['mean_dice_network']:.3f}); {out / 'loo.json'}")
        return 0

    t2w_root, t1w_root = Path(args.t2w), Path(args.t1w)
    for root in (t2w_root, t1w_root):
        if not (root / "dataset.json").is_file():
            print(f"error: {root} is not an nnU-Net raw dataset (no dataset.json); give it with --t2w/--t1w",
                  file=sys.stderr)
            return 2
    if not args.raw or not args.preprocessed:
        print("error: set nnUNet_raw and nnUNet_preprocessed (or give --raw and --preprocessed)", file=sys.stderr)
        return 2
    target = Path(args.raw) / NAME
    if target.exists():
        print(f"error: {target} exists; remove it to build it again", file=sys.stderr)
        return 2
    partial = Path(args.raw) / (NAME + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "imagesTr").mkdir(parents=True)
    (partial / "labelsTr").mkdir()

    t2w = sorted(p.name[:-len(".nii.gz")] for p in (t2w_root / "labelsTr").glob("*.nii.gz"))
    t1w = sorted(p.name[:-len(".nii.gz")] for p in (t1w_root / "labelsTr").glob("*.nii.gz"))
    missing = [c for c in t1w if c not in HAND_PLACED_CENTRES_MM]
    if missing:
        print(f"error: no hand-placed centres for {missing} (studies/t1w_levels501.py)", file=sys.stderr)
        return 2
    for case in t2w:
        shutil.copy(t2w_root / "imagesTr" / f"{case}_0000.nii.gz", partial / "imagesTr")
        shutil.copy(t2w_root / "labelsTr" / f"{case}.nii.gz", partial / "labelsTr")
    ignored = {}
    for case in t1w:
        shutil.copy(t1w_root / "imagesTr" / f"{case}_0000.nii.gz", partial / "imagesTr")
        image = sitk.ReadImage(str(t1w_root / "labelsTr" / f"{case}.nii.gz"))
        reference = with_ignored_levels(sitk.GetArrayFromImage(image), image, HAND_PLACED_CENTRES_MM[case])
        ignored[case] = [level for level in range(1, 6) if not (reference == level).any()]
        out = sitk.GetImageFromArray(reference.astype(np.uint8))
        out.CopyInformation(image)
        sitk.WriteImage(out, str(partial / "labelsTr" / f"{case}.nii.gz"), useCompression=True)
    labels = {"background": 0, "L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "ignore": IGNORE}
    (partial / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": labels, "numTraining": len(t2w) + len(t1w), "file_ending": ".nii.gz",
        "source": "Dataset501 (14 T2w) + Dataset504 (5 T1w, renumbered by hand-placed centres; the levels its masks "
                  "lack are the ignore label): studies/mixed_contrast505.py"}, indent=2))
    partial.rename(target)
    splits = Path(args.preprocessed) / NAME / "splits_final.json"
    splits.parent.mkdir(parents=True, exist_ok=True)
    splits.write_text(json.dumps(folds(t2w, t1w), indent=2))
    print(f"wrote {target} ({len(t2w)} T2w + {len(t1w)} T1w) and {splits}")
    for case, levels in ignored.items():
        print(f"  {case}: ignored L{', L'.join(map(str, levels))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
