"""Inference time and peak memory per volume: `spinediff predict` (diffusion segmentation) vs nnU-Net's predictor.

Usage::

    python benchmarks/perf_inference.py [--quick] [--iterations N] [--repeats R]

Both sides predict the same validation volumes of the tiny phantom (fold 0) from the raw files to an
output file in the raw geometry, each side in its own fresh subprocess (one thread), so that peak
resident memory is that side's alone:

* diffusion: ``DiffusionSegmentationTrainer`` (``2d_diffusion``), what ``spinediff predict -f 0``
  does per case (``SpineDiffPredictor.predict_case``: read and check the files, nnU-Net's
  preprocessing, DDIM ensemble, export), at the plans' steps and ensemble size K (CPU default: no
  mirroring); also K = 1, the fewest steps ``perf_sampling_quality.py`` found within 1 % of 50 steps
  (if it ran), and the plans' setting with all K members of a slice in one network call;
* nnU-Net: ``nnUNetTrainer`` on ``2d_cpu`` (same patch, batch and topology), ``nnUNetPredictor``
  with its defaults (Gaussian sliding window, step 0.5, mirroring over the trainer's axes) through
  ``predict_single_npy_array`` on the read images, writing the file: what ``nnUNetv2_predict`` does
  per case, in one process (the command itself preprocesses and exports in worker processes); also
  with mirroring off (``--disable_tta``).

Both models are trained for the same number of iterations (``perf_common.trained_model``). Time per
volume is the median over repeats after a warm-up; Dice is the mean foreground Dice of the written
file against the raw reference. Memory: the worker reads its own ``VmHWM`` (peak RSS) from
``/proc/self/status`` and, after resetting it (``/proc/self/clear_refs``) once model and inputs are
loaded, the peak increase during prediction.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import perf_common as pc
import torch

TARGET_TIME_RATIO = 5.0


def memory_kib() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")}


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (``VmHWM``); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def dice(prediction: np.ndarray, reference: np.ndarray, num_classes: int, spacing) -> float:
    from spinediff.metrics.segmentation_metrics import segmentation_metrics

    scores = segmentation_metrics(prediction, reference, list(range(1, num_classes)), spacing)
    values = [v["dice"] for v in scores.values() if not np.isnan(v["dice"])]
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------- workers
def raw_case_files(key: str, channels: int) -> tuple[Path, ...]:
    raw = pc.WORK / "raw" / pc.DATASET_NAMES[pc.SEGMENTATION] / "imagesTr"
    return tuple(raw / f"{key}_{c:04d}.nii.gz" for c in range(channels))


def score_file(prediction: Path, key: str, num_classes: int) -> float:
    """Mean foreground Dice of a written label map against the raw reference."""
    import SimpleITK as sitk

    reference = pc.WORK / "raw" / pc.DATASET_NAMES[pc.SEGMENTATION] / "labelsTr" / f"{key}.nii.gz"
    return dice(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))),
                sitk.GetArrayFromImage(sitk.ReadImage(str(reference))), num_classes, [1.0] * 3)


def time_cases(cases: list[str], repeats: int, predict_case, num_classes: int, out: Path) -> dict:
    """Warm up, then ``repeats`` timed predictions of every case; mean over cases of the median times."""
    times, cpu, scores = [], [], []
    for key in cases:
        target = out / f"{key}.nii.gz"
        per_case = []
        for _ in range(repeats):
            with pc.Stopwatch() as watch:
                predict_case(key, target)
            per_case.append((watch.wall, watch.cpu))
        times.append(pc.median([w for w, _ in per_case]))
        cpu.append(pc.median([c for _, c in per_case]))
        scores.append(score_file(target, key, num_classes))
    return {"seconds_per_volume": float(np.mean(times)), "cpu_seconds_per_volume": float(np.mean(cpu)),
            "dice": float(np.mean(scores)), "dice_per_case": scores}


def worker_diffusion(spec: dict) -> dict:
    from spinediff.inference.inputs import InputCase
    from spinediff.inference.models import ModelFolder
    from spinediff.inference.predictor import PredictionOptions, SpineDiffPredictor
    from spinediff.prediction.core import INFERENCE_BATCH_FACTOR

    predictor = SpineDiffPredictor(ModelFolder.open(Path(spec["folder"]).parent), [str(pc.FOLD)])
    model = predictor.models[0]
    steps, ensemble = predictor.settings.num_inference_steps, predictor.settings.num_samples
    num_classes = predictor.label_manager.num_segmentation_heads
    channels = predictor.num_channels
    inputs = {key: InputCase(key, raw_case_files(key, channels), ".nii.gz") for key in spec["cases"]}
    work = Path(spec["output"])

    def runner(options: PredictionOptions):
        def predict_case(key: str, target: Path) -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            outputs = predictor.output_paths(inputs[key], target.parent, options)
            result = predictor.predict_case(inputs[key], outputs, options)
            if not result.ok:
                raise RuntimeError(f"spinediff prediction of {key} failed: {result.message}")
        return predict_case

    settings = [{"steps": steps, "num_samples": ensemble}, {"steps": steps, "num_samples": 1}]
    if spec.get("fewest_steps") and spec["fewest_steps"] != steps:
        settings.append({"steps": spec["fewest_steps"], "num_samples": ensemble})
    default_window_batch = model.window_batch_size
    # the window batch before INFERENCE_BATCH_FACTOR: the plans' training batch size
    settings.append({"steps": steps, "num_samples": ensemble,
                     "window_batch_size": max(1, default_window_batch // INFERENCE_BATCH_FACTOR)})
    for key in spec["cases"]:  # warm-up: reading, preprocessing, export and the network's shapes
        warmup = PredictionOptions(predictor.sampling(num_samples=1, num_inference_steps=1))
        runner(warmup)(key, work / "warmup" / f"{key}.nii.gz")
    loaded = memory_kib()  # its VmHWM: the peak of start-up, loading and warm-up
    reset = reset_peak()
    rows = []
    for index, setting in enumerate(settings):
        model.window_batch_size = setting.get("window_batch_size", default_window_batch)
        options = PredictionOptions(predictor.sampling(num_samples=setting["num_samples"],
                                                       num_inference_steps=setting["steps"]))
        if "window_batch_size" in setting:
            runner(PredictionOptions(predictor.sampling(num_samples=setting["num_samples"], num_inference_steps=1)))(
                spec["cases"][0], work / "warmup" / f"{spec['cases'][0]}.nii.gz")  # the new batch shape
        measured = time_cases(spec["cases"], spec["repeats"], runner(options), num_classes, work / f"setting{index}")
        rows.append({**setting, "default_window_batch_size": default_window_batch, **measured})
    return {"side": "diffusion", "rows": rows, "memory_after_load_kib": loaded, "peak_reset": reset,
            "memory_end_kib": memory_kib(), "tta": False}


def worker_nnunet(spec: dict) -> dict:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(Path(spec["folder"]).parent), use_folds=(pc.FOLD,),
                                                   checkpoint_name="checkpoint_final.pth")
    reader = predictor.plans_manager.image_reader_writer_class()
    channels = len(predictor.dataset_json["channel_names"])
    num_classes = predictor.label_manager.num_segmentation_heads
    work = Path(spec["output"])

    def predict_case(key: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        image, properties = reader.read_images([str(f) for f in raw_case_files(key, channels)])
        predictor.predict_single_npy_array(image, properties, output_file_truncated=str(target)[: -len(".nii.gz")])

    for key in spec["cases"]:
        predict_case(key, work / "warmup" / f"{key}.nii.gz")
    loaded = memory_kib()
    reset = reset_peak()
    rows = []
    for mirroring in (True, False):
        predictor.use_mirroring = mirroring
        measured = time_cases(spec["cases"], spec["repeats"], predict_case, num_classes,
                              work / f"mirroring_{mirroring}")
        rows.append({"mirroring": mirroring, "mirror_axes": list(predictor.allowed_mirroring_axes or [])
                     if mirroring else [], **measured})
    return {"side": "nnunet", "rows": rows, "memory_after_load_kib": loaded, "peak_reset": reset,
            "memory_end_kib": memory_kib()}


def run_worker(side: str, spec: dict) -> dict:
    """Run one side in a fresh process and return what it measured."""
    out = pc.WORK / f"inference_{side}.json"
    out.unlink(missing_ok=True)
    spec_file = pc.WORK / f"inference_{side}_spec.json"
    spec_file.write_text(json.dumps(spec))
    with pc.Stopwatch() as watch:
        process = subprocess.Popen([sys.executable, __file__, "--worker", side, str(spec_file), str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{stderr[-3000:]}")
    result = json.loads(out.read_text())
    # RUSAGE_CHILDREN: the largest of all children so far (exact for the first worker, an upper bound after)
    result["ru_maxrss_children_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["process_wall_s"] = watch.wall
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iterations", type=int, help="training iterations of both models")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("SIDE", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        side, spec_file, out = args.worker
        spec = json.loads(Path(spec_file).read_text())
        result = worker_diffusion(spec) if side == "diffusion" else worker_nnunet(spec)
        Path(out).write_text(json.dumps(result))
        return 0
    iterations = args.iterations or (pc.QUICK_ITERATIONS if args.quick else pc.FULL_ITERATIONS)
    repeats = args.repeats or (2 if args.quick else 5)
    pc.prepare_datasets()
    machine = pc.machine_info()
    diffusion_model = pc.trained_model("segmentation", iterations, args.retrain)
    nnunet_model = pc.trained_model("nnunet_segmentation", iterations, args.retrain)
    cases = pc.validation_cases(pc.SEGMENTATION)[:1 if args.quick else None]
    fewest = None  # the smallest DDIM step count within 1 % of 50 steps, if the sampling benchmark ran on this model
    sampling = pc.OUTPUT / "sampling_quality.json"
    if sampling.exists():
        for row in json.loads(sampling.read_text())["results"]:
            if row["task"] == "segmentation" and row["model"]["folder"] == diffusion_model["folder"]:
                fewest = row["smallest_steps_within_1_percent_of_50"]
    pc.log(f"inference workers on {cases}")
    output = pc.WORK / "inference_outputs"
    diffusion = run_worker("diffusion", {"folder": diffusion_model["folder"], "cases": cases, "repeats": repeats,
                                         "fewest_steps": fewest, "output": str(output / "diffusion")})
    nnunet = run_worker("nnunet", {"folder": nnunet_model["folder"], "cases": cases, "repeats": repeats,
                                   "output": str(output / "nnunet")})
    reference = nnunet["rows"][0]["seconds_per_volume"]
    for row in diffusion["rows"] + nnunet["rows"]:
        row["time_ratio_vs_nnunet"] = row["seconds_per_volume"] / reference
    result = {"machine": machine, "cases": cases, "repeats": repeats, "diffusion": diffusion, "nnunet": nnunet,
              "models": {"diffusion": diffusion_model, "nnunet": nnunet_model}, "target_time_ratio": TARGET_TIME_RATIO}
    pc.write_result("inference", result, render(result, pc.command_line()))
    return 0


def render(result: dict, command: str) -> str:
    d, n = result["diffusion"], result["nnunet"]

    def mib(kib: int) -> str:
        return f"{kib / 1024:.0f}"

    def memory(side: dict) -> list[str]:
        """Peak RSS of the whole process, RSS once loaded, peak increase while predicting."""
        peak = max(side["memory_after_load_kib"]["VmHWM"], side["memory_end_kib"]["VmHWM"])
        increase = side["memory_end_kib"]["VmHWM"] - side["memory_after_load_kib"]["VmRSS"]
        return [mib(peak), mib(side["memory_after_load_kib"]["VmRSS"]), mib(increase) if side["peak_reset"] else "n/a"]

    configuration = result["models"]["nnunet"]["recipe"]["configuration"]
    reference_cpu = n["rows"][0]["cpu_seconds_per_volume"]
    rows = []
    for row in n["rows"]:
        mirroring = f"mirroring {row['mirror_axes']}" if row["mirroring"] else "no mirroring (--disable_tta)"
        rows.append([f"nnU-Net predictor ({configuration}, {mirroring})", f"{row['seconds_per_volume']:.2f}",
                     f"{row['cpu_seconds_per_volume']:.2f}", f"{row['time_ratio_vs_nnunet']:.2f}",
                     f"{row['cpu_seconds_per_volume'] / reference_cpu:.2f}", f"{row['dice']:.3f}", *memory(n)])
    configuration = result["models"]["diffusion"]["recipe"]["configuration"]
    for row in d["rows"]:
        batch = (f", window batch {row['window_batch_size']} instead of {row['default_window_batch_size']}"
                 if "window_batch_size" in row else "")
        rows.append([f"spinediff predict ({configuration}, DDIM {row['steps']}, K = {row['num_samples']}{batch})",
                     f"{row['seconds_per_volume']:.2f}", f"{row['cpu_seconds_per_volume']:.2f}",
                     f"**{row['time_ratio_vs_nnunet']:.1f}**", f"{row['cpu_seconds_per_volume'] / reference_cpu:.1f}",
                     f"{row['dice']:.3f}", *memory(d)])
    table = pc.markdown_table(["method", "s / volume (wall)", "CPU s / volume", "wall time vs nnU-Net (mirroring)",
                               "CPU time vs nnU-Net", "Dice",
                               "peak RSS (MiB)", "RSS once loaded (MiB)", "peak increase while predicting (MiB)"],
                              rows)
    iterations = result["models"]["diffusion"]["recipe"]["iterations"]
    return (f"Command: `{command}`\n\nVolumes: validation case(s) {', '.join(result['cases'])} of the tiny phantom "
            f"(8 x 64 x 48 voxels), raw files to raw-geometry label map, median of {result['repeats']} predictions "
            f"each after a warm-up; both models trained {iterations} iterations; one thread.\n\n{table}\n")


if __name__ == "__main__":
    pc.run_main(main)
