"""`spinediff postprocess` flags the cases to review by the model's review rule (review.json), as `spinediff predict`
does: the path of nnU-Net's trainers (`nnUNetv2_predict` + `spinediff postprocess --images`) gets review.csv too
(issue 34, point 5). Synthetic label maps and images: fast."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from spinediff.cli import main
from spinediff.inference.review import ReviewRule, intensity_reference, intensity_signature

SHAPE = (16, 32, 32)


def blob(rows: int = 8) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[4:4 + rows, 8:24, 8:24] = 1
    return label


def scan(seed: int, invert: bool = False) -> np.ndarray:
    """A T2w-like image: dark noisy background, a bright body where the blob lies (inverted: a T1w-like swap)."""
    rng = np.random.default_rng(seed)
    image = rng.gamma(1.5, 20.0, size=SHAPE) + 120.0 * blob()
    return (image.max() - image) if invert else image


def write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(path))


@pytest.fixture
def folders(tmp_path):
    """A model folder with a kept-nothing post-processing and a review rule (level volumes of the blob, intensities
    of three training scans), predictions of three cases and the images that were predicted."""
    model = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir()
    (model / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w"},
                                                    "labels": {"background": 0, "vertebra": 1},
                                                    "file_ending": ".nii.gz"}))
    (model / "postprocessing.json").write_text(json.dumps({"level_order": None, "applied": False}))
    volume_ml = float(blob().sum()) * 2.0 / 1000.0
    reference = intensity_reference([[intensity_signature(scan(seed))] for seed in range(3)])
    ReviewRule("level_anomaly", float(np.log(2.0)), {1: volume_ml}, {}, reference, 0.5).write(model)
    predictions, images = tmp_path / "pred", tmp_path / "images"
    predictions.mkdir()
    images.mkdir()
    for case, rows, invert in (("ok", 8, False), ("small", 2, False), ("t1w", 8, True)):
        write(blob(rows), predictions / f"{case}.nii.gz")
        write(scan(10 + rows, invert), images / f"{case}_0000.nii.gz")
    return model, predictions, images


def rows_of(table: Path) -> dict[str, dict]:
    return {row["case"]: row for row in csv.DictReader(table.open())}


def test_postprocess_flags_by_level_volumes_and_with_the_images_by_intensities(folders, tmp_path, capsys):
    model, predictions, images = folders
    assert main(["postprocess", "-i", str(predictions), "-o", str(tmp_path / "out"), "-m", str(model),
                 "--images", str(images)]) == 0
    printed = capsys.readouterr().out
    rows = rows_of(tmp_path / "out" / "review.csv")
    assert set(rows) == {"ok", "small", "t1w"}
    assert rows["ok"]["review"] == "no" and rows["ok"]["reasons"] == ""
    assert rows["small"]["review"] == "yes" and "level_anomaly" in rows["small"]["reasons"]  # a quarter the volume
    assert rows["t1w"]["review"] == "yes" and "intensities out of distribution" in rows["t1w"]["reasons"]
    assert float(rows["t1w"]["intensity_distance"]) > 4.0 > float(rows["ok"]["intensity_distance"])
    named = printed.split("review:")[1]
    assert "small" in named and "t1w" in named and "ok," not in named and "intensities not checked" not in named
    for case in ("ok", "small", "t1w"):  # the label maps themselves are written as before
        assert (tmp_path / "out" / f"{case}.nii.gz").is_file()


def test_postprocess_without_images_flags_by_volumes_and_says_intensities_were_not_checked(folders, tmp_path,
                                                                                          capsys):
    model, predictions, _ = folders
    assert main(["postprocess", "-i", str(predictions), "-o", str(tmp_path / "out"), "-m", str(model)]) == 0
    printed = capsys.readouterr().out
    rows = rows_of(tmp_path / "out" / "review.csv")
    assert rows["small"]["review"] == "yes" and rows["t1w"]["review"] == "no"  # its volume is the training one
    assert rows["t1w"]["intensity_distance"] == ""
    assert "intensities not checked: give --images INPUT_FOLDER" in printed
    assert main(["postprocess", "-i", str(predictions), "-o", str(tmp_path / "quiet"), "-m", str(model),
                 "--no-review"]) == 0
    assert not (tmp_path / "quiet" / "review.csv").exists()


def test_find_bests_commands_for_nnunets_trainers_end_with_the_review(folders, tmp_path, capsys):
    """What find_best prints for a model of nnU-Net's trainers: nnUNetv2_predict, then `spinediff postprocess
    --images INPUT_FOLDER`; that second command, run as printed, writes review.csv with the intensities checked."""
    import shlex

    from spinediff.inference.candidates import Candidate
    from spinediff.inference.find_best import nnunet_commands

    model, predictions, images = folders
    commands = nnunet_commands("996", Candidate(model, "nnUNetTrainer", "nnUNetPlans", "3d_fullres", ["0"]),
                               {"applied": True, "foreground": "probabilities"})
    assert commands[0].startswith("nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER") and "--save_probabilities" \
        in commands[0]
    assert "--save_probabilities" not in nnunet_commands("996", Candidate(model, "nnUNetTrainer", "nnUNetPlans",
                                                                          "3d_fullres", ["0"]), {"applied": False})[0]
    argv = shlex.split(commands[1].replace("OUTPUT_FOLDER_PP", str(tmp_path / "pp"))
                       .replace("OUTPUT_FOLDER", str(predictions)).replace("INPUT_FOLDER", str(images)))
    assert argv[:2] == ["spinediff", "postprocess"]
    assert main(argv[1:]) == 0
    rows = rows_of(tmp_path / "pp" / "review.csv")
    assert rows["t1w"]["review"] == "yes" and "intensities" in rows["t1w"]["reasons"]


def test_a_level_volume_flag_names_the_level(folders, tmp_path):
    """The reason of a level_anomaly flag names the level furthest from its expected volume, missing or at which
    share of it, so that a person knows where to look."""
    model, predictions, _ = folders
    write(np.zeros(SHAPE, np.uint8), predictions / "empty.nii.gz")
    assert main(["postprocess", "-i", str(predictions), "-o", str(tmp_path / "out"), "-m", str(model)]) == 0
    rows = rows_of(tmp_path / "out" / "review.csv")
    assert rows["small"]["reasons"].endswith("(level 1 at 0.25 x its expected volume)")
    assert rows["empty"]["reasons"].endswith("(level 1 missing)")


def probabilities(label: np.ndarray, sure: float) -> np.ndarray:
    """Class probabilities (background, vertebra) whose argmax is ``label``, ``sure`` on the predicted class."""
    foreground = np.where(label == 1, sure, 1.0 - sure).astype(np.float32)
    return np.stack([1.0 - foreground, foreground])


def test_the_cross_validations_entropy_flags_a_case_less_sure_than_any_of_its_own(folders, tmp_path, capsys):
    """The rule the cross-validation writes holds 1.5 x the largest mean foreground entropy of its cases (from the
    CASE.npz nnU-Net's validation saves); `spinediff postprocess` flags a case above it when the probabilities are
    beside the inputs, says so when they are not, and find_best's nnUNetv2_predict command then saves them."""
    from spinediff.inference.candidates import Candidate
    from spinediff.inference.find_best import nnunet_commands
    from spinediff.inference.review import ENTROPY_MARGIN, rule_from_cross_validation, write_cross_validation_rule
    from spinediff.metrics.case_uncertainty import case_scores

    model, predictions, _ = folders
    validation = tmp_path / "cv"
    validation.mkdir()
    pairs, entropies = [], []
    for i, sure in enumerate((0.97, 0.95, 0.9)):
        write(blob(), validation / f"cv{i}.nii.gz")
        np.savez_compressed(validation / f"cv{i}.npz", probabilities=probabilities(blob(), sure))
        entropies.append(case_scores(probabilities(blob(), sure), (1, 1, 1), [1])["entropy"])
        pairs.append((validation / f"cv{i}.nii.gz", validation / f"cv{i}.nii.gz"))
    rule = rule_from_cross_validation(pairs, [1], None)
    assert rule.entropy_threshold == pytest.approx(ENTROPY_MARGIN * max(entropies), abs=1e-4)
    assert "3 cross-validation case(s)" in rule.chosen["entropy_threshold_from"]
    assert rule_from_cross_validation(pairs[:1], [1], None).entropy_threshold is None  # one case says nothing
    # an older rule (no entropy threshold) keeps its score and gains it
    assert ReviewRule.read(model).entropy_threshold is None
    assert write_cross_validation_rule(model, pairs, [1], None).entropy_threshold == rule.entropy_threshold
    assert ReviewRule.read(model).entropy_threshold == rule.entropy_threshold
    assert ReviewRule.read(model).threshold == pytest.approx(np.log(2.0), abs=1e-4)

    candidate = Candidate(model, "nnUNetTrainer", "nnUNetPlans", "3d_fullres", ["0"])
    assert "--save_probabilities" in nnunet_commands("996", candidate, {"applied": False})[0]
    for case, sure in (("ok", 0.95), ("small", 0.95), ("t1w", 0.95), ("unsure", 0.6)):
        if case == "unsure":
            write(blob(), predictions / "unsure.nii.gz")
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f"{case}.nii.gz")))
        np.savez_compressed(predictions / f"{case}.npz", probabilities=probabilities(label, sure))
    assert main(["postprocess", "-i", str(predictions), "-o", str(tmp_path / "out"), "-m", str(model)]) == 0
    assert "entropy not checked" not in capsys.readouterr().out
    rows = rows_of(tmp_path / "out" / "review.csv")
    assert rows["unsure"]["review"] == "yes" and rows["unsure"]["reasons"].startswith("entropy ")
    assert float(rows["unsure"]["entropy"]) > rule.entropy_threshold > float(rows["ok"]["entropy"])
    assert rows["ok"]["review"] == "no"
    (predictions / "unsure.npz").unlink()  # probabilities not beside every input: not checked, and said so
    assert main(["postprocess", "-i", str(predictions), "-o", str(tmp_path / "out2"), "-m", str(model)]) == 0
    assert "entropy not checked: predict with --save_probabilities" in capsys.readouterr().out
    assert rows_of(tmp_path / "out2" / "review.csv")["unsure"]["review"] == "no"


def test_review_other_scans_summary(tmp_path):
    """studies/review_other_scans: each scan's flag and reasons as review.csv wrote them; a scan without a row counts
    as not flagged (and says so); a missing sample file stops the study before any work, naming it."""
    from spinediff.inference.review import read_review_table, write_review_table
    from studies.review_other_scans import SCANS, markdown, scan_files, summarise

    flags = {"lumbar_ct": {"score": "level_anomaly", "value": 3.0, "threshold": 0.69, "review": True,
                           "reasons": ["level_anomaly 3 > 0.693", "entropy 0.66 > 0.47"]},
             "cervical_t2w": {"score": "level_anomaly", "value": 0.1, "threshold": 0.69, "review": False,
                              "reasons": []}}
    write_review_table(flags, tmp_path / "review.csv")
    names = ["lumbar_ct", "cervical_t2w", "abdomen_mr"]
    result = summarise(read_review_table(tmp_path / "review.csv"), names)
    assert (result["flagged"], result["total"]) == (1, 3)
    rows = {row["scan"]: row for row in result["scans"]}
    assert rows["lumbar_ct"]["reasons"] == ["level_anomaly 3 > 0.693", "entropy 0.66 > 0.47"]
    assert not rows["cervical_t2w"]["flagged"] and rows["cervical_t2w"]["in_review_csv"]
    assert not rows["abdomen_mr"]["flagged"] and not rows["abdomen_mr"]["in_review_csv"]
    text = markdown({**result, "model": "M", "folds": ["0"], "command": "C"})
    assert "**1 of 3 flagged.**" in text and "(no row in review.csv)" in text
    assert text.count("| **no** |") == 2

    (tmp_path / "samples" / "tptbox").mkdir(parents=True)
    lumbar_ct = tmp_path / "samples" / SCANS["lumbar_ct"][0]
    lumbar_ct.write_bytes(b"")
    assert scan_files(tmp_path / "samples", ["lumbar_ct"]) == {"lumbar_ct": lumbar_ct}
    with pytest.raises(SystemExit, match="sub-mri_label-6_T2w.nii.gz is missing"):
        scan_files(tmp_path / "samples", ["lumbar_ct", "cervical_t2w"])


def test_a_scan_oriented_unlike_the_training_scans_is_flagged_with_the_code_to_reorient_to(folders, tmp_path):
    """nnU-Net reads voxels as stored: a scan whose grid axes point other ways than the training scans' is seen turned
    or mirrored by the network. The rule the cross-validation writes keeps the training scans' orientation code (when
    they share one) and `spinediff postprocess` flags a prediction on a grid of another, naming the code to reorient
    to; a rule without it (older, or training scans of several orientations) checks nothing."""
    from dataclasses import replace

    from spinediff.errors import SpineDiffError
    from spinediff.inference.review import rule_from_cross_validation, write_cross_validation_rule
    from spinediff.utilities.geometry import orientation_code

    model, predictions, images = folders
    assert orientation_code((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)) == "LPS"
    assert orientation_code((1.0, 0.0, 0.0, 1.0)) is None  # 2D
    turned = sitk.PermuteAxes(sitk.ReadImage(str(predictions / "ok.nii.gz")), [2, 0, 1])
    assert orientation_code(turned.GetDirection()) not in (None, "LPS")
    sitk.WriteImage(turned, str(predictions / "turned.nii.gz"))
    sitk.WriteImage(sitk.PermuteAxes(sitk.ReadImage(str(images / "ok_0000.nii.gz")), [2, 0, 1]),
                    str(images / "turned_0000.nii.gz"))

    assert main(["postprocess", "-i", str(predictions), "-o", str(tmp_path / "before"), "-m", str(model)]) == 0
    assert rows_of(tmp_path / "before" / "review.csv")["turned"]["review"] == "no"  # the fixture's rule has none

    # the cross-validation's rule: the raw training images share LPS
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w"}, "file_ending": ".nii.gz"}))
    pairs = []
    for i in range(3):
        write(scan(i), raw / "imagesTr" / f"cv{i}_0000.nii.gz")
        write(blob(), tmp_path / f"cv{i}.nii.gz")
        pairs.append((tmp_path / f"cv{i}.nii.gz", tmp_path / f"cv{i}.nii.gz"))
    rule = rule_from_cross_validation(pairs, [1], raw)
    assert rule.orientation == "LPS" and rule.chosen["orientation_from"] == "3 training case(s), all LPS"
    assert rule_from_cross_validation(pairs, [1], None).orientation is None
    # an older rule gains the orientation (and says where it came from), keeping its own score and threshold
    written = write_cross_validation_rule(model, pairs, [1], raw)
    assert written.orientation == "LPS" and written.chosen["orientation_from"].endswith("all LPS")
    assert ReviewRule.read(model) == written
    assert main(["postprocess", "-i", str(predictions), "-o", str(tmp_path / "out"), "-m", str(model),
                 "--images", str(images)]) == 0
    rows = rows_of(tmp_path / "out" / "review.csv")
    assert rows["ok"]["review"] == "no"
    assert rows["turned"]["review"] == "yes"
    code = orientation_code(turned.GetDirection())
    assert f"oriented unlike the training scans (its axes {code}, theirs LPS" in rows["turned"]["reasons"]
    assert "DICOMOrient(image, 'LPS')" in rows["turned"]["reasons"]
    # its volume and intensities are the training ones: the orientation is the only reason
    assert rows["turned"]["reasons"].count("; ") == 0

    # the orientation is the data's, taken afresh: a rule that says RAS becomes LPS once the raw images are read again,
    # and keeps its code when they are not there
    replace(written, orientation="RAS").write(model)
    assert write_cross_validation_rule(model, pairs, [1], raw).orientation == "LPS"
    replace(written, orientation="RAS").write(model)
    assert write_cross_validation_rule(model, pairs, [1], None).orientation == "RAS"
    written.write(model)
    # training scans of two orientations: no code kept, nothing checked
    sitk.WriteImage(sitk.PermuteAxes(sitk.ReadImage(str(raw / "imagesTr" / "cv0_0000.nii.gz")), [2, 0, 1]),
                    str(raw / "imagesTr" / "cv0_0000.nii.gz"))
    mixed = rule_from_cross_validation(pairs, [1], raw)
    assert mixed.orientation is None and mixed.chosen["orientation_from"].startswith("none (training scans in several")
    assert not replace(written, orientation=None).flag({"level_anomaly": 0.0}, orientation=code)["review"]
    for bad in ("LLS", "XYZ", "LP", 3):
        with pytest.raises(SpineDiffError, match="'orientation' must be a three-letter orientation code"):
            ReviewRule.from_dict({"score": "level_anomaly", "threshold": 1.0, "orientation": bad}, "x/review.json")


def test_postprocess_takes_a_two_dimensional_scan_with_its_image(folders, tmp_path):
    """A single slice stored as a 2D image (nnUNetv2_predict takes it) is post-processed and flagged with its image
    given, not stopped by a traceback (the room at the scan's ends is measured on 3D scans only)."""
    model, predictions, images = folders
    flat = sitk.GetImageFromArray(blob()[8])
    sitk.WriteImage(flat, str(predictions / "flat.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(scan(1)[8].astype(np.float32)), str(images / "flat_0000.nii.gz"))
    assert main(["postprocess", "-i", str(predictions), "-o", str(tmp_path / "out"), "-m", str(model),
                 "--images", str(images)]) == 0
    rows = rows_of(tmp_path / "out" / "review.csv")
    assert set(rows) == {"ok", "small", "t1w", "flat"} and rows["flat"]["intensity_distance"] != ""
    written = sitk.ReadImage(str(tmp_path / "out" / "flat.nii.gz"))
    assert written.GetDimension() == 2 and np.array_equal(sitk.GetArrayFromImage(written), blob()[8])
