"""The one DICOM reader shared by validation, preprocessing and prediction: headers, pixels, LUTs, spacing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from pipeline_steps.errors import DataError

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class Spacing:
    """Row/column spacing in mm and the tag it came from (or `default` when no tag was usable)."""

    row_mm: float
    col_mm: float
    source: str  # PixelSpacing | ImagerPixelSpacing | default
    flagged: bool  # a tag was zero/absurd/unparsable, or none was present and the default was used


@dataclass(frozen=True)
class Window:
    center: float | None
    width: float | None


@dataclass(frozen=True)
class DicomImage:
    """Decoded pixels after the Modality LUT, plus what the display transform needs."""

    pixels: np.ndarray  # float32, rows x cols, modality units
    photometric: str
    window: Window
    spacing: Spacing
    pixel_sha256: str


def read_header(path: Path) -> Dataset:
    """Read a header without pixel data. Raises DataError naming the file if it is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for corrupt input
        raise DataError(f"{path.name}: not a readable DICOM file ({type(exc).__name__})") from None


def _first(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def resolve_spacing(ds: Dataset, default_mm: float, max_mm: float = 5.0) -> Spacing:
    """PixelSpacing, else ImagerPixelSpacing, else the declared default. Zero/absurd values are flagged."""
    flagged = False
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        raw = ds.get(tag)
        if raw is None:
            continue
        try:
            row, col = (float(v) for v in raw)
        except (TypeError, ValueError):
            flagged = True
            continue
        if 0.0 < row <= max_mm and 0.0 < col <= max_mm:
            return Spacing(row, col, tag, flagged)
        flagged = True
    # Falling back is never silent: the row is flagged even when the tags were simply absent.
    return Spacing(default_mm, default_mm, "default", True)


def window_of(ds: Dataset) -> Window:
    """The first DICOM window (multi-valued tags are common; the first is the vendor's default)."""
    return Window(_first(ds.get("WindowCenter")), _first(ds.get("WindowWidth")))


def pixel_hash(raw: np.ndarray) -> str:
    """Content hash of the stored pixel values, independent of the transfer syntax."""
    digest = hashlib.sha256()
    digest.update(f"{raw.dtype.str}{raw.shape}".encode())
    digest.update(np.ascontiguousarray(raw).tobytes())
    return digest.hexdigest()


def read_image(path: Path, default_spacing_mm: float) -> DicomImage:
    """Decode a single-frame grayscale image and apply its Modality LUT."""
    try:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array
    except Exception as exc:
        raise DataError(
            f"{path.name}: pixel data cannot be decoded ({type(exc).__name__}: {exc})"
        ) from None
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in GRAYSCALE or raw.ndim != 2:
        raise DataError(
            f"{path.name}: not a single-frame grayscale image ({photometric}, {raw.shape})"
        )
    pixels = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    return DicomImage(
        pixels=pixels,
        photometric=photometric,
        window=window_of(ds),
        spacing=resolve_spacing(ds, default_spacing_mm),
        pixel_sha256=pixel_hash(raw),
    )
