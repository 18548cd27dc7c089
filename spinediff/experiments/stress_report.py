"""The stress test's tables (:mod:`spinediff.experiments.stress`): the summary per source and variant, the score
``spinediff find_best`` ranks on, the review flags' split, the scans seen and unseen in training, and the Markdown
report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spinediff.evaluation.stress_figure import FAILURE
from spinediff.utilities.environment import describe


def training_source(dataset: str) -> str:
    """The source name of a dataset's training scans in the stress test's rows
    (:attr:`spinediff.experiments.stress.StressSettings.training_scans`)."""
    return f"{dataset} (training scans)"


#: What :func:`training_source` leaves in the names of the folders ``--keep`` writes for the training scans
#: (``in_/ref_/out_<dataset>_training_scans_<fold>``): the studies that read held-out answers skip those folders.
TRAINING_FOLDER_MARK = "_training_scans_"


def stress_dice(table: list[dict], dataset: str) -> float:
    """The model's score under the stress test: the mean level Dice over every variant of its own dataset's
    validation scans, the plain one included (what ``spinediff find_best`` ranks on when every candidate has one)."""
    values = [row["mean_level_dice"] for row in table if row["source"] == dataset]
    return float(np.mean(values)) if values else float("nan")


def worst_stressed(table: list[dict], dataset: str) -> tuple[str | None, float]:
    """The stressed variant (plain excluded) of the dataset's own scans with the lowest mean level Dice, and that
    Dice (None and NaN without one)."""
    stressed = [row for row in table if row["source"] == dataset and row["variant"] != "plain"]
    if not stressed:
        return None, float("nan")
    worst = min(stressed, key=lambda row: row["mean_level_dice"])
    return worst["variant"], float(worst["mean_level_dice"])


def summarise(rows: list[dict], variants: dict) -> list[dict]:
    table = []
    for source in dict.fromkeys(r["source"] for r in rows):
        plain = [r["level_dice"] for r in rows if r["source"] == source and r["variant"] == "plain"]
        for name in variants:
            mine = [r for r in rows if r["source"] == source and r["variant"] == name]
            if not mine:
                continue
            level = float(np.nanmean([r["level_dice"] for r in mine]))
            confidences = [r["numbering_confidence"] for r in mine if r["numbering_confidence"] is not None]
            in_view = [r["level_dice_in_view"] for r in mine if r.get("level_dice_in_view") is not None]
            table.append({"source": source, "variant": name, "cases": len(mine), "mean_level_dice": level,
                          "mean_level_dice_in_view": float(np.nanmean(in_view)) if in_view else None,
                          "mean_merged_dice": float(np.nanmean([r["merged_dice"] for r in mine])),
                          "cases_below_0.5": sum(1 for r in mine if not r["level_dice"] >= FAILURE),
                          "minus_plain": level - float(np.nanmean(plain)) if plain else float("nan"),
                          "mean_numbering_confidence": float(np.mean(confidences)) if confidences else None,
                          **flag_counts(mine)})
    return table


def flag_counts(rows: list[dict]) -> dict:
    """How many of ``rows`` the review rule flagged, and how many of those below 0.5 level Dice (the failures) it
    flagged (None where the prediction gave no review flags)."""
    judged = [r for r in rows if r.get("flagged") is not None]
    if not judged:
        return {"flagged": None, "failures_flagged": None}
    failures = [r for r in judged if not r["level_dice"] >= FAILURE]
    return {"flagged": sum(1 for r in judged if r["flagged"]),
            "failures_flagged": sum(1 for r in failures if r["flagged"])}


def review_split(rows: list[dict]) -> dict | None:
    """The scans the review lets through and those it flags (None where the prediction gave no review flags): how
    many of ``rows`` each, and their mean level Dice (NaN for none): what a user who checks every flagged scan gets
    on the others without looking."""
    judged = [r for r in rows if r.get("flagged") is not None]
    if not judged:
        return None
    split = {}
    for key, flagged in (("unflagged", False), ("flagged", True)):
        mine = [r["level_dice"] for r in judged if bool(r["flagged"]) == flagged]
        mean = float(np.nanmean(mine)) if any(not np.isnan(x) for x in mine) else float("nan")
        split |= {key: len(mine), f"{key}_mean_level_dice": mean}
    return split


def seen_unseen(rows: list[dict], dataset: str) -> dict:
    """The dataset's scans the folds never saw (validation) beside those they were trained on (training scans,
    :attr:`StressSettings.training_scans`): per group, the number of scans (a training scan once per fold that
    trained on it), the mean level Dice plain and over the
    stressed variants, and how many stressed answers fall below 0.5; and ``reading``, what they say
    (:func:`seen_unseen_reading`)."""
    out = {}
    for key, source in (("unseen", dataset), ("seen", training_source(dataset))):
        mine = [r for r in rows if r["source"] == source]
        stressed = [r["level_dice"] for r in mine if r["variant"] != "plain"]
        plain = [r["level_dice"] for r in mine if r["variant"] == "plain"]
        out[key] = {"scans": len({(r["case"], tuple(r["folds"])) for r in mine}),
                    "plain": float(np.nanmean(plain)) if plain else float("nan"),
                    "stressed": float(np.nanmean(stressed)) if stressed else float("nan"),
                    "stressed_answers": len(stressed),
                    "failures": sum(1 for d in stressed if not d >= FAILURE)}
    out["reading"] = seen_unseen_reading(out)
    return out


def seen_unseen_reading(split: dict) -> str:
    """What :func:`seen_unseen`'s numbers say: ``none`` (no stressed answer below 0.5 on either), ``subjects`` (the
    scans seen in training fail at most half as often as those never seen: the model learnt its subjects, more
    annotated subjects are what helps) or ``training`` (the training scans fail about as often: the augmentation or
    the network falls short)."""
    seen, unseen = split["seen"], split["unseen"]
    if not seen["failures"] and not unseen["failures"]:
        return "none"
    seen_rate, unseen_rate = (g["failures"] / max(g["stressed_answers"], 1) for g in (seen, unseen))
    return "subjects" if seen_rate <= unseen_rate / 2 else "training"


READINGS = {"none": "No stressed answer falls below 0.5 on either.",
            "subjects": "The scans never seen fail more than twice as often: the model learnt its training subjects "
                        "under these cuts but not to count on others, and more annotated subjects are what helps.",
            "training": "The training scans fail about as often as those never seen: the augmentation or the network "
                        "falls short, and more scans of the same kind would help less."}


def _seen_unseen_lines(split: dict) -> list[str]:
    seen, unseen = split["seen"], split["unseen"]

    def share(group):
        return f"{group['failures']} of {group['stressed_answers']} stressed answers below 0.5"

    return ["", f"Scans the folds were trained on (each predicted by a fold that saw it): plain {seen['plain']:.3f}, "
            f"stressed {seen['stressed']:.3f}, {share(seen)}; scans they never saw: plain {unseen['plain']:.3f}, "
            f"stressed {unseen['stressed']:.3f}, {share(unseen)}. {READINGS[split['reading']]}"]


def markdown(result: dict) -> str:
    lines = [f"# Position and field-of-view stress test: {Path(result['model']).name} on {result['dataset']}", "",
             f"Folds {', '.join(result['folds'])}; levels {result['labels']}; command: `{result['command']}`", "",
             "| scans | variant | cases | mean level Dice | − plain | levels ≥ half in view | merged Dice "
             "| cases < 0.5 | of them flagged | cases flagged | numbering confidence |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["summary"]:
        confidence = "" if row["mean_numbering_confidence"] is None else f"{row['mean_numbering_confidence']:.2f}"
        flagged = ("", "") if row.get("flagged") is None else (row["failures_flagged"], row["flagged"])
        in_view = "" if row.get("mean_level_dice_in_view") is None else f"{row['mean_level_dice_in_view']:.3f}"
        lines.append(f"| {row['source']} | {row['variant']} | {row['cases']} | {row['mean_level_dice']:.3f} | "
                     f"{row['minus_plain']:+.3f} | {in_view} | {row['mean_merged_dice']:.3f} | "
                     f"{row['cases_below_0.5']} | {flagged[0]} | {flagged[1]} | {confidence} |")
    worst, worst_dice = worst_stressed(result["summary"], result["dataset"])
    if worst is not None:
        mean = float(np.mean([r["mean_level_dice"] for r in result["summary"]
                              if r["source"] == result["dataset"] and r["variant"] != "plain"]))
        lines += ["", f"Mean level Dice over the stressed variants: {mean:.3f}; worst: {worst} ({worst_dice:.3f})."]
        in_view = [r["mean_level_dice_in_view"] for r in result["summary"] if r["source"] == result["dataset"]
                   and r["variant"] != "plain" and r.get("mean_level_dice_in_view") is not None]
        if in_view:
            lines += ["", f"Over the levels at least half in view (a sliver a cut leaves at the edge left out): "
                      f"{float(np.mean(in_view)):.3f}. The stress score (`dice_stress`, what find_best ranks on) "
                      "counts every level."]
    stressed = [r for r in result["cases"] if r["source"] == result["dataset"] and r["variant"] != "plain"]
    counts = flag_counts(stressed)
    if counts["flagged"] is not None:
        failures = sum(1 for r in stressed if not r["level_dice"] >= FAILURE)
        lines += ["", f"Review flags (the model's review.json, as `spinediff predict` / `spinediff postprocess "
                  f"--images` give them) on the stressed scans: {counts['failures_flagged']} of {failures} with a "
                  f"level Dice below 0.5 flagged; {counts['flagged']} of {len(stressed)} flagged in all."]
        split = review_split(stressed)
        plain = [r["mean_level_dice"] for r in result["summary"]
                 if r["source"] == result["dataset"] and r["variant"] == "plain"]
        behind = f" ({split['unflagged_mean_level_dice'] - plain[0]:+.3f} from plain)" if plain else ""
        lines += ["", f"What the review lets through: the {split['unflagged']} stressed scans not flagged score a "
                  f"mean level Dice of {split['unflagged_mean_level_dice']:.3f}{behind}, the {split['flagged']} "
                  f"flagged {split['flagged_mean_level_dice']:.3f} (check those)."]
    if result.get("seen_unseen"):
        lines += _seen_unseen_lines(result["seen_unseen"])
    if result.get("environment"):  # a result written before the environment was recorded has none
        lines += ["", describe(result["environment"])]
    return "\n".join(lines) + "\n"


