"""Shared pieces of the performance benchmarks (``benchmarks/perf_*.py``, assembled by ``run_all.py``).

* the machine description every result carries (CPU model, cores, torch version, threads, load);
* the phantom datasets every benchmark uses, written and planned once under
  ``benchmarks/output/performance/work/`` (gitignored) and reused by later runs;
* trainers built from those plans, batches pre-fetched from nnU-Net's own data loaders;
* the small models trained once (fixed iterations) for the sampling and inference benchmarks;
* writing one result as JSON plus a Markdown fragment.

Import this module before torch: it sets the thread count and nnU-Net's folder variables.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "benchmarks" / "output" / "performance"
WORK = OUTPUT / "work"
THREADS = 1

# One thread, also for OpenMP: on this 2-core machine shared with other busy processes, two OpenMP
# threads spin at every barrier while the other core is taken and a step gets ~10x slower.
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("MKL_NUM_THREADS", str(THREADS))
# Augmentation in the main process unless a benchmark measures nnU-Net's worker processes.
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
# nnU-Net's folders point into the gitignored output folder, never into tracked files.
os.environ["nnUNet_raw"] = str(WORK / "raw")
os.environ["nnUNet_preprocessed"] = str(WORK / "preprocessed")
os.environ["nnUNet_results"] = str(WORK / "results")  # trained models: results_folder()

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)

SEGMENTATION, TRANSLATION = 901, 902
DATASET_NAMES = {SEGMENTATION: "Dataset901_SpinePhantomSeg", TRANSLATION: "Dataset902_SpinePhantomTranslation"}
NUM_CASES = 6  # nnU-Net's 5-fold split then holds out 2 cases in fold 0
FOLD = 0
PHANTOM_SEED = 7


def phantom_settings():
    """The tests' tiny phantom (the same anatomy in mm on coarse voxels)."""
    from spinediff.datasets.phantom import PhantomSettings

    return PhantomSettings(mr_shape=(48, 64, 8), mr_spacing=(3.2, 3.2, 7.0), ct_spacing=(3.0, 3.0, 3.0))


# ---------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    import monai
    import nnunetv2  # noqa: F401  (version through importlib.metadata)

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nnunetv2": version("nnunetv2"),
        "monai": monai.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
        "load_average_start": load_average(),
        "hostname": platform.node(),
    }


def command_line() -> str:
    """The command that produced a result, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    return " ".join(["python", script_text, *map(shlex.quote, sys.argv[1:])])


class Stopwatch:
    """Wall and CPU (process) time of a block; CPU time is what a single-threaded step costs
    regardless of how many other processes share the cores."""

    def __enter__(self) -> Stopwatch:
        self.wall = -time.perf_counter()
        self.cpu = -time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter()
        self.cpu += time.process_time()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return float(ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2]))


# ---------------------------------------------------------------------------------------------- output
def write_result(name: str, result: dict[str, Any], markdown: str) -> Path:
    """``OUTPUT/name.json`` (everything) and ``OUTPUT/name.md`` (the table for the documentation)."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line(), **result}
    result.setdefault("machine", machine_info())
    result["machine"]["load_average_end"] = load_average()
    json_path = OUTPUT / f"{name}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable))
    os.replace(tmp, json_path)
    md_path = OUTPUT / f"{name}.md"
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text(markdown.rstrip() + "\n")
    os.replace(tmp, md_path)
    print(markdown)
    return json_path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()[0]:.1f}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- datasets
def prepare_datasets() -> None:
    """Write the tiny phantom (segmentation and translation) and plan it for the CPU, once.

    Planning on ``cpu`` adds ``2d_cpu`` / ``3d_fullres_cpu``: nnU-Net's own network with the patch,
    batch and stage widths of ``2d_diffusion`` / ``3d_diffusion``, the fair comparison.
    """
    from spinediff.datasets.phantom_writer import write_phantom_datasets
    from spinediff.planning.api import plan_dataset

    raw = WORK / "raw"
    marker = WORK / "datasets_ready.json"
    recipe = {"cases": NUM_CASES, "seed": PHANTOM_SEED, "settings": repr(phantom_settings()),
              "configurations": ["2d_diffusion", "3d_diffusion", "2d_cpu", "3d_fullres_cpu"]}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return
    log("writing the tiny phantom and planning it (once; reused by later runs)")
    raw.mkdir(parents=True, exist_ok=True)
    write_phantom_datasets(raw, num_cases=NUM_CASES, seed=PHANTOM_SEED, tasks=("segmentation", "translation"),
                           settings=phantom_settings(), overwrite=True, progress=False)
    for dataset in DATASET_NAMES:
        plan_dataset(dataset, configurations=recipe["configurations"], device="cpu", num_processes=1,
                     overwrite=True, show_progress_bar=False)
    marker.write_text(json.dumps(recipe))


def plans(dataset: int) -> dict[str, Any]:
    return json.loads((WORK / "preprocessed" / DATASET_NAMES[dataset] / "nnUNetPlans.json").read_text())


def configuration_summary(dataset: int, configuration: str) -> dict[str, Any]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans(dataset))
    resolved = manager.get_configuration(configuration).configuration
    kwargs = resolved["architecture"]["arch_kwargs"]
    return {"configuration": configuration, "patch_size": list(resolved["patch_size"]),
            "batch_size": int(resolved["batch_size"]), "n_stages": int(kwargs["n_stages"]),
            "features_per_stage": list(kwargs["features_per_stage"]),
            "network": resolved["architecture"]["network_class_name"].rsplit(".", 1)[-1],
            "attention_stages": list(kwargs.get("attention_stages", []) or []),
            "norm_op": kwargs.get("norm_op")}


def build_initialized_trainer(dataset: int, configuration: str, trainer: str):
    """A trainer with network, optimiser and (for ours) EMA built, as ``on_train_start`` would leave it,
    without creating log files or starting training."""
    from spinediff.training.api import build_trainer

    instance = build_trainer(dataset, configuration, FOLD, trainer)
    instance.initialize()
    instance.network.train()
    return instance


def prefetch_batches(trainer, count: int) -> list[dict]:
    """``count`` augmented batches from the trainer's own nnU-Net data loader (fixed before timing)."""
    loader, _ = trainer.get_dataloaders()
    batches = [next(loader) for _ in range(count)]
    _shutdown(loader)
    return batches


def _shutdown(loader) -> None:
    finish = getattr(loader, "_finish", None)
    if callable(finish):
        finish()


# ---------------------------------------------------------------------------------------------- models
# Trained once for the sampling-quality and inference benchmarks; reused while the recipe is unchanged.
MODEL_RECIPES: dict[str, dict[str, Any]] = {
    "translation": {"dataset": TRANSLATION, "configuration": "2d_diffusion", "trainer": "DiffusionTranslationTrainer"},
    "segmentation": {"dataset": SEGMENTATION, "configuration": "2d_diffusion",
                     "trainer": "DiffusionSegmentationTrainer"},
    "nnunet_segmentation": {"dataset": SEGMENTATION, "configuration": "2d_cpu", "trainer": "nnUNetTrainer"},
}
ITERATIONS_PER_EPOCH = 75  # few epochs: each ends with a checkpoint, a progress plot and a sampling validation
QUICK_ITERATIONS = 150
FULL_ITERATIONS = 600


def results_folder(iterations: int) -> Path:
    """Models of different schedules live apart (nnU-Net's results layout has no place for it)."""
    return WORK / f"results_{iterations}it"



def trained_model(name: str, iterations: int, retrain: bool = False) -> dict[str, Any]:
    """Train (or reuse) one small model for ``iterations`` steps; returns its recipe and folder.

    nnU-Net's training loop runs as is (epochs of ``ITERATIONS_PER_EPOCH`` steps, one sampling
    validation step per epoch) but without the final whole-volume validation, which the benchmarks
    do themselves. ``checkpoint_final.pth`` is what nnU-Net's predictor and our loaders read.
    """
    from spinediff.training.api import TrainingOptions, apply_options, build_trainer
    from spinediff.training.schedule import run_scheduled_training

    recipe = dict(MODEL_RECIPES[name], iterations=iterations, fold=FOLD, seed=0)
    epochs = max(1, iterations // ITERATIONS_PER_EPOCH)
    recipe_file = WORK / "models" / f"{name}_{iterations}it.json"
    if not retrain and recipe_file.exists():
        stored = json.loads(recipe_file.read_text())
        if stored["recipe"] == recipe and (Path(stored["folder"]) / "checkpoint_final.pth").is_file():
            return stored
    log(f"training {name}: {recipe['trainer']} on {recipe['configuration']}, {iterations} iterations")
    # nnU-Net seeds nothing (augmentation draws from the global numpy/torch generators; the network is
    # initialised from torch's): seeding them makes a cold run train the same model as the last one
    random.seed(recipe["seed"])
    np.random.seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    trainer = build_trainer(recipe["dataset"], recipe["configuration"], FOLD, recipe["trainer"],
                            results_folder=str(results_folder(iterations)))
    apply_options(trainer, TrainingOptions(epochs=epochs, iterations_per_epoch=ITERATIONS_PER_EPOCH,
                                           val_iterations_per_epoch=1))
    with Stopwatch() as watch:
        run_scheduled_training(trainer, None)
    stored = {"recipe": recipe, "folder": str(trainer.output_folder), "train_wall_s": watch.wall,
              "train_cpu_s": watch.cpu, "trained_at": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_average": load_average()}
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(json.dumps(stored, indent=2))
    return stored


def load_trainer_for_prediction(name: str, folder: str | Path):
    """The trainer of a trained model with its final checkpoint (EMA weights) loaded."""
    from spinediff.training.api import build_trainer

    recipe = MODEL_RECIPES[name]
    trainer = build_trainer(recipe["dataset"], recipe["configuration"], FOLD, recipe["trainer"],
                            results_folder=str(Path(folder).parents[2]))
    trainer.load_checkpoint(str(Path(folder) / "checkpoint_final.pth"))
    trainer.inference_network.eval()
    return trainer


def load_preprocessed_case(dataset: int, data_identifier: str, key: str):
    """``(data, seg, properties)`` of one preprocessed case: float32 image channels, int16 label map."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = str(WORK / "preprocessed" / DATASET_NAMES[dataset] / data_identifier)
    data, seg, _, properties = infer_dataset_class(folder)(folder, [key]).load_case(key)
    return (torch.from_numpy(np.asarray(data[:], dtype=np.float32)),
            torch.from_numpy(np.asarray(seg[:], dtype=np.int16)), properties)


def validation_cases(dataset: int) -> list[str]:
    splits = json.loads((WORK / "preprocessed" / DATASET_NAMES[dataset] / "splits_final.json").read_text())
    return list(splits[FOLD]["val"])


def run_main(main: Callable[[list[str] | None], int]) -> None:
    sys.exit(main(sys.argv[1:]))
