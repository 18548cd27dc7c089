"""The synthetic phantom: determinism, tissue intensities, label/image consistency, true transform."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from spinediff.datasets import anatomy as A
from spinediff.datasets.anatomy import random_anatomy
from spinediff.datasets.phantom import generate_case
from spinediff.datasets.phantom_writer import write_phantom_datasets
from spinediff.errors import SpineDiffError

IMAGES = ("t1", "t2", "mr_labels", "mr_instances", "ct", "ct_labels", "ct_instances", "ct_on_mr")


def _arrays(case):
    return {name: sitk.GetArrayFromImage(getattr(case, name)) for name in IMAGES}


def test_same_seed_gives_byte_identical_arrays_and_different_seeds_differ(tiny_settings):
    a = _arrays(generate_case(3, 0, tiny_settings))
    b = _arrays(generate_case(3, 0, tiny_settings))
    c = _arrays(generate_case(4, 0, tiny_settings))
    for name in IMAGES:
        assert a[name].tobytes() == b[name].tobytes(), name
    assert not np.array_equal(a["t1"], c["t1"])
    assert not np.array_equal(a["ct"], c["ct"]) or a["ct"].shape != c["ct"].shape


@pytest.mark.parametrize("seed", range(12))
def test_tissue_values_are_in_realistic_ranges(seed):
    anatomy = random_anatomy(np.random.default_rng(seed))
    ct, t1, t2 = anatomy.tissue_ct, anatomy.tissue_t1, anatomy.tissue_t2
    assert ct[A.CORTICAL] >= 1000
    assert 150 <= ct[A.TRABECULAR] <= 300
    assert 60 <= ct[A.NUCLEUS] <= 100 and 60 <= ct[A.ANNULUS] <= 110
    assert 40 <= ct[A.MUSCLE] <= 60
    assert -120 <= ct[A.FAT] <= -80
    assert 0 <= ct[A.CSF] <= 20
    assert ct[A.AIR] == -1000
    # MR contrast: fat bright on both; CSF and healthy nucleus bright on T2 and dark on T1.
    for image in (t1, t2):
        assert image[A.FAT] > image[A.MUSCLE] and image[A.FAT] > image[A.CORTICAL]
    assert t2[A.CSF] > 0.9 and t1[A.CSF] < 0.25
    assert t2[A.NUCLEUS] > t2[A.ANNULUS] + 0.4 and t2[A.NUCLEUS] > t1[A.NUCLEUS]
    assert t2[A.NUCLEUS_DEGENERATED] < t2[A.NUCLEUS] - 0.4
    assert 3 <= len(anatomy.vertebrae) <= 6 and len(anatomy.discs) == len(anatomy.vertebrae) - 1


def test_images_agree_with_labels(tiny_settings):
    case = generate_case(11, 1, tiny_settings)
    for ct_image, label_image in ((case.ct, case.ct_labels), (case.ct_on_mr, case.mr_labels)):
        ct = sitk.GetArrayFromImage(ct_image)
        labels = sitk.GetArrayFromImage(label_image)
        assert np.median(ct[labels == 1]) > 200  # vertebra
        assert np.median(ct[labels == 2]) < 150  # disc
        assert set(np.unique(labels)) == {0, 1, 2, 3}
    t1, t2 = sitk.GetArrayFromImage(case.t1), sitk.GetArrayFromImage(case.t2)
    labels = sitk.GetArrayFromImage(case.mr_labels)
    canal, vertebra = labels == 3, labels == 1
    assert np.median(t2[canal]) > 1.5 * np.median(t2[vertebra])  # CSF bright on T2
    assert np.median(t1[canal]) < np.median(t1[vertebra])  # and dark on T1
    # Geometry: sagittal MR with the requested anisotropic spacing, axial CT.
    assert case.t1.GetSpacing() == tiny_settings.mr_spacing
    assert np.allclose(np.asarray(case.ct.GetDirection()).reshape(3, 3), np.eye(3))
    assert not np.allclose(np.asarray(case.t1.GetDirection()).reshape(3, 3), np.eye(3))
    instances = set(np.unique(sitk.GetArrayFromImage(case.ct_instances))) - {0}
    assert instances <= set(case.vertebra_labels) and len(instances) >= 3


def test_saved_transform_maps_ct_landmarks_onto_mr_landmarks(phantom_root):
    unaligned = phantom_root / "Dataset902_SpinePhantomTranslation" / "unaligned"
    for case in ("phantom_000", "phantom_001", "phantom_002"):
        transform = sitk.ReadTransform(str(unaligned / f"{case}_true_transform.tfm"))
        inverse = transform.GetInverse()
        mr = json.loads((unaligned / f"{case}_mr_landmarks.json").read_text())["vertebrae"]
        ct = json.loads((unaligned / f"{case}_ct_landmarks.json").read_text())["vertebrae"]
        common = set(mr) & set(ct)
        assert len(common) >= 2
        for label in common:
            assert set(mr[label]) >= {"body", "posterior"}
            for name in mr[label]:
                mapped = np.asarray(inverse.TransformPoint(ct[label][name]))
                assert np.linalg.norm(mapped - np.asarray(mr[label][name])) < 0.5


def test_true_transform_aligns_the_ct_masks_with_the_mr_masks(phantom_root):
    """Independent of the landmark files: resampling the CT instance mask through the saved transform
    lands every vertebra on the MR instance mask."""
    unaligned = phantom_root / "Dataset902_SpinePhantomTranslation" / "unaligned"
    mr = sitk.ReadImage(str(unaligned / "phantom_000_mr_vertebrae.nii.gz"))
    ct = sitk.ReadImage(str(unaligned / "phantom_000_ct_vertebrae.nii.gz"))
    transform = sitk.ReadTransform(str(unaligned / "phantom_000_true_transform.tfm"))
    aligned = sitk.GetArrayFromImage(sitk.Resample(ct, mr, transform, sitk.sitkNearestNeighbor, 0))
    unaligned_arr = sitk.GetArrayFromImage(sitk.Resample(ct, mr, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    reference = sitk.GetArrayFromImage(mr)

    def dice(a, b, label):
        a, b = a == label, b == label
        return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)

    labels = [label for label in np.unique(reference) if label and (aligned == label).sum() > 20]
    assert labels
    aligned_dice = np.mean([dice(aligned, reference, label) for label in labels])
    assert aligned_dice > 0.7
    assert aligned_dice > np.mean([dice(unaligned_arr, reference, label) for label in labels])


def test_writer_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path, tiny_settings):
    write_phantom_datasets(tmp_path, num_cases=1, seed=0, tasks=["segmentation"], settings=tiny_settings,
                           progress=False)
    target = tmp_path / "Dataset901_SpinePhantomSeg"
    before = sorted(p.name for p in (target / "imagesTr").iterdir())
    with pytest.raises(SpineDiffError, match="already exists"):
        write_phantom_datasets(tmp_path, num_cases=1, seed=1, tasks=["segmentation"], settings=tiny_settings,
                               progress=False)
    assert sorted(p.name for p in (target / "imagesTr").iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    with pytest.raises(SpineDiffError, match="Unknown phantom task"):
        write_phantom_datasets(tmp_path, num_cases=1, tasks=["nonsense"], progress=False)
