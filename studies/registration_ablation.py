"""Ablation of landmark-based MR/CT registration: 0, 1 or 2 landmarks per vertebra (Graf et al.).

Usage::

    .venv/bin/python -m studies.registration_ablation [--cases 16] [--seed 0] [--work DIR]

1. ``spinediff phantom --task translation`` writes phantom subjects whose CT is misaligned by a
   random rigid transform of up to ``--max-translation-mm`` (20) and ``--max-rotation-deg`` (15),
   with the true transform saved beside it (``unaligned/``).
2. Two conditions of the vertebra masks the landmarks come from:

   - ``exact``: the phantom's masks, sampled from the same anatomy on the MR grid (sagittal,
     1.6 x 1.6 x 3.5 mm) and the CT grid (1.5 mm);
   - ``segmentation noise``: MR and CT masks come from different segmentations in practice, so
     each mask is perturbed independently: every vertebra's boundary moves by a smooth random
     displacement (signed distance + a Gaussian random field of standard deviation
     ``--noise-mm`` and correlation length ``--noise-correlation-mm``).

3. Each case is registered (``spinediff.registration.register_case``, rigid, landmarks from the
   masks) with 0 (identity), 1 (vertebra centroids) and 2 (body + posterior-elements centroids)
   landmarks per vertebra. Target registration error (TRE) = distance between where the
   estimated and the true transform send each MR vertebra voxel; per case its mean and maximum.
   Rotation error = angle of R_est R_true^T; "axial" = its component about the spine's long axis.

Results: ``benchmarks/output/registration_ablation.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import distance_transform_edt, gaussian_filter

from spinediff.errors import SpineDiffError
from spinediff.registration import align
from spinediff.registration.api import RegistrationSettings, find_unaligned_cases, register_case
from spinediff.registration.landmarks import vertebra_voxels

OUTPUT = Path(__file__).resolve().parents[1] / "benchmarks" / "output"
MODES = (0, 1, 2)


def make_phantom(work: Path, cases: int, seed: int, max_translation: float, max_rotation: float) -> Path:
    command = [
        sys.executable,
        "-m",
        "spinediff.cli",
        "phantom",
        "-o",
        str(work),
        "--task",
        "translation",
        "--cases",
        str(cases),
        "--seed",
        str(seed),
        "--max-translation-mm",
        str(max_translation),
        "--max-rotation-deg",
        str(max_rotation),
    ]
    print("$ spinediff", " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True)
    return find_phantom(work)


def find_phantom(work: Path) -> Path | None:
    found = sorted(work.glob("Dataset*_SpinePhantomTranslation/unaligned"))
    return found[0] if found else None


def perturb_mask(mask: sitk.Image, noise_mm: float, correlation_mm: float, rng: np.random.Generator) -> sitk.Image:
    """Move every label's boundary by a smooth random displacement (see module doc)."""
    array = sitk.GetArrayFromImage(mask)
    spacing = np.asarray(mask.GetSpacing())[::-1]  # numpy (z, y, x) order
    margin = np.ceil(4 * noise_mm / spacing).astype(int) + 1
    best = np.full(array.shape, np.inf, dtype=np.float32)
    out = np.zeros_like(array)
    for label in np.unique(array[(array > 0) & (array < 100)]):
        inside = array == label
        index = np.nonzero(inside)
        low = np.maximum(np.min(index, axis=1) - margin, 0)
        high = np.minimum(np.max(index, axis=1) + margin + 1, array.shape)
        box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
        region = inside[box]
        signed = (
            distance_transform_edt(~region, sampling=spacing) - distance_transform_edt(region, sampling=spacing)
        ).astype(np.float32)
        field = gaussian_filter(
            rng.standard_normal(region.shape).astype(np.float32), sigma=correlation_mm / spacing / np.sqrt(2)
        )
        field *= noise_mm / max(float(field.std()), 1e-6)
        value = signed + field
        take = (value < 0) & (value < best[box])
        best[box][take] = value[take]
        out[box][take] = label
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(mask)
    return image


def noisy_copy(unaligned: Path, target: Path, noise_mm: float, correlation_mm: float, seed: int) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(sorted(unaligned.iterdir())):
        if path.name.endswith("_vertebrae.nii.gz"):
            rng = np.random.default_rng([seed, index])
            noisy = perturb_mask(sitk.ReadImage(str(path)), noise_mm, correlation_mm, rng)
            sitk.WriteImage(noisy, str(target / path.name), True)
        elif not (target / path.name).exists():
            (target / path.name).symlink_to(path)
    return target


def spine_axis(mr_mask: sitk.Image) -> np.ndarray:
    """Long axis of the spine: first principal axis of the vertebra centroids."""
    centroids = np.array([cloud.mean(axis=0) for cloud in vertebra_voxels(mr_mask).points.values()])
    _, _, vt = np.linalg.svd(centroids - centroids.mean(axis=0))
    return vt[0]


def axial_rotation_deg(estimated: sitk.Transform, true: sitk.Transform, axis: np.ndarray) -> float:
    difference = (
        align.rotation_of(align.transform_to_matrix(estimated)) @ align.rotation_of(align.transform_to_matrix(true)).T
    )
    vector = sitk.VersorTransform()
    vector.SetMatrix([float(v) for v in difference.ravel()])
    versor = np.asarray(vector.GetVersor())  # (x, y, z, w) = axis * sin(angle / 2), cos(angle / 2)
    angle = 2 * np.degrees(np.arctan2(np.linalg.norm(versor[:3]), versor[3]))
    if angle < 1e-9:
        return 0.0
    return float(abs(angle * (versor[:3] / np.linalg.norm(versor[:3])) @ axis))


def run_condition(unaligned: Path) -> dict:
    results: dict[str, list[dict]] = {str(mode): [] for mode in MODES}
    for case in find_unaligned_cases(unaligned):
        true = sitk.ReadTransform(str(case.true_transform))
        axis = spine_axis(sitk.ReadImage(str(case.mr_vertebrae)))
        for mode in MODES:
            settings = RegistrationSettings(landmarks_per_vertebra=mode, overlay=False)
            try:
                registered = register_case(case, settings)
            except SpineDiffError as exc:
                results[str(mode)].append({"case": case.case_id, "status": "failed", "error": str(exc)})
                continue
            report = registered.report
            results[str(mode)].append(
                {
                    "case": case.case_id,
                    "status": "ok",
                    "tre_mean_mm": report.tre_mm["mean"],
                    "tre_max_mm": report.tre_mm["max"],
                    "rotation_error_deg": report.rotation_error_deg,
                    "axial_rotation_error_deg": axial_rotation_deg(registered.transform, true, axis),
                    "vertebrae": len(report.vertebrae_used),
                    "excluded": report.vertebrae_excluded,
                }
            )
    return results


def summarise(results: dict) -> dict:
    summary = {}
    for mode, rows in results.items():
        ok = [r for r in rows if r["status"] == "ok"]

        def stat(key: str, ok=ok) -> tuple[float, float]:
            values = np.array([r[key] for r in ok])
            return float(np.median(values)), float(values.max())

        summary[mode] = {
            "cases": len(rows),
            "failed": len(rows) - len(ok),
            "tre_median_of_case_means_mm": stat("tre_mean_mm")[0],
            "tre_max_mm": stat("tre_max_mm")[1],
            "rotation_error_median_deg": stat("rotation_error_deg")[0],
            "rotation_error_max_deg": stat("rotation_error_deg")[1],
            "axial_rotation_error_median_deg": stat("axial_rotation_error_deg")[0],
            "axial_rotation_error_max_deg": stat("axial_rotation_error_deg")[1],
        }
    return summary


def markdown(config: dict, summaries: dict, results: dict) -> str:
    lines = [
        "# Registration ablation: landmarks per vertebra",
        "",
        f"{config['cases']} phantom subjects (seed {config['seed']}), CT misaligned by up to "
        f"{config['max_translation_mm']:g} mm / {config['max_rotation_deg']:g} degrees; rigid transform. "
        "TRE over the MR vertebra voxels: median over cases of the per-case mean, and the largest voxel "
        "error of any case. Rotation error: median / max over cases; axial = about the spine's long axis.",
        "",
        "| masks | landmarks / vertebra | cases registered | TRE median (mm) | TRE max (mm) "
        "| rotation error median / max (deg) | axial rotation error median / max (deg) |",
        "|---|---|---|---|---|---|---|",
    ]
    for condition, summary in summaries.items():
        for mode, s in summary.items():
            lines.append(
                f"| {condition} | {mode} | {s['cases'] - s['failed']} / {s['cases']} "
                f"| {s['tre_median_of_case_means_mm']:.2f} | {s['tre_max_mm']:.2f} "
                f"| {s['rotation_error_median_deg']:.2f} / {s['rotation_error_max_deg']:.2f} "
                f"| {s['axial_rotation_error_median_deg']:.2f} / {s['axial_rotation_error_max_deg']:.2f} |"
            )
    lines.append("")
    for condition, per_mode in results.items():
        one = {r["case"]: r for r in per_mode["1"] if r["status"] == "ok"}
        two = {r["case"]: r for r in per_mode["2"] if r["status"] == "ok"}
        both = sorted(set(one) & set(two))
        better = sum(two[c]["rotation_error_deg"] < one[c]["rotation_error_deg"] for c in both)
        lines.append(
            f"- {condition}: 2 landmarks/vertebra give a lower rotation error than 1 in {better} of the "
            f"{len(both)} cases registered by both."
        )
    failures = [
        (condition, mode, r)
        for condition, per_mode in results.items()
        for mode, rows in per_mode.items()
        for r in rows
        if r["status"] != "ok"
    ]
    if failures:
        lines += ["", "Refused cases (clear error, nothing registered):", ""]
        lines += [f"- {condition}, {mode} landmark(s): {r['error']}" for condition, mode, r in failures]
    lines += [
        "",
        f"Noise model: boundary displacement std {config['noise_mm']:g} mm, correlation length "
        f"{config['noise_correlation_mm']:g} mm, independent in MR and CT. Run time "
        f"{config['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-translation-mm", type=float, default=20.0)
    parser.add_argument("--max-rotation-deg", type=float, default=15.0)
    parser.add_argument("--noise-mm", type=float, default=1.0)
    parser.add_argument("--noise-correlation-mm", type=float, default=8.0)
    parser.add_argument("--work", type=Path, help="keep the phantom here (default: a temporary folder)")
    args = parser.parse_args()
    start = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="registration_ablation_"))
    try:
        unaligned = find_phantom(work)
        if unaligned is None:
            unaligned = make_phantom(work, args.cases, args.seed, args.max_translation_mm, args.max_rotation_deg)
        noisy = noisy_copy(
            unaligned, work / f"noisy_{args.noise_mm:g}mm", args.noise_mm, args.noise_correlation_mm, args.seed
        )
        results = {}
        for condition, folder in (("exact", unaligned), (f"segmentation noise {args.noise_mm:g} mm", noisy)):
            print(f"registering ({condition}) ...", flush=True)
            results[condition] = run_condition(folder)
        summaries = {condition: summarise(rows) for condition, rows in results.items()}
        config = {
            "cases": args.cases,
            "seed": args.seed,
            "max_translation_mm": args.max_translation_mm,
            "max_rotation_deg": args.max_rotation_deg,
            "noise_mm": args.noise_mm,
            "noise_correlation_mm": args.noise_correlation_mm,
            "seconds": time.time() - start,
            "transform": "rigid",
        }
        OUTPUT.mkdir(exist_ok=True)
        (OUTPUT / "registration_ablation.json").write_text(
            json.dumps({"config": config, "summary": summaries, "cases": results}, indent=2) + "\n"
        )
        text = markdown(config, summaries, results)
        (OUTPUT / "registration_ablation.md").write_text(text)
        print(text)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
