"""Vertebra landmarks in physical coordinates: from instance masks, subregion masks or JSON files.

Points are in millimetres in ITK's physical (LPS) space, as ``TransformIndexToPhysicalPoint``
gives them, so spacing, origin and direction of the image are respected.

Landmarks per vertebra:

- ``centroid``: the centroid of all the vertebra's voxels (the 1-landmark mode of the ablation);
- ``body``: the centroid of the vertebral body;
- ``posterior``: the centroid of the posterior elements (pedicles, lamina, processes).

With a subregion mask (TPTBox convention: 49/50 corpus, 41-48 posterior elements) ``body`` and
``posterior`` come from it. Without one, each vertebra is split geometrically:

1. the spine's centre line through the vertebra centroids (sorted by label) gives the local
   cranio-caudal tangent ``t``;
2. in the plane perpendicular to ``t``, the posterior direction is the third-moment vector
   ``E[|q|^2 q]`` of the centred voxel positions ``q``: its left-right component vanishes for a
   mirror-symmetric vertebra, and it points to the posterior elements, which reach far behind the
   centroid, while the compact body lies close in front of it. Directions that are unreliable
   (a nearly symmetric distribution) are replaced by the neighbours', and signs are made to agree
   along the spine;
3. along that direction, the voxel count profile has a valley at the pedicles between the body
   and the posterior arch; the split is the depth-weighted centre of that valley.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter1d

from spinediff.errors import SpineDiffError
from spinediff.io import index_to_physical, read_json, write_json
from spinediff.utilities.geometry import same_geometry

# Vertebra instance labels (VerSe numbering 1-28). TPTBox / VerSe write discs as 100 + label and
# endplates as 200 + label into the same file; those are not vertebrae.
MAX_VERTEBRA_LABEL = 99
# TPTBox subregion labels.
SUBREGION_BODY_LABELS = (49, 50)
SUBREGION_POSTERIOR_LABELS = tuple(range(41, 49))
# A vertebra with fewer voxels is a speck (segmentation noise), not a vertebra.
MIN_VOXELS_PER_VERTEBRA = 10
# Below this normalised third moment the posterior direction of a vertebra is not trusted.
MIN_DIRECTION_CONFIDENCE = 0.03

LANDMARK_NAMES_BY_COUNT = {1: ("centroid",), 2: ("body", "posterior")}
#: The keys of a landmark JSON file ("space" and "units" may be left out: LPS and mm).
LANDMARK_FILE_KEYS = frozenset({"space", "units", "vertebrae"})


@dataclass
class LandmarkSet:
    """Named landmarks per vertebra label, in physical millimetres (LPS).

    ``volumes_mm3`` holds each vertebra's volume when the landmarks were derived from a mask
    (used to check that two masks label the same bones); ``source`` names the origin for messages.
    """

    points: dict[int, dict[str, np.ndarray]]
    source: str = ""
    volumes_mm3: dict[int, float] = field(default_factory=dict)

    @property
    def labels(self) -> list[int]:
        return sorted(self.points)

    def __len__(self) -> int:
        return sum(len(named) for named in self.points.values())

    def restricted(self, landmarks_per_vertebra: int) -> LandmarkSet:
        """Keep one landmark per vertebra (``centroid``, else ``body``, else the first name) for
        ``landmarks_per_vertebra == 1``; keep all for 2 or more."""
        if landmarks_per_vertebra >= 2:
            return self
        kept: dict[int, dict[str, np.ndarray]] = {}
        for label, named in self.points.items():
            for name in ("centroid", "body", *sorted(named)):
                if name in named:
                    kept[label] = {name: named[name]}
                    break
        return LandmarkSet(kept, self.source, dict(self.volumes_mm3))

    def to_json(self) -> dict:
        return {
            "space": "LPS",
            "units": "mm",
            "vertebrae": {
                str(label): {name: [float(v) for v in point] for name, point in sorted(self.points[label].items())}
                for label in self.labels
            },
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "landmarks") -> LandmarkSet:
        if not isinstance(data, dict) or not isinstance(data.get("vertebrae"), dict):
            raise SpineDiffError(
                f"{source}: expected an object with a 'vertebrae' entry "
                f"(see documentation/dataset_format.md, 'Landmark JSON')."
            )
        unknown = sorted(set(data) - LANDMARK_FILE_KEYS)
        if unknown:
            raise SpineDiffError(
                f"{source}: unknown key(s) {unknown}; a landmark file holds only {sorted(LANDMARK_FILE_KEYS)} "
                f"(see documentation/dataset_format.md, 'Landmark JSON')."
            )
        if not isinstance(data.get("space", "LPS"), str) or not isinstance(data.get("units", "mm"), str):
            raise SpineDiffError(f"{source}: 'space' and 'units' must be text, e.g. \"LPS\" and \"mm\".")
        if data.get("units", "mm").strip().lower() != "mm":
            raise SpineDiffError(
                f"{source}: landmarks are in {data['units']!r}; spinediff expects millimetres (\"units\": \"mm\"). "
                f"Convert the points to mm."
            )
        space = str(data.get("space", "LPS")).upper()
        if space != "LPS":
            raise SpineDiffError(
                f"{source}: landmarks are in {space!r} space; spinediff expects 'LPS' "
                f"(ITK physical coordinates). Convert RAS points by negating x and y."
            )
        points: dict[int, dict[str, np.ndarray]] = {}
        for key, named in data["vertebrae"].items():
            try:
                label = int(key)
            except ValueError:
                raise SpineDiffError(f"{source}: vertebra key {key!r} is not an integer label.") from None
            if not 1 <= label <= MAX_VERTEBRA_LABEL:
                raise SpineDiffError(
                    f"{source}: vertebra key {key!r} is not a vertebra label (1-{MAX_VERTEBRA_LABEL}; discs and "
                    f"endplates, 100+ and 200+, are not landmarks)."
                )
            if not isinstance(named, dict):
                raise SpineDiffError(f"{source}: vertebra {key} must map landmark names to [x, y, z].")
            for name, point in named.items():
                numbers = isinstance(point, (list, tuple)) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)
                array = np.asarray(point, dtype=float) if numbers else np.full(1, np.nan)  # strings etc.: below
                if array.shape != (3,) or not np.all(np.isfinite(array)):
                    raise SpineDiffError(
                        f"{source}: landmark {key}/{name} must be three finite numbers, got {point!r}."
                    )
                points.setdefault(label, {})[str(name)] = array
        if not points:
            raise SpineDiffError(f"{source}: contains no landmarks.")
        return cls(points, source)


def read_landmarks(path: str | os.PathLike) -> LandmarkSet:
    """Read a landmark JSON file (format in documentation/dataset_format.md)."""
    return LandmarkSet.from_json(read_json(path), source=str(path))


def write_landmarks(landmarks: LandmarkSet, path: str | os.PathLike) -> None:
    """Write landmarks atomically in the landmark JSON format."""
    write_json(landmarks.to_json(), path)


# ------------------------------------------------------------------------------ geometry helpers


def _label_array(mask: sitk.Image, source: str) -> np.ndarray:
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise SpineDiffError(
            f"{source}: expected a 3D single-channel label mask, got a "
            f"{mask.GetDimension()}D image with {mask.GetNumberOfComponentsPerPixel()} "
            f"component(s)."
        )
    array = sitk.GetArrayViewFromImage(mask)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise SpineDiffError(f"{source}: the mask holds non-integer values; give an integer label map.")
        array = array.astype(np.int64)
    return array


@dataclass
class VertebraVoxels:
    """Voxel centres (physical mm) of each vertebra of one mask, with their subregion labels."""

    points: dict[int, np.ndarray]
    voxel_volume_mm3: float
    subregions: dict[int, np.ndarray] | None = None
    source: str = "vertebra mask"

    @property
    def labels(self) -> list[int]:
        return sorted(self.points)

    def volumes(self) -> dict[int, float]:
        return {label: len(cloud) * self.voxel_volume_mm3 for label, cloud in self.points.items()}

    def restricted(
        self, keep: Callable[[np.ndarray], np.ndarray] | None = None, labels: Iterable[int] | None = None
    ) -> VertebraVoxels:
        """The voxels for which ``keep(points)`` is true, of the given labels; vertebrae left with
        fewer than ``MIN_VOXELS_PER_VERTEBRA`` voxels are dropped."""
        wanted = set(self.points) if labels is None else set(labels) & set(self.points)
        points: dict[int, np.ndarray] = {}
        subregions: dict[int, np.ndarray] | None = None if self.subregions is None else {}
        for label in sorted(wanted):
            selected = np.ones(len(self.points[label]), bool) if keep is None else keep(self.points[label])
            if np.count_nonzero(selected) < MIN_VOXELS_PER_VERTEBRA:
                continue
            points[label] = self.points[label][selected]
            if subregions is not None:
                subregions[label] = self.subregions[label][selected]
        return VertebraVoxels(points, self.voxel_volume_mm3, subregions, self.source)


def vertebra_voxels(
    mask: sitk.Image,
    subregion_mask: sitk.Image | None = None,
    labels: Iterable[int] | None = None,
    source: str = "vertebra mask",
) -> VertebraVoxels:
    """Physical positions of the voxel centres of each vertebra label (1-99), optionally with the
    subregion label of each voxel.

    Raises ``SpineDiffError`` when the mask holds no (wanted) vertebra label at all.
    """
    array = _label_array(mask, source)
    wanted = None if labels is None else np.asarray(sorted(set(int(x) for x in labels)))
    selected = (array > 0) & (array <= MAX_VERTEBRA_LABEL)
    if wanted is not None:
        selected &= np.isin(array, wanted)
    indices = np.nonzero(selected)
    if indices[0].size == 0:
        present = np.unique(array)
        if present.size == 1 and present[0] == 0:
            what = "is empty (all voxels are 0)"
        elif wanted is not None and np.any((array > 0) & (array <= MAX_VERTEBRA_LABEL)):
            what = f"holds none of the labels {wanted.tolist()}"
        else:
            what = f"holds no vertebra label (values {present[:12].tolist()})"
        raise SpineDiffError(
            f"{source} {what}. Give a vertebra instance mask with labels 1-"
            f"{MAX_VERTEBRA_LABEL} (VerSe numbering, e.g. 20 = L1)."
        )
    values = array[indices]
    points = index_to_physical(mask, np.stack(indices))
    order = np.argsort(values, kind="stable")
    values, points = values[order], points[order]
    unique, starts = np.unique(values, return_index=True)
    splits = starts[1:]
    sub_groups = None
    if subregion_mask is not None:
        _check_same_grid(mask, subregion_mask, source)
        sub_values = _label_array(subregion_mask, f"{source} (subregions)")[indices][order]
        sub_groups = np.split(sub_values, splits)
    voxels = VertebraVoxels({}, float(np.prod(mask.GetSpacing())), None if sub_groups is None else {}, source)
    for i, (label, group) in enumerate(zip(unique, np.split(points, splits), strict=True)):
        if len(group) >= MIN_VOXELS_PER_VERTEBRA:
            voxels.points[int(label)] = group
            if sub_groups is not None:
                voxels.subregions[int(label)] = sub_groups[i]
    return voxels


def vertebra_volumes(mask: sitk.Image, source: str = "vertebra mask") -> dict[int, float]:
    """Volume (mm^3) of each vertebra label 1-99 with at least ``MIN_VOXELS_PER_VERTEBRA`` voxels.

    Raises ``SpineDiffError`` for a mask without any vertebra label (e.g. an empty mask).
    """
    array = _label_array(mask, source)
    values = array[(array > 0) & (array <= MAX_VERTEBRA_LABEL)]
    counts = np.bincount(values.astype(np.int64), minlength=MAX_VERTEBRA_LABEL + 1) if values.size else None
    voxel_volume = float(np.prod(mask.GetSpacing()))
    volumes = (
        {}
        if counts is None
        else {
            int(label): float(counts[label]) * voxel_volume
            for label in np.nonzero(counts >= MIN_VOXELS_PER_VERTEBRA)[0]
        }
    )
    if not volumes:
        present = np.unique(array)
        what = (
            "is empty (all voxels are 0)"
            if present.size == 1 and present[0] == 0
            else f"holds no vertebra label 1-{MAX_VERTEBRA_LABEL} with at least {MIN_VOXELS_PER_VERTEBRA} "
            f"voxels (values {present[:12].tolist()})"
        )
        raise SpineDiffError(f"{source} {what}. Give a vertebra instance mask (VerSe numbering, e.g. 20 = L1).")
    return volumes


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-12 else vector * 0.0


def spine_tangents(centroids: dict[int, np.ndarray], clouds: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Cranio-caudal unit tangent of the centre line at each vertebra (towards higher labels).

    Central differences of the centroids sorted by label; one-sided at the ends. A single
    vertebra uses its own axis of least extent (vertebrae are lower than they are wide or deep).
    """
    labels = sorted(centroids)
    tangents: dict[int, np.ndarray] = {}
    if len(labels) == 1:
        label = labels[0]
        q = clouds[label] - centroids[label]
        _, vectors = np.linalg.eigh(q.T @ q)
        tangents[label] = vectors[:, 0]
        return tangents
    for i, label in enumerate(labels):
        before = centroids[labels[max(i - 1, 0)]]
        after = centroids[labels[min(i + 1, len(labels) - 1)]]
        tangents[label] = _unit(after - before)
    return tangents


def posterior_directions(
    clouds: dict[int, np.ndarray],
    centroids: dict[int, np.ndarray],
    tangents: dict[int, np.ndarray],
    source: str = "vertebra mask",
) -> dict[int, np.ndarray]:
    """Unit posterior direction of each vertebra, perpendicular to its tangent (see module doc)."""
    raw: dict[int, np.ndarray] = {}
    confidence: dict[int, float] = {}
    for label, cloud in clouds.items():
        t = tangents[label]
        q = cloud - centroids[label]
        q_perp = q - np.outer(q @ t, t)
        r2 = np.einsum("ij,ij->i", q_perp, q_perp)
        moment = (r2[:, None] * q_perp).mean(axis=0)
        moment -= (moment @ t) * t
        sigma = float(np.sqrt(r2.mean())) if r2.size else 0.0
        raw[label] = _unit(moment)
        confidence[label] = float(np.linalg.norm(moment)) / sigma**3 if sigma > 0 else 0.0
    reliable = [label for label in raw if confidence[label] >= MIN_DIRECTION_CONFIDENCE]
    if not reliable:
        raise SpineDiffError(
            f"{source}: cannot tell anterior from posterior in any vertebra (the masks look symmetric); "
            f"give a subregion mask or landmark JSON files instead."
        )
    # Signs agree along the spine: flip the minority against the confidence-weighted mean.
    mean = _unit(sum(confidence[label] * raw[label] for label in reliable))
    for label in reliable:
        if raw[label] @ mean < 0:
            raw[label] = -raw[label]
    directions: dict[int, np.ndarray] = {}
    labels = sorted(raw)
    for label in labels:
        if label in reliable:
            directions[label] = raw[label]
            continue
        nearest = sorted(reliable, key=lambda other: abs(other - label))[:2]
        borrowed = sum(raw[other] for other in nearest)
        t = tangents[label]
        directions[label] = _unit(borrowed - (borrowed @ t) * t)
    return directions


def split_position(r: np.ndarray, bin_mm: float = 0.5, smooth_mm: float = 1.5) -> float:
    """Position along the posterior axis of the valley between vertebral body and posterior arch.

    The smoothed voxel-count profile is searched between its 20th and 80th percentile; the split
    is the depth-weighted centre of the connected low region around the minimum.
    """
    low, high = np.percentile(r, [20.0, 80.0])
    edges = np.arange(r.min() - 2 * smooth_mm, r.max() + 2 * smooth_mm + bin_mm, bin_mm)
    counts, edges = np.histogram(r, bins=edges)
    profile = gaussian_filter1d(counts.astype(float), smooth_mm / bin_mm)
    centres = 0.5 * (edges[:-1] + edges[1:])
    window = np.nonzero((centres >= low) & (centres <= high))[0]
    if window.size < 3:
        return float(np.median(r))
    values = profile[window]
    minimum, maximum = float(values.min()), float(values.max())
    threshold = minimum + 0.25 * (maximum - minimum)
    start = stop = int(window[np.argmin(values)])
    while start - 1 >= window[0] and profile[start - 1] <= threshold:
        start -= 1
    while stop + 1 <= window[-1] and profile[stop + 1] <= threshold:
        stop += 1
    weights = threshold - profile[start : stop + 1] + 1e-9
    return float(np.sum(weights * centres[start : stop + 1]) / np.sum(weights))


# ------------------------------------------------------------------------------ extraction


def _check_same_grid(a: sitk.Image, b: sitk.Image, what: str) -> None:
    if same_geometry(a, b) is not None:
        raise SpineDiffError(
            f"{what}: the subregion mask and the vertebra mask have different grids "
            f"(size, spacing, origin or direction); they must be on the same image grid."
        )


def landmarks_from_voxels(voxels: VertebraVoxels, landmarks_per_vertebra: int = 2) -> LandmarkSet:
    """Landmarks per vertebra (see the module doc) from the voxels of a mask.

    With subregion labels, ``body`` and ``posterior`` are the centroids of the corpus (49, 50) and
    posterior-element (41-48) voxels; otherwise the vertebra is split geometrically. The centre line
    runs through all the vertebrae given, so give both images the same vertebrae.
    """
    if landmarks_per_vertebra not in LANDMARK_NAMES_BY_COUNT:
        raise SpineDiffError(f"landmarks_per_vertebra must be 1 or 2, got {landmarks_per_vertebra}.")
    source = voxels.source
    clouds = voxels.points
    if not clouds:
        raise SpineDiffError(f"{source}: no vertebra with at least {MIN_VOXELS_PER_VERTEBRA} voxels.")
    centroids = {label: cloud.mean(axis=0) for label, cloud in clouds.items()}
    if landmarks_per_vertebra == 1:
        return LandmarkSet({label: {"centroid": c} for label, c in centroids.items()}, source, voxels.volumes())

    points: dict[int, dict[str, np.ndarray]] = {}
    if voxels.subregions is not None:
        for label, cloud in clouds.items():
            named = {}
            for name, values in (("body", SUBREGION_BODY_LABELS), ("posterior", SUBREGION_POSTERIOR_LABELS)):
                part = np.isin(voxels.subregions[label], values)
                if np.count_nonzero(part) < MIN_VOXELS_PER_VERTEBRA:
                    raise SpineDiffError(
                        f"{source}: vertebra {label} has no {name} voxels in the subregion "
                        f"mask (labels {list(values)}); check the subregion convention."
                    )
                named[name] = cloud[part].mean(axis=0)
            points[label] = named
        return LandmarkSet(points, source, voxels.volumes())

    tangents = spine_tangents(centroids, clouds)
    directions = posterior_directions(clouds, centroids, tangents, source)
    for label, cloud in clouds.items():
        r = (cloud - centroids[label]) @ directions[label]
        cut = split_position(r)
        body, posterior = cloud[r < cut], cloud[r >= cut]
        if len(body) == 0 or len(posterior) == 0:
            raise SpineDiffError(
                f"{source}: vertebra {label} could not be split into body and posterior "
                f"elements; give a subregion mask or landmark JSON files."
            )
        points[label] = {"body": body.mean(axis=0), "posterior": posterior.mean(axis=0)}
    return LandmarkSet(points, source, voxels.volumes())


def landmarks_from_masks(
    vertebra_mask: sitk.Image,
    *,
    subregion_mask: sitk.Image | None = None,
    landmarks_per_vertebra: int = 2,
    labels: Iterable[int] | None = None,
    source: str = "vertebra mask",
) -> LandmarkSet:
    """Landmarks per vertebra from an instance mask (and optionally a TPTBox subregion mask).

    Args:
        vertebra_mask: integer instance mask, one label per vertebra (1-99; larger values such as
            TPTBox's discs 100+ and endplates 200+ are ignored).
        subregion_mask: optional subregion map on the same grid (49/50 body, 41-48 posterior).
        landmarks_per_vertebra: 1 (``centroid``) or 2 (``body`` and ``posterior``).
        labels: restrict to these vertebra labels (pass the labels common to both images so that
            the centre line, hence the split, is the same in both).
        source: name used in error messages (e.g. the file path and case).
    """
    voxels = vertebra_voxels(vertebra_mask, subregion_mask, labels, source)
    return landmarks_from_voxels(voxels, landmarks_per_vertebra)


def landmarks_from_files(
    vertebra_mask: str | os.PathLike, subregion_mask: str | os.PathLike | None = None, **kwargs
) -> LandmarkSet:
    """:func:`landmarks_from_masks` on files."""
    from spinediff.io import read_image

    mask = read_image(vertebra_mask)
    subregions = read_image(subregion_mask) if subregion_mask is not None else None
    kwargs.setdefault("source", str(Path(vertebra_mask)))
    return landmarks_from_masks(mask, subregion_mask=subregions, **kwargs)
