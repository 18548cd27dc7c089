"""``spinediff register``: landmark-based MR/CT alignment into a paired translation dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spinediff.errors import SpineDiffError
from spinediff.utilities.argtypes import case_identifier, existing_file, existing_folder

DESCRIPTION = """\
Align CT to MR with landmarks from vertebra masks and write a paired translation dataset
(nnU-Net raw layout: MR channels, then the registered CT as the last channel; labelsTr = the MR
label map; dataset.json with the spinediff block {"task": "translation", ...}).

Landmarks per vertebra: the vertebral-body centroid and the posterior-elements centroid (from a
TPTBox subregion mask when given, else split geometrically along the spine's anterior-posterior
axis), or landmark JSON files. The transform maps MR points to CT points (ITK convention); the CT
is resampled onto the MR grid (outside: -1024 HU), its masks with nearest neighbour.

Inputs: either a phantom-style unaligned/ folder (CASE_mr_<channel>.nii.gz, CASE_ct.nii.gz,
CASE_{mr,ct}_vertebrae.nii.gz, CASE_{mr,ct}_labels.nii.gz, optional CASE_{mr,ct}_landmarks.json,
CASE_true_transform.tfm), or one case's explicit files (--ct, --mr, ...).

Quality reports go to OUTPUT/registration/ (per-case JSON and PNG overlay, summary.md). A case
that fails is reported and skipped, nothing is written for it; the exit status is 2 if any failed.
"""

EPILOG = """\
examples:
  spinediff register $nnUNet_raw/Dataset902_SpinePhantomTranslation/unaligned \\
      -o $nnUNet_raw/Dataset912_PhantomRegistered
  spinediff register --case-id sub01 --mr T1w=sub01_T1w.nii.gz T2w=sub01_T2w.nii.gz \\
      --ct sub01_ct.nii.gz --mr-vertebrae sub01_mr_vert.nii.gz --ct-vertebrae sub01_ct_vert.nii.gz \\
      -o Dataset950_MyPairs
  # the paper's ablation baseline (no registration) and the 1-landmark variant:
  spinediff register UNALIGNED -o Dataset913_NoReg --landmarks-per-vertebra 0
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "register",
        help="landmark-based MR/CT registration into a paired translation dataset",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "unaligned",
        nargs="?",
        type=existing_folder,
        help="phantom-style unaligned/ folder with several cases (omit when giving --ct, --mr)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output dataset folder, named DatasetNNN_Name (e.g. $nnUNet_raw/Dataset912_Pairs)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    parser.add_argument("--cases", nargs="+", metavar="CASE", help="only these cases of the unaligned/ folder")
    options = parser.add_argument_group("registration")
    options.add_argument(
        "--transform",
        choices=("rigid", "similarity", "affine"),
        default="rigid",
        help="point-based transform (default: rigid)",
    )
    options.add_argument(
        "--landmarks-per-vertebra",
        type=int,
        choices=(0, 1, 2),
        default=2,
        help="2: body + posterior-elements centroids (default); 1: vertebra centroid only; "
        "0: no registration (identity), the ablation baseline",
    )
    options.add_argument(
        "--interpolation",
        choices=("linear", "bspline"),
        default="linear",
        help="CT interpolation (masks always nearest neighbour; default: linear)",
    )
    options.add_argument(
        "--landmark-source",
        choices=("auto", "masks", "json"),
        default="auto",
        help="landmarks from vertebra masks or from the landmark JSON files (default auto: "
        "masks when both images have one, else JSON)",
    )
    options.add_argument("--no-overlay", action="store_true", help="skip the PNG overlays")
    explicit = parser.add_argument_group("one case from explicit files (instead of an unaligned/ folder)")
    explicit.add_argument("--case-id", default="case_000", type=case_identifier,
                          help="case identifier (default: case_000)")
    explicit.add_argument(
        "--mr",
        nargs="+",
        metavar="[NAME=]PATH",
        help="MR channel files in channel order, optionally named (T1w=t1.nii.gz)",
    )
    explicit.add_argument("--ct", type=existing_file, help="CT in HU")
    for name, text in (
        ("vertebrae", "vertebra instance mask"),
        ("subregions", "TPTBox subregion mask (optional)"),
        ("labels", "semantic label map (MR: labelsTr; CT: resampled for QA)"),
        ("landmarks", "landmark JSON file (alternative to vertebra masks)"),
    ):
        for modality in ("mr", "ct"):
            explicit.add_argument(f"--{modality}-{name}", type=existing_file, help=f"{modality.upper()} {text}")
    explicit.add_argument(
        "--true-transform",
        type=existing_file,
        help="known MR->CT transform (.tfm) to measure the target registration error",
    )
    parser.set_defaults(func=run)
    return parser


def _mr_channels(values: list[str]) -> dict[str, Path]:
    channels: dict[str, Path] = {}
    for i, value in enumerate(values):
        name, sep, path = value.partition("=")
        if not sep:
            name, path = ("MR" if len(values) == 1 else f"MR{i}"), value
        if name in channels or name == "CT":
            raise SpineDiffError(f"--mr: channel name {name!r} is used twice or reserved; name channels uniquely.")
        try:
            channels[name] = existing_file(path)
        except argparse.ArgumentTypeError as exc:
            raise SpineDiffError(f"--mr {value}: {exc}.") from None
    return channels


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from spinediff.registration.api import (
        CaseFiles,
        RegistrationSettings,
        find_unaligned_cases,
        labels_from_parent_dataset,
        register_dataset,
    )

    explicit_given = args.ct is not None or args.mr is not None
    label_names = None
    if args.unaligned is not None:
        if explicit_given:
            raise SpineDiffError("give either an unaligned/ folder or explicit files (--ct, --mr), not both.")
        cases = find_unaligned_cases(args.unaligned, args.cases)
        label_names = labels_from_parent_dataset(args.unaligned)
    else:
        if args.ct is None or not args.mr:
            raise SpineDiffError(
                "give an unaligned/ folder, or at least --ct and --mr for one case (see spinediff register --help)."
            )
        cases = [
            CaseFiles(
                case_id=args.case_id,
                mr_channels=_mr_channels(args.mr),
                ct=args.ct,
                mr_vertebrae=args.mr_vertebrae,
                ct_vertebrae=args.ct_vertebrae,
                mr_subregions=args.mr_subregions,
                ct_subregions=args.ct_subregions,
                mr_labels=args.mr_labels,
                ct_labels=args.ct_labels,
                mr_landmarks=args.mr_landmarks,
                ct_landmarks=args.ct_landmarks,
                true_transform=args.true_transform,
            )
        ]
    settings = RegistrationSettings(
        transform=args.transform,
        landmarks_per_vertebra=args.landmarks_per_vertebra,
        interpolation=args.interpolation,
        landmark_source=args.landmark_source,
        overlay=not args.no_overlay,
    )
    result = register_dataset(
        cases,
        args.output,
        settings,
        overwrite=args.overwrite,
        label_names=label_names,
        progress=lambda items: tqdm(items, desc="register", unit="case", disable=len(items) < 2),
    )
    succeeded = len(result.reports) - len(result.failures)
    if succeeded:
        print(
            f"Registered {succeeded} of {len(result.reports)} case(s) into {result.output}; "
            f"summary: {result.output / 'registration' / 'summary.md'}"
        )
    if result.failures:
        listing = "\n".join(f"  - {report.error}" for report in result.failures)
        note = "" if succeeded else " Nothing was written."
        raise SpineDiffError(f"{len(result.failures)} of {len(result.reports)} case(s) failed:{note}\n{listing}")
    sys.stdout.flush()
    return 0
