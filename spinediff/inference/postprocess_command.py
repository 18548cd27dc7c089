"""``spinediff postprocess``: apply a model's cross-validated post-processing to finished predictions
(e.g. those of ``nnUNetv2_predict``; ``spinediff predict`` applies it itself)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spinediff.errors import SpineDiffError
from spinediff.inference.postprocessing import POSTPROCESSING_FILE, Postprocessing, load_probabilities
from spinediff.inference.review import NUMBERING_THRESHOLD
from spinediff.io import (
    copy_file,
    ensure_writable_folder,
    read_image,
    read_json,
    read_voxels_verified,
    write_image,
    write_json,
    write_probabilities,
)
from spinediff.utilities.argtypes import existing_folder
from spinediff.utilities.lock import folder_lock

ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
NUMBERING_FILE = "level_numbering.json"


def postprocess_folder(input_folder: Path, output_folder: Path, model_folder: Path, overwrite: bool = False,
                       progress: bool = True, save_probabilities: bool = False) -> int:
    """Write every segmentation of ``input_folder`` post-processed into ``output_folder``; returns the count.
    ``save_probabilities``: each case's ``CASE.npz`` too, its probabilities made to agree with the new numbering
    (:meth:`Postprocessing.apply_to_answer`), and nnU-Net's ``CASE.pkl`` copied beside it: an answer that a
    refinement model (``spinediff predict --init-from``) can start from."""
    import SimpleITK as sitk

    decision_file = model_folder / POSTPROCESSING_FILE
    if not decision_file.exists():
        raise SpineDiffError(f"{decision_file} does not exist. Run `spinediff find_best -d DATASET` first: it decides "
                             "the post-processing on the model's cross-validation.")
    decision = Postprocessing.load(model_folder)
    if not input_folder.is_dir():
        raise SpineDiffError(f"The input folder {input_folder} does not exist.")
    if input_folder.resolve() == output_folder.resolve():
        raise SpineDiffError("The output folder must differ from the input folder (inputs are never replaced).")
    files = sorted(p for p in input_folder.iterdir() if p.is_file() and p.name.endswith(ENDINGS))
    if not files:
        raise SpineDiffError(f"No segmentation ({', '.join(ENDINGS)}) in {input_folder}.")
    for path in files:  # every input checked before anything is written
        read_voxels_verified(path, read_image(path))
        if (decision.needs_probabilities or save_probabilities) and not _probabilities_of(path).is_file():
            why = ("--save-probabilities writes each case's probabilities post-processed, so it needs them beside "
                   "every input" if save_probabilities else
                   "this model's post-processing forms the foreground from class probabilities")
            raise SpineDiffError(f"{_probabilities_of(path)} is missing: {why}. Predict with probabilities "
                                 "(nnUNetv2_predict --save_probabilities or spinediff predict --save-probabilities).")
    ensure_writable_folder(output_folder, create=False)
    with folder_lock(output_folder):  # held to the end; outputs are checked under it (no other run adds any now)
        written = [output_folder / p.name for p in files]
        if save_probabilities:  # and each case's probabilities (its .pkl is nnU-Net's, copied)
            written += [_probabilities_of(target) for target in list(written)]
        existing = [target for target in written if target.exists()]
        if existing and not overwrite:
            raise SpineDiffError(f"{len(existing)} output file(s) already exist (e.g. {existing[0]}). Choose another "
                                 "output folder or pass --overwrite.")
        reports = {}
        for path in tqdm(files, desc="postprocess", unit="case", disable=not progress):
            image = read_image(path)
            array = sitk.GetArrayFromImage(image)
            needed = decision.needs_probabilities or save_probabilities
            probabilities = load_probabilities(_probabilities_of(path)) if needed else None
            report = None
            if image.GetDimension() != 3:
                changed = array
            elif save_probabilities:
                changed, probabilities, report = decision.apply_to_answer(array, image, probabilities)
            else:
                changed, report = decision.apply_with_report(array, image, probabilities)
            if report is not None:
                reports[path.name] = report
            out = sitk.GetImageFromArray(np.asarray(changed).astype(array.dtype))
            out.CopyInformation(image)
            write_image(out, output_folder / path.name)
            if save_probabilities:
                write_probabilities(probabilities, _probabilities_of(output_folder / path.name))
                properties = _probabilities_of(path).with_suffix(".pkl")
                if properties.is_file():
                    copy_file(properties, _probabilities_of(output_folder / path.name).with_suffix(".pkl"))
        if reports:  # each case's level numbering: levels found and missing, the field of view, the confidence
            low = sorted(c for c, r in reports.items() if r.get("confidence", 1.0) < NUMBERING_THRESHOLD)
            write_json({"cases": reports, "low_confidence": low}, output_folder / NUMBERING_FILE)
    return len(files)


def _probabilities_of(path: Path) -> Path:
    stem = path.name[: -len(next(e for e in ENDINGS if path.name.endswith(e)))]
    return path.with_name(stem + ".npz")


def run(args: argparse.Namespace) -> int:
    count = postprocess_folder(Path(args.input), Path(args.output), Path(args.model), args.overwrite,
                               save_probabilities=args.save_probabilities)
    decision = Postprocessing.load(Path(args.model))
    what = "level numbering by anatomical order" if decision.active else "nothing (it did not improve the " \
                                                                          "cross-validation; files copied)"
    print(f"post-processed {count} case(s) into {args.output}: {what}")
    numbering = Path(args.output) / NUMBERING_FILE
    if decision.active and numbering.is_file():
        low = read_json(numbering)["low_confidence"]
        print(f"level numbering: {len(low)} case(s) below confidence {NUMBERING_THRESHOLD:g} "
              f"({', '.join(low) or 'none'}; all cases in {numbering})")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "postprocess",
        help="apply a model's cross-validated post-processing (postprocessing.json) to a folder of predictions",
        description="Apply the post-processing that `spinediff find_best` kept for a model (TRAINER__PLANS__CONFIG/"
                    "postprocessing.json: the level numbering of ordered labels such as L1..L5, kept only when it "
                    "raised the cross-validation Dice) to segmentations written by another tool, e.g. "
                    "nnUNetv2_predict. `spinediff predict` applies it by itself.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-i", "--input", required=True, type=existing_folder, help="folder of predicted segmentations")
    parser.add_argument("-o", "--output", required=True, help="output folder (created; inputs are never replaced)")
    parser.add_argument("-m", "--model", required=True, type=existing_folder,
                        help="the model folder TRAINER__PLANS__CONFIG that holds postprocessing.json")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write each case's class probabilities (CASE.npz, and nnU-Net's CASE.pkl copied), "
                             "made to agree with the new level numbering: the answer a refinement model starts from "
                             "(spinediff predict --init-from OUTPUT). Needs CASE.npz beside every input")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.set_defaults(func=run)
