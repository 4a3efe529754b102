"""The patient's random geometry: build (habitus), shared by a patient's images, and the
positions and sizes of the organs and bones in one image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline_steps.synthetic.acquisition import Acquisition


@dataclass(frozen=True)
class Habitus:
    """Patient build, shared by all images of one patient."""

    sex: str  # "M" or "F"
    scale: float  # linear body size relative to an average adult
    thickness_cm: float  # antero-posterior chest thickness
    heart_scale: float


def draw_habitus(rng: np.random.Generator, sex: str) -> Habitus:
    size = rng.normal(1.0 if sex == "M" else 0.94, 0.05)
    return Habitus(
        sex=sex,
        scale=float(np.clip(size, 0.82, 1.12)),
        thickness_cm=float(np.clip(rng.normal(22.5 if sex == "M" else 21.0, 2.0), 17.0, 28.0)),
        heart_scale=float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.2)),
    )


@dataclass(frozen=True)
class Anatomy:
    """Positions (mm, y down from the top of the field, x from the midline, + = image right)."""

    width_mm: float
    height_mm: float
    x0: float
    a_thorax: float
    lung_height: float
    thickness: float
    y_apex: tuple[float, float]  # image-left (patient right) lung, image-right lung
    y_cp: tuple[float, float]
    y_dome: tuple[float, float]
    lung_lateral: tuple[float, float]
    lung_medial: tuple[float, float]
    wall: float
    lung_depth: float
    heart: tuple[float, float, float, float, float]  # x, y, semi-long, semi-short, angle
    knob: tuple[float, float, float]  # aortic knob x, y, radius
    hila: tuple[tuple[float, float], tuple[float, float]]
    carina_y: float
    rib_start: float
    rib_first: float
    rib_growth: float
    rib_drop: float
    rib_half_height: float
    rib_jitter: tuple[float, ...]  # per-rib relative calibre, so the cage is not a grating
    clavicle: tuple[float, float, float, float]  # medial x, medial y, lateral x, lateral y
    breasts: float  # extra soft tissue (cm) at the breast centre, 0 for men
    stomach_gas: float  # air (cm) in the gastric fundus under the left hemidiaphragm


def draw_anatomy(rng: np.random.Generator, acq: Acquisition, habitus: Habitus) -> Anatomy:
    width = acq.cols * acq.pixel_spacing_mm
    height = acq.rows * acq.pixel_spacing_mm
    s = habitus.scale * rng.normal(1.0, 0.015)
    a_thorax = 150.0 * s
    lung_height = 262.0 * s * (0.93 if acq.view == "AP" else 1.0) * rng.normal(1.0, 0.03)
    # Shrink the patient into the field rather than cut lungs off: labels must stay inside.
    fit = min(1.0, 0.46 * width / a_thorax, (height - 70.0) / lung_height)
    a_thorax *= fit
    lung_height *= fit
    s *= fit
    y_apex = max(28.0, (height - lung_height) / 2 - 18.0) + rng.normal(0.0, 5.0)
    y_apex_r, y_apex_l = y_apex, y_apex + rng.normal(3.0, 3.0)
    cp_r = y_apex + lung_height
    cp_l = cp_r + rng.uniform(0.0, 12.0)
    dome_r = y_apex + lung_height * rng.uniform(0.74, 0.82)
    dome_l = dome_r + lung_height * rng.uniform(0.03, 0.07)
    wall = rng.uniform(10.0, 16.0) * s
    lateral = (a_thorax - wall + rng.normal(0, 3.0), a_thorax - wall - 4.0 + rng.normal(0, 3.0))
    medial = (rng.uniform(26.0, 33.0) * s, rng.uniform(27.0, 34.0) * s)
    thickness = habitus.thickness_cm * rng.normal(1.0, 0.02)
    hs = habitus.heart_scale * (1.12 if acq.view == "AP" else 1.0)
    heart = (
        a_thorax * rng.uniform(0.12, 0.18),
        y_apex + lung_height * rng.uniform(0.68, 0.73),
        a_thorax * 0.54 * hs,
        a_thorax * 0.36 * hs,
        np.deg2rad(rng.uniform(32.0, 48.0)),
    )
    hila = (
        (-a_thorax * rng.uniform(0.30, 0.36), y_apex + lung_height * rng.uniform(0.42, 0.48)),
        (a_thorax * rng.uniform(0.32, 0.38), y_apex + lung_height * rng.uniform(0.38, 0.44)),
    )
    rib_first = lung_height * rng.uniform(0.060, 0.066)
    clavicle_shift = -0.06 * lung_height if acq.view == "AP" else 0.0
    breasts = rng.uniform(1.0, 2.5) if habitus.sex == "F" else 0.0
    return Anatomy(
        width_mm=width,
        height_mm=height,
        x0=rng.normal(0.0, 0.02) * a_thorax,
        a_thorax=a_thorax,
        lung_height=lung_height,
        thickness=thickness,
        y_apex=(y_apex_r, y_apex_l),
        y_cp=(cp_r, cp_l),
        y_dome=(dome_r, dome_l),
        lung_lateral=lateral,
        lung_medial=medial,
        wall=wall,
        lung_depth=min(thickness - 5.0, thickness * rng.uniform(0.62, 0.72)),
        heart=heart,
        knob=(a_thorax * rng.uniform(0.13, 0.17), y_apex + lung_height * 0.28, 14.0 * s),
        hila=hila,
        carina_y=y_apex + lung_height * rng.uniform(0.3, 0.35),
        rib_start=y_apex - lung_height * rng.uniform(0.0, 0.03),
        rib_first=rib_first,
        rib_growth=rib_first * rng.uniform(0.05, 0.07),
        rib_drop=lung_height * rng.uniform(0.13, 0.17),
        rib_half_height=rng.uniform(3.8, 4.6) * s,
        rib_jitter=tuple(float(v) for v in rng.normal(1.0, 0.08, 24)),
        clavicle=(
            a_thorax * 0.12,
            y_apex + lung_height * 0.08 + clavicle_shift,
            a_thorax * 0.95,
            y_apex - lung_height * 0.02 + clavicle_shift,
        ),
        breasts=breasts,
        stomach_gas=rng.uniform(0.8, 2.5) if rng.random() < 0.6 else 0.0,
    )
