"""Does a scan's level numbering survive further crops? A check of "counting from the most certain end" by test-time
crops (issue 34), on the cases a stress test kept (``benchmarks/stress_position.py --keep``).

Each chosen scan (a stress variant, e.g. ``vb3_013:crop_top_20``) is cropped again along the spine (``t15``: 15 %
off the top, i.e. the first level's side; ``b30``: 30 % off the bottom; ...) and predicted by the fold that held the
case out, post-processed as a user's scans are (:func:`spinediff.experiments.stress.predict_postprocessed`). Each
predicted level is then matched to the reference level whose centroid lies nearest along the spine (world
coordinates, so crops need no bookkeeping; within half a level pitch, else ``?``). If a wrong numbering were an
accident of one field of view, other crops of the same scan would number it right and a vote over crops could repair
it; if the same scans go wrong under every crop that removes the same end, no vote can.

    python -m studies.crop_consistency -m $nnUNet_results/Dataset505_LumbarVB3VB2mixed/MODEL \\
        --stress-cases KEEP/stress_cases --cases vb3_013:plain vb3_013:crop_top_20 vb3_008:crop_bottom_20 -o OUT

Writes ``OUT/crop_consistency.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CROPS = {"t15": (0.15, 0.0, 0.0, 0.0), "t30": (0.30, 0.0, 0.0, 0.0), "b15": (0.0, 0.15, 0.0, 0.0),
         "b30": (0.0, 0.30, 0.0, 0.0)}


def positions(path: Path, labels: list[int], direction) -> dict[int, float]:
    """Each label's centroid (mm) along the spine ``direction`` in the label image at ``path``."""
    import SimpleITK as sitk

    from spinediff.inference.level_order import label_centroids

    image = sitk.ReadImage(str(path))
    centres = label_centroids(image, sitk.GetArrayFromImage(image), labels)
    return {int(k): float(np.dot(v, direction)) for k, v in centres.items()}


def match_levels(predicted: dict[int, float], reference: dict[int, float], pitch: float) -> dict[int, int | None]:
    """Predicted level → the reference level nearest along the spine (None when none lies within half a pitch)."""
    matched = {}
    for level, where in sorted(predicted.items()):
        nearest = min(reference, key=lambda r: abs(reference[r] - where)) if reference else None
        matched[level] = nearest if nearest is not None and abs(reference[nearest] - where) <= pitch / 2 else None
    return matched


def verdict(matched: dict[int, int | None]) -> str:
    """``right`` when every predicted level sits on its own reference level, ``shifted`` when every matched one sits
    on another, ``mixed`` otherwise (``none``: nothing predicted)."""
    pairs = [(p, r) for p, r in matched.items() if r is not None]
    if not matched:
        return "none"
    if all(p == r for p, r in pairs) and len(pairs) == len(matched):
        return "right"
    if pairs and all(p != r for p, r in pairs):
        return "shifted"
    return "mixed"


@dataclass(frozen=True)
class KeptCase:
    """Where a stress test kept one varied case (``benchmarks/stress_position.py --keep``: ``in_``, ``ref_`` and
    ``out_<dataset>_<folds>`` folders)."""

    image: Path  #: the varied input, first channel
    reference: Path  #: the reference cut as the input
    folds: list[str]  #: the fold(s) that predicted it
    answer: Path  #: the answer as a user gets it (post-processed)
    raw_answer: Path  #: the network's answer before the post-processing (``answer`` when none was kept)


def find_case(stress_cases: Path, stem: str, ending: str) -> KeptCase:
    """The kept input, reference, fold(s) and answers of the stress variant ``stem`` (LookupError naming what is
    missing: the answers are checked by their users)."""
    from spinediff.experiments.stress_report import TRAINING_FOLDER_MARK

    for inputs in sorted(stress_cases.glob("in_*")):
        image = inputs / f"{stem}_0000{ending}"
        if image.is_file() and TRAINING_FOLDER_MARK not in inputs.name:  # the held-out answer
            suffix = inputs.name[len("in_"):]
            tokens = suffix.split("_")
            folds = []
            while tokens and tokens[-1].isdigit():  # in_<dataset>_<fold>[_<fold>...]
                folds.insert(0, tokens.pop())
            reference = stress_cases / f"ref_{suffix}" / f"{stem}{ending}"
            if not reference.is_file() or not folds:
                raise LookupError(f"{stem}: {reference} or the fold in {inputs.name} is missing; keep the stress "
                                  "cases whole (benchmarks/stress_position.py --keep).")
            answer = stress_cases / f"out_{suffix}" / f"{stem}{ending}"
            raw = answer.parent / "nnunet_raw_output" / answer.name
            return KeptCase(image, reference, folds, answer, raw if raw.is_file() else answer)
    raise LookupError(f"{stem}: no kept input in {stress_cases}/in_* (run benchmarks/stress_position.py --keep, "
                      "and name the cases as CASE:VARIANT).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", required=True, help="the trained model folder (TRAINER__PLANS__CONFIG)")
    parser.add_argument("--stress-cases", required=True, type=Path, help="a stress test's kept cases (stress_cases)")
    parser.add_argument("--cases", nargs="+", required=True, metavar="CASE:VARIANT")
    parser.add_argument("--crops", nargs="+", default=list(CROPS), choices=list(CROPS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", required=True, type=Path)
    args = parser.parse_args(argv)

    import SimpleITK as sitk

    from spinediff.datasets.dataset_json import foreground_labels
    from spinediff.experiments.stress import (
        StressSettings,
        dataset_level_order,
        predict_postprocessed,
        spine_array_axis,
    )
    from spinediff.experiments.stress_variants import make_variant
    from spinediff.inference.models import ModelFolder
    from spinediff.io import write_json, write_text
    from spinediff.paths import nnunet_folder

    model = ModelFolder.open(Path(args.model))
    raw = nnunet_folder("raw") / model.path.parent.name
    ending = model.dataset_json.get("file_ending", ".nii.gz")
    try:  # every case found before any prediction
        kept = {item: find_case(args.stress_cases, item.replace(":", "-"), ending) for item in args.cases}
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 2
    order = dataset_level_order(raw)
    labels = [int(v) for v in order.labels if v in foreground_labels(model.dataset_json)]
    direction = np.asarray(order.direction, dtype=float)
    rows, work = [], Path(tempfile.mkdtemp(prefix="crop_consistency_"))
    try:
        for item in args.cases:
            stem = item.replace(":", "-")
            image_path, reference_path, folds = kept[item].image, kept[item].reference, kept[item].folds
            image, reference = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(reference_path))
            truth = positions(reference_path, labels, direction)
            pitch = float(np.median(np.diff(sorted(truth.values())))) if len(truth) > 1 else 35.0
            axis, sign = spine_array_axis(reference, order.direction)
            inputs, outputs = work / f"in_{stem}", work / f"out_{stem}"
            inputs.mkdir()
            sitk.WriteImage(image, str(inputs / f"{stem}-asis_0000{ending}"), True)
            for crop in args.crops:
                cropped, _ = make_variant(image, reference, axis, sign, CROPS[crop])
                sitk.WriteImage(cropped, str(inputs / f"{stem}-{crop}_0000{ending}"), True)
            predict_postprocessed(StressSettings(device=args.device), model, folds, inputs, outputs)
            for crop in ["asis", *args.crops]:
                matched = match_levels(positions(outputs / f"{stem}-{crop}{ending}", labels, direction), truth, pitch)
                rows.append({"case": item, "crop": crop, "folds": folds, "verdict": verdict(matched),
                             "levels": {str(k): v for k, v in matched.items()}})
                print(f"{item:28s} {crop:5s} {verdict(matched):8s} "
                      + " ".join(f"{k}->{'?' if v is None else v}" for k, v in matched.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.output.mkdir(parents=True, exist_ok=True)
    command = "python -m studies.crop_consistency " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json({"model": str(model.path), "crops": {k: list(CROPS[k]) for k in args.crops}, "rows": rows,
                "command": command}, args.output / "crop_consistency.json")
    lines = ["# Level numbering under further crops", "", f"Model `{model.path.name}`; command: `{command}`", "",
             "Predicted level → the reference level it sits on (`?`: none within half a pitch).", "",
             "| scan | " + " | ".join(["as is", *args.crops]) + " |", "|---|" + "---|" * (len(args.crops) + 1)]
    for item in args.cases:
        cells = []
        for crop in ["asis", *args.crops]:
            row = next(r for r in rows if r["case"] == item and r["crop"] == crop)
            cells.append(f"{row['verdict']}: " + " ".join(f"{k}→{'?' if v is None else v}"
                                                          for k, v in row["levels"].items()))
        lines.append(f"| {item} | " + " | ".join(cells) + " |")
    write_text("\n".join(lines) + "\n", args.output / "crop_consistency.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
