"""``spinediff evaluate``: per-case CSV and summary JSON for a folder of predictions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spinediff.errors import SpineDiffError
from spinediff.evaluation.evaluate import evaluate_folders
from spinediff.tasks import IMAGE_KIND, SEGMENTATION_KIND
from spinediff.utilities.argtypes import existing_folder, finite_float, non_negative_int


def run_evaluate(args: argparse.Namespace) -> int:
    low, high = args.data_range
    if not low < high:
        raise SpineDiffError(f"--data-range LOW HIGH needs LOW below HIGH, got {low:g} {high:g}; e.g. --data-range "
                             "-1024 3071 for CT in HU.")
    ignore = args.ignore_label
    beside = Path(args.reference).parent / "dataset.json"
    if ignore is None and beside.is_file():  # a raw dataset's labelsTr: its dataset.json names the ignore label
        from spinediff.datasets.dataset_json import ignore_label
        from spinediff.io import read_json

        try:
            ignore = ignore_label(read_json(beside))
        except (ValueError, TypeError, AttributeError) as exc:
            raise SpineDiffError(f"{beside}: its 'labels' entry 'ignore' is not an integer ({exc}); fix it, or give "
                                 "--ignore-label") from None
    result = evaluate_folders(args.reference, args.prediction, labels=args.labels, task=args.task,
                              data_range=tuple(args.data_range), output_folder=args.output or args.prediction,
                              challenge=args.challenge, mask_folder=args.mask, ignore_label=ignore)
    summary = result.summary
    if summary["task"] == SEGMENTATION_KIND:
        print(f"{'label':>6} {'Dice':>8} {'HD95 mm':>9} {'ASD mm':>8}")
        for label, metrics in summary["per_label"].items():
            dice, hd95, asd = (metrics[m]["mean"] for m in ("dice", "hd95", "asd"))
            print(f"{label:>6} {dice:8.4f} {hd95:9.2f} {asd:8.2f}")
    else:
        for name, metrics in summary["metrics"].items():
            print(f"{name:>10}: {metrics['mean']:.4f} ± {metrics['std']:.4f} "
                  f"(95% CI {metrics['ci95_low']:.4f} – {metrics['ci95_high']:.4f}, n={metrics['n']})")
    failure = summary.get("failure_detection")
    if failure:
        voxel = ", ".join(f"{k} {v:.3f}" for k, v in failure.items()
                          if k.startswith(("auroc_", "ece")) and v is not None)
        print(f"\nuncertainty vs errors ({failure['cases']} case(s) with uncertainty outputs; voxels within "
              f"{failure['near_voxels']} of the foreground): {voxel or 'no voxel map'}")
        print(f"{'case score':>20} {'AURC':>7} {'e-AURC':>7}  wrong-level cases flagged "
              f"(of {failure['wrong_level_cases']})")
        for row in failure["scores"]:
            print(f"{row['score']:>20} {row['aurc']:7.3f} {row['e_aurc']:7.3f}  {row['wrong_level_flagged']} "
                  f"(and {row['good_flagged']} good case(s))")
    if summary["missing_predictions"]:
        print(f"missing predictions: {json.dumps(summary['missing_predictions'])}")
    print(f"written: {(args.output or args.prediction)}/per_case.csv and summary.json")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score predictions against references (Dice/HD95/ASD or PSNR/SSIM/MAE)",
        description="Compare every file in PRED_DIR with the file of the same name in REF_DIR. Label maps get "
                    "Dice, HD95 and average surface distance per class (mm, monai); images (e.g. CT in HU) get "
                    "PSNR, SSIM, MAE overall, inside the body (> -500 HU) and in bone (> 200 HU). Writes "
                    "per_case.csv and summary.json (mean, std, 95%% confidence interval). For a segmentation folder "
                    "with uncertainty outputs (CASE.npz probabilities, CASE_uncertainty maps and .json from `spinediff "
                    "predict --save-uncertainty --save-probabilities`, or nnU-Net's --npz) it also scores whether the "
                    "uncertainty catches the errors: voxel AUROC for wrong voxels, calibration (ECE), and per case "
                    "score the area under the risk-coverage curve (AURC, risk = 1 - Dice) and the wrong-level cases "
                    "it flags (summary.json: failure_detection; documentation/evaluation.md explains each).",
    )
    parser.add_argument("-ref", "--reference", required=True, type=existing_folder, help="folder of reference files")
    parser.add_argument("-pred", "--prediction", required=True, type=existing_folder,
                        help="folder of predictions (same file names)")
    parser.add_argument("-l", "--labels", type=non_negative_int, nargs="+",
                        help="label values to score (default: all in the reference)")
    parser.add_argument("--ignore-label", type=non_negative_int, metavar="N",
                        help="nnU-Net's ignore label of the references: its voxels count for no label (default: the "
                             "'ignore' label of the dataset.json beside the reference folder, e.g. a raw dataset's "
                             "labelsTr)")
    parser.add_argument("--task", choices=["auto", SEGMENTATION_KIND, IMAGE_KIND], default="auto",
                        help="auto: integer files with few values are label maps")
    parser.add_argument("--data-range", type=finite_float, nargs=2, default=[-1024.0, 3071.0], metavar=("LOW", "HIGH"),
                        help="intensity range for PSNR/SSIM of images (values are clipped to it)")
    parser.add_argument("--challenge", action="store_true",
                        help="images: also the SynthRAD challenges' metrics as their public code defines them "
                             "(synthrad_mae, synthrad_psnr in [-1024, 3000] HU, synthrad_ssim of 2023, "
                             "synthrad_ms_ssim of 2025) inside the body mask (--mask, else reference > -500 HU); "
                             "comparable to the leaderboards (documentation/evaluation.md)")
    parser.add_argument("--mask", metavar="MASK_DIR",
                        help="folder of body masks named as the references (voxels > 0 are inside; e.g. the labelsTr "
                             "of a dataset made by `spinediff convert`); implies --challenge")
    parser.add_argument("-o", "--output", help="where to write the CSV/JSON (default: the prediction folder)")
    parser.set_defaults(func=run_evaluate)
