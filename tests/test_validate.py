"""`spinediff validate`: passes on the phantom, names the file for each class of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spinediff.datasets.validate import validate_dataset

DATASETS = ("Dataset901_SpinePhantomSeg", "Dataset902_SpinePhantomTranslation", "Dataset903_SpinePhantomGeneration")


@pytest.mark.parametrize("name", DATASETS)
def test_every_phantom_task_validates(phantom_root, name):
    report = validate_dataset(phantom_root / name)
    assert report.ok, report.summary()
    assert report.num_cases == 3


@pytest.fixture
def dataset(phantom_root, tmp_path) -> Path:
    """A private copy of the translation dataset (without the unaligned folder) to break."""
    target = tmp_path / "Dataset902_SpinePhantomTranslation"
    shutil.copytree(phantom_root / DATASETS[1], target, ignore=shutil.ignore_patterns("unaligned", "*.png"))
    return target


def _problems_about(report, path: Path) -> list[str]:
    return [p.message for p in report.problems if p.path == str(path)]


def _rewrite(path: Path, change) -> None:
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(change(image), str(path))


def test_images_stored_in_several_orientations_are_noted_not_refused(dataset, capsys):
    """nnU-Net reads voxels as stored: a case whose files are turned (every channel and its label map, consistently)
    is no error, but validate notes it with the code to reorient to; the phantom as generated gets no note."""
    from spinediff.cli import main

    assert validate_dataset(dataset).notes == []
    turned = "phantom_001"
    for path in [dataset / "labelsTr" / f"{turned}.nii.gz", *sorted((dataset / "imagesTr").glob(f"{turned}_*"))]:
        _rewrite(path, lambda image: sitk.PermuteAxes(image, [2, 0, 1]))
    report = validate_dataset(dataset)
    common = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(
        sitk.ReadImage(str(dataset / "imagesTr" / "phantom_000_0000.nii.gz")).GetDirection())
    assert report.ok, report.summary()
    assert len(report.notes) == 1 and "stored in 2 orientations (2 case(s) " + common in report.notes[0]
    assert turned in report.notes[0] and f"DICOMOrient(image, '{common}')" in report.notes[0]
    assert main(["validate", "-d", str(dataset)]) == 0
    assert "note: the images are stored in 2 orientations" in capsys.readouterr().out


def test_missing_channel_file(dataset):
    path = dataset / "imagesTr" / "phantom_001_0001.nii.gz"
    path.unlink()
    assert any("missing" in m for m in _problems_about(validate_dataset(dataset), path))


def test_missing_label_file_means_the_images_are_orphans(dataset):
    (dataset / "labelsTr" / "phantom_002.nii.gz").unlink()
    report = validate_dataset(dataset)
    assert any("without a matching label" in m
               for m in _problems_about(report, dataset / "imagesTr" / "phantom_002_0000.nii.gz"))
    assert any("numTraining" in p.message for p in report.problems)


def test_corrupt_file(dataset):
    path = dataset / "imagesTr" / "phantom_000_0002.nii.gz"
    path.write_bytes(b"this is not a NIfTI file" * 10)
    assert any("could not be read" in m for m in _problems_about(validate_dataset(dataset), path))


def test_mismatched_geometry_between_channels(dataset):
    path = dataset / "imagesTr" / "phantom_000_0001.nii.gz"

    def shift(image):
        image.SetSpacing(tuple(s * 1.1 for s in image.GetSpacing()))
        return image

    _rewrite(path, shift)
    messages = _problems_about(validate_dataset(dataset), path)
    assert any("spacing" in m and "phantom_000" in m for m in messages)


def test_mismatched_geometry_of_label(dataset):
    path = dataset / "labelsTr" / "phantom_001.nii.gz"

    def move(image):
        image.SetOrigin(tuple(o + 5 for o in image.GetOrigin()))
        return image

    _rewrite(path, move)
    assert any("origin" in m for m in _problems_about(validate_dataset(dataset), path))


def test_nan_in_image(dataset):
    path = dataset / "imagesTr" / "phantom_002_0002.nii.gz"

    # Written with nibabel: SimpleITK's NIfTI I/O silently turns NaN into 0.
    image = nib.load(str(path))
    array = np.asarray(image.dataobj, dtype=np.float32)
    array[0, 0, :3] = np.nan
    nib.save(nib.Nifti1Image(array, image.affine, image.header), str(path))
    assert any("NaN" in m for m in _problems_about(validate_dataset(dataset), path))


def test_undeclared_label_value(dataset):
    path = dataset / "labelsTr" / "phantom_000.nii.gz"

    def add_label(image):
        array = sitk.GetArrayFromImage(image)
        array[0, 0, 0] = 7
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        return out

    _rewrite(path, add_label)
    assert any("[7]" in m and "not declared" in m for m in _problems_about(validate_dataset(dataset), path))


def test_empty_label(dataset):
    path = dataset / "labelsTr" / "phantom_001.nii.gz"
    _rewrite(path, lambda image: image * 0)
    assert any("empty" in m for m in _problems_about(validate_dataset(dataset), path))


def test_channel_count_does_not_match_dataset_json(dataset):
    data = json.loads((dataset / "dataset.json").read_text())
    data["channel_names"]["3"] = "T2star"
    (dataset / "dataset.json").write_text(json.dumps(data))
    report = validate_dataset(dataset)
    for case in ("phantom_000", "phantom_001", "phantom_002"):
        assert _problems_about(report, dataset / "imagesTr" / f"{case}_0003.nii.gz")


def test_invalid_json(dataset):
    (dataset / "dataset.json").write_text("{not json")
    report = validate_dataset(dataset)
    assert _problems_about(report, dataset / "dataset.json")


def test_all_problems_are_listed_not_just_the_first(dataset):
    (dataset / "imagesTr" / "phantom_000_0000.nii.gz").unlink()
    _rewrite(dataset / "labelsTr" / "phantom_002.nii.gz", lambda image: image * 0)
    assert len(validate_dataset(dataset).problems) >= 2


def _invalid_values(key: str, original):
    """Values that can never be valid for a field (so every draw must be reported)."""
    junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=5),
                     st.lists(st.integers(), max_size=3))
    if key == "numTraining":
        return st.one_of(st.integers(max_value=0), st.integers(min_value=4, max_value=10**6), st.none(),
                         st.text(max_size=4), st.floats(allow_nan=False))
    if key == "file_ending":
        return st.one_of(st.text(max_size=6).filter(lambda t: t not in (".nii.gz", ".nii", ".mha", ".nrrd")),
                         st.integers(), st.none())
    if key == "labels":
        return st.one_of(junk, st.just({}), st.dictionaries(st.text(min_size=1, max_size=4).filter(
            lambda t: t != "background"), st.integers(-3, 9), min_size=1, max_size=3))
    if key == "channel_names":
        return st.one_of(junk, st.just({}), st.dictionaries(st.sampled_from(["1", "2", "x", "00"]),
                                                            st.text(max_size=3), min_size=1, max_size=3))
    if key == "spinediff.task":
        return st.one_of(st.text(max_size=8).filter(lambda t: t not in ("segmentation", "translation",
                                                                          "generation")), st.integers())
    if key == "spinediff.source_channels":
        return st.one_of(st.just([]), st.lists(st.integers(min_value=2, max_value=9), min_size=1, max_size=3),
                         st.text(max_size=3), st.integers())
    if key == "spinediff.target_channels":
        return st.one_of(st.just([]), st.lists(st.integers().filter(lambda c: c != 2), min_size=1, max_size=3),
                         st.text(min_size=1, max_size=3), st.integers())
    raise KeyError(key)


FIELDS = ("numTraining", "file_ending", "labels", "channel_names", "spinediff.task", "spinediff.source_channels",
          "spinediff.target_channels")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_dataset_json_fields_are_reported(phantom_root, tmp_path_factory, data):
    key = data.draw(st.sampled_from(FIELDS))
    original = json.loads((phantom_root / DATASETS[1] / "dataset.json").read_text())
    corrupted = json.loads(json.dumps(original))
    value = data.draw(_invalid_values(key, original))
    if key.startswith("spinediff."):
        corrupted["spinediff"][key.split(".", 1)[1]] = value
    else:
        corrupted[key] = value
    folder = tmp_path_factory.mktemp("corrupt") / DATASETS[1]
    # Only dataset.json changes; link the (unchanged) images to keep this fast.
    folder.mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).symlink_to(phantom_root / DATASETS[1] / sub)
    (folder / "dataset.json").write_text(json.dumps(corrupted))
    report = validate_dataset(folder)
    assert not report.ok, f"{key}={value!r} was not reported"


def test_atomic_writes_get_the_permissions_of_a_new_file(tmp_path):
    """Results written through a temporary file are as readable as any file the user creates (not 0600)."""
    import os

    from spinediff.io import write_text

    write_text("x", tmp_path / "result.txt")
    (tmp_path / "plain.txt").write_text("x")
    assert os.stat(tmp_path / "result.txt").st_mode & 0o777 == os.stat(tmp_path / "plain.txt").st_mode & 0o777
