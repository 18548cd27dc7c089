"""Issue 35's uncertainty comparison on Dataset501 from the benchmark's own cross-validation exports: nnU-Net's trainer
(its softmax probabilities) against nnU-Net + diffusion refinement (the mean of its K refined samples' class
probabilities), each case scored by the fold that held it out, as trained (no post-processing).

For each model: the pooled voxel AUROC of its uncertainty maps for wrong voxels and the expected calibration error
(ECE) of the predicted class's probability, within 5 voxels of the predicted or true vertebrae; per case score the
AURC and e-AURC with 1 - mean L1-L5 Dice as the risk (:mod:`spinediff.evaluation.failure_detection`), and the
inference seconds per case from the benchmark's timing (the refiner's includes nnU-Net's).

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...   # after spinediff benchmark -d 501 --methods
    python -m studies.refinement_uncertainty501 -o OUT                 #   nnUNetTrainer DiffusionRefinementTrainer

Writes OUT/results.json and OUT/results.md. ``--members 3`` adds the issue's comparison, an ensemble of three nnU-Net
models per fold (the benchmark's and two more trained with other seeds at the same plans' budget: ``python -m
studies.uncertainty_cv501 --train-member M`` with ``nnUNet_results`` at ``ensemble_members/memberM``, or
``--members 3`` of that study, which trains them side by side); its time per case is the sum of its members'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from studies.uncertainty_cv501 import (
    NAME,
    dataset_folders,
    ensemble_summary,
    markdown,
    member_root,
    method_summary,
    read_array,
)

MODELS = {"nnU-Net": "nnUNetTrainer__nnUNetPlans__2d_cpu",
          "nnU-Net + diffusion refinement": "DiffusionRefinementTrainer__nnUNetPlans__2d_diffusion"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True, help="folder for results.json and results.md")
    parser.add_argument("--members", type=int, default=1,
                        help="also score the ensemble of this many nnU-Net models per fold (already trained)")
    args = parser.parse_args(argv)
    from spinediff.io import read_json, write_json, write_text

    folders = dataset_folders()
    if folders is None:
        return 0
    raw, results_root, splits = folders
    if args.members > 1:
        missing = [str(member_root(results_root, m)) for m in range(1, args.members)
                   if not all((member_root(results_root, m) / NAME / MODELS["nnU-Net"] / f"fold_{f}" / "validation"
                               ).is_dir() for f in range(len(splits)))]
        if missing:
            print(f"--members {args.members}: no finished members in {', '.join(missing)}; train them first "
                  "(python -m studies.uncertainty_cv501 --members N)", file=sys.stderr)
            return 2
    labels = {case: read_array(raw / "labelsTr" / f"{case}.nii.gz") for split in splits for case in split["val"]}
    methods = {}
    for method, model in MODELS.items():
        folder = results_root / model
        missing = [f for f in range(len(splits)) if not (folder / f"fold_{f}" / "validation").is_dir()]
        if missing:
            print(f"skipped {method}: {folder} has no validation of fold(s) {missing}")
            continue
        timings = [folder / f"fold_{f}" / "benchmark_timing.json" for f in range(len(splits))]
        seconds = [read_json(t)["inference_seconds_per_case"] for t in timings if t.is_file()]
        if model.startswith("DiffusionRefinement"):  # its row runs nnU-Net first
            nnunet = results_root / MODELS["nnU-Net"]
            seconds = [s + read_json(nnunet / f"fold_{f}" / "benchmark_timing.json")["inference_seconds_per_case"]
                       for f, s in enumerate(seconds)]
        methods[method] = dict(method_summary(lambda fold, folder=folder: folder / f"fold_{fold}" / "validation",
                                              splits, labels),
                               seconds_per_case=float(np.mean(seconds)) if seconds else None)
    if args.members > 1:
        methods[f"nnU-Net, {args.members} models"] = ensemble_summary(args.members, results_root, splits, labels)
    results = {"dataset": NAME, "methods": methods, "command": "python -m studies.refinement_uncertainty501 "
                                                                + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "results.json")
    write_text(markdown(results), out / "results.md")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
