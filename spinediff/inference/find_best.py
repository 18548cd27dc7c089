"""``find_best``: rank every trained configuration/trainer of a dataset on its cross-validation, try the
ensemble of the top two and, for a model trained in several slice directions (``nnUNetPlans_axial|coronal|sagittal``),
their 2.5D fusion, and say how to predict with the winner (nnU-Net's find_best_configuration, for spinediff's
tasks).

Scores are pooled over all validation cases of the compared folds (as nnU-Net pools its
cross-validation predictions):

- segmentation: the foreground Dice (per class, the mean over cases; then the mean over classes),
  from each fold's ``validation/summary.json`` (nnU-Net's evaluation; written by spinediff's and by
  nnU-Net's own trainers). Higher is better.
- translation / generation: the MAE inside the body (HU > -500, lower is better) from
  ``validation_metrics.json``: it measures the anatomy, whereas PSNR over the whole volume is
  dominated by the air around the patient. Datasets whose target is not CT have no body MAE and are
  ranked on PSNR (higher is better). PSNR and SSIM are shown beside it.

Ensemble of the top two (see :mod:`.find_best_ensemble`): HU predictions are averaged directly from
the folds' ``validation/`` folders. Segmentation needs class probabilities, which the final
validation does not keep: they are used when both have ``validation/CASE.npz``; otherwise, with
``repredict=True``, the validation cases are predicted again from the raw images (each by its own
fold, one sample, the steps of the final validation) with probabilities, and the ensemble is
compared with the two singles *as re-predicted*, so that the comparison is like for like.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spinediff.datasets.dataset_json import foreground_labels, ignore_label
from spinediff.errors import SpineDiffError
from spinediff.inference.candidates import Candidate, better, primary_metric, score
from spinediff.inference.models import find_dataset_results
from spinediff.io import ensure_new_output, read_json, write_json
from spinediff.metrics.direction import direction as metric_direction
from spinediff.metrics.direction import higher_is_better
from spinediff.paths import split_model_folder_name
from spinediff.tasks import Task, task_spec
from spinediff.utilities.lock import LOCK_NAME, folder_lock


def _fold_results(fold_folder: Path, task: Task) -> dict[str, dict] | None:
    """Per-case metrics of one finished fold, or None if its final validation has not run."""
    if task.writes_labels:
        summary = fold_folder / "validation" / "summary.json"
        if not summary.is_file():
            return None
        return {Path(entry["prediction_file"]).name: {str(k): float(v["Dice"]) for k, v in entry["metrics"].items()}
                for entry in read_json(summary)["metric_per_case"]}
    metrics = fold_folder / "validation_metrics.json"
    if not metrics.is_file():
        return None
    return read_json(metrics).get("per_case", {})


def collect_candidates(dataset_folder: Path, task: Task, folds: Sequence[str] | None = None
                       ) -> tuple[list[Candidate], list[str], list[str]]:
    """Every trained candidate with the compared folds finished; returns (candidates, folds, notes)."""
    found: list[tuple[Path, dict[str, dict[str, dict]]]] = []
    notes = []
    for folder in sorted(p for p in dataset_folder.iterdir() if p.is_dir() and split_model_folder_name(p.name)):
        finished = {}
        for fold_folder in sorted(folder.glob("fold_*")):
            results = _fold_results(fold_folder, task)
            if results:
                finished[fold_folder.name[len("fold_"):]] = results
        if finished:
            found.append((folder, finished))
        else:
            notes.append(f"{folder.name}: no fold with a finished final validation; not ranked.")
    if not found:
        raise SpineDiffError(f"No trained configuration with a finished cross-validation in {dataset_folder}. "
                             "Train folds with `spinediff train` first.")
    if folds is None:
        common = set.intersection(*(set(finished) for _, finished in found))
        if not common:
            raise SpineDiffError("The trained configurations share no finished fold: "
                                 + "; ".join(f"{f.name}: folds {sorted(r)}" for f, r in found)
                                 + ". Pass the folds to compare with -f.")
        folds = sorted(common, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f))
    folds = [str(f) for f in folds]
    candidates = []
    for folder, finished in found:
        missing = [f for f in folds if f not in finished]
        if missing:
            notes.append(f"{folder.name}: fold(s) {', '.join(missing)} not finished; not ranked.")
            continue
        trainer, plans, configuration = split_model_folder_name(folder.name)
        per_case = {case: metrics for f in folds for case, metrics in finished[f].items()}
        candidates.append(Candidate(folder, trainer, plans, configuration, folds, per_case))
    return candidates, folds, notes


def predict_command(dataset_id: str, candidate: Candidate, output: str = "OUTPUT_FOLDER",
                    probabilities: bool = False) -> str:
    folds = " ".join(candidate.folds)
    if candidate.is_spinediff:
        return (f"spinediff predict -i INPUT_FOLDER -o {output} -d {dataset_id} -c {candidate.configuration} "
                f"-tr {candidate.trainer} -p {candidate.plans} -f {folds}"
                + (" --save-probabilities" if probabilities else ""))
    # a spinediff trainer based on nnU-Net's (nnUNetTrainerLevelContext): nnU-Net finds it through nnUNet_extTrainer
    from spinediff.paths import NNUNET_TRAINER_ENTRY
    from spinediff.training.nnunet_entry import spinediff_trainers

    prefix = f"nnUNet_extTrainer={NNUNET_TRAINER_ENTRY} " if hasattr(spinediff_trainers, candidate.trainer) else ""
    return (f"{prefix}nnUNetv2_predict -i INPUT_FOLDER -o {output} -d {dataset_id} -c {candidate.configuration} "
            f"-tr {candidate.trainer} -p {candidate.plans} -f {folds}" + (" --save_probabilities" if probabilities
                                                                           else ""))


def nnunet_commands(dataset_id: str, candidate: Candidate, postprocessing: dict) -> list[str]:
    """How a segmentation model of nnU-Net's trainers predicts held-out scans: ``nnUNetv2_predict`` (with
    probabilities when its post-processing reads them), then ``spinediff postprocess``, which numbers the levels when
    the cross-validation kept that (``postprocessing``; the files are copied otherwise) and flags the cases to
    review by the model's review rule, their intensities read from the inputs (``review.csv``) and their class
    probabilities when the rule has an entropy threshold."""
    from spinediff.inference.review import reads_probabilities

    needs = (bool(postprocessing.get("applied")) and postprocessing.get("foreground") == "probabilities") or \
        reads_probabilities(candidate.folder)
    return [predict_command(dataset_id, candidate, probabilities=needs),
            f"spinediff postprocess -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP -m {candidate.folder} --images INPUT_FOLDER"]


SLICE_DIRECTIONS = ("axial", "coronal", "sagittal")


def slice_direction_group(ranking: list[Candidate]) -> list[Candidate]:
    """The best-ranked model (trainer and configuration) trained under two or more ``nnUNetPlans_<direction>`` plans
    (``spinediff plan --slice-direction``): its candidates in those directions, best first; empty if none."""
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for candidate in ranking:  # best first, so the first full group is the best model's
        direction = candidate.plans.rsplit("_", 1)[-1] if "_" in candidate.plans else ""
        if direction in SLICE_DIRECTIONS:
            groups.setdefault((candidate.trainer, candidate.configuration), []).append(candidate)
    return next((group for group in groups.values() if len(group) >= 2), [])


@dataclass
class FindBestResult:
    task: Task
    metric: str
    folds: list[str]
    ranking: list[Candidate]
    ensemble: dict | None
    winner: str
    commands: list[str]
    notes: list[str]
    postprocessing: dict | None = None
    fused: dict | None = None  # the 2.5D fusion of one model in the slice directions (segmentation: probabilities)
    ranked_on: str = ""  # the score the ranking sorts by (dice_pp, dice_stress, or the primary metric)

    def table(self) -> str:
        metrics = [m for m in self.task.ranking_metrics if self.task.writes_labels
                   or any(m in c.scores for c in self.ranking)]
        metrics += [m for m in ("dice_stress",) if any(m in c.scores for c in self.ranking)]
        header = f"{'rank':<5} {'candidate':<60} {'cases':>5} " + " ".join(f"{m:>9}" for m in metrics)
        lines = [header, "-" * len(header)]
        for rank, c in enumerate(self.ranking, 1):
            lines.append(f"{rank:<5} {c.name:<60} {len(c.per_case):>5} "
                         + " ".join(f"{c.scores.get(m, float('nan')):>9.4f}" for m in metrics))
        for tag, label, e in (("ens", "ensemble of ranks 1+2", self.ensemble),
                              ("2.5D", f"2.5D fusion of {len((self.fused or {}).get('members', []))} slice directions",
                               self.fused)):
            if e and "scores" in e:
                lines.append(f"{tag:<5} {label:<60} {e['cases']:>5} "
                             + " ".join(f"{e['scores'].get(m, float('nan')):>9.4f}" for m in metrics))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"task": self.task.name, "metric": self.metric, "direction": metric_direction(self.metric),
                "ranked_on": self.ranked_on or self.metric, "folds": self.folds, "winner": self.winner,
                "commands": self.commands, "notes": self.notes,
                "ranking": [{"candidate": c.name, "trainer": c.trainer, "plans": c.plans,
                             "configuration": c.configuration, "num_cases": len(c.per_case), "scores": c.scores}
                            for c in self.ranking],
                "ensemble": self.ensemble, "fused_2_5d": self.fused, "postprocessing": self.postprocessing}


def find_best(dataset: str | int, *, folds: Sequence[int | str] | None = None, repredict: bool = False,
              output: str | os.PathLike | None = None, overwrite: bool = False,
              results_folder: str | os.PathLike | None = None, raw_folder: str | os.PathLike | None = None,
              device: str = "auto") -> FindBestResult:
    """Rank the dataset's trained candidates, try the top-two ensemble, write ``find_best.json``.

    Args:
        dataset: ID or name of the dataset in ``$nnUNet_results``.
        folds: folds to compare (default: those finished by every candidate).
        repredict: segmentation without saved probabilities: re-predict the validation cases to ensemble.
        output: the JSON (default ``$nnUNet_results/DatasetXXX/find_best.json``); never silently replaced.
        raw_folder: ``$nnUNet_raw`` (references of image tasks, inputs of re-prediction).
    """
    dataset_folder = find_dataset_results(dataset, results_folder)
    target = Path(output) if output else dataset_folder / "find_best.json"
    with contextlib.ExitStack() as locks:  # taken before the check that the output is new, held to the end
        # one find_best per dataset (it writes each model's postprocessing.json and review.json) and per output file
        locks.enter_context(folder_lock(dataset_folder, name=f".find_best{LOCK_NAME}", create=False))
        locks.enter_context(folder_lock(target.parent, name=f".{target.name}{LOCK_NAME}"))
        return _find_best(dataset_folder, ensure_new_output(target, overwrite), folds, repredict, overwrite,
                          raw_folder, device)


def _find_best(dataset_folder: Path, target: Path, folds: Sequence[int | str] | None, repredict: bool,
               overwrite: bool, raw_folder, device: str) -> FindBestResult:
    from spinediff.inference.find_best_ensemble import evaluate_ensemble

    task = None
    for dataset_json in sorted(dataset_folder.glob("*__*__*/dataset.json")):
        task = task_spec(read_json(dataset_json), dataset_json).task
        break
    if task is None:
        raise SpineDiffError(f"No trained configuration (TRAINER__PLANS__CONFIG/dataset.json) in {dataset_folder}.")
    candidates, used_folds, notes = collect_candidates(dataset_folder, task,
                                                       [str(f) for f in folds] if folds is not None else None)
    if not candidates:
        raise SpineDiffError(f"No candidate has all of folds {used_folds} finished: " + " ".join(notes))
    if task.writes_labels:  # the review rules it completes are read through their schema before any work
        from spinediff.inference.review import ReviewRule

        for candidate in candidates:
            ReviewRule.read(candidate.folder)
    metric = primary_metric(task, candidates)
    decisions: dict[str, dict] = {}
    for c in candidates:
        c.scores = score(c.per_case, task)
        if task.writes_labels:  # each candidate with the post-processing its own cross-validation keeps
            decisions[c.name] = decide_postprocessing(c, dataset_folder, raw_folder, overwrite)
            c.scores["dice_pp"] = decisions[c.name]["dice_after"]
    rank_on = compare_on = "dice_pp" if task.writes_labels else metric
    if task.writes_labels:
        stress = stress_scores(candidates, used_folds, notes)
        if stress:  # every candidate was stress-tested on these folds: rank on it (issue 34)
            for c in candidates:
                c.scores["dice_stress"] = stress[c.name]
            rank_on = "dice_stress"
    ranking = sorted(candidates, key=lambda c: (math.isnan(c.scores[rank_on]),
                                                -c.scores[rank_on] if higher_is_better(metric)
                                                else c.scores[rank_on]))
    dataset_id = dataset_folder.name[len("Dataset"):len("Dataset") + 3]
    best = ranking[0]
    winner, commands = best.name, [predict_command(dataset_id, best)]
    ensemble = None
    if len(ranking) >= 2:
        ensemble = evaluate_ensemble(ranking[:2], task, metric, dataset_folder, repredict, raw_folder, device)
        # the ensemble is not post-processed: it must beat the best single as that one will be predicted
        if "scores" in ensemble and task.writes_labels:
            ensemble["best_single_postprocessed"] = best.scores[compare_on]
        # re-predicted singles (segmentation without kept probabilities): the ensemble must also beat the best of
        # them, predicted alike; the cross-validation score alone may differ from them by the sampling settings
        beats_singles = "best_single" not in ensemble or better(ensemble["scores"][metric], ensemble["best_single"],
                                                                metric)
        if "scores" in ensemble and beats_singles and better(ensemble["scores"][metric], best.scores[compare_on],
                                                             metric):
            winner = f"ensemble of {ranking[0].name} and {ranking[1].name}"
            probabilities = task.writes_labels
            commands = [predict_command(dataset_id, c, f"OUTPUT_FOLDER_{i}", probabilities)
                        for i, c in enumerate(ranking[:2], 1)]
            commands.append("spinediff ensemble -i OUTPUT_FOLDER_1 OUTPUT_FOLDER_2 -o OUTPUT_FOLDER")
    fused = None
    group = slice_direction_group(ranking)
    if group:  # one model trained in several slice directions: their fusion (2.5D) is a candidate too
        fused = evaluate_ensemble(group, task, metric, dataset_folder, repredict, raw_folder, device)
        current = (ensemble["scores"][metric] if winner != best.name else best.scores[compare_on])
        beats_singles = "best_single" not in fused or better(fused.get("scores", {}).get(metric, math.nan),
                                                             fused["best_single"], metric)
        if "scores" in fused and beats_singles and better(fused["scores"][metric], current, metric):
            winner = "2.5D fusion of " + " and ".join(c.name for c in group)
            probabilities = task.writes_labels
            commands = [predict_command(dataset_id, c, f"OUTPUT_FOLDER_{i}", probabilities)
                        for i, c in enumerate(group, 1)]
            commands.append("spinediff ensemble -i " + " ".join(f"OUTPUT_FOLDER_{i}" for i in range(1, len(group) + 1))
                            + " -o OUTPUT_FOLDER")
    postprocessing = decisions.get(best.name) if winner == best.name else None
    if postprocessing is not None and not best.is_spinediff:
        commands = nnunet_commands(dataset_id, best, postprocessing)
    result = FindBestResult(task, metric, used_folds, ranking, ensemble, winner, commands, notes, postprocessing,
                            fused, rank_on)
    write_json(result.to_dict(), target)
    return result


#: The stress test of position and field of view of a model (``spinediff benchmark --stress``), in its folder.
STRESS_FILE = "stress_position.json"


def stress_scores(candidates: list[Candidate], folds: list[str], notes: list[str]) -> dict[str, float]:
    """Each candidate's ``stress_dice`` from its ``stress_position.json`` (the mean level Dice over the stress
    variants of its validation scans, plain included) when every candidate has one made on ``folds``; else {} (and
    a note when some have one)."""
    found = {}
    for c in candidates:
        path = c.folder / STRESS_FILE
        if not path.is_file():
            continue
        record = read_json(path)
        value = record.get("stress_dice") if isinstance(record, dict) else None
        if not isinstance(value, (int, float)) or [str(f) for f in record.get("folds", [])] != [str(f) for f in folds]:
            notes.append(f"{path} is not a stress test of folds {', '.join(folds)}; rerun spinediff benchmark "
                         "--stress on them.")
            continue
        found[c.name] = float(value)
    if found and len(found) < len(candidates):
        missing = [c.name for c in candidates if c.name not in found]
        notes.append(f"Ranked on the plain cross-validation: {', '.join(missing)} has no stress test "
                     f"({STRESS_FILE}; spinediff benchmark --stress).")
        return {}
    if found:
        notes.append("Ranked on the stress test of position and field of view (dice_stress: the mean level Dice "
                     f"over the cropped, padded and shifted validation scans, plain included; {STRESS_FILE}); "
                     "ensembles are judged on the plain cross-validation.")
    return found


def decide_postprocessing(candidate: Candidate, dataset_folder: Path, raw_folder, overwrite: bool) -> dict:
    """The candidate's post-processing, decided on its cross-validation and written next to it
    (``postprocessing.json``: applied by ``spinediff predict``; nnU-Net's own predictions need
    ``spinediff postprocess``), and its review rule (``review.json``, :mod:`spinediff.inference.review`)."""
    from spinediff.inference.postprocessing import (
        POSTPROCESSING_FILE,
        determine_postprocessing,
        validation_pairs,
        write_decision,
    )
    from spinediff.paths import nnunet_folder

    try:
        raw = nnunet_folder("raw", raw_folder) / dataset_folder.name
    except SpineDiffError:
        raw = None
    dataset_json = read_json(candidate.folder / "dataset.json")
    labels = foreground_labels(dataset_json)
    pairs = validation_pairs(candidate.folder, candidate.folds, raw)
    decision, _ = determine_postprocessing(pairs, labels, ignore=ignore_label(dataset_json))
    evidence = decision.to_dict()
    if not write_decision(evidence, candidate.folder, overwrite):
        raise SpineDiffError(f"{candidate.folder / POSTPROCESSING_FILE} holds another decision (made on other folds "
                             "or results). Pass --overwrite to replace it.")
    from spinediff.inference.review import write_cross_validation_rule

    write_cross_validation_rule(candidate.folder, pairs, labels, raw if raw is not None and raw.is_dir() else None)
    return evidence
