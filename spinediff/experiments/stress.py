"""Stress test of position and field of view (issue 34): a model's cross-validation on its validation scans cropped,
padded and shifted along the spine, beside the plain cross-validation.

Each validation case of each fold is predicted by the fold that did not see it, as it is and in fixed variants along
the spine axis (the array axis closest to the direction the labels' levels follow, learnt from the references):
cropped by 20 % / 35 % of its length from the top (the first level's side) or the bottom, padded by 30 % at either
end (the vertebrae move inside the field of view), and shifted (20 % cut at the top and padded at the bottom); or in
variants named by their amounts (:func:`variant_fractions`: ``crop_top_10``, ``crop_bottom_5``, ...), e.g. to sweep
how much of either end a model needs (:mod:`spinediff.experiments.stress_variants`).
Images and labels change together; a level cut off entirely counts as absent from the reference. Prediction goes
through ``spinediff predict`` (the model's post-processing applied), or nnU-Net's own predictor for nnU-Net's
trainers followed by the model's ``postprocessing.json``. Reported per variant: the mean over cases of the mean
level Dice over the ordered labels present in the reference or the prediction, and the merged foreground Dice.
``stress_dice``, the mean level Dice over all variants (plain included), is what ``spinediff find_best`` ranks
segmentation models on when every candidate has a ``stress_position.json`` (``spinediff benchmark --stress``
writes one per model).

``other_dataset`` also predicts another dataset's training scans (e.g. T1w scans with the same labels) with the
ensemble of all folds, plain and in the same variants; ``training_scans`` each fold's own training scans with that
fold (:func:`seen_unseen`: does the model fail only on subjects it never saw?).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinediff.datasets.dataset_json import foreground_labels, ignore_label
from spinediff.errors import SpineDiffError
from spinediff.evaluation.stress_figure import stress_figure
from spinediff.experiments.stress_report import (
    markdown,
    review_split,
    seen_unseen,
    stress_dice,
    summarise,
    training_source,
    worst_stressed,
)
from spinediff.experiments.stress_variants import VARIANTS, make_variant, variant_fractions
from spinediff.inference.find_best import STRESS_FILE  # the stress test's result file, in the model folder
from spinediff.inference.level_geometry import spine_array_axis
from spinediff.utilities.environment import software_environment


@dataclass(frozen=True)
class StressSettings:
    """What the stress test predicts and how (``None``: the model's own settings / every trained fold / all
    variants)."""

    folds: tuple[str, ...] | None = None
    variants: tuple[str, ...] | None = None
    other_dataset: str | None = None
    steps: int | None = None
    samples: int | None = None
    seed: int = 0
    device: str = "auto"
    command: str = ""
    #: keep the varied inputs, their cut references and the predictions in ``OUTPUT/stress_cases`` (to look at them,
    #: or to post-process them again with another rule)
    keep: bool = False
    #: shares predicted side by side (:func:`stress_shares`: a scan each, a fold each with ``keep``), each in its
    #: own process with one torch thread (2 on two cores)
    workers: int = 1
    #: side by side, hand the shares with the most voxels out first (longest first: the last share to start is then
    #: a small one, and no worker predicts a large scan alone at the end while the others wait); off: in their order
    largest_first: bool = True
    #: also predict each fold's training scans with that fold, varied the same way (source ``DATASET (training
    #: scans)``): a model that numbers the scans it was trained on right under the same cuts, but not those it never
    #: saw, learnt its subjects and needs more of them, not other augmentation
    training_scans: bool = False


#: A level counts in ``level_dice_in_view`` when at least this share of it lies in the varied scan.
IN_VIEW_SHARE = 0.5


def level_scores(prediction: np.ndarray, reference: np.ndarray, labels: list[int],
                 in_view: dict[int, float] | None = None, ignore: int | None = None) -> dict:
    """Per-level Dice, their mean (``level_dice``) and the merged foreground Dice; with ``in_view`` (the share of
    each level of the unvaried reference that the varied one keeps) also ``level_dice_in_view``: the mean over the
    levels at least :data:`IN_VIEW_SHARE` in view, and those only the prediction has. A sliver of a level the cut
    leaves at the edge counts 0 in ``level_dice`` whenever the network leaves it out; the second score shows how much
    of a drop is that, and how much is numbering. The reference's voxels of the ``ignore`` label (nnU-Net's) count
    for no level."""
    from spinediff.metrics.segmentation_metrics import case_dice, without_ignored

    prediction, reference = without_ignored(prediction, reference, ignore)
    per_label = case_dice(prediction, reference, labels)
    values = [v for v in per_label.values() if not math.isnan(v)]
    p, r = np.isin(prediction, labels), np.isin(reference, labels)
    total = int(p.sum()) + int(r.sum())
    scores = {"level_dice": float(np.mean(values)) if values else float("nan"), "per_label": per_label,
              "merged_dice": 2.0 * int((p & r).sum()) / total if total else float("nan")}
    if in_view is not None:
        shares = {label: in_view.get(int(label), 0.0) for label in per_label}
        kept = [v for label, v in per_label.items() if not math.isnan(v)
                and (shares[label] >= IN_VIEW_SHARE or shares[label] == 0.0)]
        scores["level_dice_in_view"] = float(np.mean(kept)) if kept else float("nan")
    return scores


def in_view_shares(whole: np.ndarray, varied: np.ndarray, labels: list[int]) -> dict[int, float]:
    """The share of each level's voxels in ``whole`` (the reference as it is) that ``varied`` keeps."""
    return {int(label): float((varied == label).sum()) / max(1, int((whole == label).sum())) for label in labels}


def _cases_of_fold(preprocessed: Path, fold: str, part: str = "val") -> list[str]:
    """The fold's validation cases (``part`` "val") or training cases ("train") in nnU-Net's splits."""
    from spinediff.io import read_json

    splits = read_json(preprocessed / "splits_final.json")
    return list(splits[int(fold)][part])


def predict_postprocessed(settings: StressSettings, model, folds: list[str], inputs: Path, output: Path) -> None:
    """Predict ``inputs`` with ``folds`` of the model (a :class:`~spinediff.inference.models.ModelFolder`) into
    ``output``, its post-processing applied and its cases flagged by its review rule, as a user gets them
    (``spinediff predict``, or ``nnUNetv2_predict`` + ``spinediff postprocess --images``)."""
    from spinediff.training.registry import is_spinediff_trainer

    folder = model.path
    if is_spinediff_trainer(model.trainer):
        from spinediff.inference.api import predict

        report = predict(inputs, output, model.dataset_name, model.configuration, model.trainer, folds=folds,
                         plans_identifier=model.plans_identifier, device=settings.device,
                         num_samples=settings.samples, num_inference_steps=settings.steps, seed=settings.seed,
                         progress=False, overwrite=True)
        if report.failed:
            raise SpineDiffError("the stress test's prediction failed: "
                                 + "; ".join(f"{c.identifier}: {c.message}" for c in report.failed))
        return
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from spinediff.inference.postprocessing import POSTPROCESSING_FILE, Postprocessing
    from spinediff.inference.review import reads_probabilities
    from spinediff.utilities.device import parse_device
    from spinediff.utilities.in_process import predict_nnunet_files

    decision = Postprocessing.load(folder)
    decided = (folder / POSTPROCESSING_FILE).is_file()  # `spinediff postprocess` then runs, as for a user
    # with probabilities where find_best's printed command saves them (nnunet_commands)
    probabilities = decision.needs_probabilities or (decided and reads_probabilities(folder))
    raw_output = output / "nnunet_raw_output" if decided else output
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=parse_device(settings.device), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=tuple(int(f) if f.isdigit() else f
                                                                                for f in folds))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    predict_nnunet_files(predictor, str(inputs), str(raw_output), save_probabilities=probabilities)
    if decided:  # the numbering it kept (files copied when it kept none) and the review flags
        from spinediff.inference.postprocess_command import postprocess_folder
        from spinediff.inference.review import REVIEW_FILE

        reviewed = (folder / REVIEW_FILE).is_file()
        postprocess_folder(raw_output, output, folder, overwrite=True, progress=False, review=reviewed,
                           images=inputs if reviewed else None)


def find_raw_dataset(name: str) -> Path:
    """The raw dataset folder of an ID (``504``) or a name (``Dataset504_...``)."""
    from spinediff.paths import resolve_raw_dataset

    return resolve_raw_dataset(name)


def dataset_level_order(raw: Path):
    """:func:`level_order` of the raw dataset ``raw`` with its own foreground labels and file ending (its
    ``dataset.json``): what ``spinediff benchmark --stress`` checks before any training and the test itself uses."""
    from spinediff.io import read_json

    dataset_json = read_json(raw / "dataset.json")
    labels = foreground_labels(dataset_json)
    return level_order(raw, labels, dataset_json.get("file_ending", ".nii.gz"))


def level_order(raw: Path, labels: list[int], ending: str = ".nii.gz"):
    """The order the labels keep along the spine in every reference of the raw dataset ``raw``
    (:func:`~spinediff.inference.level_order.learn_order`); refuses a dataset whose labels keep none (nothing to
    stress)."""
    import SimpleITK as sitk

    from spinediff.inference.level_order import label_centroids, learn_order

    centroids = []
    for reference in sorted((raw / "labelsTr").glob(f"*{ending}")):
        image = sitk.ReadImage(str(reference))
        centroids.append(label_centroids(image, sitk.GetArrayFromImage(image), labels))
    order = learn_order(centroids) if centroids else None
    if order is None:
        raise SpineDiffError(f"The labels of {raw.name} keep no order along any direction in {raw / 'labelsTr'}: "
                             "there is nothing to stress (the stress test moves ordered levels, e.g. vertebrae).")
    return order


@dataclass(frozen=True)
class _StressContext:
    """What every share of the stress test needs (sent to a worker process as it is)."""

    folder: Path
    settings: StressSettings
    variants: dict
    order: object
    channels: list
    ending: str
    work: Path


def stress_share(context: _StressContext, share: tuple) -> list[dict]:
    """One share of the stress test: the cases of ``share`` = (source, raw folder, folds, cases, name of its folders)
    varied, predicted by ``folds`` as a user's run predicts them (:func:`predict_postprocessed`) and scored; one row
    per case-variant."""
    import SimpleITK as sitk

    from spinediff.inference.models import ModelFolder
    from spinediff.inference.review import REVIEW_TABLE, read_review_table
    from spinediff.io import read_json

    settings, order, ending, work = context.settings, context.order, context.ending, context.work
    source, source_raw, use_folds, cases, where = share
    inputs, predicted = work / f"in_{where}", work / f"out_{where}"
    inputs.mkdir()
    ignore = ignore_label(read_json(source_raw / "dataset.json"))
    truth = {}
    for case in cases:
        label = sitk.ReadImage(str(source_raw / "labelsTr" / f"{case}{ending}"))
        whole = sitk.GetArrayFromImage(label)
        images = [sitk.ReadImage(str(source_raw / "imagesTr" / f"{case}_{int(c):04d}{ending}"))
                  for c in context.channels]
        axis, sign = spine_array_axis(label, order.direction)
        for name, fractions in context.variants.items():
            stem = f"{case}-{name}"  # the variant's case identifier
            cut = None
            for c, image in zip(context.channels, images, strict=True):
                varied, cut = make_variant(image, label, axis, sign, fractions)
                sitk.WriteImage(varied, str(inputs / f"{stem}_{int(c):04d}{ending}"), True)
            reference = sitk.GetArrayFromImage(cut)
            truth[stem] = (case, name, reference, in_view_shares(whole, reference, list(order.labels)))
            if settings.keep:
                references = work / f"ref_{where}"
                references.mkdir(exist_ok=True)
                sitk.WriteImage(cut, str(references / f"{stem}{ending}"), True)
    start = time.perf_counter()
    predict_postprocessed(settings, ModelFolder.open(context.folder), use_folds, inputs, predicted)
    seconds = time.perf_counter() - start
    numbering, flags = {}, read_review_table(predicted / REVIEW_TABLE)  # as the user's run wrote them
    summary = predicted / "prediction.json"
    if summary.is_file():
        for identifier, entry in read_json(summary).get("cases", {}).items():
            numbering[identifier] = ((entry.get("uncertainty") or {}).get("level_numbering") or {})
    elif (predicted / "level_numbering.json").is_file():
        reports = read_json(predicted / "level_numbering.json")["cases"]
        numbering = {k[: -len(ending)]: v for k, v in reports.items()}
    rows = []
    for stem, (case, name, reference, in_view) in truth.items():
        answer = sitk.GetArrayFromImage(sitk.ReadImage(str(predicted / f"{stem}{ending}")))
        scores = level_scores(answer, reference, list(order.labels), in_view, ignore)
        rows.append({"source": source, "folds": use_folds, "case": case, "variant": name, **scores,
                     "numbering_confidence": numbering.get(stem, {}).get("confidence"),
                     "flagged": flags[stem]["review"] if stem in flags else None,
                     "flag_reasons": flags[stem]["reasons"] if stem in flags else None,
                     "seconds_per_case": seconds / max(1, len(truth))})
    return rows


def _stress_share_in_worker(context: _StressContext, share: tuple) -> list[dict]:
    """:func:`stress_share` in a worker process with one torch thread (shares side by side split the cores fairly)."""
    import torch

    torch.set_num_threads(1)
    return stress_share(context, share)


def _share_name(share: tuple) -> str:
    source, _, use_folds, cases, _ = share
    scans = cases[0] if len(cases) == 1 else f"{len(cases)} scans"
    return f"{source}, fold{'s' if len(use_folds) > 1 else ''} {' '.join(use_folds)} ({scans})"


def stress_shares(groups: list[tuple], workers: int, keep: bool) -> list[tuple]:
    """The stress test's units of work from ``groups`` = (source, raw folder, folds, cases): a group each (its
    folders ``in_/out_/ref_<source>_<folds>``, the layout ``--keep`` leaves), or, side by side without ``keep``, a
    scan each, so that the workers share the work evenly (five folds on two workers would leave one idle for the
    last fold). The shares' rows come out in the same order either way."""
    shares = []
    for source, raw, folds, cases in groups:
        where = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', source).strip('_')}_{'_'.join(folds)}"  # a folder name
        if workers > 1 and not keep:
            shares += [(source, raw, folds, [case], f"{where}_{case}") for case in cases]
        else:
            shares.append((source, raw, folds, list(cases), where))
    return shares


def share_voxels(context: _StressContext, share: tuple) -> float:
    """The voxels a share predicts (its scans' first channel, read from the headers, once per variant)."""
    import SimpleITK as sitk

    source_raw, cases = share[1], share[3]
    total = 0.0
    for case in cases:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(source_raw / "imagesTr" / f"{case}_{int(context.channels[0]):04d}{context.ending}"))
        reader.ReadImageInformation()
        total += float(np.prod(reader.GetSize()))
    return total * len(context.variants)


def time_left(sizes: list[float], started: dict[int, float], finished: dict[int, float], now: float,
              workers: int) -> float:
    """Seconds until the last of the shares (``sizes``: the work of each, e.g. voxels) ends, ``workers`` at a time in
    their order: the seconds per unit of work measured on the ``finished`` ones (index → end time, ``started``: index
    → start time), what the running ones have left of theirs, the queued ones handed to the first worker free."""
    done = [i for i in finished if sizes[i]]
    if not done:
        return float("nan")
    rate = sum(finished[i] - started[i] for i in done) / sum(sizes[i] for i in done)
    unfinished = [i for i in range(len(sizes)) if i not in finished]
    free = [max(0.0, sizes[i] * rate - (now - started[i])) for i in unfinished if i in started]
    free += [0.0] * max(0, workers - len(free))
    for i in unfinished:
        if i not in started:
            slot = free.index(min(free))
            free[slot] += sizes[i] * rate
    return max(free) if unfinished else 0.0


def share_order(voxels: list[float], workers: int, largest_first: bool) -> list[int]:
    """The order in which the shares (``voxels``: the work of each) are handed out: side by side and
    ``largest_first``, the most voxels first (ties in their given order); otherwise as given."""
    order = list(range(len(voxels)))
    if workers > 1 and largest_first:
        order.sort(key=lambda i: -voxels[i])
    return order


def run_stress_shares(context: _StressContext, shares: list[tuple], work_in_worker=None) -> list[list[dict]]:
    """Every share's rows, in the order of ``shares`` (the result is the same whatever ``settings.workers``); side
    by side, the shares are handed out largest first (:func:`share_order`), each to
    ``work_in_worker(context, share)`` (default :func:`_stress_share_in_worker`) in a process of its own; each
    share's end is printed with the time left (:func:`time_left`, the shares' work counted in voxels: a T1w scan of
    381 mm takes three times as long as a T2w one of 224 mm)."""
    voxels = [share_voxels(context, share) for share in shares]
    workers = max(1, min(context.settings.workers, len(shares)))
    order = share_order(voxels, workers, context.settings.largest_first)
    queue = [shares[i] for i in order]  # the shares as they are handed out; queue index k is shares[order[k]]
    voxels = [voxels[i] for i in order]
    sizes = [len(share[3]) * len(context.variants) for share in queue]
    total = sum(sizes)
    start = time.perf_counter()
    # shares start in the queue's order, the first ones at once and each later one as an earlier one ends
    started = {k: start for k in range(workers)}
    finished: dict[int, float] = {}

    def report(k: int) -> None:
        now = time.perf_counter()
        finished[k] = now
        if len(finished) + workers - 1 < len(queue):
            started[len(finished) + workers - 1] = now
        done = sum(sizes[i] for i in finished)
        left = time_left(voxels, started, finished, now, workers)
        print(f"[stress] {_share_name(queue[k])}: {sizes[k]} case-variants predicted and scored; {done}/{total} "
              f"done in {(now - start) / 60:.1f} min, about {left / 60:.0f} min left", flush=True)

    print(f"[stress] {total} case-variants ({len(context.variants)} variants of each scan) in {len(queue)} "
          f"share{'s' if len(queue) > 1 else ''}, {workers} side by side"
          f"{', the largest first' if order != list(range(len(order))) else ''}", flush=True)
    results: list = [None] * len(queue)
    if workers == 1:
        for k, share in enumerate(queue):
            results[k] = stress_share(context, share)
            report(k)
    else:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(work_in_worker or _stress_share_in_worker, context, share): k
                       for k, share in enumerate(queue)}
            pending = set(futures)
            try:
                while pending:
                    ended, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in ended:
                        k = futures[future]
                        results[k] = future.result()
                        report(k)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    rows: list = [None] * len(shares)
    for k, i in enumerate(order):
        rows[i] = results[k]
    return rows


def stress_test(model, settings: StressSettings | None = None, output: str | os.PathLike | None = None) -> dict:
    """The stress test of ``model`` (a :class:`~spinediff.inference.models.ModelFolder`): every validation case of
    each fold predicted by that fold, as it is and in ``settings.variants``; writes ``stress_position.json``,
    ``.md`` and ``.png`` (:func:`~spinediff.evaluation.stress_figure.stress_figure`) to ``output`` (default: the
    model folder, where ``spinediff find_best`` reads it) and returns the result; ``settings.workers`` shares
    (:func:`stress_shares`) are predicted side by side, the largest first (:func:`run_stress_shares`)."""
    from spinediff.io import read_json, write_json, write_text
    from spinediff.paths import nnunet_folder

    settings = settings or StressSettings()
    folder = model.path
    dataset = folder.parent.name
    raw = nnunet_folder("raw") / dataset
    preprocessed = nnunet_folder("preprocessed") / dataset
    dataset_json = read_json(raw / "dataset.json")
    ending = dataset_json.get("file_ending", ".nii.gz")
    channels = sorted(dataset_json["channel_names"], key=int)
    folds = [str(f) for f in settings.folds] if settings.folds else sorted(
        p.name[5:] for p in folder.glob("fold_*") if (p / "checkpoint_final.pth").is_file())
    if not folds:
        raise SpineDiffError(f"{folder} has no trained fold (fold_*/checkpoint_final.pth).")
    variants = {name: variant_fractions(name) for name in (settings.variants or VARIANTS)}
    order = dataset_level_order(raw)
    groups = [(dataset, raw, [f], _cases_of_fold(preprocessed, f)) for f in folds]
    if settings.training_scans:
        groups += [(training_source(dataset), raw, [f], _cases_of_fold(preprocessed, f, "train")) for f in folds]
    if settings.other_dataset:
        other = find_raw_dataset(settings.other_dataset)
        other_cases = sorted(p.name[: -len(ending)] for p in (other / "labelsTr").glob(f"*{ending}"))
        groups.append((other.name, other, folds, other_cases))
    work = Path(tempfile.mkdtemp(prefix="stress_position_"))
    context = _StressContext(folder, settings, variants, order, list(channels), ending, work)
    shares = stress_shares(groups, settings.workers, settings.keep)
    try:
        rows = [row for share_rows in run_stress_shares(context, shares) for row in share_rows]
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    out = Path(output) if output is not None else folder
    out.mkdir(parents=True, exist_ok=True)
    if settings.keep:
        kept = out / "stress_cases"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.move(str(work), str(kept))
    else:
        shutil.rmtree(work, ignore_errors=True)
    table = summarise(rows, variants)
    result = {"model": str(folder), "dataset": dataset, "other_dataset": settings.other_dataset, "folds": folds,
              "variants": {k: list(v) for k, v in variants.items()}, "labels": list(order.labels),
              "level_direction": list(order.direction), "summary": table, "cases": rows,
              "stress_dice": stress_dice(table, dataset), "stress_dice_worst": worst_stressed(table, dataset)[1],
              "review_split": review_split([r for r in rows if r["source"] == dataset and r["variant"] != "plain"]),
              "seen_unseen": seen_unseen(rows, dataset) if settings.training_scans else None,
              "command": settings.command, "environment": software_environment(),
              "made_by": "spinediff stress test (spinediff.experiments.stress)"}
    write_json(result, out / STRESS_FILE)
    write_text(markdown(result), out / Path(STRESS_FILE).with_suffix(".md").name)
    stress_figure(result, out / Path(STRESS_FILE).with_suffix(".png").name)
    return result
