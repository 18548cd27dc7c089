"""Could the vertebral bodies' wedge shape number a scan that shows neither end of the lumbar spine? (issue 34)

When a scan cuts the spine at both ends, the level numbering rests on the network's labels alone (flagged for review),
and the network is then right in about 6 of 10 stressed cases. The lumbar bodies are wedged with the lordosis: in the
sagittal plane the ratio of a body's height at one end of its anteroposterior extent to the other rises from L1 to L4
(the training labels of Dataset505: about 0.79, 0.90, 1.07, 1.14; L5 is 0.96 and the most variable). A column of
bodies numbered one level off would then fit that profile worse than the right numbering. This study measures whether
it does, on the bodies the network found, before anything is built on it.

Per fold, the profile (mean and spread per level) comes from the fold's training labels only (``splits_final.json``);
the level above L1 (T12) is extrapolated one step from L1 and L2. Each kept stress answer
(``benchmarks/stress_position.py --keep``, post-processed as a user's) is scored: the ratio of each level the answer
holds (clear of the image's edges along the spine), then the offset (−1, 0, +1: "the answer's level L is level
L + offset") whose profile fits those ratios best (mean squared z, at least three levels), against the true offset
(the reference level most of the answer's level covers).

    python -m studies.wedge_numbering --raw $nnUNet_raw/Dataset505_LumbarVB3VB2mixed \\
        --splits $nnUNet_preprocessed/Dataset505_LumbarVB3VB2mixed/splits_final.json \\
        --stress-cases KEEP/stress_cases -o OUT

Writes ``OUT/wedge_numbering.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

OFFSETS = (-1, 0, 1)
#: The sagittal slices measured: those holding at least this share of the body's largest sagittal area.
CENTRAL_SHARE = 0.6


def wedge_ratio(mask: np.ndarray, spine_axis: int = 1) -> float:
    """The ratio of a vertebral body's height at the low end of its extent across the spine (the last array axis) to
    its height at the high end (a quarter of the extent each), the median over its central sagittal slices (the
    first array axis); NaN for an empty or too thin mask. ``mask``: (slices, along the spine, across it)."""
    if spine_axis != 1:
        mask = np.moveaxis(mask, spine_axis, 1)
    areas = mask.sum((1, 2))
    if not areas.any():
        return float("nan")
    ratios = []
    for z in np.nonzero(areas >= CENTRAL_SHARE * areas.max())[0]:
        columns = np.nonzero(mask[z].any(0))[0]
        if len(columns) < 6:
            continue
        first, last = int(columns.min()), int(columns.max())
        quarter = max(1, (last - first + 1) // 4)
        low = mask[z][:, first:first + quarter].sum(0).mean()
        high = mask[z][:, last - quarter + 1:last + 1].sum(0).mean()
        if high > 0:
            ratios.append(low / high)
    return float(np.median(ratios)) if ratios else float("nan")


def level_profile(label_maps: list[np.ndarray], levels: list[int]) -> dict[int, tuple[float, float]]:
    """Mean and spread of each level's :func:`wedge_ratio` over ``label_maps``; the level before the first (e.g. T12
    before L1) extrapolated one step, with the first level's spread."""
    ratios = np.array([[wedge_ratio(m == level) for level in levels] for m in label_maps])
    mean, spread = np.nanmean(ratios, 0), np.nanstd(ratios, 0)
    profile = {level: (float(mean[i]), float(max(spread[i], 1e-3))) for i, level in enumerate(levels)}
    profile[levels[0] - 1] = (float(2 * mean[0] - mean[1]), profile[levels[0]][1])
    return profile


def best_offset(ratios: dict[int, float], profile: dict[int, tuple[float, float]], least: int = 3) -> int | None:
    """The offset (:data:`OFFSETS`) under which the measured ``ratios`` ({level as numbered: ratio}) fit the profile
    best (mean squared z over the levels it knows; at least ``least`` of them), None when no offset has enough."""
    fits = {}
    for offset in OFFSETS:
        z = [((ratio - profile[level + offset][0]) / profile[level + offset][1]) ** 2
             for level, ratio in ratios.items() if level + offset in profile and np.isfinite(ratio)]
        if len(z) >= least:
            fits[offset] = float(np.mean(z))
    return min(fits, key=fits.get) if fits else None


def true_offset(answer: np.ndarray, reference: np.ndarray, levels: list[int]) -> int | None:
    """The offset by which the answer's levels sit on the reference's: per level the reference level most of its
    voxels cover minus its own, the most common over levels; None when no level covers a reference level."""
    offsets = []
    for level in levels:
        covered = reference[(answer == level) & np.isin(reference, levels)]
        if covered.size:
            offsets.append(int(np.bincount(covered).argmax()) - level)
    return max(set(offsets), key=offsets.count) if offsets else None


def clear_of_edges(mask: np.ndarray, spine_axis: int = 1) -> bool:
    """Does the body lie clear of the image's edges along the spine (not cut by them)?"""
    rows = np.nonzero(mask.any(tuple(a for a in range(mask.ndim) if a != spine_axis)))[0]
    return rows.size > 0 and rows.min() > 0 and rows.max() < mask.shape[spine_axis] - 1


#: The levels a cut leaves in view, for the check on the reference masks.
WINDOWS = {"L1-L5": (1, 2, 3, 4, 5), "L1-L4": (1, 2, 3, 4), "L2-L5": (2, 3, 4, 5)}


def reference_check(labels: dict[str, np.ndarray], splits: list[dict], levels: list[int]) -> dict:
    """The cue on perfect segmentations: each fold's validation cases' reference masks, numbered right, measured
    against the profile of the fold's training cases; per window of levels in view (:data:`WINDOWS`), how often the
    best fit is the right numbering (offset 0)."""
    counts = {name: {"right": 0, "cases": 0} for name in WINDOWS}
    for split in splits:
        profile = level_profile([labels[c] for c in split["train"]], levels)
        for case in split["val"]:
            ratios = {level: wedge_ratio(labels[case] == level) for level in levels
                      if (labels[case] == level).sum() > 200}
            for name, window in WINDOWS.items():
                counts[name]["cases"] += 1
                counts[name]["right"] += best_offset({k: v for k, v in ratios.items() if k in window}, profile) == 0
    return counts


def tally(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["truth"] is not None]
    return {"case_variants": len(rows), "network_right": sum(r["truth"] == 0 for r in scored),
            "wedge_right": sum(r["wedge"] == r["truth"] for r in scored)}


def markdown(result: dict) -> str:
    lines = ["# Wedge shape and level numbering", "", f"Command: `{result['command']}`", "",
             "| answers (plain and cut) | case-variants | numbered right by the network "
             "| offset the wedge fit picks right |",
             "|---|---|---|---|"]
    for key, title in (("both_open", "both ends open"), ("anchored", "at least one end anchored"), ("all", "all")):
        t = result["tally"][key]
        lines.append(f"| {title} | {t['case_variants']} | {t['network_right']} | {t['wedge_right']} |")
    lines += ["", "On the reference masks themselves (numbered right, each fold's validation cases against its "
              "training cases' profile), the best fit is the right numbering in: "
              + ", ".join(f"{v['right']} of {v['cases']} ({k} in view)" for k, v in result["references"].items()) + "."]
    lines += ["", "| case-variant | fold | both ends open | true offset | wedge fit |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['fold']} | {'yes' if r['both_open'] else 'no'} | {r['truth']} | {r['wedge']} |"
              for r in result["rows"] if r["both_open"] or r["truth"] != 0]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--raw", required=True, help="the raw dataset folder (its labelsTr)")
    parser.add_argument("--splits", required=True, help="the folds' splits_final.json")
    parser.add_argument("--stress-cases", required=True, help="a stress test's kept cases (--keep)")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args(argv)

    import SimpleITK as sitk

    from spinediff.io import ensure_writable_folder, read_json, write_json, write_text
    from studies.rescore_stress import held_out_folders, kept_folder_parts

    raw, cases = Path(args.raw), Path(args.stress_cases)
    splits = read_json(args.splits)
    kept = held_out_folders(cases)
    if not kept or not (raw / "labelsTr").is_dir():
        raise SystemExit(f"{cases} holds no kept answers (out_*) or {raw} no labelsTr: see --help")
    ending = read_json(raw / "dataset.json").get("file_ending", ".nii.gz")
    labels = {p.name[:-len(ending)]: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
              for p in sorted((raw / "labelsTr").glob(f"*{ending}"))}
    rows = []
    for folder in kept:
        _, folds = kept_folder_parts(folder.name)
        if "_" in folds:  # another dataset's scans, predicted by every fold: no training split of their own
            continue
        profile = level_profile([labels[c] for c in splits[int(folds)]["train"]], args.levels)
        numbering = read_json(folder / "level_numbering.json")["cases"] if (folder / "level_numbering.json").is_file() \
            else {}
        for answer_file in sorted(folder.glob(f"*{ending}")):
            answer = sitk.GetArrayFromImage(sitk.ReadImage(str(answer_file)))
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(cases / folder.name.replace("out_", "ref_", 1)
                                                                  / answer_file.name)))
            ratios = {level: wedge_ratio(answer == level) for level in args.levels
                      if (answer == level).sum() > 200 and clear_of_edges(answer == level)}
            report = numbering.get(answer_file.name, {})
            rows.append({"case": answer_file.name[:-len(ending)], "fold": int(folds),
                         "both_open": bool(report.get("top_open")) and bool(report.get("bottom_open")),
                         "truth": true_offset(answer, reference, args.levels), "wedge": best_offset(ratios, profile),
                         "ratios": {str(k): round(v, 3) for k, v in ratios.items()}})
    tallies = {"both_open": tally([r for r in rows if r["both_open"]]),
               "anchored": tally([r for r in rows if not r["both_open"]]), "all": tally(rows)}
    result = {"references": reference_check(labels, splits, args.levels), "rows": rows, "tally": tallies,
              "command": "python -m studies.wedge_numbering " + " ".join(sys.argv[1:] if argv is None else argv)}
    output = ensure_writable_folder(args.output)
    write_json(result, output / "wedge_numbering.json")
    write_text(markdown(result), output / "wedge_numbering.md")
    print(json.dumps(result["tally"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
