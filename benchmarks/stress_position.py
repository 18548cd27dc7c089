"""Stress test of position and field of view: a model's cross-validation on its validation scans cropped, padded and
shifted along the spine, beside the plain cross-validation (issue 34; :mod:`spinediff.experiments.stress`, which
``spinediff benchmark --stress`` runs for every segmentation method).

``--other-dataset`` predicts another dataset's training scans (e.g. T1w scans with the same labels) with the
ensemble of all folds, plain and in the same variants. ``--training-scans`` also predicts each fold's training scans
with that fold: does the model fail only on the subjects it never saw?

    python benchmarks/stress_position.py -d 501 -c 2d_cpu -tr nnUNetTrainer -o results/stress501
    python benchmarks/stress_position.py -d 501 -c 2d_diffusion -tr DiffusionSegmentationTrainer --steps 1 \\
        --other-dataset 504 -o results/stress501_diffusion
"""

from __future__ import annotations

import argparse
import sys

from spinediff.experiments.stress import StressSettings, markdown, stress_test
from spinediff.experiments.stress_variants import VARIANTS, VARIANTS_HELP, variant_argument
from spinediff.utilities.argtypes import positive_int

__all__ = ["VARIANTS", "add_model_arguments", "main"]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The trained model and its folds: -d, -c, -tr, -p, -f (as nnU-Net's commands name them)."""
    parser.add_argument("-d", "--dataset", required=True, help="dataset of the trained model (ID or name)")
    parser.add_argument("-c", "--configuration", required=True, help="the model's configuration")
    parser.add_argument("-tr", "--trainer", required=True, help="trainer class (spinediff's or nnU-Net's)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-f", "--folds", nargs="+", help="folds (default: every trained fold)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="folder for stress_position.json and .md")
    parser.add_argument("--variants", nargs="+", type=variant_argument, metavar="VARIANT", help=VARIANTS_HELP)
    parser.add_argument("--other-dataset", help="also predict this dataset's labelled scans with all folds")
    parser.add_argument("--training-scans", action="store_true",
                        help="also predict each fold's training scans with that fold, varied the same way: failures "
                             "on the scans never seen only (the model learnt its subjects) call for more annotated "
                             "subjects; failures on the training scans too, for other augmentation or another network")
    parser.add_argument("--steps", type=int, help="spinediff predict --steps (default: the model's)")
    parser.add_argument("--samples", type=int, help="spinediff predict --samples (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("-j", "--workers", type=positive_int, default=1,
                        help="scans predicted side by side (each by the fold that held it out), one process and one "
                             "torch thread each (e.g. 2 on two cores); with --keep, whole folds")
    parser.add_argument("--keep", action="store_true",
                        help="keep the varied inputs (in_*), their cut references (ref_*) and the predictions (out_*) "
                             "in OUTPUT/stress_cases, one folder of each per fold")
    args = parser.parse_args(argv)
    from spinediff.inference.models import model_folder

    model = model_folder(args.dataset, args.configuration, args.trainer, args.plans)
    settings = StressSettings(tuple(args.folds) if args.folds else None,
                              tuple(args.variants) if args.variants else None, args.other_dataset, args.steps,
                              args.samples, args.seed, args.device, " ".join(sys.argv if argv is None
                                                                              else ["stress_position.py", *argv]),
                              keep=args.keep, workers=args.workers, training_scans=args.training_scans)
    result = stress_test(model, settings, args.output)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
