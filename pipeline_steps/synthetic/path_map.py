"""The anatomy drawn as a water-equivalent path-length map: trunk, lungs, heart, airways,
spine, ribs, clavicles, vessel trees and textures, on the half-resolution work grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline_steps.synthetic.anatomy import Anatomy
from pipeline_steps.synthetic.raster import BoolArray, FloatArray, power_law_noise, upsample2

# Aerated lung is ~0.25 g/cm3, so each cm of lung replaces 0.75 cm of water on the ray.
LUNG_AIR_FRACTION = 0.75
# Extra water-equivalent path per cm of bone beyond the soft tissue it replaces (at ~60 keV).
CORTICAL_EXCESS = 1.8
TRABECULAR_EXCESS = 0.4


def _smoothstep(e0: float, e1: float, x: FloatArray) -> FloatArray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _half_chord(u: FloatArray) -> FloatArray:
    """Chord of a unit circle at offset u, halved: sqrt(1 - u^2) inside, 0 outside."""
    return np.sqrt(np.clip(1.0 - u * u, 0.0, None))


def _bone_chord(u: FloatArray, cortex: float = 0.3) -> FloatArray:
    """Water-equivalent chord (per unit half-depth) through a bone with a cortical shell."""
    inner_r = 1.0 - cortex
    outer = _half_chord(u)
    inner = inner_r * _half_chord(u / inner_r)
    return 2.0 * (CORTICAL_EXCESS * (outer - inner) + TRABECULAR_EXCESS * inner)


def _level_index(u: FloatArray, first: float, growth: float) -> FloatArray:
    """Continuous index n of repeating levels (ribs, vertebrae) whose spacing grows linearly.

    Level n starts at first*n + growth*n^2/2, so n is the positive root of that quadratic.
    """
    return np.where(
        u > 0.0, (np.sqrt(first * first + 2.0 * growth * np.maximum(u, 0.0)) - first) / growth, -1.0
    )


@dataclass(frozen=True)
class PathMap:
    """Water-equivalent path length (cm) on the half-resolution work grid, and region masks."""

    path_cm: FloatArray
    lung_mask: BoolArray
    mediastinum_mask: BoolArray
    body_mask: BoolArray


@dataclass(frozen=True)
class Grid:
    """Pixel-centre coordinates in mm, kept separable (x is 1 x w, y is h x 1) so that terms
    depending on one axis cost a row or column, not an image."""

    x: FloatArray  # from the patient midline, + = image right (patient left)
    y: FloatArray  # from the top of the field
    spacing_mm: float

    @staticmethod
    def build(shape: tuple[int, int], spacing_mm: float, anat: Anatomy) -> Grid:
        xs = (np.arange(shape[1], dtype=np.float64) + 0.5) * spacing_mm
        xs = xs - anat.width_mm / 2.0 - anat.x0
        ys = (np.arange(shape[0], dtype=np.float64) + 0.5) * spacing_mm
        return Grid(xs[None, :], ys[:, None], spacing_mm)

    def window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """Index slices of the pixels whose centres fall in [x0, x1] x [y0, y1] (mm)."""
        cols = np.searchsorted(self.x[0], [x0, x1])
        rows = np.searchsorted(self.y[:, 0], [y0, y1])
        return slice(int(rows[0]), int(rows[1])), slice(int(cols[0]), int(cols[1]))


def _body(x: FloatArray, y: FloatArray, anat: Anatomy) -> tuple[FloatArray, FloatArray]:
    """Soft-tissue thickness (cm) of a flattened-ellipse trunk with neck and shoulders."""
    a, y_ap = anat.a_thorax, min(anat.y_apex)
    shoulder = _smoothstep(y_ap - 45.0, y_ap + 5.0, y)
    chest = _smoothstep(y_ap + 5.0, y_ap + 110.0, y)
    abdomen = _smoothstep(max(anat.y_cp) - 10.0, max(anat.y_cp) + 60.0, y)
    half_width = 0.36 * a + (1.1 * a - 0.36 * a) * shoulder + (a - 1.1 * a) * chest
    half_width = half_width * (1.0 - 0.05 * abdomen)
    thick = 11.0 + (anat.thickness - 11.0) * _smoothstep(y_ap - 40.0, y_ap + 40.0, y)
    thick = thick + 2.0 * abdomen
    u2 = (x / half_width) ** 2
    # Between an ellipse and a superellipse of order 4: a trunk is flatter than a cylinder.
    inside = np.maximum(1.0 - u2, 0.0)
    profile = 0.5 * np.sqrt(inside) + 0.5 * np.sqrt(np.sqrt(np.maximum(1.0 - u2 * u2, 0.0)))
    return thick * profile, half_width


def _lung_extent(
    y: FloatArray, anat: Anatomy, side: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Lateral and medial lung borders (mm from the midline) and the height fraction v at y."""
    y_ap, y_cp = anat.y_apex[side], anat.y_cp[side]
    lateral, medial = anat.lung_lateral[side], anat.lung_medial[side]
    apex_x = 0.42 * lateral
    v = (y - y_ap) / (y_cp - y_ap)
    vc = np.clip(v, 0.0, 1.0)
    x_lat = apex_x + (lateral - apex_x) * np.sqrt(1.0 - (1.0 - vc) ** 2.5)
    x_med = apex_x - (apex_x - medial) * np.sqrt(1.0 - (1.0 - np.clip(vc / 0.3, 0.0, 1.0)) ** 2)
    return x_lat, x_med, v


def _lung_depth(x: FloatArray, y: FloatArray, anat: Anatomy, side: int) -> FloatArray:
    """Antero-posterior depth (cm) of aerated lung on one side (0 = image left = patient right)."""
    ax = x * (1.0 if side else -1.0)
    y_cp, y_dome, lateral = anat.y_cp[side], anat.y_dome[side], anat.lung_lateral[side]
    x_lat, x_med, v = _lung_extent(y, anat, side)
    h = (ax - x_med) / np.maximum(x_lat - x_med, 1e-3)
    across = _half_chord(h) * np.sqrt(np.clip(h / 0.06, 0.0, 1.0))
    # The dome rises from the costophrenic angle to its top at ~45 % of the width, and falls
    # again towards the heart.
    x_top = 0.45 * lateral
    q = np.where(ax > x_top, (ax - x_top) / (lateral - x_top), 0.4 * (x_top - ax) / x_top)
    y_diaphragm = y_dome + (y_cp - y_dome) * q * q
    down = np.sqrt(np.clip((y_diaphragm - y) / 30.0, 0.0, 1.0))
    up = np.sqrt(np.clip(v / 0.2, 0.0, 1.0))
    return anat.lung_depth * across * down * (up * (v >= 0))


def _ellipse_depth(
    x: FloatArray,
    y: FloatArray,
    cx: float,
    cy: float,
    a: float,
    b: FloatArray | float,
    angle: float,
) -> FloatArray:
    c, s = np.cos(angle), np.sin(angle)
    u = ((x - cx) * c + (y - cy) * s) / a
    w = (-(x - cx) * s + (y - cy) * c) / b
    return _half_chord(np.sqrt(u * u + w * w))


def _segment_distance(
    x: FloatArray, y: FloatArray, p: tuple[float, float], q: tuple[float, float]
) -> FloatArray:
    dx, dy = q[0] - p[0], q[1] - p[1]
    t = np.clip(((x - p[0]) * dx + (y - p[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.asarray(np.hypot(x - p[0] - t * dx, y - p[1] - t * dy), dtype=np.float64)


def _spine(x: FloatArray, y: FloatArray, anat: Anatomy) -> FloatArray:
    """Vertebral bodies with end plates and disc spaces, pedicles and spinous processes."""
    y_ap, lh, s = min(anat.y_apex), anat.lung_height, anat.a_thorax / 150.0
    half = (14.0 + 11.0 * np.clip((y - y_ap) / lh, -0.3, 1.3)) * s
    u = x / half
    level = _level_index(y - (y_ap - 60.0 * s), 19.0 * s, 0.4 * s)
    psi = level - np.floor(level)
    # Discs are only slightly less dense than vertebral bodies once soft tissue is added.
    body_rows = 0.75 + 0.25 * _smoothstep(0.06, 0.16, psi) * (1.0 - _smoothstep(0.94, 0.99, psi))
    plates = np.exp(-(((psi - 0.15) / 0.035) ** 2)) + np.exp(-(((psi - 0.97) / 0.035) ** 2))
    body = (0.7 * _bone_chord(u, cortex=0.15) + 0.15 * plates * _half_chord(u)) * body_rows
    pedicles = np.exp(-(((np.abs(u) - 0.7) / 0.14) ** 2) - ((psi - 0.4) / 0.15) ** 2)
    spinous = np.exp(-((u / 0.12) ** 2) - ((psi - 0.75) / 0.2) ** 2)
    return 0.45 * (body + 0.35 * pedicles + 0.25 * spinous)


def _ribs(x: FloatArray, y: FloatArray, anat: Anatomy, side: int) -> FloatArray:
    """Posterior ribs as curved bony bands, anterior ribs as fainter oblique ones.

    Rib position is a level index over a warped height, so the whole cage is one vectorised
    expression; the lateral coordinate follows the lung outline, which curls the upper ribs
    around the apex.
    """
    ax = x * (1.0 if side else -1.0)
    s = anat.a_thorax / 150.0
    spine_half = 14.0 * s
    x_lat, _, _ = _lung_extent(y, anat, side)
    t = (ax - spine_half) / (x_lat + 0.6 * anat.wall - spine_half)
    tc = np.clip(t, 0.0, 1.2)
    jitter = np.asarray(anat.rib_jitter)
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape))
    # Posterior ribs rise a little from the spine, then curve down towards the axilla.
    posterior = anat.rib_drop * (2.2 * tc**2.5 - 0.8 * tc)
    # Anterior ribs leave the axilla and run down towards the sternum, ending at cartilage.
    anterior = (
        anat.rib_drop * 1.4 + 0.2 * anat.lung_height * ((1.0 - np.clip(t, 0, 1)) / 0.6) ** 1.3
    )
    for drop, weight, half_height, lo, hi, n_max, offset in (
        (posterior, 1.0, anat.rib_half_height, (0.0, 0.08), (1.0, 1.12), 10.0, 0),
        (anterior, 0.5, 1.25 * anat.rib_half_height, (0.3, 0.5), (0.97, 1.08), 6.0, 12),
    ):
        level = _level_index(y - drop - anat.rib_start, anat.rib_first, anat.rib_growth)
        n = np.floor(level)
        period = anat.rib_first + anat.rib_growth * n
        calibre = jitter[np.clip(n, 0, 11).astype(np.intp) + offset]
        h = half_height * calibre * (1.0 + 0.03 * n) * (1.0 + 0.2 * tc)
        across = ((level - n) * period - h) / h
        envelope = _smoothstep(lo[0], lo[1], t) * (1.0 - _smoothstep(hi[0], hi[1], t))
        envelope = envelope * ((n >= 0) & (n < n_max))
        out += weight * 0.28 * _bone_chord(across) * envelope
    return out


def _clavicles(x: FloatArray, y: FloatArray, anat: Anatomy) -> FloatArray:
    xm, ym, xl, yl = anat.clavicle
    u = (np.abs(x) - xm) / (xl - xm)
    uc = np.clip(u, 0.0, 1.0)
    yc = ym + (yl - ym) * u + 5.0 * np.sin(2 * np.pi * uc)
    half = 8.5 - 2.5 * uc
    envelope = _smoothstep(-0.04, 0.03, u) * (1.0 - _smoothstep(0.95, 1.03, u))
    return 0.6 * _bone_chord((y - yc) / half, cortex=0.35) * envelope


def _to_pixels(
    x: FloatArray, y: FloatArray, spacing_mm: float, anat: Anatomy
) -> tuple[FloatArray, FloatArray]:
    """Inverse of `Grid.build`: patient mm to continuous (row, col), pixel centres at integers."""
    return y / spacing_mm - 0.5, (x + anat.x0 + anat.width_mm / 2.0) / spacing_mm - 0.5


def _grow_vessels(
    rng: np.random.Generator, anat: Anatomy, lung_eff: FloatArray, spacing_mm: float
) -> FloatArray:
    """Pulmonary vessel trees as segments (x0, y0, x1, y1, diameter mm, bend), one row each.

    Trunks leave each hilum; every segment ends in an asymmetric fork whose calibres obey
    Murray's law (d^3 = d1^3 + d2^3); growth stops at the lung edge or below ~1.5 mm.
    """
    floor = 0.25 * anat.lung_depth

    def in_lung(x: float, y: float) -> bool:
        r, c = _to_pixels(np.array(x), np.array(y), spacing_mm, anat)
        ri, ci = int(round(float(r))), int(round(float(c)))
        inside = 0 <= ri < lung_eff.shape[0] and 0 <= ci < lung_eff.shape[1]
        return inside and bool(lung_eff[ri, ci] > floor)

    segments: list[tuple[float, float, float, float, float, float]] = []
    queue: list[tuple[float, float, float, float]] = []
    for side, (hx, hy) in enumerate(anat.hila):
        lateral = 1.0 if side else -1.0
        # Arteries fan out from the hilum; veins gather lower down towards the left atrium.
        for ox, oy, angles, d0 in (
            (0.0, -5.0, (-105, -75, -45, -15, 15, 45, 75, 100), (6.0, 9.0)),
            (-6.0, 22.0, (-20, 10, 35, 60), (5.0, 7.5)),
        ):
            for a in angles:
                angle = np.deg2rad(a + rng.normal(0.0, 8.0))
                ux, uy = lateral * np.cos(angle), np.sin(angle)
                start_x = hx - lateral * ox + rng.normal(0.0, 5.0)
                start_y = hy + oy + rng.normal(0.0, 8.0)
                queue.append((start_x, start_y, float(np.arctan2(uy, ux)), rng.uniform(*d0)))
    head = 0
    while head < len(queue) and len(segments) < 1400:
        x, y, angle, d = queue[head]
        head += 1
        length = d * rng.uniform(4.0, 8.0) + 2.0
        x1, y1 = x + length * np.cos(angle), y + length * np.sin(angle)
        alive = in_lung(x1, y1)
        if not alive:
            x1, y1 = x + 0.5 * length * np.cos(angle), y + 0.5 * length * np.sin(angle)
        segments.append((x, y, x1, y1, d, rng.uniform(-0.12, 0.12)))
        if not alive:
            continue
        d1 = d * rng.uniform(0.78, 0.93)
        d2 = max(d**3 - d1**3, 0.0) ** (1.0 / 3.0)
        turn = 1.0 if rng.random() < 0.5 else -1.0
        for child, spread in ((d1, rng.uniform(8.0, 25.0)), (d2, -rng.uniform(25.0, 50.0))):
            if child >= 1.4:
                queue.append((x1, y1, angle + turn * np.deg2rad(spread), child))
    return np.asarray(segments, dtype=np.float64).reshape(-1, 6)


def _render_vessels(
    segments: FloatArray, shape: tuple[int, int], spacing_mm: float, anat: Anatomy
) -> FloatArray:
    """Extra water path (cm) of vessels replacing lung: splatted, then blurred per calibre."""
    step = 0.5 * spacing_mm
    x0, y0, x1, y1, d, bend = segments.T
    length = np.hypot(x1 - x0, y1 - y0)
    counts = np.maximum(np.ceil(length / step).astype(np.intp), 1)
    seg = np.repeat(np.arange(len(segments)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    t = (np.arange(seg.size) - first + 0.5) / counts[seg]
    # A sideways bow (quadratic in t) keeps vessels from looking ruled.
    nx, ny = -(y1 - y0)[seg], (x1 - x0)[seg]
    bow = 4.0 * t * (1.0 - t) * bend[seg]
    px = x0[seg] + t * (x1 - x0)[seg] + bow * nx
    py = y0[seg] + t * (y1 - y0)[seg] + bow * ny
    # Cross-section integral of a cylinder's chord is pi d^2 / 4, doubled for the bronchus wall
    # and interstitium that sheathe each artery; lung is 0.75 air.
    ds = (length / counts)[seg]
    mass = 2.0 * LUNG_AIR_FRACTION * 0.1 * np.pi * d[seg] ** 2 / 4.0 * ds / spacing_mm**2
    rows, cols = _to_pixels(px, py, spacing_mm, anat)
    out = np.zeros(shape)
    for lo, hi, sigma_mm in ((0.0, 2.5, 0.6), (2.5, 4.5, 1.2), (4.5, 99.0, 2.2)):
        pick = (d[seg] >= lo) & (d[seg] < hi)
        if pick.any():
            splat = _splat(rows[pick], cols[pick], mass[pick], shape)
            out += ndimage.gaussian_filter(splat, sigma_mm / spacing_mm, truncate=3.0)
    return out


def _splat(
    rows: FloatArray, cols: FloatArray, weights: FloatArray, shape: tuple[int, int]
) -> FloatArray:
    """Bilinear deposit of point weights onto a grid (mass-preserving, points off-grid dropped)."""
    r0, c0 = np.floor(rows).astype(np.intp), np.floor(cols).astype(np.intp)
    fr, fc = rows - r0, cols - c0
    total = np.zeros(shape[0] * shape[1])
    for dr, dc, w in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        r, c = r0 + dr, c0 + dc
        ok = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
        total += np.bincount(
            r[ok] * shape[1] + c[ok], weights=(weights * w)[ok], minlength=total.size
        )
    return total.reshape(shape)


def render_path_map(
    rng: np.random.Generator,
    anat: Anatomy,
    work_shape: tuple[int, int],
    work_spacing_mm: float,
    texture: float,
) -> PathMap:
    """Water-equivalent path length through the patient, on the half-resolution work grid.

    Organs that cover part of the field are evaluated only in their own window of the grid.
    """
    g = Grid.build(work_shape, work_spacing_mm, anat)
    x, y = g.x, g.y
    body, half_width = _body(x, y, anat)
    body_mask = body > 0.5

    lung = np.zeros(work_shape)
    for side, sign in ((0, -1.0), (1, 1.0)):
        far = sign * (anat.lung_lateral[side] + 2.0)
        rs, cs = g.window(min(0.0, far), max(0.0, far), anat.y_apex[side], anat.y_cp[side] + 2.0)
        lung[rs, cs] += _lung_depth(x[:, cs], y[rs], anat, side)
    # Heart and aorta displace the lung: their borders are where the silhouette is drawn, and only
    # a thin slice of lower lobe stays behind them.
    displaced = np.zeros(work_shape)
    hx, hy, ha, hb, hangle = anat.heart
    rs, cs = g.window(hx - ha, hx + ha, hy - ha, hy + ha)
    displaced[rs, cs] = _ellipse_depth(x[:, cs], y[rs], hx, hy, ha, hb, hangle)
    kx, ky, kr = anat.knob
    rs, cs = g.window(kx - kr, kx + kr, ky - 2.0 * kr, ky + 1.2 * kr)
    yk = y[rs]
    knob = _ellipse_depth(x[:, cs], yk, kx, ky, kr, kr * np.where(yk < ky, 2.0, 1.2), 0.0)
    displaced[rs, cs] = np.maximum(displaced[rs, cs], knob)
    lung_eff = lung * (1.0 - 0.88 * np.minimum(displaced / 0.3, 1.0))

    path = body - LUNG_AIR_FRACTION * lung_eff
    # Trachea and main bronchi: air columns in the upper mediastinum.
    trachea_x = -0.02 * anat.a_thorax
    tw = 8.0 * anat.a_thorax / 150.0
    carina = (trachea_x, anat.carina_y - 4.0)
    hx_lo, hx_hi = min(h[0] for h in anat.hila), max(h[0] for h in anat.hila)
    rs, cs = g.window(hx_lo - tw, hx_hi + tw, 0.0, max(h[1] for h in anat.hila) + tw)
    xa, ya = x[:, cs], y[rs]
    above_carina = 1.0 - _smoothstep(anat.carina_y - 8, anat.carina_y, ya)
    air = 1.8 * _half_chord((xa - trachea_x) / tw) * above_carina
    for hilum in anat.hila:
        bronchus = 1.2 * _half_chord(_segment_distance(xa, ya, carina, hilum) / (0.7 * tw))
        air = np.maximum(air, bronchus)
    path[rs, cs] -= air
    for hxy, sign in zip(anat.hila, (-1.0, 1.0), strict=True):
        cx = hxy[0] - sign * 5.0
        rs, cs = g.window(cx - 40.0, cx + 40.0, hxy[1] - 80.0, hxy[1] + 80.0)
        blob = ((x[:, cs] - cx) / 13.0) ** 2 + ((y[rs] - hxy[1]) / 26.0) ** 2
        path[rs, cs] += 2.2 * np.exp(-blob)
    if anat.breasts > 0:
        # Breast shadows fade upwards over the lower zones and end in a sharp curved lower edge.
        by, rx = max(anat.y_dome) - 0.1 * anat.lung_height, 0.5 * anat.a_thorax
        for sign in (-1.0, 1.0):
            bx = sign * 0.5 * anat.a_thorax
            rs, cs = g.window(bx - rx, bx + rx, by - 150.0, by + 45.0)
            ry = np.where(y[rs] < by, 150.0, 45.0)
            rho = np.hypot((x[:, cs] - bx) / rx, (y[rs] - by) / ry)
            path[rs, cs] += anat.breasts * _half_chord(rho) ** 0.8
    if anat.stomach_gas > 0:
        gx, gy = 0.45 * anat.lung_lateral[1], anat.y_dome[1] + 22.0
        rs, cs = g.window(gx - 35.0, gx + 35.0, gy - 35.0, gy + 35.0)
        bubble = _ellipse_depth(x[:, cs], y[rs], gx, gy, 28.0, 13.0, 0.15)
        path[rs, cs] -= anat.stomach_gas * bubble

    spine_reach = 40.0 * anat.a_thorax / 150.0
    rs, cs = g.window(-spine_reach, spine_reach, -1.0, anat.height_mm + 1.0)
    path[rs, cs] += _spine(x[:, cs], y, anat) * (body[:, cs] > 0.0)
    bones = np.zeros(work_shape)
    for side, sign in ((0, -1.0), (1, 1.0)):
        far = sign * 1.25 * anat.a_thorax
        rs, cs = g.window(min(0.0, far), max(0.0, far), anat.rib_start - 30.0, anat.height_mm)
        bones[rs, cs] += _ribs(x[:, cs], y[rs], anat, side)
    xm, ym, xl, yl = anat.clavicle
    rs, cs = g.window(-xl - 10.0, xl + 10.0, min(ym, yl) - 30.0, max(ym, yl) + 30.0)
    bones[rs, cs] += _clavicles(x[:, cs], y[rs], anat)
    path += texture * bones * (np.abs(x) < half_width)

    # Smooth textures are drawn at quarter resolution and upsampled.
    q_shape = (-(-work_shape[0] // 2), -(-work_shape[1] // 2))
    clutter = power_law_noise(rng, q_shape, 2 * work_spacing_mm, beta=3.0, cutoff_mm=60.0)
    mottle = power_law_noise(rng, q_shape, 2 * work_spacing_mm, beta=2.0, cutoff_mm=15.0)
    segments = _grow_vessels(rng, anat, lung_eff, work_spacing_mm)
    lung_weight = np.sqrt(np.minimum(lung_eff / anat.lung_depth, 1.0))
    smooth = upsample2(np.stack([0.08 * mottle, 0.15 * clutter], axis=-1), work_shape)
    texture_cm = _render_vessels(segments, work_shape, work_spacing_mm, anat)
    texture_cm += smooth[..., 0] * lung_weight
    texture_cm += smooth[..., 1] * np.minimum(body / anat.thickness, 1.0)
    path += texture * texture_cm

    lung_mask = lung_eff > 0.3 * anat.lung_depth
    mediastinum = (
        (lung_eff < 0.05 * anat.lung_depth)
        & (np.abs(x) < 0.35 * anat.a_thorax)
        & (y > min(anat.y_apex) + 0.25 * anat.lung_height)
        & (y < min(anat.y_dome))
    )
    return PathMap(np.maximum(path, 0.0), lung_mask, mediastinum, body_mask)
