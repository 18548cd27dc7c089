"""The stress test drawn: stress_position.png beside stress_position.json (spinediff.evaluation.stress_figure)."""

from __future__ import annotations

import math

import pytest

from spinediff.evaluation.stress_figure import stress_figure, variant_points
from spinediff.experiments.stress import summarise
from spinediff.experiments.stress_variants import VARIANTS


def _case(source, case, variant, dice, flagged):
    return {"source": source, "folds": ["0"], "case": case, "variant": variant, "level_dice": dice,
            "level_dice_in_view": dice, "merged_dice": 0.9, "numbering_confidence": 0.9, "flagged": flagged}


def _result():
    cases = []
    for variant in ("plain", "crop_top_20", "crop_bottom_20"):
        cases.append(_case("Dataset9_A", "a", variant, 0.9, False))
        # b fails with the bottom cut (flagged); its plain level Dice is NaN (no level in view: drawn at 0, not lost)
        dice = {"plain": 0.8, "crop_top_20": 0.7, "crop_bottom_20": 0.0}[variant]
        cases.append(_case("Dataset9_A", "b", variant, dice, variant == "crop_bottom_20"))
        cases.append(_case("Dataset8_T1", "c", variant, float("nan") if variant == "plain" else 0.6, True))
    variants = {k: VARIANTS[k] for k in ("plain", "crop_top_20", "crop_bottom_20")}
    return {"model": "/r/Dataset9_A/nnUNetTrainer__nnUNetPlans__2d", "dataset": "Dataset9_A", "folds": ["0"],
            "summary": summarise(cases, variants), "cases": cases}


def test_the_stress_figure_draws_every_scan_per_variant_and_source(tmp_path):
    result = _result()
    target = tmp_path / "stress_position.png"
    drawn = stress_figure(result, target)
    assert target.is_file() and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: nothing half-written beside it
    assert [d["source"] for d in drawn] == ["Dataset9_A", "Dataset8_T1"]  # one panel per source, the model's first
    own = {p["variant"]: p for p in drawn[0]["variants"]}
    assert list(own) == ["plain", "crop_top_20", "crop_bottom_20"]
    assert own["crop_bottom_20"]["dice"] == [0.9, 0.0] and own["crop_bottom_20"]["flagged"] == [False, True]
    assert own["crop_top_20"]["mean"] == pytest.approx(0.8)
    other = variant_points(result, "Dataset8_T1")
    assert math.isnan(other[0]["dice"][0]) and other[1]["flagged"] == [True]


def test_seen_and_unseen_scans_are_read_by_their_failure_rates():
    """The stress test's reading of the training scans beside the held-out ones: subjects when the seen scans fail at
    most half as often as the unseen ones, training (augmentation or network) otherwise, none without failures."""
    from spinediff.experiments.stress_report import READINGS, markdown, seen_unseen_reading

    def split(seen, unseen):
        return {"seen": {"plain": 0.9, "stressed": 0.8, "stressed_answers": seen[1], "failures": seen[0]},
                "unseen": {"plain": 0.9, "stressed": 0.6, "stressed_answers": unseen[1], "failures": unseen[0]}}

    assert seen_unseen_reading(split((2, 120), (9, 32))) == "subjects"  # the twenty-fourth run's numbers
    assert seen_unseen_reading(split((1, 20), (1, 10))) == "subjects"  # half the rate: still the subjects
    assert seen_unseen_reading(split((4, 4), (1, 1))) == "training"
    assert seen_unseen_reading(split((3, 20), (1, 10))) == "training"
    assert seen_unseen_reading(split((0, 20), (0, 10))) == "none"
    assert seen_unseen_reading(split((0, 20), (1, 10))) == "subjects"
    result = {"model": "m", "dataset": "D", "folds": ["0"], "labels": [1, 2], "command": "c", "summary": [],
              "cases": [], "seen_unseen": {**split((2, 120), (9, 32)), "reading": "subjects"}}
    table = markdown(result)
    assert "2 of 120 stressed answers below 0.5" in table and "9 of 32" in table and READINGS["subjects"] in table
    assert READINGS["training"] not in table
