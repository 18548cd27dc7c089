"""How much of the spine beyond L1 and L5 must a scan show for the level numbering to hold? (issue 34)

The stress test cuts 20 % or 35 % off a scan's end; this study reads a stress test run with a sweep of cuts instead
(``benchmarks/stress_position.py --variants plain crop_top_5 crop_top_10 ... crop_bottom_30``, variants named by
their amounts) and puts each answer beside what the cut left of the anatomy: the room between the scan's new edge
and the first level's far face (above L1) or the last level's (below L5), in mm along the spine, from the case's
reference labels; negative when the cut runs into that level. Answers are grouped by that room, and each group
reports how many were numbered wrong (level Dice below 0.5, the stress test's failure) and how many of those the
review flagged. A user reads off what a scan must show (e.g. "the sacrum's top", "a vertebra above L1") before the
numbering can be trusted without looking.

    python benchmarks/stress_position.py -d 505 -c 2d_cpu -tr nnUNetTrainer -j 2 -o SWEEP --device cpu \\
        --variants plain crop_top_5 crop_top_10 crop_top_15 crop_top_20 crop_top_25 crop_top_30 \\
                   crop_bottom_5 crop_bottom_10 crop_bottom_15 crop_bottom_20 crop_bottom_25 crop_bottom_30
    python -m studies.fov_sweep --stress SWEEP/stress_position.json --raw $nnUNet_raw/Dataset505_LumbarVB3VB2mixed \\
        -o OUT

Writes ``OUT/fov_sweep.json``, ``.md`` and ``.png`` (level Dice against the room left, one panel per end).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

#: The groups of room left beyond the end level (mm; lower bounds, the first group open below).
ROOM_EDGES_MM = (0.0, 10.0, 20.0)
#: A level Dice below this is a failure (the stress test's: :data:`spinediff.evaluation.stress_figure.FAILURE`).
FAILURE = 0.5


def end_faces(label: np.ndarray, axis: int, sign: int, first: int, last: int) -> tuple[int, int] | None:
    """The array index (along ``axis``) of the first level's face towards the top of the scan and of the last
    level's face towards its bottom, where the top is the low-index end for ``sign`` +1 and the high-index end for
    -1; None when either level is absent."""
    def extent(value: int) -> tuple[int, int] | None:
        other = tuple(a for a in range(label.ndim) if a != axis)
        present = np.flatnonzero(np.any(label == value, axis=other))
        return (int(present.min()), int(present.max())) if present.size else None

    top, bottom = extent(first), extent(last)
    if top is None or bottom is None:
        return None
    return (top[0], bottom[1]) if sign > 0 else (top[1], bottom[0])


def room_left(faces: tuple[int, int], length: int, sign: int, fractions, spacing: float) -> tuple[float, float]:
    """The room (mm) between the scan's edges after a variant's crop (``fractions``, as the stress test applies them:
    :func:`~spinediff.experiments.stress_variants.kept_range`) and the first level's top face / the last level's
    bottom face (``faces``: :func:`end_faces`); negative when the cut runs into the level."""
    from spinediff.experiments.stress_variants import kept_range

    start, stop = kept_range(length, fractions, sign)
    top_face, bottom_face = faces
    if sign > 0:
        return (top_face - start) * spacing, (stop - 1 - bottom_face) * spacing
    return (stop - 1 - top_face) * spacing, (bottom_face - start) * spacing


def room_group(room: float) -> str:
    """The name of the group of :data:`ROOM_EDGES_MM` that ``room`` (mm) falls in."""
    if room < ROOM_EDGES_MM[0]:
        return "cut into the level"
    for low, high in zip(ROOM_EDGES_MM, ROOM_EDGES_MM[1:], strict=False):
        if room < high:
            return f"{low:g}-{high:g} mm"
    return f"≥ {ROOM_EDGES_MM[-1]:g} mm"


GROUPS = ("cut into the level",
          *(f"{low:g}-{high:g} mm" for low, high in zip(ROOM_EDGES_MM, ROOM_EDGES_MM[1:], strict=False)),
          f"≥ {ROOM_EDGES_MM[-1]:g} mm")


def end_of(fractions) -> str | None:
    """Which end a variant cuts: "top", "bottom", None for the plain scan (both ends as they are); "other" for any
    variant that pads, shifts or cuts both ends."""
    crop_top, crop_bottom, pad_top, pad_bottom = fractions
    if pad_top or pad_bottom or (crop_top and crop_bottom):
        return "other"
    return "top" if crop_top else "bottom" if crop_bottom else None


def sweep_rows(result: dict, geometry: dict[str, dict]) -> list[dict]:
    """One row per answer of ``result`` (a stress test's JSON) on its own dataset's scans: the end the variant cuts,
    the room left at each end (``geometry``: per case its ``faces``, ``length``, ``sign`` and ``spacing`` along the
    spine), the level Dice, whether it failed and whether the review flagged it. The plain scans count at both ends."""
    rows = []
    for case in result["cases"]:
        if case["source"] != result["dataset"] or case["case"] not in geometry:
            continue
        fractions = result["variants"][case["variant"]]
        end = end_of(fractions)
        if end == "other":
            continue
        g = geometry[case["case"]]
        top, bottom = room_left(g["faces"], g["length"], g["sign"], fractions, g["spacing"])
        dice = float(case["level_dice"])
        rows.append({"case": case["case"], "variant": case["variant"], "end": end, "room_top_mm": round(top, 1),
                     "room_bottom_mm": round(bottom, 1), "level_dice": dice,
                     "failed": not dice >= FAILURE, "flagged": case.get("flagged")})
    return rows


def grouped(rows: list[dict]) -> list[dict]:
    """Per end (top, bottom) and room group: answers, failures, failures flagged, mean level Dice. The plain scans
    count at both ends, each in the group of its room there."""
    table = []
    for end, key in (("top", "room_top_mm"), ("bottom", "room_bottom_mm")):
        mine = [r for r in rows if r["end"] in (end, None)]
        for group in GROUPS:
            members = [r for r in mine if room_group(r[key]) == group]
            if not members:
                continue
            failures = [r for r in members if r["failed"]]
            judged = [r for r in failures if r["flagged"] is not None]
            table.append({"end": end, "room": group, "answers": len(members), "failures": len(failures),
                          "failures_flagged": sum(bool(r["flagged"]) for r in judged) if judged else None,
                          "cases_failing": sorted({r["case"] for r in failures}),
                          "mean_level_dice": float(np.nanmean([r["level_dice"] for r in members]))})
    return table


def markdown(summary: dict) -> str:
    lines = [f"# How much beyond L1 and L5 a scan must show: {summary['model']}", "",
             f"Stress test: `{summary['stress_command']}`", "",
             "Room left between the scan's edge and the end level's far face (mm along the spine, from the reference "
             "labels; the plain scans count at both ends). A failure: level Dice < 0.5.", "",
             "| end cut | room left beyond the end level | answers | numbered wrong | of them flagged "
             "| mean level Dice | scans numbered wrong |", "|---|---|---|---|---|---|---|"]
    for row in summary["groups"]:
        flagged = "" if row["failures_flagged"] is None else str(row["failures_flagged"])
        level = "L1" if row["end"] == "top" else "L5"
        room = row["room"].replace("the level", level)
        lines.append(f"| {row['end']} | {room} | {row['answers']} | {row['failures']} | {flagged} | "
                     f"{row['mean_level_dice']:.3f} | {', '.join(row['cases_failing']) or '–'} |")
    lines += ["", "Per scan (level Dice; **bold**: numbered wrong; † flagged by the review):", "",
              "| scan | " + " | ".join(summary["variants"]) + " |", "|---|" + "---|" * len(summary["variants"])]
    for case in summary["cases"]:
        cells = []
        for variant in summary["variants"]:
            row = next((r for r in summary["rows"] if r["case"] == case and r["variant"] == variant), None)
            if row is None:
                cells.append("")
                continue
            text = f"{row['level_dice']:.2f}"
            cells.append((f"**{text}**" if row["failed"] else text) + (" †" if row["flagged"] else ""))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], target: Path) -> None:
    """Level Dice against the room left, one panel per end; failures below the dashed line, flagged answers filled."""
    from spinediff.utilities.figures import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (end, key, level) in zip(axes, (("top", "room_top_mm", "L1"), ("bottom", "room_bottom_mm", "L5")),
                                     strict=True):
        mine = [r for r in rows if r["end"] == end]
        plain = [r for r in rows if r["end"] is None]
        for group, colour, label in ((mine, "tab:blue", f"{end} cut"), (plain, "tab:gray", "plain scan")):
            x = np.array([r[key] for r in group], dtype=float)
            y = np.array([r["level_dice"] for r in group], dtype=float)
            flagged = np.array([bool(r["flagged"]) for r in group])
            if len(group):
                ax.scatter(x[~flagged], y[~flagged], s=22, facecolors="none", edgecolors=colour, label=label)
                ax.scatter(x[flagged], y[flagged], s=22, color=colour, label=f"{label}, flagged")
        ax.axhline(FAILURE, color="k", linestyle="--", linewidth=0.8)
        ax.axvline(0.0, color="tab:red", linewidth=0.8)
        ax.set_xlabel(f"room left {'above' if end == 'top' else 'below'} {level} (mm; < 0: the cut runs into {level})")
        ax.set_title(f"scans cut at the {end}")
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("mean L1-L5 Dice of the answer")
    fig.tight_layout()
    save_figure(fig, target)


def case_geometry(raw: Path, cases: list[str], ending: str, direction) -> dict[str, dict]:
    """Per case of ``raw``'s labelsTr: the end levels' faces along the spine, the scan's length and sign along it,
    and its spacing (mm)."""
    import SimpleITK as sitk

    from spinediff.inference.level_geometry import spine_array_axis

    geometry = {}
    for case in cases:
        path = raw / "labelsTr" / f"{case}{ending}"
        if not path.is_file():
            continue
        image = sitk.ReadImage(str(path))
        label = sitk.GetArrayFromImage(image)
        axis, sign = spine_array_axis(image, direction)
        faces = end_faces(label, axis, sign, 1, 5)
        if faces is None:
            continue
        geometry[case] = {"faces": faces, "length": int(label.shape[axis]), "sign": sign,
                          "spacing": float(image.GetSpacing()[::-1][axis])}
    return geometry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stress", required=True, help="a stress test's stress_position.json, with crop_top_N and "
                                                        "crop_bottom_N variants")
    parser.add_argument("--raw", required=True, help="the model's raw dataset folder (its labelsTr)")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)

    from spinediff.io import ensure_writable_folder, read_json, write_json, write_text

    raw, stress = Path(args.raw), Path(args.stress)
    if not stress.is_file() or not (raw / "labelsTr").is_dir():
        parser.error(f"--stress {stress} is not a file or --raw {raw} holds no labelsTr: give a stress test's "
                     "stress_position.json and the model's raw dataset folder")
    result = read_json(stress)
    ending = read_json(raw / "dataset.json").get("file_ending", ".nii.gz")
    labels = result["labels"]
    if labels != [1, 2, 3, 4, 5]:
        parser.error(f"--stress {stress}: levels {labels}; this study reads L1-L5 = labels 1-5")
    cases = sorted({c["case"] for c in result["cases"] if c["source"] == result["dataset"]})
    geometry = case_geometry(raw, cases, ending, result["level_direction"])
    rows = sweep_rows(result, geometry)
    if not rows:
        parser.error(f"--stress {stress} holds no answers on {raw.name}'s scans with L1 and L5 in their labels: "
                     "give the stress test of a model trained on --raw")
    variants = [v for v in result["variants"] if end_of(result["variants"][v]) != "other"]
    summary = {"model": Path(result["model"]).name, "dataset": result["dataset"], "stress": str(stress),
               "stress_command": result.get("command", ""), "room_edges_mm": list(ROOM_EDGES_MM),
               "variants": variants, "cases": sorted({r["case"] for r in rows}), "groups": grouped(rows),
               "rows": rows, "made_by": "python -m studies.fov_sweep " + " ".join(sys.argv[1:] if argv is None
                                                                              else argv)}
    out = ensure_writable_folder(args.output)
    write_json(summary, out / "fov_sweep.json")
    write_text(markdown(summary), out / "fov_sweep.md")
    figure(rows, out / "fov_sweep.png")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
