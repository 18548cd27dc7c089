"""The stress test's kept cases post-processed again by the code as it is now, and scored beside what the stress test
wrote: how much a change of the level numbering moves the stress numbers without predicting again (issue 34).

A stress test run with ``--keep`` (``benchmarks/stress_position.py --keep``) leaves, per fold, the varied inputs
(``in_*``), their cut references (``ref_*``) and the predictions (``out_*``), nnU-Net's raw answers among them
(``out_*/nnunet_raw_output``, for nnU-Net's trainers). Each raw answer is numbered again by the model's
``postprocessing.json`` (:func:`spinediff.inference.postprocess_command.postprocess_folder`, as ``spinediff
postprocess`` numbers a user's answers) and scored as the stress test scores (:func:`spinediff.experiments.stress.
level_scores`, the levels' shares in view from the raw dataset's whole reference).

    python -m studies.rescore_stress \\
        -m $nnUNet_results/Dataset505_LumbarVB3VB2mixed/nnUNetTrainer__nnUNetPlans__2d_cpu \\
        --stress-cases KEEP/stress_cases -o OUT

``--average-with OTHER/stress_cases [...]`` first averages each raw answer with the same case's raw answer of other
trainings' kept stress tests (the same folds and cases, e.g. another seed) by nnU-Net's ensembling
(``nnunetv2.ensembling.ensemble.ensemble_folders``, class probabilities averaged), as a user's fold ensemble is
made: "now" is then the ensemble's score and "kept" the first training's.

Writes ``OUT/rescore_stress.json`` and ``.md``: per variant the mean level Dice as kept and as numbered now, how many
cases a numbering confidence under the review rule's threshold flags either way, how many of the stressed failures
(level Dice under 0.5) it flags, and every case-variant whose score changed.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def kept_folder_parts(name: str) -> tuple[str, str]:
    """The dataset and the folds (``"0"``, or ``"0_1_2_3_4"`` for another dataset's scans predicted by every fold) of
    a kept prediction folder ``out_<dataset>_<folds>``."""
    match = re.fullmatch(r"out_(Dataset\d+_.+?)_(\d+(?:_\d+)*)", name)
    if match is None:
        raise SystemExit(f"{name} is not a stress test's prediction folder (out_<dataset>_<folds>)")
    return match.group(1), match.group(2)


def held_out_folders(stress_cases: Path) -> list[Path]:
    """The kept prediction folders (``out_*``) of the scans each fold held out, in name order: those of the folds'
    own training scans (``--training-scans``, ``out_<dataset>_training_scans_<fold>``) left out, since a rescoring
    compares held-out answers."""
    from spinediff.experiments.stress_report import TRAINING_FOLDER_MARK

    return sorted(p for p in stress_cases.glob("out_*") if p.is_dir() and TRAINING_FOLDER_MARK not in p.name)


def averaged_raw_folders(stress_cases: Path, average_with: list[Path]) -> dict[str, list[Path]]:
    """Per kept prediction folder (``out_*``) of ``stress_cases``: the raw answer folders of ``average_with`` to
    average with its own, checked before any work: each must hold the same folder with the same raw answers."""
    folders = {}
    for predicted in held_out_folders(stress_cases):
        own = {p.name for p in (predicted / "nnunet_raw_output").glob("*.npz")}
        if not own:
            raise SystemExit(f"{predicted / 'nnunet_raw_output'} holds no raw answers with probabilities (CASE.npz): "
                             "average the kept stress_cases of a stress test of an nnU-Net trainer run with --keep")
        others = [other / predicted.name / "nnunet_raw_output" for other in average_with]
        for other in others:
            theirs = {p.name for p in other.glob("*.npz")} if other.is_dir() else set()
            if theirs != own:
                raise SystemExit(f"{other} does not hold the same raw answers with probabilities (CASE.npz) as "
                                 f"{predicted / 'nnunet_raw_output'}: give --average-with the kept stress_cases of "
                                 "a stress test of the same dataset, folds and cases run with --keep")
        folders[predicted.name] = others
    return folders


def rescore(model: Path, stress_cases: Path, average_with: list[Path] | None = None) -> list[dict]:
    """One row per kept case-variant: ``kept`` (the stress test's level Dice) and ``now`` (numbered again, after
    averaging with the raw answers of ``average_with`` when given)."""
    import SimpleITK as sitk

    from spinediff.datasets.dataset_json import ignore_label
    from spinediff.experiments.stress import dataset_level_order, in_view_shares, level_scores
    from spinediff.inference.postprocess_command import postprocess_folder
    from spinediff.inference.review import REVIEW_FILE
    from spinediff.io import read_json
    from spinediff.paths import resolve_raw_dataset

    averaged = averaged_raw_folders(stress_cases, average_with) if average_with else {}
    rows = []
    for predicted in held_out_folders(stress_cases):
        raw_output = predicted / "nnunet_raw_output"
        references = stress_cases / ("ref_" + predicted.name[4:])
        if not raw_output.is_dir() or not references.is_dir():
            raise SystemExit(f"{predicted} has no nnunet_raw_output or no {references.name} beside it: keep the "
                             "stress cases of an nnU-Net trainer's model (--keep)")
        source, folds = kept_folder_parts(predicted.name)
        raw = resolve_raw_dataset(source)
        dataset_json = read_json(raw / "dataset.json")
        ending, ignore = dataset_json.get("file_ending", ".nii.gz"), ignore_label(dataset_json)
        labels = list(dataset_level_order(raw).labels)
        work = Path(tempfile.mkdtemp(prefix="rescore_"))
        try:
            if averaged:  # nnU-Net's ensembling: the class probabilities averaged, its dataset.json and .pkl kept
                from nnunetv2.ensembling.ensemble import ensemble_folders

                ensemble_folders([str(raw_output), *map(str, averaged[predicted.name])], str(work / "averaged"),
                                 save_merged_probabilities=True, num_processes=1)
                raw_output = work / "averaged"
            # as the stress test post-processes: with the review rule and the varied inputs beside the answers (the
            # numbering then measures the room at the ends to the edges of the image data)
            inputs = stress_cases / ("in_" + predicted.name[4:])
            reviewed = (model / REVIEW_FILE).is_file() and inputs.is_dir()
            postprocess_folder(raw_output, work / "now", model, overwrite=True, progress=False, review=reviewed,
                               images=inputs if reviewed else None)
            confidence = {name: _confidences(folder / "level_numbering.json", ending)
                          for name, folder in (("kept", predicted), ("now", work / "now"))}
            for reference_file in sorted(references.glob(f"*{ending}")):
                stem = reference_file.name[: -len(ending)]
                case, variant = stem.split("-", 1)
                reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_file)))
                whole = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case}{ending}")))
                shares = in_view_shares(whole, reference, labels)
                scores = {}
                for name, folder in (("kept", predicted), ("now", work / "now")):
                    answer = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{stem}{ending}")))
                    scores[name] = level_scores(answer, reference, labels, shares, ignore)
                rows.append({"fold": folds, "case": case, "variant": variant,
                             "kept": scores["kept"]["level_dice"], "now": scores["now"]["level_dice"],
                             "kept_per_label": scores["kept"]["per_label"],
                             "now_per_label": scores["now"]["per_label"],
                             "kept_confidence": confidence["kept"].get(stem),
                             "now_confidence": confidence["now"].get(stem)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def _confidences(report: Path, ending: str) -> dict[str, float]:
    """Each case's level numbering confidence from a ``level_numbering.json`` (none when the file is missing)."""
    from spinediff.io import read_json

    if not report.is_file():
        return {}
    return {name[: -len(ending)] if name.endswith(ending) else name: entry.get("confidence")
            for name, entry in read_json(report).get("cases", {}).items()}


def _low_confidence(rows: list[dict], key: str) -> int:
    """How many of ``rows`` the review rule's numbering criterion flags by their ``key`` (``kept_confidence`` or
    ``now_confidence``): a confidence below :data:`spinediff.inference.review.NUMBERING_THRESHOLD`."""
    from spinediff.inference.review import NUMBERING_THRESHOLD

    return sum(1 for r in rows if r.get(key) is not None and r[key] < NUMBERING_THRESHOLD)


def summary(rows: list[dict]) -> list[dict]:
    """Per variant: cases, mean level Dice as kept and now, and how many cases the review rule's numbering criterion
    flags (:func:`_low_confidence`) as kept and now."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        chosen = [r for r in rows if r["variant"] == variant]
        out.append({"variant": variant, "cases": len(chosen), "kept": float(np.nanmean([r["kept"] for r in chosen])),
                    "now": float(np.nanmean([r["now"] for r in chosen])),
                    "kept_low_confidence": _low_confidence(chosen, "kept_confidence"),
                    "now_low_confidence": _low_confidence(chosen, "now_confidence")})
    return out


def caught(rows: list[dict]) -> str:
    """How many stressed case-variants (all but ``plain``) fail (level Dice under 0.5) and how many of those, and of
    all, the numbering confidence flags as kept and now: does the review catch the failures, and at what cost."""
    stressed = [r for r in rows if r["variant"] != "plain"]
    failed = [r for r in stressed if r["now"] < 0.5]
    low = _low_confidence
    return (f"Stressed case-variants: {len(stressed)}; flagged by the numbering confidence: "
            f"{low(stressed, 'kept_confidence')} as kept, {low(stressed, 'now_confidence')} now. Under 0.5 level Dice "
            f"now: {len(failed)}; of them flagged: {low(failed, 'kept_confidence')} as kept, "
            f"{low(failed, 'now_confidence')} now.")


def markdown(rows: list[dict], table: list[dict], command: str, averaged_with: list[str] | None = None) -> str:
    lines = ["# Stress cases numbered again", "", f"`{command}`", ""]
    if averaged_with:
        lines += [f"'Now': each raw answer averaged with those of {', '.join(averaged_with)} (nnU-Net's ensembling), "
                  "then numbered; 'kept': the first training's own answer.", ""]
    lines += ["| variant | cases | level Dice as kept | numbered now | change "
              "| numbering confidence < 0.5: kept, now |", "|---|---|---|---|---|---|"]
    lines += [f"| {t['variant']} | {t['cases']} | {t['kept']:.3f} | {t['now']:.3f} | {t['now'] - t['kept']:+.3f} | "
              f"{t.get('kept_low_confidence', 0)}, {t.get('now_low_confidence', 0)} |" for t in table]
    lines += ["", caught(rows)]
    changed = [r for r in rows if not (math.isclose(r["kept"], r["now"], abs_tol=1e-6)
                                       or (math.isnan(r["kept"]) and math.isnan(r["now"])))]
    lines += ["", f"## Case-variants whose score changed ({len(changed)} of {len(rows)})", ""]
    lines += [f"- {r['case']} {r['variant']} (fold {r['fold']}): {r['kept']:.3f} -> {r['now']:.3f}" for r in changed]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", required=True, type=Path, help="the model folder (its postprocessing.json)")
    parser.add_argument("--stress-cases", required=True, type=Path, help="the stress test's kept stress_cases folder")
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--average-with", nargs="+", type=Path, default=[], metavar="STRESS_CASES",
                        help="other trainings' kept stress_cases folders (same folds and cases): average each raw "
                             "answer with theirs (nnU-Net's ensembling) before numbering; 'now' is the ensemble")
    args = parser.parse_args(argv)
    from spinediff.io import write_json, write_text

    rows = rescore(args.model, args.stress_cases, args.average_with)
    table = summary(rows)
    command = "python -m studies.rescore_stress " + " ".join(sys.argv[1:] if argv is None else argv)
    args.output.mkdir(parents=True, exist_ok=True)
    write_json({"model": str(args.model), "average_with": [str(p) for p in args.average_with], "summary": table,
                "cases": rows, "command": command},
               args.output / "rescore_stress.json")
    text = markdown(rows, table, command, [str(p) for p in args.average_with])
    write_text(text, args.output / "rescore_stress.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
