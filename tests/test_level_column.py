"""Issue 34: the level numbering as a column of vertebrae (places a level pitch apart, parts of one vertebra, blobs
off the column), the stress test's scores and the studies that look at its kept cases (numpy only: fast). The
helpers (a stack of vertebrae, its numbering) are test_position_contrast's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from test_position_contrast import numbered, stack


def test_the_stress_score_of_levels_in_view_leaves_out_a_sliver_at_the_edge():
    from spinediff.experiments.stress import in_view_shares, level_scores

    whole = stack([1, 2, 3, 4, 5], 10)
    cut = whole[:, 18:].copy()  # one row of L1 (rows 10-18) left at the top edge
    shares = in_view_shares(whole, cut, [1, 2, 3, 4, 5])
    assert 0 < shares[1] < 0.5 and shares[2] == 1.0
    missed = cut.copy()
    missed[missed == 1] = 0  # the network leaves the sliver out, every other level right
    scores = level_scores(missed, cut, [1, 2, 3, 4, 5], shares)
    assert scores["level_dice"] == pytest.approx(0.8) and scores["level_dice_in_view"] == 1.0
    shifted = np.where(cut > 1, cut - 1, 0)  # every whole level moved by one: both scores see it
    scores = level_scores(shifted, cut, [1, 2, 3, 4, 5], shares)
    assert scores["level_dice_in_view"] < 0.2 and scores["level_dice"] < 0.2
    assert "level_dice_in_view" not in level_scores(missed, cut, [1, 2, 3, 4, 5])


def test_vertebra_slots_count_pitches_and_share_a_place_for_parts_of_one_vertebra():
    from spinediff.inference.level_order import vertebra_slots

    # neighbours a pitch apart, a gap of two pitches (a vertebra not found), two parts of one vertebra
    assert vertebra_slots([0.0, 12.0, 25.0, 48.0, 53.0], 12.0) == [0, 1, 2, 4, 4]


def test_a_longer_field_of_view_is_numbered_as_a_consecutive_column():
    # seven vertebrae (a T1w scan from T11 to the sacrum), the network counting L1/L2 twice at the top: the column
    # keeps L3-L5 and numbers upwards from them; the two above L1 become background. A free assignment would skip
    # the second vertebra called L1 and the second called L2 (levels 1, -, 2, -, 3, 4, 5), which no spine has.
    values, report = numbered(stack([1, 1, 2, 2, 3, 4, 5], 10, length=110))
    assert values == [0, 0, 1, 2, 3, 4, 5]
    assert report["applied"] and report["labels"] == [1, 2, 3, 4, 5]


def test_the_free_assignment_is_what_the_consecutive_numbering_replaces(monkeypatch):
    from spinediff.inference import level_order

    monkeypatch.setattr(level_order, "CONSECUTIVE", False)
    values, _ = numbered(stack([1, 1, 2, 2, 3, 4, 5], 10, length=110))
    assert values != [0, 0, 1, 2, 3, 4, 5]  # the test above asserts what the old numbering got wrong


def test_a_component_as_long_as_two_vertebrae_is_parted_in_two():
    from scipy import ndimage

    from spinediff.inference.level_order import split_long

    # six vertebrae of a long scan (18 mm every 24 mm), the 3rd and 4th joined by a thin bridge through their disc
    array = stack([1, 2, 3, 3, 4, 5], 5, length=90)
    array[2:8, 5 + 2 * 12 + 9:5 + 3 * 12, 9:11] = 3
    components, count = ndimage.label(array > 0)
    assert count == 5  # five components for six vertebrae: separate() leaves them (not fewer than five levels)
    foreground = np.flatnonzero(array > 0)
    heights = np.unravel_index(foreground, array.shape)[1] * 2.0  # mm along y
    parted = split_long(components, foreground, heights, (3.0, 2.0, 1.0))
    sizes = np.bincount(parted.ravel())[1:]
    assert np.count_nonzero(sizes > 100) == 6  # the joined pair is two vertebrae again
    assert (split_long(parted, foreground, heights, (3.0, 2.0, 1.0)) == parted).all()  # nothing longer is left


def test_levels_right_at_hand_placed_centres_sees_a_shift_by_one_level():
    from studies.t1w_levels501 import levels_right

    centres = (40, 80, 120, 160, 200)  # mm along y, 1 mm rows
    labels = np.zeros((4, 240, 10), np.uint8)
    for level, centre in enumerate(centres, start=1):
        labels[:, centre - 12:centre + 12] = level
    image = sitk.GetImageFromArray(labels)
    assert levels_right(labels, image, centres) == 5
    shifted = np.zeros_like(labels)
    shifted[:, 40:] = labels[:, :-40]  # every level on the vertebra below
    assert levels_right(shifted, image, centres) == 0
    image.SetOrigin((0.0, -40.0, 0.0))  # the same shift undone by the geometry: the study reads world y
    assert levels_right(shifted, image, centres) == 5


def test_manual_bodies_renumbered_by_hand_placed_centres_and_scored():
    from studies.t1w_levels501 import dice_at_reference_levels, reference_from_hand_placed

    centres = (80, 120, 160, 200, 240)  # L1..L5, mm along y (1 mm rows)
    source = np.zeros((4, 280, 10), np.uint8)
    # as in Dataset504: seven bodies T11..L5 outlined, five kept under labels 1-5 out of order (T11, T12, L2, L3, L5)
    for value, centre in ((3, 0 + 12), (5, 40), (1, 120), (4, 160), (2, 240)):
        source[:, centre - 12:centre + 12] = value
    image = sitk.GetImageFromArray(source)
    reference = reference_from_hand_placed(source, image, centres)
    assert sorted(np.unique(reference)) == [0, 2, 3, 5]  # T11, T12 -> background; L1 and L4 were dropped at source
    assert (reference[:, 110:130] == 2).all() and (reference[:, 230:250] == 5).all()
    assert dice_at_reference_levels(reference, reference) == {2: 1.0, 3: 1.0, 5: 1.0}
    shifted = np.zeros_like(reference)
    shifted[:, :-40] = reference[:, 40:]  # every level on the vertebra above
    assert dice_at_reference_levels(shifted, reference) == {2: 0.0, 3: 0.0, 5: 0.0}


def test_a_blob_off_the_column_of_bodies_is_background_before_the_numbering():
    from spinediff.inference import level_geometry, level_order

    # five bodies down a gently curved column (mm: 1 mm voxels), and a bright blob 70 mm behind L3
    prediction = np.zeros((20, 240, 160), np.uint8)
    for level, y in enumerate((40, 75, 110, 145, 180), start=1):
        x = 60 + int(0.001 * (y - 110) ** 2)  # lordosis: a few mm off a straight line
        prediction[6:14, y - 12:y + 12, x - 18:x + 18] = level
    blob = (slice(6, 14), slice(100, 120), slice(120, 140))  # half a body: it takes part in the first fit
    centres = np.array([[10.0, y, 60 + 0.001 * (y - 110) ** 2] for y in (40, 75, 110, 145, 180)] +
                       [[10.0, 110.0, 130.0]])
    sizes = np.array([8 * 24 * 36] * 5 + [8 * 20 * 20], float)
    assert level_geometry.off_column(centres, centres[:, 1], sizes, 24.0) == [5]
    assert level_geometry.off_column(centres[:5], centres[:5, 1], sizes[:5], 24.0) == []  # the column itself stays
    prediction[blob] = 2
    speck = (slice(8, 12), slice(150, 156), slice(130, 136))  # too small to be a candidate, off the column too
    prediction[speck] = 4
    image = sitk.GetImageFromArray(prediction)
    order = level_order.LevelOrder(labels=(1, 2, 3, 4, 5), direction=(0.0, 1.0, 0.0))
    out, report = level_order.renumber_with_report(prediction, image, order)
    column = prediction.copy()
    column[blob] = column[speck] = 0
    assert report["off_column"] == 1 and report["off_column_small"] == 1
    assert (out == column).all()  # the blob and the speck are gone, the column keeps its labels


def test_several_large_blobs_beside_the_spine_do_not_pull_the_column_off_the_bodies():
    from spinediff.inference.level_geometry import off_column

    # as on a T1w scan: six bodies down the column (x 190-220 mm), and six large blobs of fat 130 mm behind its upper
    # half, each half the size of a body; one fit through all twelve would run obliquely from the blobs to the
    # lower bodies and call the upper bodies off
    bodies = [(31, 218, 29e3), (63, 212, 29e3), (98, 205, 35e3), (135, 198, 36e3), (174, 193, 43e3), (214, 188, 44e3)]
    blobs = [(43, 352, 20e3), (44, 350, 15e3), (78, 336, 13e3), (79, 334, 13e3), (111, 327, 20e3), (113, 329, 24e3)]
    rows = bodies + blobs
    centres = np.array([[20.0, y, x] for y, x, _ in rows])
    sizes = np.array([size for _, _, size in rows])
    assert off_column(centres, centres[:, 1], sizes, 33.0) == list(range(6, 12))
    assert off_column(centres[:6], centres[:6, 1], sizes[:6], 33.0) == []


def test_crop_consistency_matches_levels_along_the_spine_and_names_a_shift():
    from studies.crop_consistency import match_levels, verdict

    reference = {1: 0.0, 2: 35.0, 3: 70.0, 4: 105.0, 5: 140.0}
    right = match_levels({2: 36.0, 3: 69.0, 4: 104.0}, reference, 35.0)
    assert right == {2: 2, 3: 3, 4: 4} and verdict(right) == "right"
    shifted = match_levels({1: 34.0, 2: 71.0, 3: 106.0, 4: 139.0, 5: 175.0}, reference, 35.0)  # L2..S1 called L1..L5
    assert shifted == {1: 2, 2: 3, 3: 4, 4: 5, 5: None} and verdict(shifted) == "shifted"
    assert verdict(match_levels({1: 1.0, 2: 70.0}, reference, 35.0)) == "mixed"
    assert verdict({}) == "none"


def test_the_stress_comparison_keeps_the_folds_and_case_names_asked_for():
    from studies.compare_stress501 import variant_means

    rows = [{"source": "D", "folds": [f], "case": c, "variant": "plain", "level_dice": d}
            for f, c, d in [("0", "vb3_001", 0.9), ("0", "vb2_002", 0.5), ("1", "vb3_003", 0.1)]]
    record = {"dataset": "D", "cases": rows + [{**rows[0], "source": "other"}]}
    assert variant_means(record, {"0"}) == {"plain": [0.9, 0.5]}
    assert variant_means(record, {"0", "1"}, "vb3_") == {"plain": [0.9, 0.1]}


def test_the_paired_stress_comparison_scores_cases_and_refuses_other_folds(tmp_path, capsys):
    import json

    from studies.compare_stress501 import main, paired

    def record(dice):
        variants = ("plain", "cut_a", "cut_b")
        rows = [{"source": "D", "folds": ["0"], "case": case, "variant": variant, "level_dice": value,
                 "flagged": value < 0.5}
                for case, values in dice.items() for variant, value in zip(variants, values, strict=True)]
        return {"dataset": "D", "cases": rows}

    first = record({"a": (0.9, 0.2, 0.8), "b": (0.9, 0.9, 0.7), "c": (0.8, 0.1, 0.1)})
    second = record({"a": (0.9, 0.8, 0.8), "b": (0.9, 0.9, 0.9), "c": (0.8, 0.1, 0.3)})
    result = paired(first, second, {"0"})
    assert result["cases"]["a"] == pytest.approx([0.5, 0.8])
    assert result["mean_difference"] == pytest.approx((0.3 + 0.1 + 0.1) / 3)
    assert (result["better"], result["worse"]) == (3, 0) and 0 < result["wilcoxon_p"] <= 1
    assert result["failures"] == [(3, 3), (2, 2)]  # plain answers are not counted
    paths = []
    for name, content in (("one", first), ("two", second), ("other", record({"z": (0.9, 0.9, 0.9)}))):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(content))
    assert main(["--folds", "0", "--paired", f"one={paths[0]}", f"two={paths[1]}"]) == 0
    assert "3 cases better, 0 worse" in capsys.readouterr().out
    assert main(["--folds", "0", "--paired", f"one={paths[0]}", f"other={paths[2]}"]) == 2
    assert "different case-variants" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["--folds", "0", "--paired", f"one={paths[0]}"])
    assert refused.value.code == 2


def test_crop_consistency_refuses_a_case_the_stress_test_did_not_keep(tmp_path):
    from studies.crop_consistency import find_case

    kept = tmp_path / "in_Dataset9_X_0"
    kept.mkdir()
    (kept / "a-plain_0000.nii.gz").touch()
    with pytest.raises(LookupError, match="b-plain"):
        find_case(tmp_path, "b-plain", ".nii.gz")
    with pytest.raises(LookupError, match="ref_Dataset9_X_0"):  # the input kept, its reference not
        find_case(tmp_path, "a-plain", ".nii.gz")
    (tmp_path / "ref_Dataset9_X_0").mkdir()
    (tmp_path / "ref_Dataset9_X_0" / "a-plain.nii.gz").touch()
    assert find_case(tmp_path, "a-plain", ".nii.gz").folds == ["0"]


def test_slice_numbering_names_right_shifted_and_edge_slices_and_runs_on_kept_cases(tmp_path, capsys):
    """studies/slice_numbering: per slice, a level Dice that keeps the merged Dice is right, one that keeps none of
    it is shifted; a slice barely overlapping is an edge; the command scores a kept case (raw answer before the
    numbering) and refuses a case the stress test did not keep with exit 2."""
    from studies.slice_numbering import main, pooled_level_dice, slice_verdicts

    reference = np.zeros((4, 20, 6), np.uint8)
    for level in (1, 2, 3):
        reference[:, 6 * level - 5:6 * level - 1, 1:5] = level
    prediction = reference.copy()
    prediction[1] = np.where(reference[1] > 0, reference[1] % 3 + 1, 0)  # every level one off on slice 1
    prediction[2, :, 3:] = 0  # slice 2 half found, numbered right
    prediction[3] = 0
    prediction[3, 1:5, 1:2] = 1  # slice 3 barely overlapping
    rows = slice_verdicts(prediction, reference, [1, 2, 3], axis=0)
    assert [r["kind"] for r in rows] == ["right", "shifted", "right", "edge"]
    assert rows[1]["level_dice"] == 0.0 and rows[1]["merged_dice"] == 1.0
    assert pooled_level_dice(reference, reference, [1, 2, 3]) == 1.0
    assert pooled_level_dice(prediction, reference, [1, 2, 3]) < pooled_level_dice(reference, reference, [1, 2, 3])

    for folder, array in (("out_Dataset9_X_0/nnunet_raw_output", prediction), ("out_Dataset9_X_0", reference),
                          ("ref_Dataset9_X_0", reference)):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / folder / "a-plain.nii.gz"))
    (tmp_path / "in_Dataset9_X_0").mkdir()
    (tmp_path / "in_Dataset9_X_0" / "a-plain_0000.nii.gz").touch()  # the varied input the stress test kept
    assert main(["--stress-cases", str(tmp_path), "--cases", "a:plain", "--labels", "1", "2", "3",
                 "-o", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "slice_numbering.json").read_text())
    case = result["cases"][0]
    assert case["counts"] == {"right": 2, "mixed": 0, "shifted": 1, "edge": 1}
    assert case["final_level_dice"] == 1.0  # the post-processed answer: the reference itself here
    assert main(["--stress-cases", str(tmp_path), "--cases", "b:plain", "-o", str(tmp_path / "out2")]) == 2
    assert "b-plain" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_wedge_numbering_study_measures_the_wedge_and_picks_the_offset_that_fits():
    """studies/wedge_numbering: a body twice as tall at one end of its extent across the spine as at the other has a
    ratio near 0.6 (its reciprocal seen the other way); ratios that follow the profile one level on are fitted with
    offset +1; the true offset is read from the reference under the answer's levels."""
    from studies.wedge_numbering import best_offset, clear_of_edges, true_offset, wedge_ratio

    body = np.zeros((5, 60, 40), bool)
    for x in range(40):  # height 10 rows at column 0, 20 rows at column 39
        height = 10 + round(10 * x / 39)
        body[:, 30 - height // 2:30 - height // 2 + height, x] = True
    ratio = wedge_ratio(body)
    assert 0.5 < ratio < 0.7
    assert wedge_ratio(body[:, :, ::-1]) == pytest.approx(1 / ratio, rel=0.05)
    assert np.isnan(wedge_ratio(np.zeros((3, 8, 8), bool)))
    assert clear_of_edges(body) and not clear_of_edges(body[:, 25:, :])

    profile = {level: (0.7 + 0.1 * level, 0.05) for level in range(0, 6)}
    assert best_offset({1: 0.9, 2: 1.0, 3: 1.1, 4: 1.2}, profile) == 1  # numbered L1..L4, they are L2..L5
    assert best_offset({1: 0.8, 2: 0.9, 3: 1.0}, profile) == 0
    assert best_offset({2: 0.8, 3: 0.9, 4: 1.0}, profile) == -1
    assert best_offset({1: 0.8, 2: 0.9}, profile) is None  # fewer than three levels say nothing

    reference = np.zeros((1, 50, 10), np.uint8)
    answer = np.zeros_like(reference)
    for level in range(1, 5):
        reference[0, 10 * level:10 * level + 8] = level + 1  # the answer's level L lies on reference level L + 1
        answer[0, 10 * level:10 * level + 8] = level
    assert true_offset(answer, reference, [1, 2, 3, 4, 5]) == 1
    assert true_offset(reference, reference, [1, 2, 3, 4, 5]) == 0
    assert true_offset(np.zeros_like(answer), reference, [1, 2, 3, 4, 5]) is None


def test_fov_sweep_study_measures_the_room_each_cut_leaves_beyond_l1_and_l5(tmp_path):
    """studies/fov_sweep: a scan 100 voxels long (2 mm) with L1 at rows 20-29 and L5 at rows 60-69: a 10 % top cut
    leaves 20 mm above L1, a 25 % one runs 10 mm into it; the same from the bottom, and for a scan stored the other way
    up; the answers are grouped by that room, failures (level Dice < 0.5) and flags counted, files written."""
    from spinediff.experiments.stress_variants import variant_fractions
    from studies.fov_sweep import end_faces, grouped, main, room_group, room_left, sweep_rows

    label = np.zeros((3, 100, 8), np.uint8)
    for level in range(1, 6):
        label[:, 10 + 10 * level:20 + 10 * level] = level
    assert end_faces(label, 1, 1, 1, 5) == (20, 69)
    assert room_left((20, 69), 100, 1, variant_fractions("plain"), 2.0) == (40.0, 60.0)
    assert room_left((20, 69), 100, 1, variant_fractions("crop_top_10"), 2.0) == (20.0, 60.0)
    assert room_left((20, 69), 100, 1, variant_fractions("crop_top_25"), 2.0) == (-10.0, 60.0)
    assert room_left((20, 69), 100, 1, variant_fractions("crop_bottom_35"), 2.0) == (40.0, -10.0)
    flipped = label[:, ::-1]  # the first level at the high-index end
    faces = end_faces(flipped, 1, -1, 1, 5)
    assert faces == (79, 30)
    assert room_left(faces, 100, -1, variant_fractions("crop_top_25"), 2.0) == (-10.0, 60.0)
    assert [room_group(r) for r in (-3.0, 0.0, 9.9, 15.0, 20.0, 80.0)] == [
        "cut into the level", "0-10 mm", "0-10 mm", "10-20 mm", "≥ 20 mm", "≥ 20 mm"]

    image = sitk.GetImageFromArray(label)
    image.SetSpacing((1.0, 2.0, 1.0))
    raw = tmp_path / "Dataset999_Sweep"
    (raw / "labelsTr").mkdir(parents=True)
    sitk.WriteImage(image, str(raw / "labelsTr" / "a.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    names = ["plain", "crop_top_10", "crop_top_25", "crop_bottom_35", "shift_down_20"]
    dice = {"plain": 0.9, "crop_top_10": 0.85, "crop_top_25": 0.1, "crop_bottom_35": 0.2, "shift_down_20": 0.0}
    result = {"model": "/x/nnUNetTrainer__nnUNetPlans__2d", "dataset": raw.name, "command": "stress",
              "labels": [1, 2, 3, 4, 5], "level_direction": [0.0, 1.0, 0.0],
              "variants": {n: list(variant_fractions(n)) for n in names},
              "cases": [{"source": raw.name, "case": "a", "variant": n, "level_dice": dice[n],
                         "flagged": n == "crop_top_25"} for n in names]
              + [{"source": "Other", "case": "a", "variant": "plain", "level_dice": 0.0, "flagged": False}]}
    geometry = {"a": {"faces": (20, 69), "length": 100, "sign": 1, "spacing": 2.0}}
    rows = sweep_rows(result, geometry)
    assert [r["variant"] for r in rows] == ["plain", "crop_top_10", "crop_top_25", "crop_bottom_35"]  # no shift
    assert [r["failed"] for r in rows] == [False, False, True, True]
    table = {(g["end"], g["room"]): g for g in grouped(rows)}
    assert table["top", "cut into the level"] == {
        "end": "top", "room": "cut into the level", "answers": 1, "failures": 1, "failures_flagged": 1,
        "cases_failing": ["a"], "mean_level_dice": 0.1}
    assert table["top", "≥ 20 mm"]["answers"] == 2  # the plain scan and the 10 % cut
    assert table["bottom", "cut into the level"]["failures_flagged"] == 0
    assert table["bottom", "≥ 20 mm"]["answers"] == 1  # the plain scan only: top cuts count at the top

    stress = tmp_path / "stress_position.json"
    with pytest.raises(SystemExit) as exit_info:  # bad input: exit 2 naming the option, nothing written
        main(["--stress", str(stress), "--raw", str(raw), "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    stress.write_text(json.dumps(result))
    assert main(["--stress", str(stress), "--raw", str(raw), "-o", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "fov_sweep.json").read_text())
    assert written["rows"][2]["room_top_mm"] == -10.0 and written["cases"] == ["a"]
    text = (tmp_path / "out" / "fov_sweep.md").read_text()
    assert "| top | cut into L1 | 1 | 1 | 1 | 0.100 | a |" in text
    assert "**0.10** †" in text and (tmp_path / "out" / "fov_sweep.png").stat().st_size > 0
