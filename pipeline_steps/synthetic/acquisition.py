"""How each image is taken and encoded: made-up vendors and devices, view, geometry, exposure
and the stored-value encoding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline_steps.core.config import SynthParams

# Made-up vendors and devices (any resemblance to real ones is accidental).


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
