"""Synthetic chest radiographs as DICOM with RSNA-format lesion boxes: the default dataset."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    RLELossless,
)
from scipy import ndimage

from pipeline_steps.core.config import LesionParams, SynthParams

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
U16Array = npt.NDArray[np.uint16]

# Effective attenuation of water for a filtered 85-125 kVp chest beam (mean energy ~55-65 keV).
MU_WATER_PER_CM = 0.20
# Aerated lung is ~0.25 g/cm3, so each cm of lung replaces 0.75 cm of water on the ray.
LUNG_AIR_FRACTION = 0.75
# Extra water-equivalent path per cm of bone beyond the soft tissue it replaces (at ~60 keV).
CORTICAL_EXCESS = 1.8
TRABECULAR_EXCESS = 0.4

LABEL_HEADER = "patientId,x,y,width,height,Target"
IMAGE_ID_PATTERN = re.compile(r"^cxr-[0-9a-f]{16}$")

# Values read back by `collect_phi`. StudyTime is left out on purpose: six digits alone identify
# nobody and would match unrelated numbers in leak checks.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)

# A fixed namespace makes UIDs name-based (UUID v5 under the 2.25 root): same seed, same UID,
# on any machine. pydicom's generate_uid(prefix=None) ignores entropy_srcs and is random.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/radflow/radflow/synth")
_IMPLEMENTATION_VERSION = "RADFLOW_SYNTH1"


# --------------------------------------------------------------------------------------------
# Made-up vendors, sites and names (any resemblance to real ones is accidental)


@dataclass(frozen=True)
class Vendor:
    manufacturer: str
    models: tuple[str, ...]
    modality: str  # DX or CR


VENDORS = (
    Vendor("Aurora Imaging", ("AuroraDR 700", "AuroraDR Flex"), "DX"),
    Vendor("Kestrel Medical Systems", ("KCR-350", "KCR-500 Duo"), "CR"),
    Vendor("Northwind Radiology", ("NW Vista DX", "NW Vista Mobile"), "DX"),
    Vendor("Meridian X-Ray", ("MeriDR 3",), "DX"),
    Vendor("Halvorsen Diagnostics", ("HCR-12 Reader",), "CR"),
)

INSTITUTIONS = (
    ("Riverbend General Hospital", "RB"),
    ("St. Aldric Medical Center", "SA"),
    ("Northgate University Hospital", "NG"),
    ("Lakeshore Community Hospital", "LS"),
    ("Mount Calder Regional Clinic", "MC"),
)

FAMILY_NAMES = (
    "Abernathy", "Alvarez", "Bakker", "Brennan", "Castellano", "Chowdhury", "Dalton", "Delacroix",
    "Eriksen", "Fairbanks", "Fitzgerald", "Gallagher", "Grunewald", "Haddad", "Holloway",
    "Ibarra", "Jankowski", "Kaminski", "Kowalczyk", "Lindqvist", "Marchetti", "McAllister",
    "Nakamura", "Novak", "Okafor", "Oyelaran", "Pellegrini", "Quintero", "Radcliffe",
    "Saarinen", "Sandoval", "Thorsen", "Underwood", "Vasquez", "Whitfield", "Yamada",
    "Zielinski", "Ashworth", "Beaumont", "Carrington",
)  # fmt: skip
GIVEN_NAMES = {
    "M": (
        "Aaron", "Benedikt", "Carlos", "Dmitri", "Elias", "Farid", "Gavin", "Henrik", "Idris",
        "Jonah", "Kenji", "Lorenzo", "Mateo", "Nikolai", "Oscar", "Pavel", "Rafael", "Samuel",
        "Tobias", "Viktor", "Walter", "Yusuf",
    ),
    "F": (
        "Adaeze", "Beatrix", "Camille", "Dagny", "Elena", "Freya", "Greta", "Hana", "Ingrid",
        "Josephine", "Katarina", "Leonora", "Marisol", "Nadia", "Olena", "Priya", "Rosalind",
        "Sofia", "Theodora", "Ursula", "Valentina", "Yara",
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Typed records


@dataclass(frozen=True)
class Box:
    """A lesion's bounding box in native pixel coordinates (x, y = top-left corner)."""

    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Habitus:
    """Patient build, shared by all images of one patient."""

    sex: str  # "M" or "F"
    scale: float  # linear body size relative to an average adult
    thickness_cm: float  # antero-posterior chest thickness
    heart_scale: float


@dataclass(frozen=True)
class Acquisition:
    """How one image was taken and encoded."""

    modality: str
    manufacturer: str
    model: str
    view: str  # PA or AP
    rows: int
    cols: int
    pixel_spacing_mm: float  # in the patient plane
    imager_pixel_spacing_mm: float  # at the detector
    bits_stored: int
    monochrome1: bool
    rescale_slope: float
    rescale_intercept: float
    photons_per_pixel: float
    kvp: float
    scatter_to_primary: float
    range_compression: float  # share of the large-scale log signal the vendor subtracts
    edge_enhancement: float  # unsharp-mask gain at ~3 mm
    log_range: tuple[float, float]  # attenuation (-ln I/I0) mapped onto 0..2**bits-1
    rle: bool

    @property
    def max_stored(self) -> int:
        return int(2**self.bits_stored - 1)


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


@dataclass(frozen=True)
class SynthImage:
    """One synthesized radiograph: stored pixel values, boxes and what display needs."""

    stored: U16Array  # rows x cols, values < 2**bits_stored
    boxes: tuple[Box, ...]
    lesions: tuple[Lesion, ...]
    window_center: float  # rescaled units
    window_width: float
    acquisition: Acquisition
    lung_mask_work: BoolArray  # half resolution: aerated lung where a lesion may sit
    mediastinum_mask_work: BoolArray

    def lung_mask(self) -> BoolArray:
        return _upsample_mask(self.lung_mask_work, self.stored.shape)

    def mediastinum_mask(self) -> BoolArray:
        return _upsample_mask(self.mediastinum_mask_work, self.stored.shape)


@dataclass(frozen=True)
class Patient:
    index: int
    name: str
    patient_id: str
    sex: str
    birth_date: date
    institution: str
    institution_code: str
    habitus: Habitus


@dataclass(frozen=True)
class ImageSpec:
    """Everything that identifies one image before its pixels exist."""

    index: int
    seed: int
    image_id: str
    patient: Patient
    study_date: date
    study_time: str
    accession: str
    referring_physician: str
    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True)
class SynthSummary:
    n_images: int
    n_patients: int
    n_positive: int
    n_boxes: int
    labels_path: Path
    images_dir: Path


# --------------------------------------------------------------------------------------------
# Small numeric helpers


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


def _upsample2(a: FloatArray, shape: tuple[int, int]) -> FloatArray:
    """Bilinear x2 upsampling of the first two axes, pixel-area aligned, cropped to `shape`.

    Written with in-place updates because it runs on the full native image; keeps the dtype.
    """
    h, w = a.shape[:2]
    rows = np.empty((2 * h,) + a.shape[1:], a.dtype)
    even, odd = rows[0::2], rows[1::2]
    np.multiply(a, 0.75, out=even)
    even[1:] += 0.25 * a[:-1]
    even[:1] += 0.25 * a[:1]
    np.multiply(a, 0.75, out=odd)
    odd[:-1] += 0.25 * a[1:]
    odd[-1:] += 0.25 * a[-1:]
    out = np.empty((2 * h, 2 * w) + a.shape[2:], a.dtype)
    even, odd = out[:, 0::2], out[:, 1::2]
    np.multiply(rows, 0.75, out=even)
    even[:, 1:] += 0.25 * rows[:, :-1]
    even[:, :1] += 0.25 * rows[:, :1]
    np.multiply(rows, 0.75, out=odd)
    odd[:, :-1] += 0.25 * rows[:, 1:]
    odd[:, -1:] += 0.25 * rows[:, -1:]
    return out[: shape[0], : shape[1]]


def _upsample_mask(mask: BoolArray, shape: tuple[int, ...]) -> BoolArray:
    return np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)[: shape[0], : shape[1]]


def _block_mean(a: FloatArray, factor: int) -> FloatArray:
    h, w = -(-a.shape[0] // factor), -(-a.shape[1] // factor)
    padded = np.pad(a, ((0, h * factor - a.shape[0]), (0, w * factor - a.shape[1])), mode="edge")
    return padded.reshape(h, factor, w, factor).mean(axis=(1, 3))


def _power_law_noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    spacing_mm: float,
    beta: float,
    cutoff_mm: float,
) -> FloatArray:
    """Zero-mean, unit-variance Gaussian field with a 1/f^beta power spectrum (anatomical noise)."""
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0], d=spacing_mm)[:, None]
    fx = np.fft.rfftfreq(shape[1], d=spacing_mm)[None, :]
    f2 = fy * fy + fx * fx + (1.0 / cutoff_mm) ** 2
    field = np.fft.irfft2(np.fft.rfft2(white) * f2 ** (-beta / 4.0), s=shape)
    return np.asarray((field - field.mean()) / (field.std() + 1e-12), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Random draws: acquisition, anatomy, lesions


def draw_acquisition(rng: np.random.Generator, params: SynthParams) -> Acquisition:
    """Device, geometry and encoding of one image."""
    vendor = VENDORS[int(rng.integers(len(VENDORS)))]
    model = vendor.models[int(rng.integers(len(vendor.models)))]
    # Portable AP films are the minority and come from the mobile DR units and CR cassettes.
    view = (
        "AP"
        if rng.random() < (0.35 if "Mobile" in model or vendor.modality == "CR" else 0.1)
        else "PA"
    )
    base_rows, base_cols = params.native_size
    shape_draw = rng.random()
    if shape_draw < 0.2:  # portrait detector
        rows, cols = base_rows, 2 * round(base_cols * 0.875 / 2)
    elif shape_draw < 0.35:  # landscape, for broad patients
        rows, cols = 2 * round(base_rows * 0.875 / 2), base_cols
    else:
        rows, cols = base_rows, base_cols
    imager = round(params.field_of_view_mm / max(base_rows, base_cols) * rng.uniform(0.97, 1.03), 4)
    # PA at 180 cm magnifies the chest ~5 %, AP portable at ~100 cm nearer 10 %.
    magnification = rng.uniform(1.03, 1.07) if view == "PA" else rng.uniform(1.07, 1.10)
    spacing = round(imager / magnification, 4)
    slope, intercept = [
        (1.0, 0.0),
        (1.0, 0.0),
        (0.5, 0.0),
        (2.0, 0.0),
        (1.0, -1024.0),
        (2.0, -1024.0),
    ][int(rng.integers(6))]
    kvp = float(rng.integers(110, 126)) if view == "PA" else float(rng.integers(85, 101))
    return Acquisition(
        modality=vendor.modality,
        manufacturer=vendor.manufacturer,
        model=model,
        view=view,
        rows=int(rows),
        cols=int(cols),
        pixel_spacing_mm=spacing,
        imager_pixel_spacing_mm=imager,
        bits_stored=int(params.bits_stored[int(rng.integers(len(params.bits_stored)))]),
        monochrome1=bool(rng.random() < params.monochrome1_fraction),
        rescale_slope=slope,
        rescale_intercept=intercept,
        photons_per_pixel=float(params.photons_per_pixel * rng.lognormal(0.0, 0.25)),
        kvp=kvp,
        # A grid keeps PA scatter low; bedside AP films are often taken without one.
        scatter_to_primary=rng.uniform(0.15, 0.3) if view == "PA" else rng.uniform(0.35, 0.6),
        range_compression=rng.uniform(0.4, 0.65),
        edge_enhancement=rng.uniform(0.8, 1.6),
        log_range=(rng.uniform(-1.5, -1.2), rng.uniform(6.0, 7.0)),
        rle=bool(rng.random() < params.rle_fraction),
    )


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


# --------------------------------------------------------------------------------------------
# Anatomy as a water-equivalent path-length map


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
    clutter = _power_law_noise(rng, q_shape, 2 * work_spacing_mm, beta=3.0, cutoff_mm=60.0)
    mottle = _power_law_noise(rng, q_shape, 2 * work_spacing_mm, beta=2.0, cutoff_mm=15.0)
    segments = _grow_vessels(rng, anat, lung_eff, work_spacing_mm)
    lung_weight = np.sqrt(np.minimum(lung_eff / anat.lung_depth, 1.0))
    smooth = _upsample2(np.stack([0.08 * mottle, 0.15 * clutter], axis=-1), work_shape)
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


# --------------------------------------------------------------------------------------------
# Physics: exposure, detection, log and quantisation


def _upsample_from(a: FloatArray, factor: int, shape: tuple[int, int]) -> FloatArray:
    """Undo `_block_mean(., factor)` for a power-of-two factor by repeated bilinear doubling."""
    if factor == 1:
        return a[: shape[0], : shape[1]]
    half = (-(-shape[0] // 2), -(-shape[1] // 2))
    return _upsample2(_upsample_from(a, factor // 2, half), shape)


def _blur3(a: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    """Separable (0.2, 0.6, 0.2) kernel with edge replication: the scintillator's light spread."""
    out = 0.6 * a
    out[1:] += 0.2 * a[:-1]
    out[:1] += 0.2 * a[:1]
    out[:-1] += 0.2 * a[1:]
    out[-1:] += 0.2 * a[-1:]
    res = 0.6 * out
    res[:, 1:] += 0.2 * out[:, :-1]
    res[:, :1] += 0.2 * out[:, :1]
    res[:, :-1] += 0.2 * out[:, 1:]
    res[:, -1:] += 0.2 * out[:, -1:]
    return res


def expose(
    rng: np.random.Generator,
    path_cm: FloatArray,
    acq: Acquisition,
    work_spacing_mm: float,
) -> tuple[FloatArray, FloatArray]:
    """Beer-Lambert, scatter, heel effect, quantum noise, detector blur, log and the vendor's
    image processing.

    Returns (log signal on the native grid, its noise-free counterpart on the work grid).
    """
    shape = path_cm.shape
    mu = MU_WATER_PER_CM * (115.0 / acq.kvp) ** 0.35
    primary = np.exp(-mu * path_cm)
    heel_sign = 1.0 if rng.random() < 0.5 else -1.0
    heel = 1.0 + heel_sign * 0.05 * (np.linspace(-0.5, 0.5, shape[0])[:, None])
    coarse_spacing = 8 * work_spacing_mm
    coarse = _block_mean(primary, 8)
    coarse_heel = _block_mean(np.repeat(heel, 8, axis=1), 8)
    scatter = acq.scatter_to_primary * ndimage.gaussian_filter(
        coarse, 45.0 / coarse_spacing, mode="nearest"
    )
    # "For presentation" images are processed: subtracting part of the large-scale log signal
    # narrows the lung-to-mediastinum range so that vessels and ribs get display contrast.
    large_scale = ndimage.gaussian_filter(
        -np.log((coarse + scatter) * coarse_heel), 40.0 / coarse_spacing, mode="nearest"
    )
    smooth = _upsample_from(
        np.stack([scatter, acq.range_compression * (large_scale - 2.5)], axis=-1), 8, shape
    )
    transmission = (primary + smooth[..., 0]) * heel
    raw = -np.log(transmission)
    # Unsharp masking at vessel scale, as vendors do; applied to the expected signal only, so
    # it sharpens anatomy without also amplifying the quantum noise.
    blurred = ndimage.gaussian_filter(_block_mean(raw, 2), 3.0 / (2 * work_spacing_mm))
    offset = smooth[..., 1] - acq.edge_enhancement * (raw - _upsample2(blurred, shape))
    clean = raw - offset

    # Float32 is enough for the expected counts and their noise; only +, *, sqrt are used on
    # it, which round identically on every IEEE machine, so the bytes stay reproducible.
    stack = np.stack([transmission, offset], axis=-1).astype(np.float32)
    native = _upsample2(stack, (acq.rows, acq.cols))  # type: ignore[arg-type]
    expected = np.float32(acq.photons_per_pixel) * native[..., 0]
    # Counts are in the thousands (hundreds behind the heart), where a Gaussian with variance
    # equal to the mean is Poisson to within rounding; it is also ~3x faster to draw.
    # Drawn in float64: the float32 ziggurat consults libm's expf, which may differ by an ulp
    # between C libraries and so change which draws are accepted.
    noise = rng.standard_normal(expected.shape).astype(np.float32)
    counts = _blur3(expected + np.sqrt(expected) * noise)
    signal = -np.log(np.maximum(counts.astype(np.float64), 0.5) / acq.photons_per_pixel)
    return signal - native[..., 1], clean


def quantize(signal: FloatArray, acq: Acquisition) -> U16Array:
    """Map the log signal onto 0..2**BitsStored-1; MONOCHROME1 stores the inverse of MONOCHROME2.

    `log_range` is the inverse of the rescale: stored x slope + intercept is then linear in the
    log signal (in each vendor's own units, as on real devices).
    """
    lo, hi = acq.log_range
    top = acq.max_stored
    mono2 = np.clip(np.rint((signal - lo) / (hi - lo) * top), 0, top).astype(np.uint16)
    return (top - mono2).astype(np.uint16) if acq.monochrome1 else mono2


def display_window(clean: FloatArray, path: PathMap, acq: Acquisition) -> tuple[float, float]:
    """WindowCenter/Width in rescaled units: from the darkest lung to the dense mediastinum."""
    lung = clean[::2, ::2][path.lung_mask[::2, ::2]]
    dense = clean[::2, ::2][path.mediastinum_mask[::2, ::2]]
    lo_att = float(np.percentile(lung, 0.5)) if lung.size else float(clean.min())
    hi_att = float(np.percentile(dense, 98.0)) if dense.size else float(clean.max())
    span = hi_att - lo_att
    lo_att, hi_att = lo_att - 0.15 * span, hi_att + 0.02 * span
    lo, hi = acq.log_range
    top = acq.max_stored
    s_lo, s_hi = ((a - lo) / (hi - lo) * top for a in (lo_att, hi_att))
    if acq.monochrome1:
        s_lo, s_hi = top - s_hi, top - s_lo
    r_lo = acq.rescale_slope * s_lo + acq.rescale_intercept
    r_hi = acq.rescale_slope * s_hi + acq.rescale_intercept
    return round((r_lo + r_hi) / 2.0, 2), round(r_hi - r_lo, 2)


def synthesize_image(
    rng: np.random.Generator, acq: Acquisition, habitus: Habitus, params: SynthParams
) -> SynthImage:
    """One radiograph. Draws from `rng` in an order that does not depend on the encoding choices."""
    anat = draw_anatomy(rng, acq, habitus)
    work_shape = (-(-acq.rows // 2), -(-acq.cols // 2))
    work_spacing = 2.0 * acq.pixel_spacing_mm
    path = render_path_map(rng, anat, work_shape, work_spacing, params.texture)
    placed = place_lesions(
        rng, params.lesions, path.lung_mask, (acq.rows, acq.cols), acq.pixel_spacing_mm
    )
    path_cm = add_lesions(path.path_cm, placed)
    signal, clean = expose(rng, path_cm, acq, work_spacing)
    center, width = display_window(clean, path, acq)
    return SynthImage(
        stored=quantize(signal, acq),
        boxes=tuple(box for _, box in placed),
        lesions=tuple(lesion for lesion, _ in placed),
        window_center=center,
        window_width=width,
        acquisition=acq,
        lung_mask_work=path.lung_mask,
        mediastinum_mask_work=path.mediastinum_mask,
    )


def to_display(image: SynthImage) -> FloatArray:
    """Rescale, window and (for MONOCHROME1) invert: 0 = black, 1 = white, as a viewer shows it."""
    acq = image.acquisition
    rescaled = image.stored.astype(np.float64) * acq.rescale_slope + acq.rescale_intercept
    low = image.window_center - image.window_width / 2.0
    shown = np.clip((rescaled - low) / image.window_width, 0.0, 1.0)
    return 1.0 - shown if acq.monochrome1 else shown


# --------------------------------------------------------------------------------------------
# Patients, studies and identifiers


def _uid(seed: int, *parts: object) -> str:
    name = ":".join(str(p) for p in ("radflow-synth", seed, *parts))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def image_id_for(seed: int, index: int) -> str:
    """Opaque file stem: neither PHI nor a DICOM UID."""
    digest = hashlib.sha256(f"radflow-synth-image:{seed}:{index}".encode()).hexdigest()
    return f"cxr-{digest[:16]}"


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _person(rng: np.random.Generator, sex: str) -> str:
    family = FAMILY_NAMES[int(rng.integers(len(FAMILY_NAMES)))]
    given = GIVEN_NAMES[sex][int(rng.integers(len(GIVEN_NAMES[sex])))]
    return f"{family}^{given}"


def plan_dataset(params: SynthParams, n_images: int, seed: int) -> tuple[ImageSpec, ...]:
    """Group images into patients and give each its identifiers. Patient k's draws depend only
    on (seed, k), so a smaller dataset is a prefix of a larger one."""
    specs: list[ImageSpec] = []
    lo, hi = params.images_per_patient
    k = 0
    while len(specs) < n_images:
        rng = _rng(seed, 1, k)
        sex = "M" if rng.random() < 0.52 else "F"
        institution, code = INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))]
        first_study = date(2014, 1, 1) + timedelta(days=int(rng.integers(0, 3650)))
        age = int(np.clip(rng.normal(58.0, 15.0), 18, 92))
        birth = first_study - timedelta(days=int(365.25 * age + rng.integers(0, 365)))
        patient = Patient(
            index=k,
            name=_person(rng, sex),
            patient_id=f"{code}{10_000_000 + k * 7_919 + int(rng.integers(7_919)):08d}",
            sex=sex,
            birth_date=birth,
            institution=institution,
            institution_code=code,
            habitus=draw_habitus(rng, sex),
        )
        study_date = first_study
        for _ in range(min(int(rng.integers(lo, hi + 1)), n_images - len(specs))):
            i = len(specs)
            seconds = int(rng.integers(7 * 3600, 20 * 3600))
            serial = 1_000_000 + i * 97 + int(rng.integers(97))  # unique per image
            specs.append(
                ImageSpec(
                    index=i,
                    seed=seed,
                    image_id=image_id_for(seed, i),
                    patient=patient,
                    study_date=study_date,
                    study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
                    accession=f"A{study_date.year % 100:02d}{serial}",
                    referring_physician=_person(rng, "M" if rng.random() < 0.5 else "F"),
                    study_uid=_uid(seed, "study", i),
                    series_uid=_uid(seed, "series", i),
                    sop_uid=_uid(seed, "sop", i),
                )
            )
            study_date += timedelta(days=int(rng.integers(14, 700)))
        k += 1
    return tuple(specs)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator behind image `index`: independent of every other image and of order."""
    return _rng(seed, 2, index)


def synthesize_for(spec: ImageSpec, params: SynthParams) -> SynthImage:
    """The image of one planned spec; depends only on (seed, index) and the params."""
    rng = image_rng(spec.seed, spec.index)
    acq = draw_acquisition(rng, params)
    return synthesize_image(rng, acq, spec.patient.habitus, params)


# --------------------------------------------------------------------------------------------
# DICOM encoding


def _ds(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def build_dataset(image: SynthImage, spec: ImageSpec) -> Dataset:
    """The DICOM dataset (file meta included) for one image, compressed when the draw said RLE."""
    acq = image.acquisition
    sop_class = (
        DigitalXRayImageStorageForPresentation
        if acq.modality == "DX"
        else ComputedRadiographyImageStorage
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(spec.sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(_uid(0, "implementation", _IMPLEMENTATION_VERSION))
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    patient = spec.patient
    study_date = spec.study_date.strftime("%Y%m%d")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = spec.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = spec.study_time
    ds.AccessionNumber = spec.accession
    ds.Modality = acq.modality
    if acq.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = acq.manufacturer
    ds.InstitutionName = patient.institution
    ds.ReferringPhysicianName = spec.referring_physician
    ds.StudyDescription = f"XR CHEST {acq.view}"
    ds.SeriesDescription = f"CHEST {acq.view}"
    ds.ManufacturerModelName = acq.model
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{_age_on(patient.birth_date, spec.study_date):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = _ds(acq.kvp)
    source_to_detector = 1800.0 if acq.view == "PA" else 1000.0
    magnification = acq.imager_pixel_spacing_mm / acq.pixel_spacing_mm
    ds.DistanceSourceToDetector = _ds(source_to_detector)
    ds.DistanceSourceToPatient = _ds(round(source_to_detector / magnification, 1))
    ds.EstimatedRadiographicMagnificationFactor = _ds(round(magnification, 4))
    ds.ImagerPixelSpacing = [_ds(acq.imager_pixel_spacing_mm)] * 2
    ds.ViewPosition = acq.view
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.PixelSpacing = [_ds(acq.pixel_spacing_mm)] * 2
    ds.WindowCenter = _ds(image.window_center)
    ds.WindowWidth = _ds(image.window_width)
    ds.RescaleIntercept = _ds(acq.rescale_intercept)
    ds.RescaleSlope = _ds(acq.rescale_slope)
    ds.RescaleType = "US"
    ds.PixelIntensityRelationship = "LOG"
    # +1: lower values mean less X-ray intensity (MONOCHROME1 here); -1 the other way round.
    ds.PixelIntensityRelationshipSign = 1 if acq.monochrome1 else -1
    ds.PresentationLUTShape = "INVERSE" if acq.monochrome1 else "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    photometric = "MONOCHROME1" if acq.monochrome1 else "MONOCHROME2"
    ds.set_pixel_data(image.stored, photometric, acq.bits_stored, generate_instance_uid=False)
    if acq.rle:
        # pylibjpeg-rle and pydicom's own encoder write the same bytes; the former is ~10x faster.
        encoder = get_encoder(RLELossless)
        plugin = "pylibjpeg" if "pylibjpeg" in encoder.available_plugins else "pydicom"
        ds.compress(RLELossless, encoding_plugin=plugin, generate_instance_uid=False)
    return ds


def encode_dicom(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Labels


def format_labels(results: Sequence[tuple[str, Sequence[Box]]]) -> str:
    """RSNA Pneumonia Detection CSV: one row per box, negatives as one row with Target 0."""
    lines = [LABEL_HEADER]
    for image_id, boxes in results:
        if not boxes:
            lines.append(f"{image_id},,,,,0")
        for b in sorted(boxes, key=lambda b: (b.y, b.x)):
            lines.append(f"{image_id},{b.x:.1f},{b.y:.1f},{b.width:.1f},{b.height:.1f},1")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Edges: files


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _render_and_write(
    spec: ImageSpec, params: SynthParams, images_dir: Path
) -> tuple[str, tuple[Box, ...]]:
    image = synthesize_for(spec, params)
    _write_atomic(images_dir / f"{spec.image_id}.dcm", encode_dicom(build_dataset(image, spec)))
    return spec.image_id, image.boxes


def _render_and_write_packed(
    job: tuple[ImageSpec, SynthParams, Path],
) -> tuple[str, tuple[Box, ...]]:
    return _render_and_write(*job)


def generate_dataset(
    params: SynthParams,
    out_dir: Path,
    n_images: int | None = None,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> SynthSummary:
    """Write `out_dir/images/<image_id>.dcm` and `out_dir/labels.csv`.

    The bytes depend only on (params, n_images, seed): not on `workers`, the machine or the clock.
    `workers > 1` uses spawned processes, so a calling script needs the usual
    `if __name__ == "__main__":` guard.
    """
    n = params.n_images if n_images is None else n_images
    s = params.seed if seed is None else seed
    specs = plan_dataset(params, n, s)
    images_dir = Path(out_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    wanted = {f"{spec.image_id}.dcm" for spec in specs}
    # A rerun with fewer images must not leave the previous run's files in the dataset.
    for old in images_dir.glob("cxr-*.dcm"):
        if old.name not in wanted and IMAGE_ID_PATTERN.match(old.stem):
            old.unlink()

    def results() -> Iterator[tuple[str, tuple[Box, ...]]]:
        if workers <= 1:
            for spec in specs:
                yield _render_and_write(spec, params, images_dir)
            return
        context = multiprocessing.get_context("spawn")  # callers may hold threads (Prefect)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            jobs = [(spec, params, images_dir) for spec in specs]
            yield from pool.map(_render_and_write_packed, jobs, chunksize=4)

    done: list[tuple[str, tuple[Box, ...]]] = []
    for result in results():
        done.append(result)
        if progress is not None:
            progress(len(done), n)
    labels_path = Path(out_dir) / "labels.csv"
    _write_atomic(labels_path, format_labels(done).encode())
    return SynthSummary(
        n_images=len(done),
        n_patients=len({spec.patient.index for spec in specs}),
        n_positive=sum(1 for _, boxes in done if boxes),
        n_boxes=sum(len(boxes) for _, boxes in done),
        labels_path=labels_path,
        images_dir=images_dir,
    )


def collect_phi(images_dir: Path) -> set[str]:
    """Every non-empty PHI value (PHI_KEYWORDS) in the headers of the DICOM files under a folder."""
    values: set[str] = set()
    for path in sorted(Path(images_dir).rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in PHI_KEYWORDS:
            value = str(ds.get(keyword, "") or "").strip()
            if value:
                values.add(value)
        meta_uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
        if meta_uid:
            values.add(meta_uid)
    return values
