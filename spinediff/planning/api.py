"""``plan_dataset``: fingerprint, plan and preprocess one raw dataset (the API behind ``spinediff plan``).

Steps, all through nnunetv2 so that nnU-Net's own trainer reads the result unchanged:

1. nnunetv2's ``DatasetFingerprintExtractor`` -> ``dataset_fingerprint.json``;
2. for translation/generation datasets, the target channels' intensity statistics
   (:mod:`.target_intensity`) -> ``spinediff_fingerprint.json``;
3. :class:`~spinediff.planning.planner.SpineDiffPlanner` -> ``nnUNetPlans.json`` (nnU-Net's
   configurations plus ``2d_diffusion`` / ``3d_diffusion``);
4. nnunetv2's preprocessor for the requested configurations (configurations sharing a data
   identifier are preprocessed once), and ``gt_segmentations`` as ``nnUNetv2_preprocess`` copies it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spinediff.errors import SpineDiffError
from spinediff.io import copy_file, read_json, write_json
from spinediff.paths import DEFAULT_PLANS, nnunet_folder, resolve_raw_dataset
from spinediff.planning import completion
from spinediff.planning.planner import CPU_BASELINES, DIFFUSION_BASE, NNUNET_CONFIGURATIONS
from spinediff.planning.plans import SpineDiffPlans
from spinediff.utilities.device import parse_device
from spinediff.utilities.lock import folder_lock

PLANS_IDENTIFIER = DEFAULT_PLANS  # nnU-Net's default, so `nnUNetv2_train ID 2d FOLD` finds the plans
DIFFUSION_CONFIGURATIONS = tuple(DIFFUSION_BASE)
CPU_BASELINE_CONFIGURATIONS = tuple(CPU_BASELINES)
ALL_CONFIGURATIONS = (*NNUNET_CONFIGURATIONS, *DIFFUSION_CONFIGURATIONS, *CPU_BASELINE_CONFIGURATIONS)
# nnU-Net samples 1e8 foreground voxels for its intensity statistics (hundreds of MB per channel);
# 1e7 gives the same percentiles to three digits at a tenth of the memory and time.
DEFAULT_INTENSITY_SAMPLES = 10_000_000
_DATASET_FOLDER = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_\-]+$")


def default_num_processes() -> int:
    """Half the cores, at most 4: preprocessing workers each hold whole volumes in memory."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def resolve_device(device: str | torch.device) -> str:  # noqa: F821 (annotation only)
    """The kind of device to plan for, ``cpu`` or ``cuda`` (see :func:`spinediff.utilities.device.parse_device`)."""
    return parse_device(device).type


@contextlib.contextmanager
def nnunet_environment(raw: Path, preprocessed: Path) -> Iterator[None]:
    """Point nnunetv2 (which reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` lazily) at these folders.

    The variables are also inherited by nnunetv2's spawned worker processes; they are restored after.
    """
    saved = {key: os.environ.get(key) for key in ("nnUNet_raw", "nnUNet_preprocessed")}
    os.environ["nnUNet_raw"] = str(raw)
    os.environ["nnUNet_preprocessed"] = str(preprocessed)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _in_process(enabled: bool) -> Iterator[None]:
    """With one worker, run nnunetv2's fingerprint extraction and preprocessing in this process
    (:mod:`spinediff.utilities.in_process`: each spawned worker re-imports torch and nnunetv2, 5-10 s on a 2-core
    machine, before doing the same sequential work a single thread does here); its listings of the dataset's files
    always."""
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.preprocessing.preprocessors import default_preprocessor

    from spinediff.utilities.in_process import file_lists_in_process, pools_in_process

    with pools_in_process(fingerprint_extractor, default_preprocessor, enabled=enabled), file_lists_in_process():
        yield


def _quiet(enabled: bool):
    """Send nnunetv2's prints to nowhere (its tqdm bars go to stderr and stay visible)."""
    return contextlib.redirect_stdout(io.StringIO()) if enabled else contextlib.nullcontext()


def _check_dataset(folder: Path) -> dict[str, Any]:
    if not _DATASET_FOLDER.match(folder.name):
        raise SpineDiffError(f"{folder} is not named like an nnU-Net dataset (DatasetXXX_Name); nnU-Net's "
                             "planner needs that name. Rename the folder or place it under $nnUNet_raw.")
    dataset_json = read_json(folder / "dataset.json")
    missing = [key for key in ("channel_names", "labels", "numTraining", "file_ending") if key not in dataset_json]
    if "channel_names" in missing and "modality" in dataset_json:
        missing.remove("channel_names")
    if missing:
        raise SpineDiffError(f"{folder / 'dataset.json'} lacks {missing}; see documentation/dataset_format.md "
                             "(run `spinediff validate` for a full check).")
    if not (folder / "imagesTr").is_dir() or not any((folder / "imagesTr").iterdir()):
        raise SpineDiffError(f"{folder / 'imagesTr'} is missing or empty: nothing to plan from.")
    return dataset_json


def _validate_before_planning(folder: Path, progress: bool) -> None:
    """``spinediff validate``'s checks; nnunetv2 would plan a truncated file as zeros and NaNs as 0."""
    from spinediff.datasets.validate import validate_dataset

    report = validate_dataset(folder, progress=progress)
    if not report.ok:
        raise SpineDiffError(f"{report.summary()}\nNothing was planned or written. Fix the files above (`spinediff "
                             f"validate -d {folder}` lists them again) and run `spinediff plan` once more.")
    for note in report.notes:
        print(f"note: {note}", flush=True)


def _make_fingerprint_extractor(intensity_samples: int):
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    class FingerprintExtractor(DatasetFingerprintExtractor):
        """nnunetv2's extractor with a smaller (configurable) intensity sample, nothing else changed."""

        def __init__(self, dataset_name_or_id: str | int, num_processes: int = 8, verbose: bool = False):
            super().__init__(dataset_name_or_id, num_processes, verbose)
            self.num_foreground_voxels_for_intensitystats = intensity_samples

    return FingerprintExtractor


def _copy_ground_truth(dataset_folder: Path, dataset_json: dict[str, Any], target: Path) -> list[str]:
    """As nnUNetv2_preprocess: labels into ``gt_segmentations`` (nnU-Net's validation reads them there)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    target.mkdir(parents=True, exist_ok=True)
    cases = get_filenames_of_train_images_and_targets(str(dataset_folder), dataset_json)
    for case, files in cases.items():
        destination = target / f"{case}{dataset_json['file_ending']}"
        source = Path(files["label"])
        if not destination.exists() or destination.stat().st_mtime < source.stat().st_mtime:
            copy_file(source, destination)
    return sorted(cases)


def plan_dataset(dataset: str | int | os.PathLike, configurations: Sequence[str] | None = None, *,
                 device: str = "auto", memory_target_gb: float | None = None, preprocess: bool = True,
                 num_processes: int | None = None, raw_folder: str | os.PathLike | None = None,
                 preprocessed_folder: str | os.PathLike | None = None, overwrite: bool = False,
                 show_progress_bar: bool = True, verbose: bool = False,
                 intensity_samples: int = DEFAULT_INTENSITY_SAMPLES,
                 log: Callable[[str], None] | None = None, budget: str | float | None = None,
                 measure: bool = True, check_input: bool = True, slice_direction: str | None = None) -> Path:
    """Fingerprint, plan and (optionally) preprocess ``dataset``; return the path of the plans file.

    Args:
        dataset: ID (``501``), name (``Dataset501_X``) under the raw folder, or a dataset folder.
        configurations: configurations to preprocess (default: all that the plans contain). The plans
            always hold every configuration; those sharing data (``2d`` and ``2d_diffusion``) are
            preprocessed once.
        device: 'cpu', 'cuda' or 'auto' (cuda when torch sees a GPU).
        memory_target_gb: GPU memory (cuda, default 8 as nnU-Net) or RAM (cpu, default 4) to plan for.
        preprocess: run nnunetv2's preprocessor after planning.
        num_processes: preprocessing / fingerprint workers (default: half the cores, at most 4).
        raw_folder, preprocessed_folder: override ``$nnUNet_raw`` / ``$nnUNet_preprocessed``.
        overwrite: replace an existing plans file (otherwise an existing one is an error).
        show_progress_bar: tqdm bars for fingerprint, statistics and preprocessing.
        verbose: let nnunetv2 print its own messages.
        intensity_samples: foreground voxels sampled for nnU-Net's intensity statistics.
        log: receives one line per step (default: stderr when ``show_progress_bar``).
        budget: training time per fold and configuration (``"20m"``, ``"12h"``, or minutes): plan spacing,
            patch and schedule for it (:mod:`spinediff.planning.budget`). None: plan for memory, as nnU-Net.
        measure: with a budget, time a few training steps of each configuration on this machine (else
            use the cost model's estimate).
        check_input: run ``spinediff validate``'s checks (readable files, geometry across channels and
            labels, NaN/Inf, declared label values) before nnunetv2 reads anything; any problem stops
            planning before a file is written.
        slice_direction: ``axial``, ``coronal`` or ``sagittal``: plans ``nnUNetPlans_<direction>`` whose 2D
            configurations slice the images in that plane (found from the first image's orientation), beside the
            default plans; train, predict and ensemble them with ``-p nnUNetPlans_<direction>``.

    Raises:
        SpineDiffError: missing dataset or folders, invalid settings, existing plans without overwrite.
    """
    from spinediff.planning.planner import SpineDiffPlanner
    from spinediff.planning.target_intensity import collect_target_statistics
    from spinediff.tasks import task_spec

    say = log or ((lambda line: print(line, file=sys.stderr)) if show_progress_bar else (lambda line: None))
    requested = list(configurations) if configurations else None
    unknown = sorted(set(requested or ()) - set(ALL_CONFIGURATIONS))
    if unknown:
        raise SpineDiffError(f"Unknown configuration(s) {unknown}; choose from {', '.join(ALL_CONFIGURATIONS)}.")
    if memory_target_gb is not None and not memory_target_gb > 0:
        raise SpineDiffError(f"--memory-target-gb must be positive, got {memory_target_gb}.")
    device = resolve_device(device)
    budget_seconds = None
    if budget is not None:
        from spinediff.planning.budget import parse_budget

        budget_seconds = parse_budget(budget)
    num_processes = int(num_processes or default_num_processes())
    if num_processes < 1:
        raise SpineDiffError(f"-np must be at least 1, got {num_processes}.")

    dataset_folder = resolve_raw_dataset(dataset, raw_folder)
    dataset_json = _check_dataset(dataset_folder)
    if check_input:
        _validate_before_planning(dataset_folder, show_progress_bar)
    name = dataset_folder.name
    preprocessed_root = nnunet_folder("preprocessed", preprocessed_folder)
    output = preprocessed_root / name
    plans_identifier = PLANS_IDENTIFIER if slice_direction is None else f"{PLANS_IDENTIFIER}_{slice_direction}"
    slicing = None if slice_direction is None else (slice_direction,
                                                    slicing_axis(dataset_folder, dataset_json, slice_direction))
    plans_file = output / f"{plans_identifier}.json"
    created = not output.exists()
    with folder_lock(output):  # one plan per preprocessed dataset, held to the end; checks below run under it
        why = completion.incomplete(output) if output.is_dir() else None
        if why is not None:
            warn = log or (lambda line: print(line, file=sys.stderr))  # shown with --quiet too
            warn(f"{output} is incomplete: {why}. Planning and preprocessing it again.")
        elif plans_file.exists() and not overwrite:
            raise SpineDiffError(f"{plans_file} already exists (its preprocessing is complete). Pass --overwrite "
                                 "(overwrite=True) to plan again; configurations of other planners in it are kept.")
        completion.start_run(output, plans_identifier, [])  # until finish_run, the folder counts as incomplete
        try:
            with nnunet_environment(dataset_folder.parent, preprocessed_root), _in_process(num_processes == 1):
                say(f"[1/4] Fingerprint of {name} (nnunetv2 extractor, {num_processes} process(es))")
                extractor = _make_fingerprint_extractor(intensity_samples)(name, num_processes, verbose=verbose)
                extractor.show_progress_bar = show_progress_bar
                with _quiet(not verbose):
                    extractor.run(overwrite_existing=True)

                spec = task_spec(dataset_json, dataset_folder / "dataset.json")
                statistics: dict[str, Any] = {}
                if spec.task.has_image_target:
                    say(f"[2/4] Target intensity statistics (channels {list(spec.target_channels)})")
                    statistics = collect_target_statistics(dataset_folder, dataset_json, spec,
                                                           show_progress_bar=show_progress_bar)
                    write_json(statistics, output / "spinediff_fingerprint.json")
                else:
                    say("[2/4] Target intensity statistics: not needed (segmentation)")

                say(f"[3/4] Planning for {device}" + (f", {memory_target_gb:g} GB" if memory_target_gb else "")
                    + (f", a training budget of {budget} per fold (timing a few steps of each network)" if budget
                       else ""))
                planner = SpineDiffPlanner(name, plans_name=plans_identifier, device=device,
                                           memory_target_gb=memory_target_gb, target_statistics=statistics,
                                           budget_seconds=budget_seconds, measure=measure, slicing=slicing)
                with _quiet(not verbose):
                    planner.plan_experiment()

                if not preprocess:
                    say("[4/4] Preprocessing skipped (--no-preprocess)")
                    completion.finish_run(output, [], [])
                    return plans_file
                planned = SpineDiffPlans.read(plans_file)
                names = requested or planned.planned_names
                missing = [c for c in names if c not in planned]
                if missing:
                    say(f"      (not in the plans for this dataset, skipped: {', '.join(missing)})")
                done: dict[str, str] = {}
                for configuration in names:
                    if configuration in missing:
                        continue
                    configuration_manager = planned.configuration(configuration).manager
                    identifier = configuration_manager.data_identifier
                    if identifier in done:
                        say(f"[4/4] {configuration}: shares preprocessed data with {done[identifier]}")
                        continue
                    say(f"[4/4] Preprocessing {configuration} -> {identifier}")
                    completion.start_run(output, plans_identifier, [identifier])  # its old data no longer counts
                    preprocessor = configuration_manager.preprocessor_class(verbose=verbose)
                    preprocessor.show_progress_bar = show_progress_bar
                    with _quiet(not verbose):
                        preprocessor.run(name, configuration, plans_identifier, num_processes=num_processes)
                    done[identifier] = configuration
                cases = _copy_ground_truth(dataset_folder, dataset_json, output / "gt_segmentations")
                completion.finish_run(output, cases, list(done))  # last: every case file checked and recorded
            return plans_file
        except BaseException:
            if created:  # everything in it is this run's: an interrupted first plan leaves nothing behind
                shutil.rmtree(output, ignore_errors=True)
            raise


SLICE_DIRECTIONS = {"sagittal": 0, "coronal": 1, "axial": 2}  # the physical axis (LPS: x, y, z) normal to the plane


def slicing_axis(dataset_folder: Path, dataset_json: dict, direction: str) -> int:
    """The array axis (z, y, x order of SimpleITK's arrays, as nnU-Net reads them) closest to the normal of
    ``direction``'s plane, from the first training image's direction cosines."""
    import SimpleITK as sitk

    if direction not in SLICE_DIRECTIONS:
        raise SpineDiffError(f"--slice-direction must be one of {', '.join(SLICE_DIRECTIONS)}, got {direction!r}.")
    images = sorted((dataset_folder / "imagesTr").glob(f"*{dataset_json.get('file_ending', '.nii.gz')}"))
    if not images:
        raise SpineDiffError(f"{dataset_folder / 'imagesTr'} has no images to read the orientation from.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(images[0]))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise SpineDiffError(f"{images[0]} is {reader.GetDimension()}D: slice directions need 3D images.")
    cosines = np.asarray(reader.GetDirection(), dtype=float).reshape(3, 3)  # row: physical axis, column: index axis
    index_axis = int(np.argmax(np.abs(cosines[SLICE_DIRECTIONS[direction]])))
    return 2 - index_axis  # ITK index axis i is numpy axis 2 - i


def _compact(values: Sequence[Any]) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def summarize_plans(plans: dict[str, Any] | str | os.PathLike, configurations: Sequence[str] | None = None
                    ) -> list[dict[str, Any]]:
    """One row per configuration (resolved through nnunetv2's ``PlansManager``) for the summary table.

    Every row also carries the memory model's estimates for the configuration's own network: GPU memory
    in nnU-Net's reference units and the seconds of one training step on the project's 2-core CPU.
    """
    from spinediff.planning.memory import analytic_cost, estimate_cost, gb_per_element

    planned = SpineDiffPlans(read_json(plans) if not isinstance(plans, dict) else plans)
    n_channels = len(planned.plans.get("foreground_intensity_properties_per_channel", {})) or 1
    rows = []
    for name in configurations or planned.planned_names:
        if name not in planned:
            continue
        resolved = planned.configuration(name).configuration
        if "patch_size" not in resolved or "architecture" not in resolved:
            continue  # e.g. 3d_cascade_fullres without its own architecture
        arch = resolved["architecture"]
        kwargs = arch["arch_kwargs"]
        patch = tuple(int(p) for p in resolved["patch_size"])
        diffusion = resolved.get("diffusion")
        if diffusion:
            in_ch = diffusion["condition_channels"] + diffusion["target_channels"]
            out_ch = diffusion["target_channels"]
            cost = estimate_cost(patch, kwargs, in_ch, out_ch)
            elements = cost.feature_map_elements
        else:
            in_ch, out_ch = n_channels, 2
            cost = analytic_cost(patch, kwargs, in_ch, out_ch)
            elements = cost.plain_unet_elements  # what nnU-Net itself estimates
        dim = len(patch)
        gpu_gb = resolved["batch_size"] * elements * gb_per_element(dim)
        features = kwargs["features_per_stage"]
        rows.append({
            "configuration": name,
            "network": arch["network_class_name"].rsplit(".", 1)[-1],
            "spacing": [round(float(s), 3) for s in resolved["spacing"]],
            "patch_size": list(patch),
            "batch_size": int(resolved["batch_size"]),
            "n_stages": int(kwargs["n_stages"]),
            "features": f"{features[0]}-{max(features)}",
            "inplane_stages": sum(1 for k in kwargs["kernel_sizes"] if 1 in k),
            "attention_stages": list(kwargs.get("attention_stages", []) or []),
            "estimated_gpu_gb": round(float(gpu_gb), 2),
            "estimated_cpu_step_s": round(float(cost.step_seconds(int(resolved["batch_size"]))), 2),
            "data_identifier": resolved["data_identifier"],
            "prediction_type": diffusion.get("prediction_type") if diffusion else None,
            "foreground_coverage": (resolved.get("planning") or {}).get("foreground_coverage"),
            "schedule": resolved.get("schedule"),
            "notes": list(resolved.get("notes", [])),
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`summarize_plans` rows (also valid Markdown)."""
    header = ["configuration", "network", "spacing (mm)", "patch", "batch", "stages", "features", "in-plane",
              "attention", "~GPU GB", "~CPU s/step", "data"]
    budgeted = any(r.get("schedule") for r in rows)
    if budgeted:
        header += ["covers fg", "s/step", "steps", "~min"]

    def budget_cells(r: dict[str, Any]) -> list[str]:
        schedule, coverage = r.get("schedule"), r.get("foreground_coverage")
        if not schedule:
            return ["-"] * 4
        cover = "x".join(f"{100 * c:.0f}%" for c in coverage) if coverage else "-"
        return [cover, f"{schedule['step_seconds']:.3g}", f"{schedule['epochs']}x{schedule['iterations_per_epoch']}",
                f"{schedule['expected_minutes']:.1f}"]

    lines = [[r["configuration"], r["network"], _compact(r["spacing"]), _compact(r["patch_size"]),
              str(r["batch_size"]), str(r["n_stages"]), r["features"], str(r["inplane_stages"]),
              ",".join(map(str, r["attention_stages"])) or "-", f"{r['estimated_gpu_gb']:.2f}",
              f"{r['estimated_cpu_step_s']:g}", r["data_identifier"], *(budget_cells(r) if budgeted else [])]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    out = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def dataset_summary(plans: dict[str, Any]) -> dict[str, Any]:
    """Plan-wide facts for the summary: median shape/spacing, transpose, task, recommendation."""
    block = plans.get("spinediff", {})
    return {
        "dataset": plans["dataset_name"],
        "median_shape": plans["original_median_shape_after_transp"],
        "median_spacing": [round(float(s), 3) for s in plans["original_median_spacing_after_transp"]],
        "transpose_forward": plans["transpose_forward"],
        "anisotropy": round(float(np.max(plans["original_median_spacing_after_transp"])
                                  / np.min(plans["original_median_spacing_after_transp"])), 2),
        "task": block.get("task"),
        "device": block.get("device"),
        "memory_target_gb": block.get("memory_target_gb"),
        "budget_seconds": block.get("budget_seconds"),
        "recommended_configuration": block.get("recommended_configuration"),
    }
