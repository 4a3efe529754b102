"""Reading values out of a DICOM header the same way everywhere: tags that may be damaged, pixel
spacing, VOI windows and LUTs, the Modality LUT rescale, which decoder a transfer syntax needs, and
the pixel hash. Pure functions of a pydicom Dataset (or of decoded pixels); no file IO."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    JPEGExtended12Bit,
)

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")

# What each optional decoder adds (pydicom tries gdcm, then pylibjpeg, then Pillow):
# - pylibjpeg-openjpeg (MIT, default): JPEG 2000 and HTJ2K.
# - pylibjpeg-rle (MIT, default): faster RLE; pydicom also decodes RLE by itself.
# - Pillow (MIT-CMU, installed with the stack): JPEG Baseline and 8-bit JPEG Extended, JPEG 2000.
# - pyjpegls (BSD-3, default; CharLS): JPEG-LS.
# - pylibjpeg-libjpeg (GPLv3, the opt-in `jpeg` extra): JPEG Lossless (common for CR/DX),
#   12-bit JPEG Extended and JPEG-LS. python-gdcm (BSD) covers the same syntaxes.
_LIBJPEG_ADVICE = (
    "install pylibjpeg-libjpeg (GPLv3) via the `jpeg` extra (pip install 'radflow[jpeg]'), "
    "or python-gdcm"
)
_JPEGLS_ADVICE = (
    "install pyjpegls (BSD-3, a radflow dependency: the environment is incomplete), "
    "or pylibjpeg-libjpeg via the `jpeg` extra"
)
_OPENJPEG_ADVICE = (
    "install pylibjpeg-openjpeg (a radflow dependency: the environment is incomplete)"
)
_ADVICE = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG_ADVICE,
    "1.2.840.10008.1.2.4.51": _LIBJPEG_ADVICE,
    "1.2.840.10008.1.2.4.57": _LIBJPEG_ADVICE,
    "1.2.840.10008.1.2.4.70": _LIBJPEG_ADVICE,
    "1.2.840.10008.1.2.4.80": _JPEGLS_ADVICE,
    "1.2.840.10008.1.2.4.81": _JPEGLS_ADVICE,
    "1.2.840.10008.1.2.4.90": _OPENJPEG_ADVICE,
    "1.2.840.10008.1.2.4.91": _OPENJPEG_ADVICE,
    "1.2.840.10008.1.2.4.201": _OPENJPEG_ADVICE,
    "1.2.840.10008.1.2.4.202": _OPENJPEG_ADVICE,
    "1.2.840.10008.1.2.4.203": _OPENJPEG_ADVICE,
}


@contextmanager
def values_unvalidated() -> Iterator[None]:
    """Silence pydicom's value validation while radflow reads headers.

    pydicom logs and warns the offending value (a malformed birth date, say), and values may be PHI.
    radflow judges the values it uses itself (`text_tag`, `int_tag`), with messages that name the tag
    only. The setting is process-wide; the previous mode is restored on exit.
    """
    settings = pydicom.config.settings
    previous = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = previous


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
    count: int = 0  # how many windows the header lists; more than one is common, the first is used


@dataclass(frozen=True, eq=False)
class VoiLut:
    """The first item of a VOI LUT Sequence: modality values -> display values in [0, 2**bits - 1]."""

    first_mapped: int
    table: np.ndarray
    bits: int

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        # PS3.3 C.11.2.1.1: inputs below the first mapped value take the first entry, above the last the last.
        index = np.clip(np.rint(pixels) - self.first_mapped, 0, len(self.table) - 1)
        return self.table[index.astype(np.int64)].astype(np.float32)


def _first(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


class HeaderValueError(ValueError):
    """A header value that breaks its VR. The message names the tag, never the value (it may be PHI)."""


# VR maximum lengths (PS3.5 6.2) of the string VRs that radflow exports or quotes.
_MAX_CHARS = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "IS": 12,
    "LO": 64,
    "SH": 16,
    "UI": 64,
}


def int_tag(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """An integer tag, `default` when absent or empty; raises HeaderValueError naming the tag when malformed."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HeaderValueError(f"{keyword} is not an integer: the header is damaged") from None


def text_tag(ds: Dataset, keyword: str) -> str:
    """A string tag that radflow exports or quotes, stripped; "" when absent.

    A damaged length makes a value swallow the elements after it (names, IDs, dates). Such a value
    breaks its VR (too long, or control bytes from the swallowed tags), so it is refused, not exported.
    """
    value = ds.get(keyword)
    if value is None:
        return ""
    text = str(value).strip()
    vr = dictionary_VR(keyword)
    recorded = ds[keyword].VR
    if recorded != vr:
        # In explicit VR a damaged tag number keeps its old VR: a PN under Manufacturer's tag is a
        # renamed name. (Implicit VR files take the dictionary VR, so this cannot be seen there.)
        raise HeaderValueError(
            f"{keyword} is recorded as {recorded}, not {vr}: the header is damaged"
        )
    limit = _MAX_CHARS.get(vr, 64)
    if len(text) > limit or not text.isprintable():
        raise HeaderValueError(f"{keyword} is not valid {vr} text: the header is damaged")
    return text


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
    raw = ds.get("WindowCenter")
    if raw is None or raw == "":
        count = 0
    elif isinstance(raw, pydicom.multival.MultiValue | list | tuple):
        count = len(raw)
    else:
        count = 1
    return Window(_first(raw), _first(ds.get("WindowWidth")), count)


def voi_source_of(window: Window, has_lut: bool) -> str:
    parts = (["window"] if window.center is not None and window.width is not None else []) + (
        ["voi_lut"] if has_lut else []
    )
    return "+".join(parts) or "none"


def voi_source(ds: Dataset) -> str:
    """Which VOI information a header carries: window | voi_lut | window+voi_lut | none."""
    return voi_source_of(window_of(ds), bool(ds.get("VOILUTSequence")))


def voi_lut_of(ds: Dataset) -> VoiLut | None:
    """The first VOI LUT, or None when there is none or it is malformed (the window is used instead)."""
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 65536  # PS3.3: 0 means 2**16 entries
        data = item.LUTData
        if isinstance(data, bytes):
            little = ds.original_encoding[1] is not False
            table = np.frombuffer(data, dtype="<u2" if little else ">u2")
        else:
            table = np.asarray(data if isinstance(data, list | tuple) else list(data))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if len(table) < entries or entries < 1:
        return None
    return VoiLut(first, table[:entries].astype(np.float32), bits)


def modality_lut_of(ds: Dataset) -> tuple[str, float, float]:
    """(source, slope, intercept). A lone slope or intercept is applied with the identity partner."""
    if ds.get("ModalityLUTSequence"):
        return "lut_sequence", 1.0, 0.0
    slope, intercept = _first(ds.get("RescaleSlope")), _first(ds.get("RescaleIntercept"))
    if slope is None and intercept is None:
        return "none", 1.0, 0.0
    source = "rescale" if slope is not None and intercept is not None else "rescale_partial"
    return source, 1.0 if slope is None else slope, 0.0 if intercept is None else intercept


def rescale_problem(ds: Dataset) -> str | None:
    """A rescale that would flatten or poison every pixel (seen in real headers), or None."""
    _, slope, intercept = modality_lut_of(ds)
    return rescale_values_problem(slope, intercept)


def rescale_values_problem(slope: float, intercept: float) -> str | None:
    if slope == 0.0 or not math.isfinite(slope) or not math.isfinite(intercept):
        return f"RescaleSlope {slope} / RescaleIntercept {intercept} would destroy the image"
    return None


def missing_decoder(transfer_syntax: str, bits_stored: int = 0) -> str | None:
    """Why pixels in `transfer_syntax` cannot be decoded with the installed plugins, or None if they can."""
    uid = UID(transfer_syntax)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return (
            f"pydicom has no decoder for {uid.name} ({uid}); convert the file to a supported syntax"
        )
    advice = _ADVICE.get(str(uid), "install a pydicom pixel data plugin for it")
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        return f"no decoder installed for {uid.name} ({uid}): {advice} (pydicom: {missing})"
    if (
        uid == JPEGExtended12Bit
        and bits_stored > 8
        and set(decoder.available_plugins) <= {"pillow"}
    ):
        return f"Pillow decodes only 8-bit {uid.name}, this file has {bits_stored} bits: {advice}"
    return None


def _exact_in_float32(dtype: np.dtype, slope: float, intercept: float) -> bool:
    """Whether every stored value of `dtype`, rescaled, stays an integer below 2**24 in magnitude:
    then float32 arithmetic is exact at each step and equals the float64 result rounded once."""
    if dtype.kind not in "ui" or dtype.itemsize > 2:
        return False
    if not (slope.is_integer() and intercept.is_integer()):
        return False
    info = np.iinfo(dtype)
    largest = max(abs(int(info.min)), abs(int(info.max)))
    return largest * abs(slope) + abs(intercept) < 2**24


def rescale(raw: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values -> modality values (raw * slope + intercept) as float32.

    An identity or integer rescale of 8/16-bit pixels is computed in float32 in place (one buffer
    instead of three float64 temporaries); it is bit-for-bit the float64 result rounded to float32,
    because every intermediate is an integer float32 holds exactly. Anything else goes through
    float64, as the DICOM standard's arithmetic would."""
    if slope == 1.0 and intercept == 0.0 and raw.dtype.kind in "ui" and raw.dtype.itemsize <= 4:
        # int -> float32 rounds once, as int -> float64 (exact for 32 bits) -> float32 does.
        return raw.astype(np.float32)
    if _exact_in_float32(raw.dtype, slope, intercept):
        out = raw.astype(np.float32)
        out *= np.float32(slope)
        # Added even when 0: it turns a -0.0 (0 * negative slope) into +0.0, as float64 does.
        out += np.float32(intercept)
        return out
    return np.asarray(raw.astype(np.float64) * slope + intercept, dtype=np.float32)


def pixel_hash(raw: np.ndarray) -> str:
    """Content hash of the stored pixel values, independent of the transfer syntax (and its byte order)."""
    native = np.ascontiguousarray(raw, dtype=raw.dtype.newbyteorder("="))
    digest = hashlib.sha256()
    digest.update(f"{native.dtype.str}{native.shape}".encode())
    digest.update(native.tobytes())
    return digest.hexdigest()
