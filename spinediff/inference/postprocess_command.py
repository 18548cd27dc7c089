"""``spinediff postprocess``: apply a model's cross-validated post-processing to finished predictions
(e.g. those of ``nnUNetv2_predict``; ``spinediff predict`` applies it itself), and flag the cases to review by the
model's review rule (``review.json``) as ``spinediff predict`` does: ``review.csv``, and ``review.png`` with the
flagged cases drawn."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spinediff.errors import SpineDiffError
from spinediff.inference.postprocessing import (
    POSTPROCESSING_FILE,
    Postprocessing,
    image_content_box,
    load_probabilities,
)
from spinediff.inference.review import (
    NUMBERING_THRESHOLD,
    REVIEW_TABLE,
    ReviewRule,
    flagged_cases,
    write_review_table,
)
from spinediff.inference.review_sheet import REVIEW_SHEET, SheetCase, write_review_sheet
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
#: Case scores a review rule may use that a finished segmentation gives: from its label map, and from its class
#: probabilities (``CASE.npz``) when they are there. The others need samples or fold members (``spinediff predict``,
#: ``spinediff ensemble --save-uncertainty``).
LABEL_MAP_SCORES = ("level_anomaly",)
PROBABILITY_SCORES = ("entropy", "level_confidence")


@dataclass
class PostprocessResult:
    count: int  # segmentations written
    flags: dict[str, dict] = field(default_factory=dict)  # case -> its review flag (empty without a review rule)
    review_table: Path | None = None  # OUTPUT/review.csv
    review_sheet: Path | None = None  # OUTPUT/review.png: the flagged cases drawn (None: none flagged)
    intensities_checked: bool = False
    #: the rule's entropy threshold applied (class probabilities beside every input); None: the rule has none
    entropy_checked: bool | None = None

    @property
    def flagged(self) -> list[str]:
        return flagged_cases(self.flags)


def _case_stem(path: Path) -> str:
    return path.name[: -len(next(e for e in ENDINGS if path.name.endswith(e)))]


def _review_inputs(rule: ReviewRule | None, files: list[Path], model_folder: Path, images: Path | None,
                   probabilities_everywhere: bool) -> dict[str, list[Path]]:
    """Checks, before anything is written, that the review rule can be applied to these predictions; returns each
    case's image files (empty without ``images``)."""
    if rule is None:
        if images is not None:
            raise SpineDiffError(f"--images is read only for the review flags, and {model_folder} has no review rule "
                                 f"(review.json). Run `spinediff find_best -d DATASET` (it writes one from the "
                                 "cross-validation) or leave --images out.")
        return {}
    available = set(LABEL_MAP_SCORES if rule.expected_volumes_ml else ()) | set(
        PROBABILITY_SCORES if probabilities_everywhere else ())
    if rule.score not in available:
        need = ("class probabilities beside every input (nnUNetv2_predict --save_probabilities)"
                if rule.score in PROBABILITY_SCORES else
                "expected level volumes in review.json" if rule.score in LABEL_MAP_SCORES else
                "several members per case: predict each fold with --save_probabilities and combine them with "
                "`spinediff ensemble --save-uncertainty`, whose CASE_uncertainty.json has it")
        raise SpineDiffError(f"{model_folder / 'review.json'} flags cases by {rule.score!r}, which needs {need}. "
                             "Give what it needs or move review.json aside to post-process without review flags.")
    if images is None:
        return {}
    if not images.is_dir():
        raise SpineDiffError(f"--images {images} is not a folder: give the folder of input images that was "
                             "predicted (CASE_0000.nii.gz, ...).")
    dataset_json = read_json(model_folder / "dataset.json")
    channels = sorted(dataset_json["channel_names"], key=int)
    found = {}
    for path in files:
        stem = _case_stem(path)
        endings = (path.name[len(stem):],) + ENDINGS  # the prediction's own ending first
        wanted = [next((images / f"{stem}_{int(c):04d}{e}" for e in endings
                        if (images / f"{stem}_{int(c):04d}{e}").is_file()), None) for c in channels]
        if any(w is None for w in wanted):
            missing = next(int(c) for c, w in zip(channels, wanted, strict=True) if w is None)
            raise SpineDiffError(f"{images} has no image {stem}_{missing:04d}{endings[0]} for the prediction "
                                 f"{path.name}: --images must be the folder that was predicted.")
        found[stem] = wanted
    return found


def _review_flag(rule: ReviewRule, label_map: np.ndarray, image, probabilities: np.ndarray | None,
                 channels: list[np.ndarray], numbering: dict | None) -> dict:
    """One case's review flag from its post-processed label map (level volumes), its probabilities (entropy,
    level confidence), its input images' arrays (intensities) and its level numbering report."""
    from spinediff.inference.review import intensity_signature
    from spinediff.metrics.case_uncertainty import case_scores, level_anomaly, level_statistics
    from spinediff.utilities.geometry import orientation_code

    labels = sorted(rule.expected_volumes_ml) or sorted(int(v) for v in np.unique(label_map) if v > 0)
    spacing = image.GetSpacing()
    scores: dict = {}
    if probabilities is not None and probabilities.shape[1:] == label_map.shape:
        scores = case_scores(probabilities, spacing, labels)
    stats = level_statistics(label_map, None, spacing, labels)  # the volumes of the numbered levels
    if rule.expected_volumes_ml:
        scores["level_anomaly"] = level_anomaly(stats, rule.expected_volumes_ml)
    scores.setdefault("levels", {str(k): v for k, v in stats.items()})
    intensity = [intensity_signature(c) for c in channels] if channels else None
    # nnU-Net writes each prediction with its input's geometry: the prediction's axes are the scan's
    return rule.flag(scores, intensity, numbering, orientation_code(image.GetDirection()))


def postprocess_folder(input_folder: Path, output_folder: Path, model_folder: Path, overwrite: bool = False,
                       progress: bool = True, save_probabilities: bool = False, review: bool = False,
                       images: Path | None = None) -> PostprocessResult:
    """Write every segmentation of ``input_folder`` post-processed into ``output_folder``.
    ``save_probabilities``: each case's ``CASE.npz`` too, its probabilities made to agree with the new numbering
    (:meth:`Postprocessing.apply_to_answer`), and nnU-Net's ``CASE.pkl`` copied beside it: an answer that a
    refinement model (``spinediff predict --init-from``) can start from. ``review``: flag the cases by the model's
    review rule (``review.json``, when it has one) into ``OUTPUT/review.csv``, their intensities too when ``images``
    (the folder that was predicted) is given."""
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
    if images is not None and not review:
        raise SpineDiffError("--images is read only for the review flags, which --no-review turns off: leave out one "
                             "of the two.")
    rule = ReviewRule.read(model_folder) if review else None
    with_probabilities = all(_probabilities_of(path).is_file() for path in files)
    image_files = _review_inputs(rule, files, model_folder, images, with_probabilities)
    ensure_writable_folder(output_folder, create=False)
    result = PostprocessResult(len(files), intensities_checked=bool(image_files) and rule is not None
                               and rule.intensity is not None,
                               entropy_checked=None if rule is None or rule.entropy_threshold is None
                               else with_probabilities)
    with folder_lock(output_folder):  # held to the end; outputs are checked under it (no other run adds any now)
        written = [output_folder / p.name for p in files]
        if save_probabilities:  # and each case's probabilities (its .pkl is nnU-Net's, copied)
            written += [_probabilities_of(target) for target in list(written)]
        if rule is not None:
            written += [output_folder / REVIEW_TABLE, output_folder / REVIEW_SHEET]
        existing = [target for target in written if target.exists()]
        if existing and not overwrite:
            raise SpineDiffError(f"{len(existing)} output file(s) already exist (e.g. {existing[0]}). Choose another "
                                 "output folder or pass --overwrite.")
        reports = {}
        for path in tqdm(files, desc="postprocess", unit="case", disable=not progress):
            image = read_image(path)
            array = sitk.GetArrayFromImage(image)
            needed = decision.needs_probabilities or save_probabilities or (
                rule is not None and rule.score in PROBABILITY_SCORES) or result.entropy_checked
            probabilities = load_probabilities(_probabilities_of(path)) if needed else None
            channels = [sitk.GetArrayFromImage(read_image(f)) for f in image_files.get(_case_stem(path), [])]
            report = None
            if image.GetDimension() != 3:  # a 2D scan: no numbering along a spine, nothing to measure
                changed = array
            else:
                # with the inputs, the room at the scan's ends is measured to the edges of their image data
                # (nnU-Net's nonzero crop), not to planes of zeros padded around it
                box = image_content_box(channels) if channels and channels[0].shape == array.shape else None
                if save_probabilities:
                    changed, probabilities, report = decision.apply_to_answer(array, image, probabilities, box)
                else:
                    changed, report = decision.apply_with_report(array, image, probabilities, box)
            if report is not None:
                reports[path.name] = report
            if rule is not None:
                result.flags[_case_stem(path)] = _review_flag(rule, np.asarray(changed), image, probabilities,
                                                              channels, report)
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
        if rule is not None:
            result.review_table = write_review_table(result.flags, output_folder / REVIEW_TABLE)
            result.review_sheet = _write_sheet(result, files, image_files, model_folder, output_folder)
    return result


def _write_sheet(result: PostprocessResult, files: list[Path], image_files: dict[str, list[Path]],
                 model_folder: Path, output_folder: Path) -> Path | None:
    """``OUTPUT/review.png``, the flagged cases drawn on their images (when --images gave them); None, and a sheet
    of the run this one overwrites removed, when no case is flagged."""
    sheet = output_folder / REVIEW_SHEET
    if not result.flagged:
        sheet.unlink(missing_ok=True)  # an earlier run's sheet would name cases this run did not flag
        return None
    written = {_case_stem(p): output_folder / p.name for p in files}
    dataset = model_folder / "dataset.json"
    dataset_json = read_json(dataset) if dataset.is_file() else {}
    cases = [SheetCase(case, written[case], (image_files.get(case) or [None])[0],
                       tuple(result.flags[case].get("reasons", []))) for case in result.flagged]
    return write_review_sheet(cases, dataset_json, sheet)


def _probabilities_of(path: Path) -> Path:
    return path.with_name(_case_stem(path) + ".npz")


def run(args: argparse.Namespace) -> int:
    images = Path(args.images) if args.images else None
    result = postprocess_folder(Path(args.input), Path(args.output), Path(args.model), args.overwrite,
                                save_probabilities=args.save_probabilities, review=not args.no_review, images=images)
    decision = Postprocessing.load(Path(args.model))
    what = "level numbering by anatomical order" if decision.active else "nothing (it did not improve the " \
                                                                          "cross-validation; files copied)"
    print(f"post-processed {result.count} case(s) into {args.output}: {what}")
    numbering = Path(args.output) / NUMBERING_FILE
    if decision.active and numbering.is_file():
        low = read_json(numbering)["low_confidence"]
        print(f"level numbering: {len(low)} case(s) below confidence {NUMBERING_THRESHOLD:g} "
              f"({', '.join(low) or 'none'}; all cases in {numbering})")
    if result.review_table is not None:
        shown = ", ".join(result.flagged) if result.flagged else "none"
        unchecked = "" if result.intensities_checked else (
            "; intensities not checked: give --images INPUT_FOLDER" if images is None else
            "; intensities not checked: the review rule has no intensity reference")
        if result.entropy_checked is False:
            unchecked += "; entropy not checked: predict with --save_probabilities (CASE.npz beside every input)"
        drawn = f"; the flagged ones drawn in {result.review_sheet}" if result.review_sheet else ""
        print(f"review: {len(result.flagged)} case(s) flagged by the model's review rule, most doubtful first: "
              f"{shown} (all cases ranked in {result.review_table}{drawn}{unchecked})")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "postprocess",
        help="apply a model's cross-validated post-processing (postprocessing.json) and review flags to a folder of "
             "predictions (e.g. nnUNetv2_predict's)",
        description="Apply the post-processing that `spinediff find_best` kept for a model (TRAINER__PLANS__CONFIG/"
                    "postprocessing.json: the level numbering of ordered labels such as L1..L5, kept only when it "
                    "raised the cross-validation Dice) to segmentations written by another tool, e.g. "
                    "nnUNetv2_predict, and flag the cases a person should check by the model's review rule "
                    "(review.json: level volumes within the scan's field of view, numbering confidence, the "
                    "entropy of the class probabilities when CASE.npz lies beside every input "
                    "(nnUNetv2_predict --save_probabilities) and, with --images, intensities out of the "
                    "training range) into OUTPUT/review.csv. `spinediff predict` does both by itself. Example: "
                    "spinediff postprocess -i nnunet_out -o out -m $nnUNet_results/Dataset501_X/"
                    "nnUNetTrainer__nnUNetPlans__2d_cpu --images INPUT_FOLDER",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-i", "--input", required=True, type=existing_folder, help="folder of predicted segmentations")
    parser.add_argument("-o", "--output", required=True, help="output folder (created; inputs are never replaced)")
    parser.add_argument("-m", "--model", required=True, type=existing_folder,
                        help="the model folder TRAINER__PLANS__CONFIG that holds postprocessing.json")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write each case's class probabilities (CASE.npz, and nnU-Net's CASE.pkl copied), "
                             "made to agree with the new level numbering: the answer a refinement model starts from "
                             "(spinediff predict --init-from OUTPUT). Needs CASE.npz beside every input")
    parser.add_argument("--images", type=existing_folder, default=None,
                        help="the folder of input images that was predicted (CASE_0000.nii.gz, ...): the review flag "
                             "then also checks each scan's intensities against the training scans' (e.g. a T1w scan "
                             "for a model trained on T2w)")
    parser.add_argument("--no-review", action="store_true",
                        help="do not flag cases by the model's review rule (review.json); by default every case is "
                             "flagged or not in OUTPUT/review.csv, and the flagged ones are drawn in "
                             "OUTPUT/review.png (the sagittal slice with most of the segmentation, on its image "
                             "with --images), as `spinediff predict` does")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.set_defaults(func=run)
