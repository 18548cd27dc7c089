"""Level numbering that respects the anatomy: labels with an order in space (L1 above L2 ... above L5).

A 2D network numbers each slice on its own and a patch-based one each window on its own, so a vertebra
may be called L2 in one slice and L3 in the next, two neighbouring vertebrae may both be called L2, or an
extra vertebra (T12, S1) may carry a lumbar label. The foreground is then right and the numbering wrong
(high merged Dice, low per-level Dice). This post-processing numbers the vertebrae again, as a whole:

1. The order is learnt from the reference labels (:func:`learn_order`): the physical direction along which
   the labels' centroids follow their label values in every case (e.g. head to feet for L1..L5), in
   world coordinates, so that scans of any orientation are handled.
2. Per predicted case (:func:`renumber`): the connected components of the ordered labels are the
   candidate vertebrae. A component whose labels are stacked along the direction (two vertebrae bridged
   by a few voxels) is split by label; one whose labels lie side by side (one vertebra numbered
   differently in different slices) stays whole. A component longer along the direction than
   :data:`LONG_COMPONENT` times the median one is parted by erosion into as many vertebrae as its length holds
   (:func:`split_long`: two vertebrae one label bridges through their disc). Components smaller than
   :data:`MIN_COMPONENT_SHARE` of the largest are left as they are. Candidates off the column of bodies
   (:func:`off_column`: further than :data:`OFF_COLUMN_HEIGHTS` body heights from the line along the direction
   that most of the larger candidates' voxels follow, e.g. bright fat behind the spine on a T1w scan) become
   background before the numbering, so that they neither take a level nor a place in the column; so do the smaller
   components that lie as far off. A level the edge of the scan cuts to a sliver, fused to the outermost vertebra
   (:func:`_with_edge_parts`), becomes a candidate of its own instead of taking that vertebra's level.
3. The candidates, sorted along the direction, take places in a column of vertebrae (:func:`vertebra_slots`: one
   level pitch apart, one place further; two pitches apart, a place left empty for a vertebra the network did not
   find; parts of one vertebra, one place). The levels follow the places, L1 at one of them and the rest counted
   from it, and the numbering chosen is the one that agrees with most of their predicted voxels; candidates placed
   above L1 or below L5 (a T12 or an S1 in a longer field of view) become background. A numbering can thus neither
   skip a vertebra that is there nor give two neighbours one level. (With :data:`CONSECUTIVE` off: strictly
   increasing labels by dynamic programming, the surplus candidates with the least support becoming background.)
4. The field of view decides which numberings the anatomy allows (:func:`renumber_with_report`). An end of the
   scan is *open* when the outermost vertebra found lies within half a level pitch of the image edge, across the
   scan's axis nearest the direction (a level beyond it may be outside the scan); it is *closed* when there is
   room for another vertebra between them (a level beyond it would have been seen). Given the part of the grid that
   holds image data (``content_box``), its edges are the image's: zeros padded around a scan are not room. Levels
   may be missing only at an open end, so a numbering that leaves out L1 needs an open top and one that leaves out
   L5 an open bottom; numberings with fewer levels than found vertebrae (an extra S1 or T12 labelled as a lumbar
   level) are tried at open ends too.
   A renumbering that changes the level of most vertebrae is applied only when the anatomy supports it (all
   levels found with both ends closed, or the missing levels at an open end); otherwise the network's numbering
   is kept. Every case gets a report with a confidence: the share of the found vertebrae's voxels whose label
   the numbering keeps (raised to 0.5 + half of it when the field of view leaves only one numbering of the
   vertebrae found), halved when levels are missing inside the field of view, and at most 0.45 (under the review
   threshold) when both ends are open: no end of the levels found is anchored in the scan, and a numbering one
   level off (a T12 called L1, an S1 called L5) fits the field of view as well as the network's.

:func:`spinediff.inference.postprocessing.determine_postprocessing` keeps this step only when it
improves the cross-validation Dice (as nnU-Net decides its own post-processing).

Where the vertebrae lie (the column of bodies, :func:`off_column`; the scan's edges; the level pitch) is computed in
:mod:`spinediff.inference.level_geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from spinediff.inference.level_geometry import (
    OFF_COLUMN_HEIGHTS,
    column_distances,
    column_line,
    face_distances,
    level_pitch,
)
from spinediff.io import index_to_physical

#: Components smaller than this share of the largest ordered component are left untouched (specks).
MIN_COMPONENT_SHARE = 0.1
#: Share of a component a second label needs before the component counts as mixed.
MIXED_SHARE = 0.2
#: Share of the label pairs (over cases) whose centroids must follow the label order along the direction.
MIN_AGREEMENT = 0.95
#: Centroids closer than this along the direction (mm) do not count as ordered (labels side by side).
MIN_SEPARATION_MM = 5.0
#: Erosion radii (mm) tried, in turn, to part vertebrae that touch through thin bridges (discs are thicker).
SEPARATION_RADII_MM = (1.5, 3.0, 4.5)
#: Weight of a candidate's size beside its votes: among equally supported numberings, keep the larger ones.
TIE_BREAK = 1e-3


@dataclass(frozen=True)
class LevelOrder:
    """Labels in anatomical order and the world direction (unit vector, x/y/z in mm) they follow."""

    labels: tuple[int, ...]
    direction: tuple[float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "direction": [round(float(d), 6) for d in self.direction]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LevelOrder:
        return cls(tuple(int(v) for v in data["labels"]), tuple(float(d) for d in data["direction"]))


def label_centroids(image, array: np.ndarray, labels: list[int]) -> dict[int, np.ndarray]:
    """World centroid of each label present in ``array``."""
    from scipy import ndimage

    present = [v for v in labels if np.any(array == v)]
    if not present:
        return {}
    centres = np.asarray(ndimage.center_of_mass(np.ones(array.shape, np.uint8), array, present), dtype=float)
    return dict(zip(present, index_to_physical(image, centres.reshape(-1, 3).T), strict=True))


def learn_order(cases: list[dict[int, np.ndarray]]) -> LevelOrder | None:
    """The order of the labels in reference cases (label → world centroid), or None if they keep none.

    The direction is the mean, over cases, of the unit vector from the lowest to the highest label value;
    the ordered labels are those whose pairs follow their values along it in at least
    :data:`MIN_AGREEMENT` of the cases, at least :data:`MIN_SEPARATION_MM` apart (at least three labels, as a
    level numbering needs)."""
    vectors = []
    for case in cases:
        if len(case) >= 2:
            low, high = case[min(case)], case[max(case)]
            norm = np.linalg.norm(high - low)
            if norm > 0:
                vectors.append((high - low) / norm)
    if not vectors:
        return None
    direction = np.mean(vectors, axis=0)
    if np.linalg.norm(direction) < 0.5:  # cases disagree on the direction
        return None
    direction /= np.linalg.norm(direction)
    labels = sorted({v for case in cases for v in case})
    agree = {v: [] for v in labels}
    for case in cases:
        for a, b in combinations(sorted(case), 2):
            ok = float(np.dot(case[b] - case[a], direction) >= MIN_SEPARATION_MM)
            agree[a].append(ok)
            agree[b].append(ok)
    ordered = tuple(v for v in labels if agree[v] and np.mean(agree[v]) >= MIN_AGREEMENT)
    if len(ordered) < 3:
        return None
    return LevelOrder(ordered, tuple(float(d) for d in direction))


def _candidates(components: np.ndarray, values: np.ndarray, heights: np.ndarray, labels: tuple[int, ...]
                ) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Candidate vertebrae from the foreground voxels (their component, predicted label and height along
    the direction): (positions in the foreground list, mean height, votes per ordered label)."""
    candidates = []
    sizes = np.bincount(components)[1:]
    if not len(sizes):
        return []
    for component in np.flatnonzero(sizes >= MIN_COMPONENT_SHARE * sizes.max()) + 1:
        where = np.flatnonzero(components == component)
        own, h = values[where], heights[where]
        votes = np.array([np.count_nonzero(own == v) for v in labels], dtype=float)
        present = [i for i in np.argsort(-votes) if votes[i] >= MIXED_SHARE * len(where)]
        if len(present) >= 2 and _stacked([h[own == labels[i]] for i in present]):
            centres = np.array([np.mean(h[own == labels[i]]) for i in present])
            nearest = np.argmin(np.abs(h[:, None] - centres[None, :]), axis=1)
            for p, i in enumerate(present):  # each part: its label's voxels plus the minor labels nearest to it
                part = where[(own == labels[i]) | (~np.isin(own, [labels[j] for j in present]) & (nearest == p))]
                part_votes = np.array([np.count_nonzero(values[part] == v) for v in labels], dtype=float)
                candidates.append((part, float(np.mean(heights[part])), part_votes))
        else:
            candidates.append((where, float(np.mean(h)), votes))
    return candidates


def _stacked(heights_per_label: list[np.ndarray]) -> bool:
    """Do the labels' voxels lie one above the other (overlap of their 10-90 % height ranges < 50 %)?"""
    ranges = [np.percentile(h, [10, 90]) for h in heights_per_label]
    for (a0, a1), (b0, b1) in combinations(ranges, 2):
        overlap = max(0.0, min(a1, b1) - max(a0, b0))
        if overlap > 0.5 * max(min(a1 - a0, b1 - b0), 1e-6):
            return False
    return True


def assign(votes: np.ndarray) -> list[int | None]:
    """Strictly increasing label indices for candidates in order (rows of ``votes``, candidates x labels)
    that maximise the agreeing votes; as many candidates as there are labels get one, the rest None.
    Dynamic programming from the last candidate backwards (iterative: a noisy prediction may have hundreds of
    candidates)."""
    votes = np.asarray(votes, dtype=float)
    n, k = votes.shape
    keep = min(n, k)
    # best[i][j][left]: (score, choice) for candidates i.. with labels j.. still free and `left` to place
    best = [[[(-np.inf, None)] * (keep + 1) for _ in range(k + 1)] for _ in range(n + 1)]
    for i in range(n, -1, -1):
        for j in range(k, -1, -1):
            best[i][j][0] = (0.0, "done")
            for left in range(1, keep + 1):
                if n - i < left or k - j < left:
                    continue
                options = []
                if n - i > left:  # candidate i dropped
                    options.append((best[i + 1][j][left][0], "drop"))
                for label in range(j, k - left + 1):
                    options.append((best[i + 1][label + 1][left - 1][0] + votes[i, label], label))
                best[i][j][left] = max(options, key=lambda o: o[0])
    chosen: list[int | None] = []
    i, j, left = 0, 0, keep
    while i < n:
        choice = best[i][j][left][1] if left else "done"
        if choice in ("done", "drop"):
            chosen.append(None)
        else:
            chosen.append(int(choice))
            j, left = int(choice) + 1, left - 1
        i += 1
    return chosen


def _major(components: np.ndarray) -> int:
    sizes = np.bincount(components.ravel())[1:]
    return int(np.count_nonzero(sizes >= MIN_COMPONENT_SHARE * sizes.max())) if len(sizes) and sizes.max() else 0


def separate(mask: np.ndarray, spacing_zyx, expected: int) -> np.ndarray:
    """Connected components of ``mask``; while there are fewer large ones than ``expected``, vertebrae that touch
    are parted as a watershed would: the mask eroded by a growing ball gives seeds, and every voxel of the mask
    joins its nearest seed."""
    from scipy import ndimage

    components, _ = ndimage.label(mask)
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    crop = mask[box]
    spacing = np.asarray(spacing_zyx, dtype=float)
    for radius in SEPARATION_RADII_MM:
        if _major(components) >= expected:
            break
        half = np.floor(radius / spacing).astype(int)
        grid = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
        ball = sum((g * s / radius) ** 2 for g, s in zip(grid, spacing, strict=True)) <= 1.0
        seeds, count = ndimage.label(ndimage.binary_erosion(crop, structure=ball))
        if count == 0 or _major(seeds) <= _major(components[box]):
            continue
        nearest = ndimage.distance_transform_edt(seeds == 0, sampling=spacing, return_distances=False,
                                                 return_indices=True)
        parted = np.zeros_like(components)
        parted[box] = np.where(crop, seeds[tuple(nearest)], 0)
        components = parted
    return components


#: A component longer along the direction than this many times the median one holds several vertebrae.
LONG_COMPONENT = 1.6


def split_long(components: np.ndarray, foreground: np.ndarray, heights: np.ndarray, spacing_zyx) -> np.ndarray:
    """``components`` with each component much longer along the direction (5-95 % of its voxels' ``heights``, given
    for the ``foreground`` voxels in flat order) than the median component parted by :func:`separate` into as many
    vertebrae as its length holds: two vertebrae that one label bridges through their disc."""
    flat = components.ravel()[foreground]
    sizes = np.bincount(flat)
    major = [c for c in range(1, len(sizes)) if sizes[c] >= MIN_COMPONENT_SHARE * sizes.max()]
    if len(major) < 2:
        return components
    lengths = {c: float(np.subtract(*np.percentile(heights[flat == c], [95, 5]))) for c in major}
    typical = float(np.median(list(lengths.values())))
    out, next_id = components.copy(), int(components.max()) + 1
    for c in major:
        count = int(np.floor(lengths[c] / max(typical, 1e-6) + 0.5))
        if lengths[c] <= LONG_COMPONENT * typical or count < 2:
            continue
        parts = separate(components == c, spacing_zyx, count)
        found = [p for p in np.unique(parts) if p]
        if len(found) < 2:
            continue
        for part in found:
            out[parts == part] = next_id
            next_id += 1
    return out


def renumber(prediction: np.ndarray, image, order: LevelOrder) -> np.ndarray:
    """``prediction`` (3D array on the SimpleITK ``image``'s grid) with its ordered labels numbered again."""
    return renumber_with_report(prediction, image, order)[0]


#: An end of the scan is open when the outermost vertebra found is closer to the image edge than this share of
#: the level pitch (another level may lie beyond it, outside the scan).
OPEN_END_PITCHES = 0.5
#: A change of level for more than this share of the vertebrae found is a shift of the numbering.
SHIFT_SHARE = 0.5
#: Cost (share of its voxels) of setting a found vertebra to background when numberings are compared.
DROP_COST = 0.5
#: Confidence factor when levels are missing inside the field of view (a vertebra the network did not find).
UNSUPPORTED_FACTOR = 0.5
#: Confidence factor when both ends are open: the scan cuts the spine above and below the vertebrae found, so no end
#: of the labelled levels anchors the numbering (a T12 called L1 or an S1 called L5 fits the field of view as well).
#: Under 0.5, so that such a numbering is flagged for review however sure the network is (1.0 turns the flag off).
UNANCHORED_FACTOR = 0.45
#: Number the vertebrae found as a consecutive column (:func:`vertebra_slots`): the levels follow the places of the
#: vertebrae, so a numbering cannot skip a vertebra that is there, nor give two vertebrae a pitch apart one level.
CONSECUTIVE = True
#: Set candidates off the column of vertebral bodies (:func:`off_column`) to background before the numbering.
OFF_COLUMN = True
#: Number a sliver of a level that the edge of the scan cuts, fused to its neighbour, on its own
#: (:func:`_with_edge_parts`).
EDGE_PARTS = True
#: An edge part reaches to within this many level pitches of the image edge (a cut: the sliver ends at the edge).
EDGE_PART_PITCHES = 0.15
#: An edge part holds at least this share of its component's voxels (fewer: a few voxels of noise).
EDGE_PART_MIN_SHARE = 0.02


def _without_off_column(prediction: np.ndarray, image, components: np.ndarray, foreground: np.ndarray,
                        heights: np.ndarray, direction: np.ndarray, candidates: list, report: dict[str, Any]
                        ) -> tuple[np.ndarray, list]:
    """``prediction`` (a copy when there is a column) and ``candidates`` without what lies off the column
    (:func:`column_line`): the candidates further than :data:`OFF_COLUMN_HEIGHTS` body heights from it (unless that
    would be all of them), and the components too small to be candidates that lie as far off. Counts them in
    ``report`` (``off_column``, ``off_column_small``)."""
    sizes = np.asarray([len(c[0]) for c in candidates], dtype=float)
    points = index_to_physical(image, np.unravel_index(foreground, prediction.shape))
    centres = np.stack([points[c[0]].mean(axis=0) for c in candidates])
    body = float(np.median([np.ptp(heights[c[0]]) for i, c in enumerate(candidates)
                            if sizes[i] >= sizes.max() / 3.0]))
    line = column_line(centres, centres @ direction, sizes, body)
    if line is None:
        return prediction, candidates
    limit = OFF_COLUMN_HEIGHTS * body
    out = prediction.copy()  # C-contiguous: its flat view writes through
    flat = out.reshape(-1)
    off = [int(i) for i in np.flatnonzero(column_distances(line, centres, centres @ direction) > limit)]
    if off and len(off) < len(candidates):
        for i in off:
            flat[foreground[candidates[i][0]]] = 0
        report["off_column"] = len(off)
        candidates = [c for i, c in enumerate(candidates) if i not in off]
    ids = components.ravel()[foreground]
    counts = np.bincount(ids)
    small = np.flatnonzero((counts > 0) & (counts < MIN_COMPONENT_SHARE * counts[1:].max()))
    small = small[small > 0]
    if len(small):
        middles = np.stack([np.bincount(ids, weights=points[:, k], minlength=len(counts))[small]
                            for k in range(3)], axis=1) / counts[small, None]
        far = small[column_distances(line, middles, middles @ direction) > limit]
        if len(far):
            flat[foreground[np.isin(ids, far)]] = 0
            report["off_column_small"] = int(len(far))
    return out, candidates


def vertebra_slots(centres: list[float], pitch: float) -> list[int]:
    """The place of each candidate (sorted by height along the direction) in the column of vertebrae, in whole
    level pitches from the first: neighbours one pitch apart take consecutive places, a gap of two pitches leaves a
    place empty (a vertebra the network did not find), and parts of one vertebra less than half a pitch apart share
    a place."""
    slots = [0]
    for before, after in zip(centres[:-1], centres[1:], strict=True):
        slots.append(slots[-1] + max(0, int(np.floor((after - before) / max(pitch, 1e-6) + 0.5))))
    return slots


def _consecutive_numberings(slots: list[int], k: int) -> list[list[int | None]]:
    """Every numbering that gives the candidates the levels of their places (level = place + offset): the
    vertebrae stay consecutive, and candidates whose place lies beyond L1 or L5 (a T12, an S1) become background."""
    options = []
    for offset in range(-max(slots), k):
        numbering = [s + offset if 0 <= s + offset < k else None for s in slots]
        if any(j is not None for j in numbering):
            options.append(numbering)
    return options


def _numberings(votes: np.ndarray, top_open: bool, bottom_open: bool, slots: list[int] | None = None
                ) -> list[tuple[list[int | None], tuple[int, int] | None]]:
    """Candidate numberings (label index or None per candidate), each with the block of labels it uses (None for
    the first, the free assignment of :func:`assign`, which the field of view does not check), then the numberings
    the field of view allows.

    With ``slots`` (:func:`vertebra_slots`) these are the consecutive numberings (:func:`_consecutive_numberings`)
    whose missing labels lie at open ends; without, assignments to contiguous blocks of labels whose missing labels
    lie at open ends (with all labels placeable, down to two levels fewer, the surplus vertebrae becoming background:
    an S1 or T12 that carries a lumbar label)."""
    n, k = votes.shape
    full = min(n, k)
    options = [(assign(votes), None)]
    if slots is not None:
        for numbering in _consecutive_numberings(slots, k):
            used = sorted({j for j in numbering if j is not None})
            if (used[0] > 0 and not top_open) or (used[-1] < k - 1 and not bottom_open):
                continue
            options.append((numbering, (used[0], used[-1] + 1)))
        return options
    for m in range(full, (full if n < k else max(1, full - 2)) - 1, -1):
        for start in range(0, k - m + 1):
            if (start > 0 and not top_open) or (start + m < k and not bottom_open):
                continue
            block = assign(votes[:, start:start + m])
            options.append(([None if b is None else b + start for b in block], (start, start + m)))
    return options


def renumber_with_report(prediction: np.ndarray, image, order: LevelOrder, content_box: list | None = None
                         ) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`renumber` and its report: the vertebrae found, the numbering chosen and why, and a confidence in
    [0, 1] (see the module docstring, point 4). ``content_box``: where the grid holds image data
    (:func:`spinediff.inference.level_geometry.face_distances`); the room at each end is measured to its edges."""
    labels = order.labels
    report: dict[str, Any] = {"levels_found": 0, "labels": [], "missing_labels": list(labels), "applied": False,
                              "confidence": 0.0, "basis": "no vertebra found"}
    mask = np.isin(prediction, labels)
    if prediction.ndim != 3 or not mask.any():
        return prediction, report
    components = separate(mask, image.GetSpacing()[::-1], len(labels))
    foreground = np.flatnonzero(mask)
    direction = np.asarray(order.direction)
    heights = index_to_physical(image, np.unravel_index(foreground, prediction.shape)) @ direction
    if CONSECUTIVE:  # a component as long as two vertebrae takes two places in the column
        components = split_long(components, foreground, heights, image.GetSpacing()[::-1])
    candidates = _candidates(components.ravel()[foreground], prediction.ravel()[foreground], heights, labels)
    if not candidates:
        return prediction, report
    candidates.sort(key=lambda c: c[1])
    if OFF_COLUMN:  # what lies off the column of vertebral bodies is set to background before the numbering
        prediction, candidates = _without_off_column(prediction, image, components, foreground, heights, direction,
                                                     candidates, report)
    # the field of view: each vertebra voxel's distance to the edges of the scan where the spine leaves it
    to_faces = face_distances(image, prediction.shape, foreground, direction, content_box)
    if EDGE_PARTS:  # a level cut by the edge of the scan, fused to its neighbour, is numbered on its own
        split = _with_edge_parts(candidates, prediction.ravel()[foreground], heights, labels, to_faces,
                                 level_pitch(candidates, heights))
        if len(split) > len(candidates):
            report["edge_parts"] = len(split) - len(candidates)
        candidates = split
    sizes = np.asarray([len(c[0]) for c in candidates], dtype=float)
    votes = np.stack([c[2] for c in candidates])
    # ties: keep the larger vertebrae, and set the outermost ones to background first (an S1 or T12 lies outside)
    inner = np.minimum(np.arange(len(candidates)), np.arange(len(candidates))[::-1])
    weighted = votes + TIE_BREAK * sizes[:, None] + TIE_BREAK * sizes.max() * inner[:, None]
    pitch = level_pitch(candidates, heights)
    # room between the outermost vertebrae found and the edges, across the scan's own axis along the spine (not along
    # the tilted direction from the grid's far corners, which would count room beside the spine that is not there)
    found = np.concatenate([c[0] for c in candidates])
    room_top, room_bottom = float(to_faces[0][found].min()), float(to_faces[1][found].min())
    top_open, bottom_open = room_top < OPEN_END_PITCHES * pitch, room_bottom < OPEN_END_PITCHES * pitch
    slots = vertebra_slots([c[1] for c in candidates], pitch) if CONSECUTIVE else None
    options = _numberings(weighted, top_open, bottom_open, slots)

    def score(numbering):  # agreeing votes; a vertebra set to background costs half its voxels
        return sum(weighted[i, j] if j is not None else -DROP_COST * sizes[i] for i, j in enumerate(numbering))

    supported = [numbering for numbering, _ in options[1:]]
    field_supports = bool(supported)
    full = min(len(candidates), len(labels))
    determined = len({tuple(n) for n in supported if sum(j is not None for j in n) == full}) == 1
    chosen = max(supported, key=score) if supported else options[0][0]
    majority = [int(np.argmax(v)) for v in votes]
    kept = [i for i, j in enumerate(chosen) if j is not None]
    shifted = sum(1 for i in kept if chosen[i] != majority[i])
    is_shift = len(kept) >= 2 and shifted > SHIFT_SHARE * len(kept)
    apply = not is_shift or field_supports
    if not apply:
        # the anatomy gives no reason to move the levels: keep the network's own numbering
        kept_labels = sorted({labels[majority[i]] for i in range(len(candidates))})
        agreement = 1.0 - float(votes.sum() - sum(votes[i, majority[i]] for i in range(len(candidates)))) / \
            float(votes.sum())
        report.update(levels_found=len(candidates), labels=kept_labels,
                      missing_labels=[v for v in labels if v not in kept_labels], applied=False,
                      shifted_levels=shifted, agreement=round(agreement, 4),
                      confidence=round(UNSUPPORTED_FACTOR * min(agreement, 1.0 - shifted / len(kept)), 4),
                      basis="renumbering would shift most levels and the field of view does not support it: the "
                            "network's numbering is kept")
        report.update(_geometry_report(room_top, room_bottom, top_open, bottom_open, pitch))
        report.update(view_explained(kept_labels, labels, top_open, bottom_open))
        return prediction, report
    out = prediction.copy().ravel()
    for (where, _, _), label in zip(candidates, chosen, strict=True):
        out[foreground[where]] = 0 if label is None else labels[label]
    assigned = sorted(labels[j] for j in chosen if j is not None)
    missing = [v for v in labels if v not in assigned]
    agreement = float(sum(votes[i, j] for i, j in enumerate(chosen) if j is not None)) / float(votes.sum())
    inside_gap = bool(missing) and not _missing_at_open_ends(chosen, len(labels), top_open, bottom_open)
    # the field of view leaves one numbering of the vertebrae found: it counts beside the network's votes
    anchored = not (top_open and bottom_open)
    confidence = (0.5 + 0.5 * agreement if determined and anchored else agreement) * \
        (UNSUPPORTED_FACTOR if inside_gap else 1.0) * (1.0 if anchored else UNANCHORED_FACTOR)
    basis = "all levels found" if not missing else (
        f"levels {', '.join(map(str, missing))} missing " +
        ("inside the field of view (a vertebra the network did not find?)" if inside_gap
         else "beyond an open end of the field of view"))
    dropped = [i for i, j in enumerate(chosen) if j is None]
    if dropped:
        basis += f"; {len(dropped)} surplus vertebra(e) set to background"
    if not anchored:
        basis += "; the scan cuts the spine at both ends: the numbering rests on the network's labels alone"
    report.update(levels_found=len(kept), candidates=len(candidates), labels=assigned, missing_labels=missing,
                  applied=True, shifted_levels=shifted, agreement=round(agreement, 4),
                  confidence=round(confidence, 4), basis=basis)
    report.update(_geometry_report(room_top, room_bottom, top_open, bottom_open, pitch))
    report.update(view_explained(assigned, labels, top_open, bottom_open))
    return out.reshape(prediction.shape), report


def _with_edge_parts(candidates: list, values: np.ndarray, heights: np.ndarray, labels: tuple[int, ...],
                     to_faces: tuple[np.ndarray, np.ndarray], pitch: float) -> list:
    """``candidates`` (sorted along the direction) with the part of the outermost one that the network labels as a
    level beyond its own, lying beyond its own label's voxels (one above the other, :func:`_stacked`) and reaching to
    within :data:`EDGE_PART_PITCHES` level pitches of the image edge, made a candidate of its own: a level the edge
    of the scan cuts to a sliver, fused to its neighbour through the disc. As one component the pair takes its
    majority's label (the sliver is below :data:`MIXED_SHARE`), so that the sliver would lose its level; on its own it
    takes a place in the column beyond the neighbour's (its centre lies more than half a pitch beyond the neighbour's
    centre), and keeps its level when the numbering agrees. A part nearer the neighbour's centre shares its place and
    its level, as before. ``values``: the predicted label of each foreground voxel; ``to_faces``: its distances to
    the top and bottom edges of the scan (:func:`_face_distances`)."""
    if len(candidates) < 2:
        return candidates
    out = list(candidates)
    for end in (0, -1):
        where, _, votes = out[end]
        major = int(np.argmax(votes))
        beyond = labels[:major] if end == 0 else labels[major + 1:]
        own, h = values[where], heights[where]
        part = np.isin(own, beyond)
        count = int(part.sum())
        if not beyond or count < EDGE_PART_MIN_SHARE * len(where):
            continue
        body = own == labels[major]
        if not _stacked([h[part], h[body]]):
            continue  # side by side: one vertebra labelled differently in different slices
        outside = h[part].mean() < h[body].mean() if end == 0 else h[part].mean() > h[body].mean()
        reach = float(to_faces[0 if end == 0 else 1][where[part]].min())
        if not outside or reach > EDGE_PART_PITCHES * pitch:
            continue
        pieces = []
        for positions in (where[part], where[~part]):
            piece_votes = np.array([np.count_nonzero(values[positions] == v) for v in labels], dtype=float)
            pieces.append((positions, float(np.mean(heights[positions])), piece_votes))
        if end == 0:
            out[:1] = pieces  # the sliver lies above
        else:
            out[-1:] = pieces[::-1]
    return out


def _missing_at_open_ends(numbering: list[int | None], k: int, top_open: bool, bottom_open: bool) -> bool:
    """Are the labels this numbering leaves out all beyond open ends (none in the middle)?"""
    used = sorted(j for j in numbering if j is not None)
    if not used:
        return False
    if used != list(range(used[0], used[-1] + 1)):
        return False
    return (used[0] == 0 or top_open) and (used[-1] == k - 1 or bottom_open)


def view_explained(found: list[int], labels: tuple[int, ...], top_open: bool, bottom_open: bool) -> dict[str, list]:
    """The levels whose absence or small size the field of view explains: ``beyond_view``, the labels missing
    beyond an open end (before the first level found with an open top, after the last with an open bottom), and
    ``at_view_edge``, the outermost levels found at an open end (the edge of the scan may cut them)."""
    present = [v for v in labels if v in found]
    if not present:
        return {"beyond_view": [], "at_view_edge": []}
    first, last = labels.index(present[0]), labels.index(present[-1])
    beyond = (list(labels[:first]) if top_open else []) + (list(labels[last + 1:]) if bottom_open else [])
    edge = sorted(({present[0]} if top_open else set()) | ({present[-1]} if bottom_open else set()))
    return {"beyond_view": [int(v) for v in beyond], "at_view_edge": [int(v) for v in edge]}


def _geometry_report(room_top: float, room_bottom: float, top_open: bool, bottom_open: bool,
                     pitch: float) -> dict[str, Any]:
    return {"room_above_mm": round(room_top, 1), "room_below_mm": round(room_bottom, 1), "top_open": bool(top_open),
            "bottom_open": bool(bottom_open), "anchored": not (top_open and bottom_open),
            "level_pitch_mm": round(pitch, 1)}
