"""Landmark-based MR/CT registration: landmarks, fitting, bad input, the dataset writer and the CLI.

The tests build their own small synthetic spines: per vertebra a body block, pedicles, lamina,
transverse and spinous processes (boxes in the vertebra's own frame) placed along a curved
centre line, sampled on grids with oblique directions and anisotropic spacing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from spinediff.cli import main
from spinediff.errors import SpineDiffError
from spinediff.registration import align
from spinediff.registration.api import (
    CaseFiles,
    RegistrationSettings,
    find_unaligned_cases,
    register_case,
    register_dataset,
)
from spinediff.registration.landmarks import (
    LandmarkSet,
    index_to_physical,
    landmarks_from_masks,
    read_landmarks,
    write_landmarks,
)

TPTBOX = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "samples" / "tptbox"
LABELS = (20, 21, 22, 23, 24)
BODY, POSTERIOR = 50, 41  # TPTBox subregion labels
# Vertebra parts in the vertebra frame (u left-right, v posterior, w along the spine), mm:
# (u_min, u_max, v_min, v_max, half height), mirrored in u when u_min > 0.
BODY_BOX = (-10.0, 10.0, -20.0, -6.0, 9.0)
POSTERIOR_BOXES = (
    (5.0, 8.0, -6.0, 3.0, 4.0),  # pedicles
    (-10.0, 10.0, 3.0, 10.0, 6.0),  # lamina
    (-3.0, 3.0, 10.0, 30.0, 5.0),  # spinous process
    (8.0, 22.0, -2.0, 2.0, 3.0),  # transverse processes
)


def _box_volume_and_centroid(box: tuple[float, ...]) -> tuple[float, np.ndarray]:
    u0, u1, v0, v1, h = box
    mirrored = u0 > 0
    volume = (u1 - u0) * (v1 - v0) * 2 * h * (2 if mirrored else 1)
    return volume, np.array([0.0 if mirrored else (u0 + u1) / 2, (v0 + v1) / 2, 0.0])


@dataclass
class SyntheticSpine:
    """Vertebrae along a circular arc in the y-z plane (LPS: y posterior, z superior)."""

    radius_mm: float | None = 250.0  # None: a straight spine
    step_mm: float = 28.0
    labels: tuple[int, ...] = LABELS

    def frame(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """Centre and axes (rows: u, v, w) of a vertebra, in the anatomy frame."""
        s = (label - np.mean(self.labels)) * -self.step_mm  # higher labels are lower (caudal)
        if self.radius_mm is None:
            return np.array([0.0, 0.0, s]), np.eye(3)
        a = s / self.radius_mm
        centre = np.array([0.0, -self.radius_mm * (1 - np.cos(a)), self.radius_mm * np.sin(a)])
        axes = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(a), np.sin(a)], [0.0, -np.sin(a), np.cos(a)]])
        return centre, axes

    def part_centroids(self, label: int) -> dict[str, np.ndarray]:
        """Exact centroids of the body, the posterior elements and the whole vertebra."""
        centre, axes = self.frame(label)
        body_volume, body_local = _box_volume_and_centroid(BODY_BOX)
        parts = [_box_volume_and_centroid(box) for box in POSTERIOR_BOXES]
        post_volume = sum(v for v, _ in parts)
        post_local = sum(v * c for v, c in parts) / post_volume
        whole_local = (body_volume * body_local + post_volume * post_local) / (body_volume + post_volume)
        return {
            name: centre + local @ axes
            for name, local in (("body", body_local), ("posterior", post_local), ("centroid", whole_local))
        }

    def sample(self, grid: sitk.Image, to_anatomy: np.ndarray | None = None) -> tuple[sitk.Image, sitk.Image]:
        """Vertebra instance mask and subregion mask on ``grid``; ``to_anatomy`` (4x4) maps the
        grid's physical points into the anatomy frame (default identity)."""
        size = grid.GetSize()
        zyx = np.indices(size[::-1]).reshape(3, -1)
        points = index_to_physical(grid, zyx)
        if to_anatomy is not None:
            points = points @ to_anatomy[:3, :3].T + to_anatomy[:3, 3]
        instance = np.zeros(points.shape[0], np.uint8)
        subregion = np.zeros(points.shape[0], np.uint8)
        for label in self.labels:
            centre, axes = self.frame(label)
            u, v, w = ((points - centre) @ axes.T).T
            for value, boxes in ((BODY, (BODY_BOX,)), (POSTERIOR, POSTERIOR_BOXES)):
                for u0, u1, v0, v1, h in boxes:
                    uu = np.abs(u) if u0 > 0 else u
                    inside = (uu >= u0) & (uu < u1) & (v >= v0) & (v < v1) & (np.abs(w) < h)
                    instance[inside] = label
                    subregion[inside] = value
        shape = size[::-1]
        images = []
        for array in (instance, subregion):
            image = sitk.GetImageFromArray(array.reshape(shape))
            image.CopyInformation(grid)
            images.append(image)
        return images[0], images[1]


def tptbox_or_skip() -> Path:
    if not (TPTBOX / "sub-ct_seg-vert_label-22_msk.nii.gz").exists():
        pytest.skip(f"needs the real TPTBox sample at {TPTBOX} (../shared beside the repository), absent here")
    return TPTBOX


def rotation_matrix(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def make_grid(size, spacing, direction, centre=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A uint8 image whose grid is centred on ``centre`` (physical mm)."""
    image = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in spacing])
    direction = np.asarray(direction, float)
    image.SetDirection([float(x) for x in direction.ravel()])
    half = direction @ ((np.asarray(size) - 1) * np.asarray(spacing) / 2)
    image.SetOrigin([float(x) for x in np.asarray(centre) - half])
    return image


# MR-like: sagittal slices (index k along left-right, 3 mm, only 20 slices: the transverse processes
# are cut), rows along superior-inferior, tilted by 7 degrees. CT-like: oblique axial grid, 2-2.5 mm.
SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def mr_grid() -> sitk.Image:
    return make_grid((48, 64, 20), (2.0, 2.6, 3.0), rotation_matrix((2, 1, 1), 7) @ SAGITTAL, (1.5, 5.0, 0.0))


def ct_grid() -> sitk.Image:
    return make_grid((48, 56, 64), (2.0, 2.0, 2.5), rotation_matrix((1, 2, 3), 20), centre=(0.0, 5.0, 0.0))


def true_rigid(degrees: float = 12.0, translation=(14.0, -9.0, 11.0)) -> sitk.Euler3DTransform:
    """A known MR -> CT transform (rotation about an oblique axis, then translation)."""
    transform = sitk.Euler3DTransform()
    transform.SetMatrix([float(x) for x in rotation_matrix((0.3, 0.8, 0.5), degrees).ravel()])
    transform.SetTranslation(translation)
    return transform


def write_synthetic_case(
    folder: Path,
    case: str,
    spine: SyntheticSpine | None = None,
    transform: sitk.Transform | None = None,
    ct_labels_map=None,
    mr_labels_map=None,
) -> None:
    """Write a phantom-style unaligned case: MR (T1w, T2w) and CT images, masks, true transform.

    ``ct_labels_map`` / ``mr_labels_map`` (a function on the instance array) relabel one mask
    to build bad input.
    """
    spine = spine or SyntheticSpine()
    transform = transform or true_rigid()
    to_anatomy = np.linalg.inv(align.transform_to_matrix(transform))  # CT point -> MR (anatomy) point
    mr_vertebrae, _ = spine.sample(mr_grid())
    ct_vertebrae, _ = spine.sample(ct_grid(), to_anatomy)
    folder.mkdir(parents=True, exist_ok=True)
    for name, image, relabel in (("mr", mr_vertebrae, mr_labels_map), ("ct", ct_vertebrae, ct_labels_map)):
        array = sitk.GetArrayFromImage(image)
        if relabel is not None:
            array = relabel(array).astype(np.uint8)
        bone = array > 0
        if name == "mr":
            channels = {"T1w": np.where(bone, 300.0, 100.0), "T2w": np.where(bone, 150.0, 250.0)}
        else:
            channels = {"": np.where(bone, 700, 40).astype(np.int16)}
        for channel, values in channels.items():
            intensity = sitk.GetImageFromArray(values.astype(np.float32) if name == "mr" else values)
            intensity.CopyInformation(image)
            suffix = f"_{channel}" if channel else ""
            sitk.WriteImage(intensity, str(folder / f"{case}_{name}{suffix}.nii.gz"))
        for kind, values in (("vertebrae", array), ("labels", bone.astype(np.uint8))):
            mask = sitk.GetImageFromArray(values)
            mask.CopyInformation(image)
            sitk.WriteImage(mask, str(folder / f"{case}_{name}_{kind}.nii.gz"))
    sitk.WriteTransform(transform, str(folder / f"{case}_true_transform.tfm"))


@pytest.fixture(scope="module")
def good_case(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unaligned")
    write_synthetic_case(folder, "good_000")
    return folder


# ------------------------------------------------------------------------------ landmarks


def test_index_to_physical_matches_simpleitk():
    grid = make_grid((7, 9, 5), (0.7, 1.3, 2.9), rotation_matrix((1, -2, 0.5), 33), centre=(4.0, -7.0, 11.0))
    zyx = np.array([[0, 4, 2], [8, 0, 3], [6, 1, 4]])  # three voxels as (z, y, x) columns
    expected = [grid.TransformIndexToPhysicalPoint([int(i) for i in zyx[::-1, n]]) for n in range(3)]
    np.testing.assert_allclose(index_to_physical(grid, zyx), expected, atol=1e-9)


def test_centroids_of_known_geometry_on_oblique_anisotropic_grids():
    spine = SyntheticSpine()
    for grid in (mr_grid(), ct_grid()):
        vertebrae, subregions = spine.sample(grid)
        centroids = landmarks_from_masks(vertebrae, landmarks_per_vertebra=1)
        parts = landmarks_from_masks(vertebrae, subregion_mask=subregions)
        assert centroids.labels == list(LABELS)
        tolerance = 0.5 * max(grid.GetSpacing())  # sampling a box at voxel centres
        for label in LABELS:
            truth = spine.part_centroids(label)
            if grid.GetSize()[2] > 20:  # the MR cuts the transverse processes: only the CT sees all
                assert np.linalg.norm(centroids.points[label]["centroid"] - truth["centroid"]) < tolerance
                assert np.linalg.norm(parts.points[label]["posterior"] - truth["posterior"]) < tolerance
            assert np.linalg.norm(parts.points[label]["body"] - truth["body"]) < tolerance


def test_geometric_split_finds_body_and_posterior_elements():
    spine = SyntheticSpine()
    vertebrae, subregions = spine.sample(ct_grid())
    geometric = landmarks_from_masks(vertebrae)
    from_subregions = landmarks_from_masks(vertebrae, subregion_mask=subregions)
    for label in LABELS:
        _, axes = spine.frame(label)
        named = geometric.points[label]
        # the posterior landmark lies ~26 mm behind the body one along the vertebra's AP axis
        assert (named["posterior"] - named["body"]) @ axes[1] > 20
        for name in ("body", "posterior"):
            assert np.linalg.norm(named[name] - from_subregions.points[label][name]) < 1.5


@pytest.mark.parametrize(
    "prefix, labels",
    [("sub-ct_seg-{}_label-22_msk", [21, 22, 23]), ("sub-mri_seg-{}_label-6_msk", [5, 6, 7])],
    ids=["lumbar-ct", "cervical-mr"],
)
def test_geometric_split_on_real_tptbox_masks(prefix, labels):
    """Real masks (the MR one also holds discs 100+ and endplates 200+, which are ignored): the
    geometric landmarks agree with the subregion-based ones."""
    folder = tptbox_or_skip()
    vertebrae = sitk.ReadImage(str(folder / f"{prefix.format('vert')}.nii.gz"))
    subregions = sitk.ReadImage(str(folder / f"{prefix.format('subreg')}.nii.gz"))
    geometric = landmarks_from_masks(vertebrae)
    reference = landmarks_from_masks(vertebrae, subregion_mask=subregions)
    assert geometric.labels == labels
    for label in labels:
        for name in ("body", "posterior"):
            assert np.linalg.norm(geometric.points[label][name] - reference.points[label][name]) < 2.0


def test_landmark_json_roundtrip_and_bad_files(tmp_path):
    landmarks = LandmarkSet({20: {"body": np.array([1.0, 2.0, 3.0]), "spinous_tip": np.array([0.5, 40, 2])}})
    write_landmarks(landmarks, tmp_path / "lm.json")
    again = read_landmarks(tmp_path / "lm.json")
    np.testing.assert_allclose(again.points[20]["spinous_tip"], [0.5, 40, 2])
    assert json.loads((tmp_path / "lm.json").read_text())["space"] == "LPS"
    (tmp_path / "ras.json").write_text(json.dumps({"space": "RAS", "vertebrae": {"20": {"body": [0, 0, 0]}}}))
    with pytest.raises(SpineDiffError, match="RAS"):
        read_landmarks(tmp_path / "ras.json")
    (tmp_path / "short.json").write_text(json.dumps({"vertebrae": {"20": {"body": [0, 0]}}}))
    with pytest.raises(SpineDiffError, match="20/body"):
        read_landmarks(tmp_path / "short.json")


# ------------------------------------------------------------------------------ fitting


@pytest.mark.parametrize("kind", ["rigid", "similarity", "affine"])
def test_fit_recovers_exact_transforms(kind):
    rng = np.random.default_rng(3)
    fixed = rng.normal(size=(8, 3)) * 40
    linear = rotation_matrix((1, 1, 0), 14)
    if kind == "similarity":
        linear = 1.07 * linear
    if kind == "affine":
        linear = linear @ np.array([[1.05, 0.04, 0], [0, 0.96, 0.02], [0.03, 0, 1.02]])
    moving = fixed @ linear.T + np.array([5.0, -12.0, 7.5])
    keys = [(20 + i, "p") for i in range(8)]
    transform = align.fit_transform(align.MatchedLandmarks(keys, fixed, moving), kind)
    np.testing.assert_allclose(align.apply_matrix(align.transform_to_matrix(transform), fixed), moving, atol=1e-6)


def test_masks_recover_known_rigid_transform_despite_cut_fields_of_view(good_case):
    case = find_unaligned_cases(good_case)[0]
    centroids = register_case(case, RegistrationSettings(landmarks_per_vertebra=1, overlay=False))
    assert centroids.report.tre_mm["median"] < 1.0, centroids.report.tre_mm
    result = register_case(case, RegistrationSettings(landmarks_per_vertebra=2, overlay=False))
    assert result.report.tre_mm["max"] < 1.0, result.report.tre_mm
    assert result.report.rotation_error_deg < 1.0
    baseline = register_case(case, RegistrationSettings(landmarks_per_vertebra=0, overlay=False))
    assert baseline.report.tre_mm["median"] > 10  # the misalignment itself
    # the registered CT's bone overlaps the MR vertebrae
    bone = sitk.GetArrayFromImage(result.ct_on_mr) > 300
    vertebra = sitk.GetArrayFromImage(result.label_map) > 0
    assert 2 * np.sum(bone & vertebra) / (bone.sum() + vertebra.sum()) > 0.85


@pytest.mark.parametrize(
    "relabel, message",
    [
        (lambda a: np.where(a > 0, a - 10, 0), "no common vertebra labels"),
        (lambda a: (a > 0) * 1 + (a == 24) * 1, "different label conventions"),  # semantic map vs instances
        (lambda a: a * 0, "is empty"),
    ],
    ids=["no-common-labels", "label-conventions", "empty-mask"],
)
def test_bad_masks_raise_clear_errors(tmp_path, relabel, message):
    relabel_mr = (lambda a: np.where(a > 0, a - 19, 0)) if "conventions" in message else None  # MR 1..5
    write_synthetic_case(tmp_path, "bad_001", ct_labels_map=relabel, mr_labels_map=relabel_mr)
    with pytest.raises(SpineDiffError, match=message) as error:
        register_case(find_unaligned_cases(tmp_path)[0], RegistrationSettings(overlay=False))
    assert "bad_001" in str(error.value)


def test_collinear_landmarks_are_refused(tmp_path):
    write_synthetic_case(tmp_path, "straight_002", spine=SyntheticSpine(radius_mm=None))
    case = find_unaligned_cases(tmp_path)[0]
    with pytest.raises(SpineDiffError, match="straight_002.*collinear"):
        register_case(case, RegistrationSettings(landmarks_per_vertebra=1, overlay=False))
    # two landmarks per vertebra span a plane: the same straight spine registers
    result = register_case(case, RegistrationSettings(landmarks_per_vertebra=2, overlay=False))
    assert result.report.tre_mm["max"] < 1.0


# ------------------------------------------------------------------------------ dataset writer and CLI


def _bad_cases(folder: Path) -> None:
    write_synthetic_case(folder, "case_a_good")
    write_synthetic_case(folder, "case_b_nocommon", ct_labels_map=lambda a: np.where(a > 0, a - 10, 0))
    write_synthetic_case(folder, "case_c_empty", ct_labels_map=lambda a: a * 0)
    # landmark files only (no masks), all on one line
    write_synthetic_case(folder, "case_d_collinear")
    for side in ("mr", "ct"):
        (folder / f"case_d_collinear_{side}_vertebrae.nii.gz").unlink()
        points = {str(label): {"body": [0.0, 0.0, 30.0 * i]} for i, label in enumerate(LABELS)}
        (folder / f"case_d_collinear_{side}_landmarks.json").write_text(json.dumps({"vertebrae": points}))


def test_dataset_keeps_good_cases_and_writes_nothing_for_failures(tmp_path):
    from spinediff.datasets.validate import validate_dataset

    _bad_cases(tmp_path / "unaligned")
    output = tmp_path / "Dataset950_Registered"
    result = register_dataset(
        find_unaligned_cases(tmp_path / "unaligned"), output, RegistrationSettings(landmarks_per_vertebra=1)
    )
    status = {r.case: r.status for r in result.reports}
    assert status == {
        "case_a_good": "ok",
        "case_b_nocommon": "failed",
        "case_c_empty": "failed",
        "case_d_collinear": "failed",
    }
    errors = {r.case: r.error for r in result.failures}
    assert "no common vertebra labels" in errors["case_b_nocommon"]
    assert "empty" in errors["case_c_empty"]
    assert "collinear" in errors["case_d_collinear"]
    written = sorted(p.name for p in output.rglob("*") if p.is_file())
    assert not [name for name in written if "case_b" in name or "case_c" in name or "case_d" in name]
    assert {
        "case_a_good_0000.nii.gz",
        "case_a_good_0001.nii.gz",
        "case_a_good_0002.nii.gz",
        "case_a_good_overlay.png",
        "case_a_good_report.json",
        "summary.md",
    } <= set(written)
    assert (output / "registration" / "case_a_good_overlay.png").read_bytes()[:4] == b"\x89PNG"
    dataset = json.loads((output / "dataset.json").read_text())
    assert dataset["spinediff"] == {"task": "translation", "source_channels": [0, 1], "target_channels": [2]}
    assert dataset["channel_names"] == {"0": "T1w", "1": "T2w", "2": "CT"}
    assert validate_dataset(output).ok
    summary = (output / "registration" / "summary.md").read_text()
    assert "case_c_empty" in summary and "1 of 4 cases registered" in summary
    ct = sitk.ReadImage(str(output / "imagesTr" / "case_a_good_0002.nii.gz"))
    assert sitk.GetArrayViewFromImage(ct).min() == -1024  # outside the CT field of view
    assert not list(tmp_path.glob(".Dataset950*"))  # no staging folder left behind


def test_cli_exits_2_naming_failed_cases_and_respects_overwrite(tmp_path, capsys):
    folder = tmp_path / "unaligned"
    write_synthetic_case(folder, "cli_good")
    write_synthetic_case(folder, "cli_empty", ct_labels_map=lambda a: a * 0)
    output = tmp_path / "Dataset951_Cli"
    code = main(["register", str(folder), "-o", str(output), "--no-overlay", "--interpolation", "bspline"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cli_empty" in err and "1 of 2 case(s) failed" in err and "cli_good" not in err
    assert (output / "labelsTr" / "cli_good.nii.gz").exists()
    assert not (output / "labelsTr" / "cli_empty.nii.gz").exists()

    code = main(["register", str(folder), "-o", str(output), "--cases", "cli_good"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    code = main(
        ["register", str(folder), "-o", str(output), "--cases", "cli_good", "--overwrite", "--transform", "similarity"]
    )
    assert code == 0
    dataset = json.loads((output / "dataset.json").read_text())
    assert dataset["registration"]["transform"] == "similarity"


def test_cli_explicit_files_and_json_landmarks(tmp_path, good_case):
    spine = SyntheticSpine()
    transform = true_rigid()
    truth = {label: spine.part_centroids(label) for label in LABELS}
    matrix = align.transform_to_matrix(transform)
    for side in ("mr", "ct"):
        points = {
            str(label): {
                name: (align.apply_matrix(matrix, p[None])[0] if side == "ct" else p).tolist()
                for name, p in truth[label].items()
                if name != "centroid"
            }
            for label in LABELS
        }
        (tmp_path / f"{side}.json").write_text(json.dumps({"space": "LPS", "vertebrae": points}))
    g = good_case
    code = main(
        [
            "register",
            "--case-id",
            "sub01",
            "--mr",
            f"T1w={g}/good_000_mr_T1w.nii.gz",
            "--ct",
            f"{g}/good_000_ct.nii.gz",
            "--mr-labels",
            f"{g}/good_000_mr_labels.nii.gz",
            "--mr-landmarks",
            str(tmp_path / "mr.json"),
            "--ct-landmarks",
            str(tmp_path / "ct.json"),
            "--true-transform",
            f"{g}/good_000_true_transform.tfm",
            "-o",
            str(tmp_path / "Dataset952_X"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "Dataset952_X" / "registration" / "sub01_report.json").read_text())
    assert report["landmark_source"] == "json"
    assert report["tre_mm"]["max"] < 1e-3  # exact landmarks give the exact transform


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["register", "-o", str(tmp_path / "Dataset953_X")]) == 2
    assert "--ct and --mr" in capsys.readouterr().err
    assert main(["register", str(tmp_path), "-o", str(tmp_path / "not_a_dataset_name")]) == 2
    with pytest.raises(SystemExit):
        main(["register", "--help"])
    assert "--landmarks-per-vertebra" in capsys.readouterr().out


def test_registers_the_tiny_phantom_into_a_valid_translation_dataset(phantom_root, tmp_path):
    """End to end on ``spinediff phantom`` output (conftest's tiny grids: 7 mm MR slices)."""
    from spinediff.datasets.validate import validate_dataset
    from spinediff.registration.api import labels_from_parent_dataset

    unaligned = next(phantom_root.glob("Dataset*_SpinePhantomTranslation/unaligned"))
    output = tmp_path / "Dataset960_TinyRegistered"
    result = register_dataset(
        find_unaligned_cases(unaligned),
        output,
        RegistrationSettings(overlay=False),
        label_names=labels_from_parent_dataset(unaligned),
    )
    assert not result.failures
    assert all(report.tre_mm["mean"] < 1.5 for report in result.reports), [r.tre_mm for r in result.reports]
    assert validate_dataset(output).ok
    assert json.loads((output / "dataset.json").read_text())["labels"]["disc"] == 2


# ------------------------------------------------------------------------------ real data


def test_tptbox_ct_registered_onto_moved_copy_of_itself(tmp_path):
    """The real TPTBox CT, moved by a known rigid transform and resampled onto another grid,
    is registered back within 1 mm over its vertebra voxels."""
    folder = tptbox_or_skip()
    ct = sitk.ReadImage(str(folder / "sub-ct_label-22_ct.nii.gz"))
    vertebrae = sitk.ReadImage(str(folder / "sub-ct_seg-vert_label-22_msk.nii.gz"))
    transform = true_rigid(degrees=9.0, translation=(6.0, -11.0, 8.0))  # "MR" (moved copy) -> CT
    inverse = transform.GetInverse()
    # the moved copy: an anisotropic grid covering the whole moved CT (nothing cut off)
    corners = [
        ct.TransformIndexToPhysicalPoint([i * (s - 1) for i, s in zip(c, ct.GetSize(), strict=True)])
        for c in np.ndindex(2, 2, 2)
    ]
    moved = np.array([inverse.TransformPoint(p) for p in corners])
    spacing = (1.2, 1.2, 2.0)
    grid = sitk.Image([int(np.ceil(e / s)) + 3 for e, s in zip(np.ptp(moved, 0), spacing, strict=True)], sitk.sitkInt16)
    grid.SetSpacing(spacing)
    grid.SetOrigin([float(x) for x in moved.min(0) - 1.5 * np.asarray(spacing)])
    copy = sitk.Resample(ct, grid, transform, sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    copy_mask = sitk.Resample(vertebrae, grid, transform, sitk.sitkNearestNeighbor, 0, vertebrae.GetPixelID())
    for name, image in (("copy", copy), ("copy_mask", copy_mask), ("ct", ct), ("ct_mask", vertebrae)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    sitk.WriteTransform(transform, str(tmp_path / "true.tfm"))
    case = CaseFiles(
        "tptbox",
        {"CTcopy": tmp_path / "copy.nii.gz"},
        tmp_path / "ct.nii.gz",
        mr_vertebrae=tmp_path / "copy_mask.nii.gz",
        ct_vertebrae=tmp_path / "ct_mask.nii.gz",
        true_transform=tmp_path / "true.tfm",
    )
    result = register_case(case, RegistrationSettings(overlay=False))
    assert result.report.vertebrae_used == [21, 22, 23]
    assert result.report.tre_mm["max"] < 1.0, result.report.tre_mm


# ---------------------------------------------------------------------- landmark JSON fuzzing
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner,
                                                                                  max_size=3), max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(_JSON, st.fixed_dictionaries({"vertebrae": st.dictionaries(
    st.one_of(st.text(max_size=3), st.sampled_from(["20", "21"])), st.one_of(_JSON, st.dictionaries(
        st.sampled_from(["body", "posterior"]), st.one_of(_JSON, st.lists(_JSON, min_size=3, max_size=3))))),
    "space": st.one_of(st.just("LPS"), st.text(max_size=4), st.integers())})))
def test_fuzzed_landmark_json_raises_only_spinediff_errors(data):
    """Any JSON value as a landmark file: either valid landmarks (three finite numbers each) or a SpineDiffError
    naming the source, never another exception."""
    from spinediff.errors import SpineDiffError
    from spinediff.registration.landmarks import LandmarkSet

    try:
        landmarks = LandmarkSet.from_json(data, source="fuzz.json")
    except SpineDiffError as error:
        assert "fuzz.json" in str(error)
    else:
        assert all(np.all(np.isfinite(p)) and p.shape == (3,) for named in landmarks.points.values()
                   for p in named.values())
