"""Does the review flag scans unlike the training scans? A lumbar model's prediction of real scans of another region
or modality (issue 34: "``spinediff predict`` flags scans that are out of distribution").

A user who hands a lumbar MRI model a CT, a cervical MRI or an axial abdominal MRI gets labels back all the same;
the review (``review.csv``) should say that these answers are not to be trusted. This study predicts such scans with
every trained fold of a model, post-processed and flagged as a user's scans are
(:func:`spinediff.experiments.stress.predict_postprocessed`: ``spinediff predict``, or ``nnUNetv2_predict`` +
``spinediff postprocess --images``), and tabulates each scan's flag and reasons.

The scans (:data:`SCANS`) are the real sample images of ``../shared/data/samples`` (see its README): a lumbar CT
cut-out, a cervical T2w MRI cut-out (TPTBox test data), an abdominal CT and an axial abdominal MRI (TotalSegmentator
test data). Their labels are not used: none holds L1-L5 as the model knows them, so there is no Dice to score, only
whether the review notices.

    python -m studies.review_other_scans \\
        -m $nnUNet_results/Dataset505_LumbarVB3VB2mixed/nnUNetTrainer__nnUNetPlans__2d_cpu -o OUT --device cpu

Writes ``OUT/review_other_scans.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

#: name: (file under the samples folder, what the scan is)
SCANS = {
    "lumbar_ct": ("tptbox/sub-ct_label-22_ct.nii.gz", "lumbar CT cut-out (L2-L4), 1.5 mm, HU"),
    "cervical_t2w": ("tptbox/sub-mri_label-6_T2w.nii.gz", "cervical T2w MRI cut-out (C5-C7), 1.5 mm"),
    "abdomen_ct": ("totalsegmentator/example_ct.nii.gz", "abdominal CT (T11-S1 in view), 3 mm, HU"),
    "abdomen_mr": ("totalsegmentator/example_mr_sm.nii.gz", "axial abdominal MRI, 3 mm, 20 slices"),
}
DEFAULT_SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "samples"


def scan_files(samples: Path, names: list[str]) -> dict[str, Path]:
    """The chosen scans' files under ``samples``, checked before any work (SystemExit naming the missing file)."""
    files = {}
    for name in names:
        path = samples / SCANS[name][0]
        if not path.is_file():
            raise SystemExit(f"{path} is missing: pass --samples FOLDER holding {SCANS[name][0]} "
                             f"(../shared/data/samples), or leave {name} out with --scans")
        files[name] = path
    return files


def summarise(flags: dict[str, dict], names: list[str]) -> dict:
    """Per scan its flag and reasons from ``review.csv`` (:func:`spinediff.inference.review.read_review_table`'s
    ``{case: {review, reasons}}``), and how many were flagged; a scan without a row counts as not flagged."""
    rows = []
    for name in names:
        flag = flags.get(name, {"review": False, "reasons": []})
        rows.append({"scan": name, "what": SCANS[name][1], "flagged": bool(flag["review"]),
                     "reasons": list(flag["reasons"]), "in_review_csv": name in flags})
    return {"scans": rows, "flagged": sum(r["flagged"] for r in rows), "total": len(rows)}


def markdown(result: dict) -> str:
    lines = [f"# The review on scans unlike the training scans: {result['model']}", "",
             f"Folds {', '.join(result['folds'])}; command: `{result['command']}`", "",
             f"**{result['flagged']} of {result['total']} flagged.**", "",
             "| scan | what | flagged | reasons (review.csv) |", "|---|---|---|---|"]
    for row in result["scans"]:
        reasons = "; ".join(row["reasons"]) if row["in_review_csv"] else "(no row in review.csv)"
        lines.append(f"| {row['scan']} | {row['what']} | {'yes' if row['flagged'] else '**no**'} | "
                     f"{reasons.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="the trained model's results folder")
    parser.add_argument("-o", "--output", required=True, help="folder for review_other_scans.json and .md")
    parser.add_argument("--samples", default=str(DEFAULT_SAMPLES), help="the real sample images' folder")
    parser.add_argument("--scans", nargs="+", choices=sorted(SCANS), default=list(SCANS), help="scans to predict")
    parser.add_argument("-f", "--folds", nargs="+", default=None, help="folds (default: every trained fold)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from spinediff.errors import SpineDiffError
    from spinediff.experiments.stress import StressSettings, predict_postprocessed
    from spinediff.inference.models import ModelFolder
    from spinediff.inference.review import read_review_table
    from spinediff.io import copy_file, ensure_writable_folder, write_json, write_text

    try:
        model = ModelFolder.open(Path(args.model))
    except (SpineDiffError, OSError) as error:
        raise SystemExit(f"{args.model}: not a trained model's results folder ({error})") from None
    folds = args.folds or model.available_folds()
    if not folds:
        raise SystemExit(f"{args.model} holds no trained fold (fold_*)")
    if len(model.dataset_json.get("channel_names", {"0": ""})) != 1:
        raise SystemExit(f"{args.model}: the model has more than one input channel; these scans have one")
    files = scan_files(Path(args.samples), list(args.scans))
    output = ensure_writable_folder(args.output)
    with tempfile.TemporaryDirectory() as scratch:
        inputs, predicted = Path(scratch) / "in", Path(scratch) / "out"
        inputs.mkdir()
        for name, path in files.items():
            shutil.copyfile(path, inputs / f"{name}_0000.nii.gz")
        predict_postprocessed(StressSettings(device=args.device), model, folds, inputs, predicted)
        flags = read_review_table(predicted / "review.csv")
        if (predicted / "review.csv").is_file():
            copy_file(predicted / "review.csv", output / "review.csv")
    result = {"model": str(model.path), "folds": list(folds), **summarise(flags, list(args.scans)),
              "command": "python -m studies.review_other_scans " + " ".join(sys.argv[1:] if argv is None else argv)}
    text = markdown(result)
    write_json(result, output / "review_other_scans.json")
    write_text(text, output / "review_other_scans.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
