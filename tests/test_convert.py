"""`spinediff convert`: SynthRAD-style folders (.nii.gz and .mha, region sub-folders) become a translation dataset that
passes `spinediff validate`; bad input exits 2 with nothing written; slab folds keep their gap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from spinediff.cli import main
from spinediff.datasets.convert import SlabSettings, convert_pairs
from spinediff.datasets.validate import validate_dataset

SHAPE = (10, 12, 14)  # numpy z, y, x


def _image(array: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _subject(folder: Path, ending: str, seed: int, **changes) -> None:
    rng = np.random.default_rng(seed)
    body = np.zeros(SHAPE, dtype=np.uint8)
    body[1:9, 2:10, 2:12] = 1
    ct = np.where(body > 0, rng.uniform(-100, 80, SHAPE), -1024).astype(np.int16)
    ct[3:7, 5:8, 5:9] = 700  # bone
    ct[2, 3:5, 3:6] = -100  # fat
    mr = np.where(body > 0, rng.uniform(100, 900, SHAPE), 0).astype(np.float32)
    images = {"mr": _image(mr), "ct": _image(ct), "mask": _image(body)}
    images.update(changes)
    folder.mkdir(parents=True)
    for name, image in images.items():
        if image is not None:
            sitk.WriteImage(image, str(folder / f"{name}{ending}"), True)


@pytest.fixture
def synthrad(tmp_path) -> Path:
    """SynthRAD2023-like (brain, .nii.gz, overview/) and SynthRAD2025-like (HN/TH, .mha, overviews/) subjects."""
    root = tmp_path / "Task1"
    _subject(root / "brain" / "1BA001", ".nii.gz", 0)
    _subject(root / "brain" / "1BA002", ".nii.gz", 1)
    (root / "brain" / "overview").mkdir()
    (root / "brain" / "overview" / "1BA001_mr_ct_mask_train.png").write_bytes(b"not an image")
    _subject(root / "HN" / "1HNA001", ".mha", 2)
    _subject(root / "TH" / "1THB003", ".mha", 3)
    (root / "TH" / "overviews").mkdir()
    (root / "TH" / "overviews" / "1THB003_overview.png").write_bytes(b"not an image")
    return root


def test_synthrad_layout_converts_and_validates(synthrad, tmp_path):
    raw = tmp_path / "raw"
    code = main(["convert", "-i", str(synthrad), "-o", str(raw), "-d", "930", "--name", "SynthRADTiny", "-q",
                 "--labels", "ct-classes"])
    assert code == 0
    folder = raw / "Dataset930_SynthRADTiny"
    report = validate_dataset(folder)
    assert report.ok, report.summary()
    assert report.task == "translation" and report.num_cases == 4 and report.num_channels == 2
    data = json.loads((folder / "dataset.json").read_text())
    assert data["channel_names"] == {"0": "MR", "1": "CT"}
    assert data["spinediff"] == {"task": "translation", "source_channels": [0], "target_channels": [1],
                                 "body_mask": "labels"}
    assert data["conversion"]["regions"] == {"brain": ["1BA001", "1BA002"], "HN": ["1HNA001"], "TH": ["1THB003"]}
    # the .mha subject arrives as NIfTI with its voxels and grid, the CT in HU as the last channel
    ct = sitk.ReadImage(str(folder / "imagesTr" / "1HNA001_0001.nii.gz"))
    source = sitk.ReadImage(str(synthrad / "HN" / "1HNA001" / "ct.mha"))
    assert np.array_equal(sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(source))
    assert ct.GetSpacing() == source.GetSpacing()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "1HNA001.nii.gz")))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(synthrad / "HN" / "1HNA001" / "mask.mha")))
    assert np.array_equal(labels > 0, mask > 0)  # the union of the classes is the body mask
    hu = sitk.GetArrayFromImage(source)
    assert np.all(labels[(hu >= 200) & (mask > 0)] == 3) and np.all(labels[(hu == -100) & (mask > 0)] == 2)
    assert not [p for p in raw.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_generic_names_and_body_from_ct(tmp_path):
    root = tmp_path / "pairs"
    _subject(root / "subjectA", ".nii.gz", 4)
    for name, new in (("mr", "t2"), ("ct", "ct_reg")):
        (root / "subjectA" / f"{name}.nii.gz").rename(root / "subjectA" / f"{new}.nii.gz")
    (root / "subjectA" / "mask.nii.gz").unlink()
    result = convert_pairs(root, tmp_path / "raw", 931, "Generic", names=_names(["t2"], "ct_reg", None))
    assert validate_dataset(result.folder).ok
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(result.folder / "labelsTr" / "subjectA.nii.gz")))
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "subjectA" / "ct_reg.nii.gz")))
    assert np.array_equal(labels, (ct > -500).astype(np.uint8))


def _names(source, target, mask):
    from spinediff.datasets.convert import parse_names

    return parse_names(source, target, mask)


def _assert_refused(args: list[str], raw: Path, capsys, message: str) -> None:
    before = sorted(p.name for p in raw.iterdir()) if raw.exists() else []
    assert main(["convert", *args, "-o", str(raw), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    after = sorted(p.name for p in raw.iterdir()) if raw.exists() else []
    assert after == before  # nothing written, no staging folder left


def test_missing_ct_exits_2_naming_the_folder(synthrad, tmp_path, capsys):
    (synthrad / "HN" / "1HNA001" / "ct.mha").unlink()
    _assert_refused(["-i", str(synthrad), "-d", "932"], tmp_path / "raw", capsys, "1HNA001: the target image ct")


def test_grids_that_differ_exit_2_with_nothing_written(synthrad, tmp_path, capsys):
    moved = _image(np.ones(SHAPE, dtype=np.uint8), origin=(0.0, 0.0, 5.0))
    (synthrad / "TH" / "1THB003" / "mask.mha").unlink()
    sitk.WriteImage(moved, str(synthrad / "TH" / "1THB003" / "mask.mha"))
    raw = tmp_path / "raw"
    raw.mkdir()
    _assert_refused(["-i", str(synthrad), "-d", "933"], raw, capsys, "does not lie on the grid of mr.mha")


def test_bad_mask_values_and_nan_are_refused(synthrad, tmp_path, capsys):
    mr = sitk.GetArrayFromImage(sitk.ReadImage(str(synthrad / "brain" / "1BA002" / "mr.nii.gz")))
    mr[0, 0, 0] = np.nan
    sitk.WriteImage(_image(mr), str(synthrad / "brain" / "1BA002" / "mr.nii.gz"))
    sitk.WriteImage(_image(np.full(SHAPE, 2, dtype=np.uint8)), str(synthrad / "HN" / "1HNA001" / "mask.mha"))
    raw = tmp_path / "raw"
    raw.mkdir()
    _assert_refused(["-i", str(synthrad), "-d", "934"], raw, capsys, "NaN/Inf")
    _assert_refused(["-i", str(synthrad), "-d", "934"], raw, capsys, "a body mask must hold 0")


def test_existing_target_is_refused_without_overwrite(synthrad, tmp_path, capsys):
    raw = tmp_path / "raw"
    assert main(["convert", "-i", str(synthrad), "-o", str(raw), "-d", "935", "-q"]) == 0
    stamp = (raw / "Dataset935_MRCT" / "dataset.json").stat().st_mtime_ns
    _assert_refused(["-i", str(synthrad), "-d", "935"], raw, capsys, "already exists")
    assert (raw / "Dataset935_MRCT" / "dataset.json").stat().st_mtime_ns == stamp
    assert main(["convert", "-i", str(synthrad), "-o", str(raw), "-d", "935", "-q", "--overwrite"]) == 0


def test_slab_folds_keep_the_gap_and_validate(tmp_path):
    root = tmp_path / "object"
    _subject(root / "pig", ".nii.gz", 5)  # x is the longest axis: 14 voxels of 1 mm; z 10 x 2 mm = 20 mm
    result = convert_pairs(root, tmp_path / "raw", 936, "Slabs", slabs=SlabSettings(3, gap_mm=2.0, axis=2))
    assert validate_dataset(result.folder).ok
    splits = json.loads((result.folder / "splits_final.json").read_text())
    assert len(splits) == 3 and splits == result.splits
    for fold in splits:
        (val,) = fold["val"]
        assert fold["train"] and val not in fold["train"]
        z = {}
        for case in [val, *fold["train"]]:
            image = sitk.ReadImage(str(result.folder / "imagesTr" / f"{case}_0001.nii.gz"))
            start = image.GetOrigin()[2]
            z[case] = (start, start + (image.GetSize()[2] - 1) * image.GetSpacing()[2])
        for case in fold["train"]:  # voxel centres at least gap + one spacing apart
            distance = max(z[case][0] - z[val][1], z[val][0] - z[case][1])
            assert distance >= 2.0 + 2.0 - 1e-6
    # the longest physical axis is chosen by default: z (20 mm) over x (14 mm) and y (12 mm)
    auto = convert_pairs(root, tmp_path / "raw", 937, "Auto", slabs=SlabSettings(2, gap_mm=0.0))
    sizes = {c: sitk.ReadImage(str(auto.folder / "imagesTr" / f"{c}_0000.nii.gz")).GetSize() for c in auto.cases}
    assert {s[2] for s in sizes.values()} == {5} and {s[:2] for s in sizes.values()} == {(14, 12)}
