"""``spinediff convert``: paired MR/CT subject folders (SynthRAD layout or your own) → nnU-Net raw translation
dataset."""

from __future__ import annotations

import argparse

from spinediff.datasets.convert import LABEL_MODES, SlabSettings, convert_pairs, parse_names
from spinediff.datasets.validate import validate_dataset
from spinediff.errors import SpineDiffError
from spinediff.paths import nnunet_folder
from spinediff.utilities.argtypes import int_range, non_negative_float

EXAMPLES = """\
examples:
  # SynthRAD2025 Task 1 (Task1/HN|TH|AB/1HNA001/{mr,ct,mask}.mha) into $nnUNet_raw/Dataset910_SynthRAD2025
  spinediff convert -i synthRAD2025_Task1_Train/Task1 -d 910 --name SynthRAD2025

  # SynthRAD2023 Task 1 brain only (Task1/brain/1BA001/{mr,ct,mask}.nii.gz), CT classes as labels
  spinediff convert -i Task1/brain -d 911 --name SynthRAD2023Brain --labels ct-classes

  # your own pairs: one folder per subject holding t1.nii.gz, t2.nii.gz, ct.nii.gz, body.nii.gz
  spinediff convert -i my_pairs -d 912 --name SpineMRCT --source-name t1 t2 --target-name ct --mask-name body

  # one object, cross-validated on 3 slabs along its longest axis with 10 mm between training and validation
  spinediff convert -i ../shared/data/real_mrct/mridir_porcine -d 920 --name PorcineSlabs --slab-folds 3 \\
      --gap-mm 10 --labels ct-classes

then: spinediff validate -d 910; spinediff plan -d 910; ... (documentation/convert.md)
"""


def run_convert(args: argparse.Namespace) -> int:
    output = nnunet_folder("raw", args.output)
    names = parse_names(args.source_name, args.target_name, args.mask_name)
    slabs = None
    if args.slab_folds:
        axis = None if args.slab_axis == "longest" else "xyz".index(args.slab_axis)
        slabs = SlabSettings(args.slab_folds, args.gap_mm, axis)
    elif args.slab_axis != "longest" or args.gap_mm != 10.0:
        raise SpineDiffError("--gap-mm and --slab-axis only apply with --slab-folds N.")
    result = convert_pairs(args.input, output, args.dataset_id, args.name, names=names, labels=args.labels,
                           slabs=slabs, file_ending=args.file_ending, overwrite=args.overwrite,
                           on_case=None if args.quiet else lambda case: print(f"  {case}"))
    report = validate_dataset(result.folder)
    print(f"{result.folder}: {len(result.cases)} case(s) from {result.subjects} subject(s)")
    if result.splits is not None:
        print(f"  folds: {result.folder / 'splits_final.json'} (copy it to $nnUNet_preprocessed/"
              f"{result.folder.name}/ after `spinediff plan`)")
    print(report.summary())
    return 0 if report.ok else 2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="import paired MR/CT folders (SynthRAD layout or one folder per subject) as a translation dataset",
        description=(
            "Import paired source/target images (MR -> CT) into nnU-Net raw layout as a spinediff translation "
            "dataset, the layout of the phantom's Dataset902: imagesTr/CASE_0000 .. the source channel(s), then the "
            "target (CT, in HU) as the last channel; labelsTr/CASE the body mask (1), or with --labels ct-classes "
            "the CT classes inside it (1 soft tissue, 2 fat -190..-30 HU, 3 bone >= 200 HU), so labelsTr > 0 is the "
            "body mask either way (used by the challenge metrics of `spinediff evaluate` and the benchmark). Every "
            "folder under INPUT holding the named files is one subject (its name the case identifier); SynthRAD2023 "
            "(Task1/brain|pelvis/1BA001/{mr,ct,mask}.nii.gz) and SynthRAD2025 (Task1/HN|TH|AB/1HNA001/"
            "{mr,ct,mask}.mha) releases are read as they are, their overview folders ignored. Every image is checked "
            "as `spinediff validate` checks it (readable, scalar, no NaN/Inf), the mask must hold 0/1 and not be "
            "empty, and a subject's images must lie on one grid; on any problem nothing is written. The dataset is "
            "validated after writing."),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-i", "--input", required=True, help="folder holding the subject folders (any depth)")
    parser.add_argument("-d", "--dataset-id", type=int_range(1, 999), required=True, help="nnU-Net dataset ID (1-999)")
    parser.add_argument("--name", default="MRCT", help="dataset name: DatasetXXX_NAME (default: MRCT)")
    parser.add_argument("-o", "--output", help="nnU-Net raw folder receiving the dataset (default: $nnUNet_raw)")
    parser.add_argument("--source-name", nargs="+", default=["mr"], metavar="NAME",
                        help="file name(s) of the source image(s), without ending; one channel each (default: mr)")
    parser.add_argument("--target-name", default="ct", help="file name of the target image (default: ct)")
    parser.add_argument("--mask-name", default="mask",
                        help="file name of the body mask (default: mask); 'none': no mask file, the body is the "
                             "target > -500 HU")
    parser.add_argument("--labels", choices=LABEL_MODES, default="mask",
                        help="labelsTr content: the body mask, or CT classes by HU inside it (a segmenter of these "
                             "serves the perception loss and the downstream Dice) (default: mask)")
    parser.add_argument("--file-ending", default=".nii.gz", choices=[".nii.gz", ".mha", ".nrrd", ".nii"],
                        help="file type written (default: .nii.gz)")
    parser.add_argument("--slab-folds", type=int_range(2, 100), metavar="N",
                        help="cut every subject into N slabs along --slab-axis for N-fold slab cross-validation: "
                             "case SUBJECT_slabK validates fold K, SUBJECT_foldK_trainJ train it (the rest minus "
                             "--gap-mm each side); writes splits_final.json")
    parser.add_argument("--gap-mm", type=non_negative_float, default=10.0,
                        help="untouched gap between a fold's training and validation slabs (default: 10)")
    parser.add_argument("--slab-axis", choices=["longest", "x", "y", "z"], default="longest",
                        help="image axis the slabs are cut along (default: the longest physical extent)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that ID and name")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not list the cases written")
    parser.set_defaults(func=run_convert)
