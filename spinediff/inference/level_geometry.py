"""Where the vertebrae lie, for the level numbering (:mod:`spinediff.inference.level_order`): the column of vertebral
bodies that the candidates should follow (a line along the level direction; what lies far off it is not a body),
the scan's axis along the spine and each voxel's distance to the scan's edges across it, and the level pitch."""

from __future__ import annotations

from itertools import combinations

import numpy as np

#: A candidate whose centre lies further than this many body heights from the column (a line through the larger
#: candidates' centres along the direction) is not a vertebral body: bright fat behind the spine, a loop of bowel.
OFF_COLUMN_HEIGHTS = 1.5
#: The column's largest slope across the direction (mm across per mm along it; 0.5: 27 degrees).
COLUMN_MAX_SLOPE = 0.5


def column_line(centres: np.ndarray, heights: np.ndarray, sizes: np.ndarray, body_height: float
                ) -> np.ndarray | None:
    """The column of vertebral bodies: coefficients (2 x 3) of the centre as a straight function of the height
    (``[1, h] @ line``), or None when no column can be told.

    The column is the line through two of the larger candidates (at least a third of the largest) that runs within
    :data:`COLUMN_MAX_SLOPE` of the direction and has the most voxels within :data:`OFF_COLUMN_HEIGHTS` body heights
    of it, fitted again to the larger candidates on it. A consensus rather than one fit to all: several large blobs
    beside the spine would pull a fit through all of them off the bodies. None when the column holds less than half
    of the voxels, or when fewer than three candidates are large. ``centres``: (n, 3) physical centres;
    ``heights``: theirs along the direction."""
    limit = OFF_COLUMN_HEIGHTS * body_height
    large = [i for i in range(len(sizes)) if sizes[i] >= sizes.max() / 3.0]
    if len(large) < 3:
        return None

    def fit(members: list[int]) -> np.ndarray:
        design = np.stack([np.ones(len(members)), heights[members]], axis=1)
        return np.linalg.lstsq(design, centres[members], rcond=None)[0]

    best, best_size = None, 0.0
    for a, b in combinations(large, 2):
        rise = heights[b] - heights[a]
        if abs(rise) < 0.5 * body_height:  # side by side: no direction to follow
            continue
        slope = (centres[b] - centres[a]) / rise  # 1 along the direction, the rest across it
        if np.sqrt(max(float(slope @ slope) - 1.0, 0.0)) > COLUMN_MAX_SLOPE:
            continue
        near = column_distances(fit([a, b]), centres, heights) <= limit
        if sizes[near].sum() > best_size:
            best, best_size = near, float(sizes[near].sum())
    if best is None or best_size < 0.5 * sizes.sum():
        return None
    return fit([i for i in large if best[i]])


def column_distances(line: np.ndarray, centres: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Distance (mm) of each centre from the column ``line`` (:func:`column_line`) at its height."""
    return np.linalg.norm(centres - np.stack([np.ones(len(heights)), heights], axis=1) @ line, axis=1)


def off_column(centres: np.ndarray, heights: np.ndarray, sizes: np.ndarray, body_height: float) -> list[int]:
    """The candidates further than :data:`OFF_COLUMN_HEIGHTS` body heights from the column (:func:`column_line`;
    indices, none when there is no column)."""
    line = column_line(centres, heights, sizes, body_height)
    if line is None:
        return []
    return [int(i) for i in np.flatnonzero(column_distances(line, centres, heights) > OFF_COLUMN_HEIGHTS * body_height)]


def spine_array_axis(image, direction) -> tuple[int, int]:
    """The array axis (numpy order) of the SimpleITK ``image`` most aligned with the world ``direction`` and the sign
    (+1: increasing index runs along the direction, towards the last level)."""
    matrix = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)  # columns: world vector of index axis i
    along = matrix.T @ np.asarray(direction, dtype=float)  # per SimpleITK index axis (x, y, z)
    index_axis = int(np.argmax(np.abs(along)))
    return 2 - index_axis, int(np.sign(along[index_axis]) or 1)


def level_pitch(candidates: list, heights: np.ndarray) -> float:
    """The distance between neighbouring vertebrae along the direction (mm): the median step between the centres of
    the larger candidates (at least 0.3 of the largest), or 1.4 times the median candidate length when fewer than two
    are large."""
    sizes = np.asarray([len(c[0]) for c in candidates], dtype=float)
    majors = [candidates[i] for i in range(len(candidates)) if sizes[i] >= 0.3 * sizes.max()]
    if len(majors) >= 2:
        return float(np.median(np.diff(sorted(c[1] for c in majors))))
    return 1.4 * float(np.median([np.ptp(heights[c[0]]) for c in candidates]))


def face_distances(image, shape, foreground: np.ndarray, direction: np.ndarray,
                   content_box: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each ``foreground`` voxel (flat index into an array of ``shape`` on the grid of ``image``), its distance
    (mm) to the first and to the last face of the grid across the array axis most aligned with ``direction``: the
    edges of the scan where the spine leaves it (the top, the first level's side, and the bottom).
    ``content_box``: the part of the grid that holds image data, ``[[start, end), ...]`` per array axis (nnU-Net's
    ``bbox_used_for_cropping``, the bounding box of the nonzero voxels): the edges are then those of the image data,
    and planes of zeros padded beyond them (a scan placed in a larger grid) are not room in which a vertebra would
    have been seen."""
    axis, sign = spine_array_axis(image, direction)
    index = np.unravel_index(foreground, shape)[axis].astype(float)
    spacing = float(image.GetSpacing()[2 - axis])
    first, last = 0, shape[axis] - 1
    if content_box is not None:
        first, last = int(content_box[axis][0]), int(content_box[axis][1]) - 1
    low, high = np.maximum(index - first, 0.0) * spacing, np.maximum(last - index, 0.0) * spacing
    return (low, high) if sign > 0 else (high, low)
