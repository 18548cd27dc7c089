"""Is a wrong level numbering a whole scan's or a few slices'? The level numbering per 2D slice of a stress test's kept
cases (issue 34; ``benchmarks/stress_position.py --keep``).

A 2D model numbers each slice on its own; the level numbering (post-processing) then numbers the vertebrae in 3D. For
each chosen case (``CASE:VARIANT``, e.g. ``vb3_008:crop_bottom_20``) and each slice that holds vertebrae in the
reference or the network's raw answer (before the post-processing: ``out_*/nnunet_raw_output``, or the final answer
where there is none), the level Dice and the merged vertebral-body Dice are taken; a slice is ``right`` when the
level Dice keeps at least 3/4 of the merged Dice, ``shifted`` when it keeps at most 1/4, ``mixed`` in between
(slices with merged Dice under 0.5, the scan's lateral edges, are counted apart as ``edge``). If a failure were a
few slices', a vote over slices could repair it; if every slice is shifted, the network numbered the whole scan so.

    python -m studies.slice_numbering --stress-cases KEEP/stress_cases \\
        --cases vb3_008:plain vb3_008:crop_bottom_20 vb3_013:plain vb3_013:crop_top_20 -o OUT

Writes ``OUT/slice_numbering.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from studies.crop_consistency import find_case

RIGHT_SHARE, SHIFTED_SHARE, EDGE_MERGED = 0.75, 0.25, 0.5
KINDS = ("right", "mixed", "shifted", "edge")


def pooled_level_dice(prediction: np.ndarray, reference: np.ndarray, labels: list[int]) -> float:
    """The level Dice over the whole volume, the levels' voxels pooled (a voxel counts when its level is right)."""
    total = int(np.isin(prediction, labels).sum()) + int(np.isin(reference, labels).sum())
    return 2.0 * sum(int(((prediction == v) & (reference == v)).sum()) for v in labels) / total if total else 0.0


def slice_verdicts(prediction: np.ndarray, reference: np.ndarray, labels: list[int], axis: int = 0) -> list[dict]:
    """Per slice along ``axis`` holding vertebrae in either array: its index, level Dice, merged Dice and verdict
    (see the module docstring)."""
    rows = []
    for index in range(reference.shape[axis]):
        p, r = np.take(prediction, index, axis=axis), np.take(reference, index, axis=axis)
        pm, rm = np.isin(p, labels), np.isin(r, labels)
        if not (pm.any() or rm.any()):
            continue
        merged = pooled_level_dice(pm, rm, [True])  # every level one: the merged vertebral bodies
        level = pooled_level_dice(p, r, labels)
        if merged < EDGE_MERGED:
            kind = "edge"
        elif level >= RIGHT_SHARE * merged:
            kind = "right"
        elif level <= SHIFTED_SHARE * merged:
            kind = "shifted"
        else:
            kind = "mixed"
        rows.append({"slice": index, "level_dice": round(level, 4), "merged_dice": round(merged, 4), "kind": kind})
    return rows


def find_answer(stress_cases: Path, stem: str, ending: str) -> tuple[Path, Path, Path]:
    """The network's raw answer (else the final one), the final (post-processed) answer and the cut reference of the
    stress variant ``stem`` (:func:`studies.crop_consistency.find_case`; LookupError when one is missing)."""
    kept = find_case(stress_cases, stem, ending)
    if not kept.answer.is_file():
        raise LookupError(f"{stem}: {kept.answer} is missing; keep the stress cases whole "
                          "(benchmarks/stress_position.py --keep).")
    return kept.raw_answer, kept.answer, kept.reference


def markdown(result: dict) -> str:
    lines = ["# Level numbering per slice", "", f"Command: `{result['command']}`", "",
             f"Slices along array axis {result['axis']}; raw = the network's answer before the level numbering.", "",
             "| case | slices right | mixed | shifted | edge | level Dice of the slices with merged ≥ 0.5 (raw) "
             "| pooled level Dice after the numbering (3D) |", "|---|---|---|---|---|---|---|"]
    for row in result["cases"]:
        counts = row["counts"]
        lines.append(f"| {row['case']} | {counts['right']} | {counts['mixed']} | {counts['shifted']} | "
                     f"{counts['edge']} | {row['raw_level_dice_inner']:.3f} | {row['final_level_dice']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stress-cases", required=True, type=Path, help="a stress test's kept cases (stress_cases)")
    parser.add_argument("--cases", nargs="+", required=True, metavar="CASE:VARIANT")
    parser.add_argument("--labels", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="the levels (default 1-5)")
    parser.add_argument("--axis", type=int, default=0, choices=(0, 1, 2),
                        help="the array axis the 2D model slices along (default 0: nnU-Net's first axis)")
    parser.add_argument("--ignore-label", type=int, default=None,
                        help="nnU-Net's ignore label of the references: its voxels count for no level")
    parser.add_argument("--ending", default=".nii.gz")
    parser.add_argument("-o", "--output", required=True, type=Path)
    args = parser.parse_args(argv)

    import SimpleITK as sitk

    from spinediff.io import write_json, write_text
    from spinediff.metrics.segmentation_metrics import without_ignored

    try:  # every case found before any work
        found = {item: find_answer(args.stress_cases, item.replace(":", "-"), args.ending) for item in args.cases}
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 2
    rows = []
    for item, (raw, final, reference_path) in found.items():
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_path)))
        answer, unignored = without_ignored(sitk.GetArrayFromImage(sitk.ReadImage(str(raw))), reference,
                                            args.ignore_label)
        slices = slice_verdicts(answer, unignored, args.labels, args.axis)
        inner = [s["level_dice"] for s in slices if s["kind"] != "edge"]
        final_answer, _ = without_ignored(sitk.GetArrayFromImage(sitk.ReadImage(str(final))), reference,
                                          args.ignore_label)
        rows.append({"case": item, "raw": str(raw), "counts": {k: sum(s["kind"] == k for s in slices) for k in KINDS},
                     "raw_level_dice_inner": round(float(np.mean(inner)), 4) if inner else float("nan"),
                     "final_level_dice": round(pooled_level_dice(final_answer, unignored, args.labels), 4),
                     "slices": slices})
    result = {"axis": args.axis, "labels": args.labels, "cases": rows,
              "command": "python -m studies.slice_numbering " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(result, args.output / "slice_numbering.json")
    write_text(markdown(result), args.output / "slice_numbering.md")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
