"""Lesions (the labelled findings): NODE21-like nodules, their placement inside the aerated
lung, their tight bounding boxes and the density they add to the path-length map."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from pipeline_steps.core.config import LesionParams
from pipeline_steps.synthetic.raster import BoolArray, FloatArray


@dataclass(frozen=True)
class Box:
    """A lesion's bounding box in native pixel coordinates (x, y = top-left corner)."""

    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Lesion:
    """A lobulated nodule: radius modulated by low-order harmonics, soft falloff to its edge."""

    row: float  # centre in native pixel coordinates (pixel centres at integer + 0.5)
    col: float
    radius_px: float
    harmonics: tuple[tuple[int, float, float], ...]  # (order, amplitude, phase)
    margin: float  # falloff exponent: 0.5 is a sphere's chord, larger is softer
    density: float  # extra water-equivalent cm per cm of lesion thickness
    diameter_mm: float

    @property
    def reach_px(self) -> float:
        return self.radius_px * (1.0 + sum(abs(a) for _, a, _ in self.harmonics)) + 1.0


def draw_lesion_count(rng: np.random.Generator, lesions: LesionParams) -> int:
    """NODE21-like: about half the images have none, the rest mostly one, rarely up to the cap."""
    if rng.random() >= lesions.positive_fraction:
        return 0
    weights = 0.3 ** np.arange(lesions.max_per_image)
    return int(rng.choice(np.arange(1, lesions.max_per_image + 1), p=weights / weights.sum()))


def draw_lesion(rng: np.random.Generator, lesions: LesionParams, spacing_mm: float) -> Lesion:
    lo, hi = lesions.diameter_mm
    diameter = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    harmonics = tuple(
        (order, float(rng.uniform(0.0, amp)), float(rng.uniform(0.0, 2 * np.pi)))
        for order, amp in ((2, 0.15), (3, 0.10), (4, 0.06))
    )
    return Lesion(
        row=0.0,
        col=0.0,
        radius_px=diameter / 2.0 / spacing_mm,
        harmonics=harmonics,
        margin=float(rng.uniform(0.5, 0.9)),
        density=float(rng.uniform(*lesions.contrast)),
        diameter_mm=diameter,
    )


def lesion_rho(lesion: Lesion, rows: FloatArray, cols: FloatArray) -> FloatArray:
    """Normalised radius (1 on the lobulated edge) at native coordinates (pixel centres at +0.5)."""
    dy, dx = rows - lesion.row, cols - lesion.col
    theta = np.arctan2(dy, dx)
    radius = np.full_like(theta, lesion.radius_px)
    for order, amp, phase in lesion.harmonics:
        radius = radius + lesion.radius_px * amp * np.cos(order * theta + phase)
    return np.asarray(np.hypot(dy, dx) / radius, dtype=np.float64)


def lesion_box(lesion: Lesion, shape: tuple[int, int]) -> Box | None:
    """Bounding box of the pixels whose centres fall inside the lesion; None if any is outside."""
    reach = lesion.reach_px
    r0, r1 = int(np.floor(lesion.row - reach)), int(np.ceil(lesion.row + reach))
    c0, c1 = int(np.floor(lesion.col - reach)), int(np.ceil(lesion.col + reach))
    if r0 < 0 or c0 < 0 or r1 > shape[0] or c1 > shape[1]:
        return None
    rr, cc = np.mgrid[r0:r1, c0:c1]
    inside = lesion_rho(lesion, rr + 0.5, cc + 0.5) < 1.0
    if not inside.any():
        return None
    ys, xs = np.nonzero(inside)
    return Box(
        x=float(c0 + xs.min()),
        y=float(r0 + ys.min()),
        width=float(xs.max() - xs.min() + 1),
        height=float(ys.max() - ys.min() + 1),
    )


def _support(lesion: Lesion, box: Box) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    rr, cc = np.mgrid[int(box.y) : int(box.y + box.height), int(box.x) : int(box.x + box.width)]
    inside = lesion_rho(lesion, rr + 0.5, cc + 0.5) < 1.0
    return rr[inside], cc[inside]


def place_lesions(
    rng: np.random.Generator,
    lesions: LesionParams,
    lung_work: BoolArray,
    native_shape: tuple[int, int],
    spacing_mm: float,
) -> tuple[tuple[Lesion, Box], ...]:
    """Drop lesions into the aerated lung, each wholly inside it and apart from the others."""
    count = draw_lesion_count(rng, lesions)
    candidates = np.flatnonzero(lung_work)
    placed: list[tuple[Lesion, Box]] = []
    for _ in range(count):
        shape = draw_lesion(rng, lesions, spacing_mm)
        for _attempt in range(60):
            if candidates.size == 0:
                break
            flat = int(candidates[int(rng.integers(candidates.size))])
            wr, wc = divmod(flat, lung_work.shape[1])
            row, col = 2.0 * wr + 2.0 * rng.random(), 2.0 * wc + 2.0 * rng.random()
            lesion = replace(shape, row=row, col=col)
            box = lesion_box(lesion, native_shape)
            if box is None:
                continue
            if any(
                np.hypot(row - o.row, col - o.col) < lesion.reach_px + o.reach_px for o, _ in placed
            ):
                continue
            rr, cc = _support(lesion, box)
            if lung_work[rr // 2, cc // 2].all():
                placed.append((lesion, box))
                break
    return tuple(placed)


def add_lesions(path_cm: FloatArray, lesions: Sequence[tuple[Lesion, Box]]) -> FloatArray:
    """Each lesion adds density x chord on the work grid: a lobulated sphere with a soft edge."""
    out = path_cm.copy()
    for lesion, box in lesions:
        r0, c0 = int(box.y) // 2, int(box.x) // 2
        r1, c1 = -(-int(box.y + box.height) // 2), -(-int(box.x + box.width) // 2)
        rr, cc = np.mgrid[r0:r1, c0:c1]
        rho = lesion_rho(lesion, 2.0 * rr + 1.0, 2.0 * cc + 1.0)
        chord_cm = 0.1 * lesion.diameter_mm * np.clip(1.0 - rho * rho, 0.0, None) ** lesion.margin
        out[r0:r1, c0:c1] += lesion.density * chord_cm
    return out
