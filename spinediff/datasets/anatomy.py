"""Procedural lumbar / thoracolumbar spine anatomy, defined in continuous physical space.

The anatomy lives in a *body frame* (millimetres, LPS axes: x = left, y = posterior,
z = superior) whose origin is the centre of the spine. A curved centre line (constant
curvature: lordosis) carries a moving frame; every point is expressed in *spine coordinates*
``(u, v, s)``: ``u`` left-right, ``v`` anterior(-)/posterior(+) perpendicular to the centre line,
``s`` arc length along the centre line. Shapes (vertebral bodies, discs, canal, posterior
elements, muscles, body outline) are simple inequalities in those coordinates, so any image
grid can be sampled exactly, and landmarks are known by construction.

Each tissue has a CT value in Hounsfield units and T1w / T2w MR intensities with realistic
relative contrast (fat bright on both, CSF and healthy nucleus bright on T2 and dark on T1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Tissue codes of the internal tissue map.
(AIR, FAT, MUSCLE, VISCERA, VESSEL, CORTICAL, TRABECULAR, POSTERIOR_BONE, ANNULUS, NUCLEUS, CSF, CORD,
 NUCLEUS_DEGENERATED) = range(13)
TISSUE_NAMES = ("air", "fat", "muscle", "viscera", "vessel", "cortical", "trabecular", "posterior_bone",
                "annulus", "nucleus", "csf", "cord", "nucleus_degenerated")

# Semantic labels written to labelsTr.
SEMANTIC_LABELS = {"background": 0, "vertebra": 1, "disc": 2, "spinal_canal": 3}
_SEMANTIC_OF_TISSUE = np.zeros(len(TISSUE_NAMES), dtype=np.uint8)
_SEMANTIC_OF_TISSUE[[CORTICAL, TRABECULAR, POSTERIOR_BONE]] = 1
_SEMANTIC_OF_TISSUE[[ANNULUS, NUCLEUS, NUCLEUS_DEGENERATED]] = 2
_SEMANTIC_OF_TISSUE[[CSF, CORD]] = 3

# VerSe numbering: 1-7 cervical, 8-19 thoracic (18 = T11, 19 = T12), 20-24 lumbar (L1-L5).
VERTEBRA_NAMES = {18: "T11", 19: "T12", 20: "L1", 21: "L2", 22: "L3", 23: "L4", 24: "L5"}


@dataclass
class Vertebra:
    label: int
    s_center: float  # arc length of the body centre (mm)
    half_width: float  # body half-width (left-right, mm)
    half_depth: float  # body half-depth (anterior-posterior, mm)
    height: float  # body height (mm)


@dataclass
class Disc:
    s_low: float
    s_high: float
    half_width: float
    half_depth: float
    degenerated: bool


@dataclass
class SpineAnatomy:
    """One subject's anatomy; build with :func:`random_anatomy`."""

    vertebrae: list[Vertebra]
    discs: list[Disc]
    curvature: float  # rad / mm (lordosis)
    s_mid: float
    canal_radius_lr: float
    canal_radius_ap: float
    canal_gap: float  # distance from the posterior body wall to the canal (mm)
    spinous_length: float
    transverse_length: float
    fat_thickness: float
    body_radius_lr: float
    body_radius_ap_posterior: float
    body_radius_ap_anterior: float
    conus_s: float  # the cord ends below this arc length (conus medullaris)
    tissue_ct: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    tissue_t1: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    tissue_t2: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    # ---------------------------------------------------------------- centre line
    @property
    def canal_centre_v(self) -> float:
        depth = max(v.half_depth for v in self.vertebrae)
        return depth + self.canal_gap + self.canal_radius_ap

    def frame(self, s: float | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centre point, posterior unit vector e_v and superior unit vector e_w at arc length ``s``.

        The centre line is the arc ``(0, R (1 - cos phi), R sin phi)``, ``phi = kappa (s - s_mid)``,
        ``R = 1 / kappa``, continued by straight lines 40 mm beyond the outermost vertebrae.
        """
        s_arr = np.atleast_1d(np.asarray(s, dtype=float))
        lo, hi = self.vertebrae[0].s_center - 40.0, self.vertebrae[-1].s_center + 40.0
        clipped = np.clip(s_arr, lo, hi)
        phi = self.curvature * (clipped - self.s_mid)
        radius = 1.0 / self.curvature
        e_w = np.stack([np.zeros_like(phi), np.sin(phi), np.cos(phi)], axis=1)
        e_v = np.stack([np.zeros_like(phi), np.cos(phi), -np.sin(phi)], axis=1)
        centre = np.stack([np.zeros_like(phi), radius * (1 - np.cos(phi)), radius * np.sin(phi)], axis=1)
        centre = centre + (s_arr - clipped)[:, None] * e_w
        return centre, e_v, e_w

    def to_spine_coordinates(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Body-frame points (n, 3) → spine coordinates (u, v, s).

        The centre line is a circular arc (constant curvature) continued by straight lines beyond the
        spine, so the arc length of the nearest centre-line point is found in closed form: the angle
        of the point seen from the centre of curvature (no nearest-neighbour search).
        """
        y, z = points[:, 1], points[:, 2]
        lo, hi = self.vertebrae[0].s_center - 40.0, self.vertebrae[-1].s_center + 40.0
        radius = 1.0 / self.curvature
        # c(s) = (0, (1 - cos phi) R, R sin phi) with phi = kappa (s - s_mid); centre of curvature (0, R, 0).
        s = self.s_mid + radius * np.arctan2(z, radius - y)
        s = np.clip(s, lo, hi)
        # Beyond the arc the line continues straight: project onto the end tangents.
        for end in (lo, hi):
            at_end = s == end
            if at_end.any():
                centre, _, e_w = self.frame(end)
                along = (points[at_end] - centre[0]) @ e_w[0]
                s[at_end] = end + along
        centre, e_v, e_w = self.frame(s)
        d = points - centre
        v = np.einsum("ij,ij->i", d, e_v)
        s_eff = s + np.einsum("ij,ij->i", d, e_w)
        return points[:, 0].astype(np.float32), v.astype(np.float32), s_eff.astype(np.float32)

    def from_spine_coordinates(self, u: float, v: float, s: float) -> np.ndarray:
        centre, e_v, e_w = self.frame(s)
        # e_w is exact only at the centre line; points off it are placed on the normal plane.
        return (centre[0] + np.array([u, 0.0, 0.0]) + v * e_v[0])

    # ---------------------------------------------------------------- tissues
    def evaluate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissue code and vertebra instance label (0 = none) at body-frame points (n, 3)."""
        u, v, s = self.to_spine_coordinates(np.asarray(points, dtype=np.float64))
        n = len(u)
        tissue = np.full(n, AIR, dtype=np.uint8)
        instance = np.zeros(n, dtype=np.uint8)

        # Body outline: an ellipse in the (u, v) plane, flatter posteriorly.
        v_back = self.body_radius_ap_posterior
        v_front = self.body_radius_ap_anterior
        ry = np.where(v >= 0, v_back, v_front)
        rho_body = np.sqrt((u / self.body_radius_lr) ** 2 + (v / ry) ** 2)
        inside = rho_body <= 1.0
        tissue[inside] = FAT
        inner = np.sqrt((u / (self.body_radius_lr - self.fat_thickness)) ** 2
                        + (v / (ry - self.fat_thickness)) ** 2) <= 1.0
        depth = max(vt.half_depth for vt in self.vertebrae)
        tissue[inner & (v < -depth - 6.0)] = VISCERA

        vc = self.canal_centre_v
        # Paraspinal muscles (erector spinae / multifidus) and psoas, both sides.
        for side in (-1.0, 1.0):
            # Multifidus/erector spinae: the two sides meet behind the spinous processes.
            para = ((u - side * (self.canal_radius_lr + 12.0)) / 22.0) ** 2 + ((v - (vc + 32.0)) / 25.0) ** 2
            psoas = ((u - side * (depth + 26.0)) / 13.0) ** 2 + ((v + 2.0) / 15.0) ** 2
            tissue[inner & ((para <= 1.0) | (psoas <= 1.0))] = MUSCLE
        # Aorta (left, anterior to the spine) and inferior vena cava (right).
        aorta = (u - 14.0) ** 2 + (v + depth + 14.0) ** 2 <= 11.0**2
        cava = ((u + 20.0) / 12.0) ** 2 + ((v + depth + 12.0) / 8.0) ** 2 <= 1.0
        tissue[inner & (aorta | cava)] = VESSEL

        # Discs (annulus with a nucleus; degenerated discs are lower and have a dry nucleus).
        for disc in self.discs:
            within = (s >= disc.s_low) & (s <= disc.s_high)
            rho = np.sqrt((u / (disc.half_width * 1.03)) ** 2 + (v / (disc.half_depth * 1.03)) ** 2)
            tissue[within & (rho <= 1.0)] = ANNULUS
            mid = 0.5 * (disc.s_low + disc.s_high)
            half_h = 0.5 * (disc.s_high - disc.s_low)
            rho_n = np.sqrt((u / (0.55 * disc.half_width)) ** 2 + ((v + 2.0) / (0.5 * disc.half_depth)) ** 2
                            + ((s - mid) / (0.75 * half_h)) ** 2)
            tissue[within & (rho_n <= 1.0)] = NUCLEUS_DEGENERATED if disc.degenerated else NUCLEUS

        # Vertebrae: body (cortical shell, trabecular core) and posterior elements.
        for vert in self.vertebrae:
            w = s - vert.s_center
            near = np.abs(w) <= vert.height / 2 + 30.0
            if not near.any():
                continue
            idx = np.nonzero(near)[0]
            uu, vv, ww = u[idx], v[idx], w[idx]
            half_h = vert.height / 2
            waist = 1.0 - 0.07 * (1.0 - (ww / half_h) ** 2)  # concave waist of the body
            rho = np.sqrt((uu / vert.half_width) ** 2 + (vv / vert.half_depth) ** 2) / np.maximum(waist, 1e-3)
            body = (rho <= 1.0) & (np.abs(ww) <= half_h)
            shell_t = 1.8  # cortical thickness (mm)
            shell = body & ((np.abs(ww) >= half_h - shell_t) | (rho >= 1.0 - shell_t / vert.half_depth))
            posterior = self._posterior_elements(uu, vv, ww, vert)
            t_local = tissue[idx]
            t_local[posterior] = POSTERIOR_BONE
            t_local[body] = TRABECULAR
            t_local[shell] = CORTICAL
            tissue[idx] = t_local
            i_local = instance[idx]
            i_local[body | posterior] = vert.label
            instance[idx] = i_local

        # Spinal canal (CSF) with the cord above the conus; it wins over adjacent bone.
        rho_c = np.sqrt((u / self.canal_radius_lr) ** 2 + ((v - vc) / self.canal_radius_ap) ** 2)
        canal = rho_c <= 1.0
        tissue[canal] = CSF
        instance[canal] = 0
        cord = (np.sqrt((u / 4.5) ** 2 + ((v - vc + 0.5) / 4.0) ** 2) <= 1.0) & (s >= self.conus_s)
        tissue[cord] = CORD
        return tissue, instance

    def _posterior_elements(self, u, v, w, vert: Vertebra) -> np.ndarray:
        """Pedicles, lamina, spinous and transverse processes of one vertebra (local w)."""
        vc = self.canal_centre_v
        rl, ra = self.canal_radius_lr, self.canal_radius_ap
        pedicle = np.zeros(u.shape, dtype=bool)
        for side in (-1.0, 1.0):
            pedicle |= (((u - side * (rl + 2.0)) / 4.5) ** 2 + ((w - 2.0) / 6.0) ** 2 <= 1.0) & (
                v >= vert.half_depth - 3.0) & (v <= vc + 2.0)
        rho_in = np.sqrt((u / rl) ** 2 + ((v - vc) / ra) ** 2)
        rho_out = np.sqrt((u / (rl + 5.5)) ** 2 + ((v - vc) / (ra + 5.0)) ** 2)
        lamina = (rho_in > 1.0) & (rho_out <= 1.0) & (v >= vc) & (np.abs(w - 1.0) <= 9.0)
        v_start = vc + ra + 3.0
        w_centre = 1.0 - 0.3 * (v - v_start)  # the spinous process points caudally
        spinous = (v >= v_start) & (v <= v_start + self.spinous_length) & (np.abs(u) <= 3.2) & (
            np.abs(w - w_centre) <= 7.5 - 0.08 * np.clip(v - v_start, 0, None))
        transverse = (np.abs(u) >= rl + 3.0) & (np.abs(u) <= rl + 3.0 + self.transverse_length) & (
            np.abs(v - (vc - 2.0)) <= 4.0) & (np.abs(w - 3.0) <= 5.0)
        return pedicle | lamina | spinous | transverse

    # ---------------------------------------------------------------- landmarks
    def landmarks(self, resolution: float = 1.5) -> dict[int, dict[str, np.ndarray]]:
        """Body-frame landmarks per vertebra: body centroid, posterior-elements centroid, spinous tip."""
        out: dict[int, dict[str, np.ndarray]] = {}
        for vert in self.vertebrae:
            centre, e_v, e_w = self.frame(vert.s_center)
            # Sample a box around the vertebra to find the exact centroids of its parts.
            reach = self.canal_centre_v + self.canal_radius_ap + self.spinous_length + 10.0
            half_u = self.canal_radius_lr + 6.0 + self.transverse_length
            # The anatomy is mirror-symmetric in u: sample the left half only (the centroid's
            # u is exactly 0) to keep this fast.
            grid_u = np.arange(resolution / 2, half_u, resolution)
            grid_v = np.arange(-vert.half_depth - 3.0, reach, resolution)
            grid_w = np.arange(-vert.height / 2 - 16.0, vert.height / 2 + 16.0, resolution)
            uu, vv, ww = np.meshgrid(grid_u, grid_v, grid_w, indexing="ij")
            points = (centre[0][None] + uu.reshape(-1, 1) * np.array([1.0, 0.0, 0.0])
                      + vv.reshape(-1, 1) * e_v[0][None] + ww.reshape(-1, 1) * e_w[0][None])
            tissue, instance = self.evaluate(points)
            mine = instance == vert.label
            body = mine & np.isin(tissue, (CORTICAL, TRABECULAR))
            post = mine & (tissue == POSTERIOR_BONE)
            v_tip = self.canal_centre_v + self.canal_radius_ap + 3.0 + self.spinous_length
            tip = self.from_spine_coordinates(0.0, v_tip, vert.s_center)
            tip = tip + e_w[0] * (1.0 - 0.3 * self.spinous_length)
            body_centroid, post_centroid = points[body].mean(axis=0), points[post].mean(axis=0)
            body_centroid[0] = post_centroid[0] = centre[0][0]
            out[vert.label] = {
                "body": body_centroid,
                "posterior": post_centroid,
                "spinous_tip": tip,
            }
        return out

    def semantic(self, tissue: np.ndarray) -> np.ndarray:
        return _SEMANTIC_OF_TISSUE[tissue]

    def extent_s(self) -> tuple[float, float]:
        return self.vertebrae[0].s_center - self.vertebrae[0].height / 2, \
            self.vertebrae[-1].s_center + self.vertebrae[-1].height / 2


def random_anatomy(rng: np.random.Generator) -> SpineAnatomy:
    """Draw one subject: 3-6 vertebrae, some degenerated discs, per-subject sizes and intensities."""
    n_vert = int(rng.integers(3, 7))
    lowest = int(rng.choice([24, 24, 23]))  # mostly down to L5
    labels = [lowest - k for k in range(n_vert)]  # bottom to top
    vertebrae: list[Vertebra] = []
    discs: list[Disc] = []
    half_width = rng.uniform(19.0, 23.0)
    half_depth = rng.uniform(14.0, 16.5)
    s = 0.0
    for k, label in enumerate(labels):
        height = rng.uniform(23.0, 27.0)
        # Lower lumbar vertebrae are a little larger.
        scale = 1.0 + 0.02 * (label - 20)
        if k == 0:
            s = height / 2
        else:
            degenerated = bool(rng.random() < 0.3)
            disc_h = rng.uniform(8.5, 11.0) * (0.55 if degenerated else 1.0)
            prev = vertebrae[-1]
            s_low = prev.s_center + prev.height / 2
            discs.append(Disc(s_low, s_low + disc_h, prev.half_width, prev.half_depth, degenerated))
            s = s_low + disc_h + height / 2
        vertebrae.append(Vertebra(label, s, half_width * scale, half_depth * scale, height))
    s_mid = 0.5 * (vertebrae[0].s_center + vertebrae[-1].s_center)
    conus_index = min(len(vertebrae) - 1, max(1, len(vertebrae) - 2))
    anatomy = SpineAnatomy(
        vertebrae=vertebrae,
        discs=discs,
        curvature=rng.uniform(0.0015, 0.004),
        s_mid=s_mid,
        canal_radius_lr=rng.uniform(10.0, 12.5),
        canal_radius_ap=rng.uniform(6.5, 8.5),
        canal_gap=rng.uniform(1.5, 3.0),
        spinous_length=rng.uniform(24.0, 32.0),
        transverse_length=rng.uniform(18.0, 26.0),
        fat_thickness=rng.uniform(10.0, 25.0),
        body_radius_lr=rng.uniform(140.0, 170.0),
        body_radius_ap_posterior=rng.uniform(95.0, 115.0),
        body_radius_ap_anterior=rng.uniform(110.0, 150.0),
        conus_s=vertebrae[conus_index].s_center,
    )
    anatomy.tissue_ct, anatomy.tissue_t1, anatomy.tissue_t2 = _tissue_intensities(rng)
    return anatomy


def _tissue_intensities(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Per-subject tissue values: CT in HU, T1w and T2w relative intensities in [0, 1]."""
    ct = np.zeros(len(TISSUE_NAMES), dtype=np.float32)
    t1 = np.zeros_like(ct)
    t2 = np.zeros_like(ct)
    #          tissue          CT (HU)                      T1w                       T2w
    values = {
        AIR: (-1000.0, 0.0, 0.0),
        FAT: (rng.uniform(-110, -85), rng.uniform(0.88, 1.0), rng.uniform(0.72, 0.85)),
        MUSCLE: (rng.uniform(40, 60), rng.uniform(0.30, 0.38), rng.uniform(0.20, 0.28)),
        VISCERA: (rng.uniform(30, 45), rng.uniform(0.40, 0.50), rng.uniform(0.50, 0.60)),
        VESSEL: (rng.uniform(35, 50), rng.uniform(0.25, 0.35), rng.uniform(0.06, 0.12)),  # flow void on T2
        CORTICAL: (rng.uniform(1100, 1400), rng.uniform(0.04, 0.08), rng.uniform(0.03, 0.07)),
        TRABECULAR: (rng.uniform(150, 300), rng.uniform(0.62, 0.78), rng.uniform(0.42, 0.55)),  # fatty marrow
        POSTERIOR_BONE: (rng.uniform(650, 900), rng.uniform(0.35, 0.45), rng.uniform(0.28, 0.36)),
        ANNULUS: (rng.uniform(80, 100), rng.uniform(0.32, 0.38), rng.uniform(0.18, 0.25)),
        NUCLEUS: (rng.uniform(65, 85), rng.uniform(0.34, 0.42), rng.uniform(0.85, 0.95)),
        CSF: (rng.uniform(5, 15), rng.uniform(0.12, 0.18), rng.uniform(0.95, 1.0)),
        CORD: (rng.uniform(30, 40), rng.uniform(0.42, 0.50), rng.uniform(0.42, 0.50)),
        # Degenerated (desiccated) nucleus: dark on T2, slightly denser on CT.
        NUCLEUS_DEGENERATED: (rng.uniform(85, 110), rng.uniform(0.30, 0.36), rng.uniform(0.22, 0.32)),
    }
    for code, (c, a, b) in values.items():
        ct[code], t1[code], t2[code] = c, a, b
    return ct, t1, t2
