"""``spinediff phantom``: synthetic paired spine datasets with known ground truth."""

from __future__ import annotations

import argparse

from spinediff.datasets.phantom import PhantomSettings
from spinediff.datasets.phantom_writer import TASK_NAMES, write_phantom_datasets
from spinediff.io import ensure_writable_folder
from spinediff.paths import nnunet_folder
from spinediff.utilities.argtypes import float_range, int_range, non_negative_float, non_negative_int, positive_int


def run_phantom(args: argparse.Namespace) -> int:
    output = ensure_writable_folder(args.output if args.output else nnunet_folder("raw"), create=False)
    tasks = list(TASK_NAMES) if args.task == "all" else [args.task]
    settings = PhantomSettings(
        mr_shape=tuple(args.shape),
        mr_spacing=tuple(args.mr_spacing),
        ct_spacing=tuple(args.ct_spacing),
        max_translation_mm=args.max_translation_mm,
        max_rotation_deg=args.max_rotation_deg,
    )
    folders = write_phantom_datasets(
        output, num_cases=args.cases, seed=args.seed, tasks=tasks, settings=settings,
        dataset_id_base=args.dataset_id, preview=args.preview, overwrite=args.overwrite,
    )
    for task, folder in folders.items():
        print(f"{task:>12}: {folder}")
        if args.preview:
            print(f"{'':>12}  preview: {folder / 'preview.png'}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    defaults = PhantomSettings()
    parser = subparsers.add_parser(
        "phantom",
        help="generate synthetic paired MR/CT spine datasets with known ground truth",
        description=(
            "Generate a procedural lumbar/thoracolumbar spine phantom (3-6 vertebrae, discs, canal, "
            "muscle, fat) as T1w + T2w MR (sagittal, anisotropic, bias field, Rician noise) and CT "
            "(Hounsfield units, near-isotropic, randomly misaligned by a saved rigid transform), with "
            "semantic labels, vertebra instance masks (VerSe numbering, 20 = L1 ... 24 = L5) and "
            "landmarks. Writes nnU-Net raw datasets: segmentation (MR -> labels), translation "
            "(MR -> CT, plus the unaligned CT for `spinediff register`), generation (labels -> CT). "
            "Deterministic for a given --seed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-o", "--output", help="folder receiving the DatasetXXX_* folders (default: $nnUNet_raw)")
    parser.add_argument("--task", choices=[*TASK_NAMES, "all"], default="all", help="which dataset(s) to write")
    parser.add_argument("--cases", type=positive_int, default=6, help="number of subjects")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (same seed → identical data)")
    parser.add_argument("--shape", type=int_range(4, 1024), nargs=3, default=list(defaults.mr_shape),
                        metavar=("AP", "SI", "LR"),
                        help="MR grid size in voxels: in-plane anterior-posterior, superior-inferior, "
                             "then the number of sagittal slices")
    parser.add_argument("--mr-spacing", type=float_range(0.05, 50.0), nargs=3, default=list(defaults.mr_spacing),
                        metavar=("AP", "SI", "LR"), help="MR voxel spacing in mm (clinical: 0.8 0.8 3.5)")
    parser.add_argument("--ct-spacing", type=float_range(0.05, 50.0), nargs=3, default=list(defaults.ct_spacing),
                        metavar=("X", "Y", "Z"), help="CT voxel spacing in mm")
    parser.add_argument("--max-translation-mm", type=non_negative_float, default=defaults.max_translation_mm,
                        help="largest random CT translation relative to the MR")
    parser.add_argument("--max-rotation-deg", type=float_range(0.0, 180.0), default=defaults.max_rotation_deg,
                        help="largest random CT rotation relative to the MR")
    parser.add_argument("--dataset-id", type=int_range(1, 997), default=901,
                        help="ID of the segmentation dataset; translation and generation get +1 and +2")
    parser.add_argument("--preview", action="store_true", help="also write preview.png in each dataset folder")
    parser.add_argument("--overwrite", action="store_true", help="replace existing phantom datasets")
    parser.set_defaults(func=run_phantom)
