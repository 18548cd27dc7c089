"""Typed API of ``spinediff register``: align CT to MR per case and write a paired translation dataset.

The output is a dataset in nnU-Net raw layout (``imagesTr/CASE_0000 ... CASE_000K`` = MR channels,
then the registered CT as the last channel; ``labelsTr/CASE`` = the MR label map) with the
``spinediff`` block ``{"task": "translation", "source_channels": [MR...], "target_channels": [CT]}``.
QA material lies beside it in ``registration/`` (per-case report, overlay, transform, landmarks,
CT masks on the MR grid, ``summary.md`` / ``summary.json``).

Nothing is written for a failed case; the other cases are still processed. The dataset is built in a
temporary sibling folder and moved into place at the end, so an existing output is never left half
replaced (and only replaced with ``overwrite=True``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinediff.errors import SpineDiffError
from spinediff.io import (
    atomic_path,
    ensure_new_output,
    read_image,
    read_voxels_verified,
    write_bytes,
    write_image,
    write_json,
    write_text,
)
from spinediff.registration import align
from spinediff.registration.inputs import CaseFiles, find_unaligned_cases, labels_from_parent_dataset
from spinediff.registration.landmarks import (
    LandmarkSet,
    index_to_physical,
    read_landmarks,
    write_landmarks,
)
from spinediff.registration.mask_alignment import MaskInputs, fit_from_masks
from spinediff.registration.report import CaseReport, error_statistics, overlay_png, summary_markdown
from spinediff.utilities.geometry import same_geometry
from spinediff.utilities.lock import LOCK_NAME, folder_lock

__all__ = [
    "CaseFiles",
    "CaseRegistration",
    "DatasetRegistration",
    "RegistrationSettings",
    "find_unaligned_cases",
    "labels_from_parent_dataset",
    "register_case",
    "register_dataset",
    "write_case",
]

LANDMARK_SOURCES = ("auto", "masks", "json")
CT_CHANNEL_NAME = "CT"
# TRE is evaluated on at most this many vertebra voxels (evenly strided).
MAX_TRE_POINTS = 200_000
_DATASET_FOLDER = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class RegistrationSettings:
    """How to register. ``landmarks_per_vertebra`` 0 means no registration (identity: the ablation
    baseline), 1 the vertebra centroid only, 2 body + posterior-elements centroids (default)."""

    transform: str = "rigid"
    landmarks_per_vertebra: int = 2
    interpolation: str = "linear"
    landmark_source: str = "auto"
    volume_tolerance: float = 0.2
    overlay: bool = True

    def __post_init__(self) -> None:
        if self.transform not in align.TRANSFORM_KINDS:
            raise SpineDiffError(
                f"--transform must be one of {', '.join(align.TRANSFORM_KINDS)}, got {self.transform!r}."
            )
        if self.landmarks_per_vertebra not in (0, 1, 2):
            raise SpineDiffError(f"--landmarks-per-vertebra must be 0, 1 or 2, got {self.landmarks_per_vertebra}.")
        if self.interpolation not in ("linear", "bspline"):
            raise SpineDiffError(f"--interpolation must be linear or bspline, got {self.interpolation!r}.")
        if self.landmark_source not in LANDMARK_SOURCES:
            raise SpineDiffError(f"--landmark-source must be one of {', '.join(LANDMARK_SOURCES)}.")


@dataclass
class CaseRegistration:
    """The in-memory result of :func:`register_case` (nothing written yet)."""

    case_id: str
    transform: sitk.Transform
    mr_channels: dict[str, sitk.Image]
    ct_on_mr: sitk.Image
    label_map: sitk.Image
    ct_masks_on_mr: dict[str, sitk.Image]
    mr_landmarks: LandmarkSet | None
    ct_landmarks: LandmarkSet | None
    report: CaseReport
    overlay: bytes | None = None


@dataclass
class DatasetRegistration:
    """Outcome of :func:`register_dataset`."""

    output: Path
    reports: list[CaseReport] = field(default_factory=list)

    @property
    def failures(self) -> list[CaseReport]:
        return [r for r in self.reports if r.status != "ok"]


# ------------------------------------------------------------------------------ grids


def _read_verified(path: Path) -> sitk.Image:
    """The image, after its voxels were read completely (a truncated file is refused, not read as zeros)."""
    image = read_image(path)
    voxels = np.asarray(read_voxels_verified(path, image))
    if np.issubdtype(voxels.dtype, np.floating) and not np.all(np.isfinite(voxels)):
        bad = int(np.count_nonzero(~np.isfinite(voxels)))
        raise SpineDiffError(f"{path} has {bad} NaN or infinite voxel(s). Fill them (e.g. with -1024 HU for CT, 0 "
                             "for MR) or crop them away before registering.")
    return image


def _read_on_grid(path: Path, reference: sitk.Image, reference_name: str, case: str) -> sitk.Image:
    image = _read_verified(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SpineDiffError(f"case {case}: {path} is a {image.GetDimension()}D image with "
                             f"{image.GetNumberOfComponentsPerPixel()} component(s); expected a 3D single-channel "
                             "mask on the grid of its image.")
    if same_geometry(reference, image) is not None:
        raise SpineDiffError(
            f"case {case}: {path} is not on the grid of {reference_name} (size, spacing, origin "
            f"or direction differ); masks must share their image's grid."
        )
    return image


# ------------------------------------------------------------------------------ one case


def _choose_source(case: CaseFiles, settings: RegistrationSettings) -> str:
    has_masks = case.mr_vertebrae is not None and case.ct_vertebrae is not None
    has_json = case.mr_landmarks is not None and case.ct_landmarks is not None
    source = settings.landmark_source
    if source == "auto":
        source = "masks" if has_masks else "json" if has_json else ""
    if source == "masks" and not has_masks or source == "json" and not has_json or not source:
        raise SpineDiffError(
            f"case {case.case_id}: landmarks need either vertebra masks of both images (--mr-vertebrae, "
            f"--ct-vertebrae) or landmark files of both (--mr-landmarks, --ct-landmarks)"
            + (
                f"; --landmark-source {settings.landmark_source} was asked"
                if settings.landmark_source != "auto"
                else ""
            )
            + "."
        )
    return source


def _fit(
    case: CaseFiles,
    mr_reference: sitk.Image,
    ct: sitk.Image,
    settings: RegistrationSettings,
    report: CaseReport,
    per_vertebra: int,
) -> tuple[sitk.Transform, align.MatchedLandmarks, LandmarkSet, LandmarkSet]:
    """Landmarks of both images, matched, and the fitted MR -> CT transform."""
    cid = case.case_id
    if _choose_source(case, settings) == "json":
        report.landmark_source = "json"
        mr_set = read_landmarks(case.mr_landmarks).restricted(per_vertebra)
        ct_set = read_landmarks(case.ct_landmarks).restricted(per_vertebra)
        matched = align.match_landmarks(mr_set, ct_set, cid)
        align.check_point_geometry(matched, settings.transform, cid)
        return align.fit_transform(matched, settings.transform), matched, mr_set, ct_set
    subregions = {}
    for key, path, reference in (("mr", case.mr_subregions, mr_reference), ("ct", case.ct_subregions, ct)):
        if path is not None:
            subregions[key] = _read_on_grid(path, reference, f"the {key.upper()}", cid)
    report.landmark_source = "subregions" if len(subregions) == 2 else "masks"
    if len(subregions) == 1:
        report.notes.append("only one image has a subregion mask: both use the geometric split")
        subregions = {}
    fit = fit_from_masks(
        MaskInputs(
            _read_on_grid(case.mr_vertebrae, mr_reference, "the MR", cid),
            subregions.get("mr"),
            f"case {cid}: MR mask {case.mr_vertebrae}",
        ),
        MaskInputs(
            _read_on_grid(case.ct_vertebrae, ct, "the CT", cid),
            subregions.get("ct"),
            f"case {cid}: CT mask {case.ct_vertebrae}",
        ),
        kind=settings.transform,
        landmarks_per_vertebra=per_vertebra,
        case=cid,
        volume_tolerance=settings.volume_tolerance,
    )
    report.vertebrae_excluded = fit.excluded
    report.notes.append(f"landmarks on the common field of view of MR and CT ({fit.iterations} fits)")
    return fit.transform, fit.matched, fit.fixed_landmarks, fit.moving_landmarks


def _tre_points(mr_mask: sitk.Image | None, label_map: sitk.Image) -> np.ndarray:
    source = mr_mask if mr_mask is not None else label_map
    array = sitk.GetArrayViewFromImage(source)
    indices = np.stack(np.nonzero((array > 0) & (array < 100) if mr_mask is not None else array > 0))
    stride = max(1, indices.shape[1] // MAX_TRE_POINTS)
    return index_to_physical(source, indices[:, ::stride])


def register_case(case: CaseFiles, settings: RegistrationSettings | None = None) -> CaseRegistration:
    """Register one case in memory: landmarks, transform, resampled CT and masks, report, overlay.

    Raises ``SpineDiffError`` (naming the case) for bad input; writes nothing.
    """
    settings = settings or RegistrationSettings()
    cid = case.case_id
    report = CaseReport(case=cid, transform=settings.transform, landmarks_per_vertebra=settings.landmarks_per_vertebra)
    if not case.mr_channels:
        raise SpineDiffError(f"case {cid}: no MR channel given.")
    mr_channels = {name: _read_verified(path) for name, path in case.mr_channels.items()}
    reference_name, mr_reference = next(iter(mr_channels.items()))
    for name, image in mr_channels.items():
        if same_geometry(mr_reference, image) is not None:
            raise SpineDiffError(
                f"case {cid}: MR channel {name} ({case.mr_channels[name]}) is not on the grid of "
                f"{reference_name}; all MR channels must share one grid."
            )
    ct = _read_verified(case.ct)

    matched = mr_set = ct_set = None
    if settings.landmarks_per_vertebra == 0:
        transform = align.identity_transform()
        report.notes.append("no registration (landmarks per vertebra = 0): identity transform")
        try:  # the residuals of the landmarks a 2-landmark registration would use are still reported
            _, matched, mr_set, ct_set = _fit(case, mr_reference, ct, settings, report, 2)
        except SpineDiffError as exc:
            report.notes.append(f"no landmark residuals: {exc}")
    else:
        transform, matched, mr_set, ct_set = _fit(
            case, mr_reference, ct, settings, report, settings.landmarks_per_vertebra
        )
    if matched is not None:
        report.vertebrae_used = matched.labels
        report.landmarks_matched = len(matched.keys)
        report.residual_before_mm = error_statistics(align.landmark_residuals(align.identity_transform(), matched))
        report.residual_after_mm = error_statistics(align.landmark_residuals(transform, matched))
    matrix = align.transform_to_matrix(transform)
    report.estimated_rotation_deg = align.rotation_angle_deg(align.rotation_of(matrix))
    report.estimated_translation_mm = float(np.linalg.norm(matrix[:3, 3]))

    ct_on_mr = align.resample_onto(ct, mr_reference, transform, settings.interpolation, align.CT_OUTSIDE_VALUE)
    ct_masks = {}
    for key, path in (("ct_vertebrae", case.ct_vertebrae), ("ct_labels", case.ct_labels)):
        if path is not None:
            ct_masks[key] = align.resample_onto(
                _read_on_grid(path, ct, "the CT", cid), mr_reference, transform, "nearest", 0
            )
    mr_mask = _read_on_grid(case.mr_vertebrae, mr_reference, "the MR", cid) if case.mr_vertebrae else None
    if case.mr_labels is not None:
        label_map = _read_on_grid(case.mr_labels, mr_reference, "the MR", cid)
    elif mr_mask is not None:
        array = sitk.GetArrayFromImage(mr_mask)
        label_map = sitk.GetImageFromArray(((array > 0) & (array < 100)).astype(np.uint8))
        label_map.CopyInformation(mr_mask)
        report.notes.append("labelsTr: the MR vertebra mask, binarised (1 = vertebra)")
    else:
        raise SpineDiffError(
            f"case {cid}: no MR label map for labelsTr; give the MR semantic labels "
            f"(--mr-labels) or the MR vertebra mask (--mr-vertebrae)."
        )
    if case.true_transform is not None:
        try:
            true = sitk.ReadTransform(str(case.true_transform))
        except RuntimeError as exc:
            raise SpineDiffError(
                f"case {cid}: {case.true_transform} is not a readable ITK transform "
                f"file ({str(exc).strip().splitlines()[-1]})."
            ) from exc
        report.tre_mm = error_statistics(
            align.target_registration_error(transform, true, _tre_points(mr_mask, label_map))
        )
        report.rotation_error_deg = align.rotation_error_deg(transform, true)
    overlay = None
    if settings.overlay:
        overlay = overlay_png(
            mr_reference,
            ct_on_mr,
            f"{cid} ({settings.transform}, {settings.landmarks_per_vertebra} landmark(s)/vertebra)",
            mr_mask,
        )
    return CaseRegistration(cid, transform, mr_channels, ct_on_mr, label_map, ct_masks, mr_set, ct_set, report, overlay)


def write_case(result: CaseRegistration, dataset: Path, channel_names: Sequence[str]) -> None:
    """Write one registered case into ``dataset``; on any error its files written so far are removed."""
    cid = result.case_id
    qa = dataset / "registration"
    written: list[Path] = []

    def target(path: Path) -> Path:
        written.append(path)
        return path

    try:
        for index, name in enumerate(channel_names):
            image = result.ct_on_mr if name == CT_CHANNEL_NAME else result.mr_channels[name]
            write_image(image, target(dataset / "imagesTr" / f"{cid}_{index:04d}.nii.gz"))
        write_image(result.label_map, target(dataset / "labelsTr" / f"{cid}.nii.gz"))
        for key, image in result.ct_masks_on_mr.items():
            write_image(image, target(qa / f"{cid}_{key}_on_mr.nii.gz"))
        with atomic_path(target(qa / f"{cid}_transform.tfm")) as tmp:
            sitk.WriteTransform(result.transform, str(tmp))
        for key, landmarks in (("mr", result.mr_landmarks), ("ct", result.ct_landmarks)):
            if landmarks is not None:
                write_landmarks(landmarks, target(qa / f"{cid}_{key}_landmarks.json"))
        if result.overlay is not None:
            write_bytes(result.overlay, target(qa / f"{cid}_overlay.png"))
        result.report.files = {p.name: str(p.relative_to(dataset)) for p in written}
        write_json(result.report.to_json(), target(qa / f"{cid}_report.json"))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ dataset


def _label_names(label_maps_max: int, binarised: bool, given: dict[str, int] | None) -> dict[str, int]:
    if given:
        return dict(given)
    if binarised:
        return {"background": 0, "vertebra": 1}
    return {"background": 0, **{f"label_{value}": value for value in range(1, label_maps_max + 1)}}


def register_dataset(
    cases: Sequence[CaseFiles],
    output: str | os.PathLike,
    settings: RegistrationSettings | None = None,
    *,
    overwrite: bool = False,
    label_names: dict[str, int] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> DatasetRegistration:
    """Register every case and write a paired translation dataset at ``output``.

    Failed cases are recorded (``status == "failed"``) and skipped; the others are written. If no
    case succeeds nothing is written. ``progress`` wraps the case iterable (e.g. ``tqdm``).
    """
    settings = settings or RegistrationSettings()
    output = Path(output).expanduser().absolute()
    if not _DATASET_FOLDER.match(output.name):
        raise SpineDiffError(
            f"{output}: the output folder must be named like nnU-Net datasets, "
            f"DatasetNNN_Name (e.g. Dataset902_SpineTranslation)."
        )
    # the dataset folder is replaced as a whole, so its lock lies beside it; taken before the check that it is new
    with folder_lock(output.parent, name=f".{output.name}{LOCK_NAME}"):
        ensure_new_output(output, overwrite)
        if not cases:
            raise SpineDiffError("no cases to register.")
        channel_names = [*cases[0].mr_channels, CT_CHANNEL_NAME]
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        result = DatasetRegistration(output)
        label_max, binarised = 0, True
        try:
            for case in progress(cases) if progress else cases:
                try:
                    if [*case.mr_channels, CT_CHANNEL_NAME] != channel_names:
                        raise SpineDiffError(
                            f"case {case.case_id}: MR channels {list(case.mr_channels)} differ from "
                            f"the first case's {channel_names[:-1]}."
                        )
                    registered = register_case(case, settings)
                    write_case(registered, staging, channel_names)
                except (SpineDiffError, RuntimeError) as exc:  # RuntimeError: SimpleITK on unusual input
                    text = str(exc).strip().splitlines()[-1] if isinstance(exc, RuntimeError) else str(exc)
                    message = text if case.case_id in text else f"case {case.case_id}: {text}"
                    result.reports.append(
                        CaseReport(
                            case=case.case_id,
                            status="failed",
                            error=message,
                            transform=settings.transform,
                            landmarks_per_vertebra=settings.landmarks_per_vertebra,
                        )
                    )
                    continue
                result.reports.append(registered.report)
                label_max = max(label_max, int(sitk.GetArrayViewFromImage(registered.label_map).max()))
                binarised &= case.mr_labels is None
            if not any(r.status == "ok" for r in result.reports):
                return result
            n_mr = len(channel_names) - 1
            dataset_json = {
                "channel_names": {str(i): name for i, name in enumerate(channel_names)},
                "labels": _label_names(label_max, binarised, label_names),
                "numTraining": sum(r.status == "ok" for r in result.reports),
                "file_ending": ".nii.gz",
                "name": output.name.split("_", 1)[1],
                "description": "MR/CT pairs aligned by landmark-based registration (spinediff register).",
                "spinediff": {
                    "task": "translation",
                    "source_channels": list(range(n_mr)),
                    "target_channels": [n_mr],
                },
                "registration": {
                    "transform": settings.transform,
                    "landmarks_per_vertebra": settings.landmarks_per_vertebra,
                    "interpolation": settings.interpolation,
                    "outside_value_hu": align.CT_OUTSIDE_VALUE,
                },
            }
            write_json(dataset_json, staging / "dataset.json")
            write_text(
                summary_markdown(result.reports, f"Registration of {output.name}"),
                staging / "registration" / "summary.md",
            )
            write_json(
                {"settings": dataset_json["registration"], "cases": [r.to_json() for r in result.reports]},
                staging / "registration" / "summary.json",
            )
            _move_into_place(staging, output)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return result


def _move_into_place(staging: Path, output: Path) -> None:
    """Replace ``output`` by ``staging`` (an existing output only after ``ensure_new_output``)."""
    if output.exists():
        if output.is_dir() and not any(output.iterdir()):
            output.rmdir()
        else:
            backup = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            backup.rmdir()
            os.replace(output, backup)
            os.replace(staging, output)
            shutil.rmtree(backup, ignore_errors=True)
            return
    os.replace(staging, output)
