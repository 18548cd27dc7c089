"""Look at the levels T2w-trained models give real T1w scans (issue 34), and score them where a reference exists.

Dataset504's labels sit on the wrong vertebrae (documentation/results.md), so its masks cannot be scored as they
are. What can be checked is where each model puts L1-L5 on those scans: this study predicts Dataset504's T1w images
with every fold of each model folder (``spinediff predict`` for spinediff's trainers, nnU-Net's predictor otherwise,
each with its post-processing), and draws for each scan the sagittal slice with the most predicted vertebra, the
levels outlined and numbered, one row per model. Reading the figure: L5 should sit directly on the sacrum, and the
levels should run L1..L5 downwards without gaps. It also writes ``t1w_levels.json`` (per model and scan: the levels
found, their centroid rows and volumes in ml, and ``right_of_5``: the levels whose centroid lies within 19 mm of the
centre placed by hand, :data:`HAND_PLACED_CENTRES_MM`) so that a reader can check the figure's numbers, and prints
each model's levels right. With the manual masks at hand (``-l``), it also scores the Dice of the levels they hold
once renumbered by the hand-placed centres (:func:`reference_from_hand_placed`; 15 of the 25 levels, three per
scan), per scan in ``dice`` and over all of them per model in ``mean_dice``.

    python -m studies.t1w_levels501 -m $nnUNet_results/Dataset501_LumbarVB3dev/nnUNetTrainer__nnUNetPlans__2d_cpu \\
        $nnUNet_results/Dataset501_LumbarVB3dev/nnUNetTrainerLevelContext__nnUNetPlans__2d_cpu -o OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

#: Where L1-L5 lie on Dataset504's T1w scans, placed by hand (2026-12-06): the L5/S1 disc found on the mid-sagittal
#: slice, L5..L1 counted upwards from it; the centre of each level along y (mm, the images' row axis).
HAND_PLACED_CENTRES_MM = {"vb2_002": (110, 145, 182, 222, 260), "vb2_004": (117, 152, 192, 232, 268),
                          "vb2_005": (95, 135, 170, 210, 250), "vb2_006": (101, 137, 175, 215, 253),
                          "vb2_007": (127, 162, 197, 237, 267)}
#: A level is right when its predicted centroid lies within this distance (half a level pitch) of the hand-placed one.
RIGHT_WITHIN_MM = 19.0


def centroid_y_mm(mask: np.ndarray, image) -> float | None:
    """World y (mm) of the centroid of ``mask`` (on ``image``'s grid, rows along y); None when it is empty."""
    rows = np.argwhere(mask)[:, 1]
    return image.GetOrigin()[1] + image.GetSpacing()[1] * rows.mean() if len(rows) else None


def levels_right(labels: np.ndarray, image, centres) -> int:
    """How many of L1..L5 in ``labels`` (on ``image``'s grid) have their centroid within :data:`RIGHT_WITHIN_MM`
    of the hand-placed ``centres`` along y."""
    right = 0
    for level, centre in enumerate(centres, start=1):
        y = centroid_y_mm(labels == level, image)
        right += int(y is not None and abs(y - centre) < RIGHT_WITHIN_MM)
    return right


def reference_from_hand_placed(source: np.ndarray, image, centres) -> np.ndarray:
    """Dataset504's manual bodies with the level numbers the hand-placed ``centres`` give them.

    The source masks outline seven bodies per scan (T11-L5) and keep five of them under the labels 1-5, in an order
    that is not L1-L5 (results.md). Each kept body takes the level whose hand-placed centre lies within
    :data:`RIGHT_WITHIN_MM` of its centroid along y; a body near none (T11, T12) becomes background. The levels
    whose body the source dropped are absent from the result, so they cannot be scored."""
    reference = np.zeros(source.shape, np.uint8)
    for value in np.unique(source[source > 0]):
        distances = np.abs(np.asarray(centres, float) - centroid_y_mm(source == value, image))
        if distances.min() < RIGHT_WITHIN_MM:
            reference[source == value] = int(np.argmin(distances)) + 1
    return reference


def dice_at_reference_levels(labels: np.ndarray, reference: np.ndarray) -> dict[int, float]:
    """Dice of each level that ``reference`` holds (the others cannot be scored)."""
    scores = {}
    for level in (int(v) for v in np.unique(reference) if v > 0):
        predicted, true = labels == level, reference == level
        scores[level] = round(float(2.0 * (predicted & true).sum() / (predicted.sum() + true.sum())), 4)
    return scores


def draw_levels(ax, image_slice: np.ndarray, labels_slice: np.ndarray) -> None:
    """One sagittal slice in grey with each level on it outlined in its colour and named ("L3") beside it."""
    import matplotlib.pyplot as plt

    ax.imshow(image_slice, cmap="gray")
    for value in (int(v) for v in np.unique(labels_slice) if v > 0):
        mask = labels_slice == value
        ax.contour(mask, levels=[0.5], colors=[plt.cm.tab10(value % 10)], linewidths=1)
        y, x = np.argwhere(mask).mean(0)
        ax.text(x + 25, y, f"L{value}", color="yellow", fontsize=7)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--models", nargs="+", required=True, help="model folders (TRAINER__PLANS__CONFIG)")
    parser.add_argument("-i", "--images", default="../shared/data/Dataset504_LumbarVB2T1dev/imagesTr",
                        help="the T1w images (nnU-Net naming)")
    parser.add_argument("-l", "--labels", default="../shared/data/Dataset504_LumbarVB2T1dev/labelsTr",
                        help="the manual masks, renumbered by the hand-placed centres before scoring "
                             "(reference_from_hand_placed); skipped when absent")
    parser.add_argument("-o", "--output", required=True, help="output folder (created)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    from spinediff.experiments.stress import StressSettings, predict_postprocessed
    from spinediff.inference.models import ModelFolder

    images = Path(args.images)
    if not images.is_dir():
        print(f"{images} does not exist: pass the T1w images with -i.", file=sys.stderr)
        return 2
    from spinediff.errors import SpineDiffError

    try:
        models = [ModelFolder.open(Path(path)) for path in args.models]
    except SpineDiffError as exc:
        print(f"-m: {exc}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
    record: dict = {"images": str(images), "models": {}}
    fig, axes = plt.subplots(len(args.models), len(cases), figsize=(2.6 * len(cases), 3.2 * len(args.models)),
                             squeeze=False)
    for row, model in enumerate(models):
        folds = sorted(p.name.split("_", 1)[1] for p in model.path.glob("fold_*")
                       if (p / "checkpoint_final.pth").is_file())
        predicted = output / model.path.name
        if predicted.exists():
            shutil.rmtree(predicted)
        predict_postprocessed(StressSettings(device=args.device), model, folds, images, predicted)
        found = record["models"][model.path.name] = {}
        for column, case in enumerate(cases):
            image = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
            array = sitk.GetArrayFromImage(image)
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted / f"{case}.nii.gz")))
            voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
            levels = {int(v): {"row": round(float(np.argwhere(labels == v)[:, 1].mean()), 1),
                               "volume_ml": round(float((labels == v).sum()) * voxel_ml, 1)}
                      for v in np.unique(labels) if v > 0}
            if case in HAND_PLACED_CENTRES_MM:  # the levels right, where the centres were placed by hand
                levels["right_of_5"] = levels_right(labels, image, HAND_PLACED_CENTRES_MM[case])
                source = Path(args.labels) / f"{case}.nii.gz"
                if source.is_file():
                    reference = reference_from_hand_placed(sitk.GetArrayFromImage(sitk.ReadImage(str(source))),
                                                           image, HAND_PLACED_CENTRES_MM[case])
                    levels["dice"] = dice_at_reference_levels(labels, reference)
            found[case] = levels
            index = int(np.argmax((labels > 0).sum(axis=(1, 2)))) if labels.any() else array.shape[0] // 2
            ax = axes[row][column]
            draw_levels(ax, array[index], labels[index])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{case}" if row == 0 else "", fontsize=8)
        axes[row][0].set_ylabel(model.trainer, fontsize=7)
        scored = [levels["right_of_5"] for levels in found.values() if "right_of_5" in levels]
        if scored:
            print(f"{model.path.name}: {sum(scored)} of {5 * len(scored)} levels right at the hand-placed centres")
        dice = [value for levels in found.values() for value in levels.get("dice", {}).values()]
        if dice:
            record.setdefault("mean_dice", {})[model.path.name] = round(float(np.mean(dice)), 4)
            print(f"{model.path.name}: mean Dice {np.mean(dice):.3f} over the {len(dice)} levels the renumbered "
                  f"manual masks hold")
    fig.tight_layout()
    fig.savefig(output / "t1w_levels.png", dpi=90)
    (output / "t1w_levels.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {output / 't1w_levels.png'} and t1w_levels.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
