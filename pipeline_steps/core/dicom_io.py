"""The one DICOM reader shared by validation, preprocessing and prediction: opening damaged files,
scanning headers without pixels, decoding pixels through the Modality LUT. Tag values: dicom_tags.

Files and in-memory bytes (an upload, a served request) go through the same reader. What a header
may declare is bounded (`dicom_limits`), and the bound is checked from the header before any pixel
data is decompressed: by screening for every input, and again here before decoding.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pipeline_steps.core.dicom_limits import (
    codestream_mismatch,
    deflate_bomb,
    pixel_module_problem,
)
from pipeline_steps.core.dicom_tags import (
    GRAYSCALE,
    HeaderValueError,
    Spacing,
    VoiLut,
    Window,
    int_tag,
    missing_decoder,
    modality_lut_of,
    pixel_hash,
    rescale,
    rescale_values_problem,
    resolve_spacing,
    text_tag,
    values_unvalidated,
    voi_lut_of,
    voi_source_of,
    window_of,
)
from pipeline_steps.core.errors import DataError

PIXEL_KEYWORDS = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
_MAX_FRAGMENTS = 100_000  # beyond this the fragment walk is left to the decoder


class UnreadableDicom(DataError):
    """A file that cannot be read as DICOM at all; `reason` is `not_dicom`, `corrupt` or
    `too_large` (a deflated dataset that would inflate past MAX_INFLATED_BYTES)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PixelElement:
    """What the header read learned about the pixel data element, without reading its value."""

    keyword: str  # PixelData | FloatPixelData | DoubleFloatPixelData | "" when the file has none
    encapsulated: bool = False
    problem: str = ""  # truncated or malformed, found without decoding


@dataclass(frozen=True)
class Header:
    """A header read with stop_before_pixels, plus what lies where the read stopped."""

    dataset: Dataset
    pixel: PixelElement
    transfer_syntax: str  # declared, or inferred from the encoding when the file meta lacks it
    transfer_syntax_inferred: bool
    forced: bool = False  # read without preamble/`DICM` marker


@dataclass(frozen=True)
class DicomImage:
    """Decoded pixels after the Modality LUT, plus what the display transform needs."""

    pixels: np.ndarray  # float32, rows x cols, modality units
    photometric: str
    window: Window
    spacing: Spacing
    pixel_sha256: str
    voi_lut: VoiLut | None = field(default=None, compare=False)
    modality_lut: str = "none"  # lut_sequence | rescale | rescale_partial | none

    @property
    def voi_source(self) -> str:
        return voi_source_of(self.window, self.voi_lut is not None)


def _starts_with_dataset(head: bytes) -> bool:
    """A file without preamble normally starts with group 0002 (file meta) or 0008 (identification)."""
    if len(head) < 8:
        return False
    return struct.unpack("<H", head[:2])[0] in (0x0002, 0x0008) or head[:2] == b"\x00\x08"


def _open_dataset(fh: BinaryIO, name: str, **read_kwargs: object) -> tuple[Dataset, bool]:
    """dcmread, falling back to force=True only for files that begin like a DICOM dataset."""
    bomb = deflate_bomb(fh)
    if bomb:
        raise UnreadableDicom("too_large", f"{name}: {bomb}")
    head = fh.read(132)
    fh.seek(0)
    try:
        return pydicom.dcmread(fh, **read_kwargs), False  # type: ignore[arg-type]
    except InvalidDicomError:
        if not head[:128].strip(b"\x00"):
            # Zeros are how a DICOM preamble starts; without the marker after them the file was cut
            # short or damaged, so this is a broken DICOM file rather than some other format.
            raise UnreadableDicom(
                "corrupt",
                f"{name}: {len(head)}+ bytes of preamble but no 'DICM' marker (truncated or damaged)",
            ) from None
        if not _starts_with_dataset(head):
            kind = " (gzip-compressed: decompress it first)" if head[:2] == b"\x1f\x8b" else ""
            raise UnreadableDicom(
                "not_dicom",
                f"{name}: not a DICOM file{kind}: no 'DICM' marker and no DICOM tag at the start",
            ) from None
    except (
        Exception
    ) as exc:  # pydicom raises many types for corrupt input; their text may quote values
        raise UnreadableDicom(
            "corrupt", f"{name}: not a readable DICOM file ({type(exc).__name__})"
        ) from None
    fh.seek(0)
    try:
        return pydicom.dcmread(fh, force=True, **read_kwargs), True  # type: ignore[arg-type]
    except Exception as exc:
        raise UnreadableDicom(
            "corrupt",
            f"{name}: no preamble, and the dataset cannot be parsed ({type(exc).__name__})",
        ) from None


def _transfer_syntax(ds: Dataset) -> tuple[str, bool]:
    """The declared transfer syntax, or the one pydicom read the dataset with (then `inferred` is True)."""
    meta = getattr(ds, "file_meta", None)
    declared = meta.get("TransferSyntaxUID") if meta is not None else None
    if declared:
        return str(declared), False
    implicit, little = ds.original_encoding
    if little is False:
        return ("" if implicit else str(ExplicitVRBigEndian)), True
    if implicit is None:
        return "", True
    return str(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian), True


def _native_length(ds: Dataset) -> int | None:
    """Bytes the native pixel data must hold, or None when the description is incomplete."""
    try:
        rows, cols = int_tag(ds, "Rows"), int_tag(ds, "Columns")
        bits = int_tag(ds, "BitsAllocated")
        frames = int_tag(ds, "NumberOfFrames", 1) or 1
        samples = int_tag(ds, "SamplesPerPixel", 1) or 1
    except HeaderValueError:
        return None
    if not rows or not cols or not bits:
        return None
    total = rows * cols * frames * samples * bits
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        total = total * 2 // 3  # chroma is shared by pixel pairs: 4 values per 2 pixels, not 6
    return (total + 7) // 8


def _walk_fragments(fh: BinaryIO, start: int, size: int) -> str:
    """Hop over the encapsulated items by their lengths (8 bytes read per item) to find truncation."""
    pos = start
    for _ in range(_MAX_FRAGMENTS):
        fh.seek(pos)
        item = fh.read(8)
        if len(item) < 8:
            return (
                f"truncated: the encapsulated pixel data stops at byte {pos} without its end marker"
            )
        group, elem, length = struct.unpack("<HHI", item)
        tag = group << 16 | elem
        if tag == _SEQUENCE_END:
            return ""
        if tag != _ITEM:
            return f"malformed encapsulated pixel data: tag ({group:04X},{elem:04X}) at byte {pos}"
        pos += 8 + length
        if pos > size:
            return (
                f"truncated: a pixel data fragment needs {pos - size} more bytes than the file has"
            )
    return ""


def _last_element_misfit(ds: Dataset, size: int) -> str:
    """pydicom stops quietly at end of file, even inside an element; a clean end is where the last value ends."""
    if not len(ds):
        return ""
    last = ds.get_item(list(ds.keys())[-1])
    if not isinstance(last, RawDataElement) or last.length == 0xFFFFFFFF:
        return ""  # sequences are parsed eagerly and fail loudly on their own
    end = last.value_tell + last.length
    if end > size:
        return (
            f"truncated: the header's last element needs {end - size} more bytes than the file has"
        )
    if end < size:
        return f"truncated or damaged: {size - end} stray bytes after the header's last element"
    return ""


def _out_of_order(ds: Dataset) -> str:
    """PS3.5 7.1: elements ascend by tag. A damaged tag number can rename an element (a patient's name
    into a manufacturer, say); the renamed element then sits out of order, which is how it is caught."""
    last = -1
    for tag in sorted(ds.keys()):
        element = ds.get_item(tag)
        position = getattr(element, "value_tell", None) or getattr(element, "file_tell", None)
        if position is None:
            continue
        if position <= last:
            return f"elements out of ascending tag order at {tag}: the header is damaged"
        last = position
    return ""


def _pixel_element(
    fh: BinaryIO, ds: Dataset, stop: int, size: int, native: bool | None
) -> PixelElement:
    """Inspect the bytes where a stop_before_pixels read ended: the pixel data element header, or EOF."""
    fh.seek(stop)
    peek = fh.read(12)
    implicit, little = ds.original_encoding
    if len(peek) < 4:
        problem = _last_element_misfit(ds, size) if not peek else "truncated inside a tag"
        return PixelElement("", problem=problem)
    group, elem = struct.unpack("<HH" if little is not False else ">HH", peek[:4])
    keyword = PIXEL_KEYWORDS.get(group << 16 | elem)
    if keyword is None:
        return PixelElement(
            "", problem=f"header parsing stopped at byte {stop} of {size}, before the end of file"
        )
    end = "<" if little is not False else ">"
    vr = peek[4:6]
    if implicit or not (vr.isalpha() and vr.isupper()):
        # Real writers switch to implicit VR mid-file; pydicom follows them, so must this peek.
        header_len, length_bytes = 8, peek[4:8]
    elif peek[4:6] in _LONG_LENGTH_VRS:
        header_len, length_bytes = 12, peek[8:12]
    else:
        header_len, length_bytes = 8, peek[6:8]
    if len(peek) < header_len:
        return PixelElement(keyword, problem="truncated inside the pixel data element header")
    length = struct.unpack(f"{end}{'H' if len(length_bytes) == 2 else 'I'}", length_bytes)[0]
    start = stop + header_len
    if length == 0xFFFFFFFF:
        if native is True:
            return PixelElement(
                keyword,
                True,
                "encapsulated pixel data under a native (uncompressed) transfer syntax",
            )
        return PixelElement(keyword, True, _walk_fragments(fh, start, size))
    if start + length > size:
        return PixelElement(
            keyword,
            problem=f"truncated: the file ends {start + length - size} bytes into the pixel data",
        )
    expected = _native_length(ds) if native else None
    if expected is not None and length < expected:
        return PixelElement(
            keyword,
            problem=f"pixel data holds {length} bytes; the image description needs {expected}",
        )
    return PixelElement(keyword)


def _inspect(fh: BinaryIO, ds: Dataset, size: int, forced: bool, name: str) -> Header:
    stop = fh.tell()
    syntax, inferred = _transfer_syntax(ds)
    uid = UID(syntax) if syntax else None
    if uid is not None and not uid.is_valid:
        raise UnreadableDicom("corrupt", f"{name}: the Transfer Syntax UID is not a valid UID")
    if uid is not None and uid.is_transfer_syntax and uid.is_deflated:
        # The deflated body is inflated in memory, so the file offset says nothing about the pixel
        # data; this rare syntax gets a second, full read (a header-only read cannot see the pixels).
        fh.seek(0)
        try:
            full = pydicom.dcmread(fh)
        except Exception as exc:
            raise UnreadableDicom(
                "corrupt", f"{name}: deflated dataset is damaged ({type(exc).__name__})"
            ) from None
        pixel = PixelElement(next((kw for tag, kw in PIXEL_KEYWORDS.items() if tag in full), ""))
        expected = _native_length(full)
        if "PixelData" in full and expected is not None and len(full.PixelData) < expected:
            pixel = PixelElement(
                "PixelData",
                problem=f"pixel data holds {len(full.PixelData)} bytes; the image description "
                f"needs {expected} (truncated)",
            )
    else:
        # None: a syntax pydicom does not know, so whether the pixels are compressed is unknown.
        native = (
            None
            if uid is not None and not uid.is_transfer_syntax
            else not uid or not uid.is_encapsulated
        )
        pixel = _pixel_element(fh, ds, stop, size, native)
    disorder = _out_of_order(ds)
    if disorder:
        raise UnreadableDicom("corrupt", f"{name}: {disorder}")
    if forced and not ("SOPClassUID" in ds or "Rows" in ds or pixel.keyword):
        # force=True parses almost anything; trust it only when it found what DICOM objects carry.
        raise UnreadableDicom(
            "corrupt", f"{name}: no preamble, and no SOP class or image description was parsed"
        )
    return Header(ds, pixel, syntax, inferred, forced)


def scan_header(path: Path) -> Header:
    """Read a header once (stop_before_pixels) and inspect, without decoding, the pixel data that follows.

    Raises UnreadableDicom (a DataError) naming the file when it is not DICOM or cannot be parsed.
    """
    try:
        size = path.stat().st_size
        fh = path.open("rb")
    except OSError as exc:
        raise UnreadableDicom(
            "corrupt", f"{path.name}: cannot be opened ({type(exc).__name__})"
        ) from None
    with fh:
        return _scan(fh, size, path.name)


def scan_bytes(data: bytes, name: str) -> Header:
    """`scan_header` for a DICOM held in memory (an upload, a served request); `name` is what
    messages call it."""
    with io.BytesIO(data) as fh:
        return _scan(fh, len(data), name)


def _scan(fh: BinaryIO, size: int, name: str) -> Header:
    with values_unvalidated():
        ds, forced = _open_dataset(fh, name, stop_before_pixels=True)
        try:
            return _inspect(fh, ds, size, forced, name)
        except UnreadableDicom:
            raise
        except Exception as exc:
            # pydicom converts values lazily, so a damaged element (an unknown VR, say) raises on
            # first use, with any exception type. Only the type is reported: the text may quote values.
            raise UnreadableDicom(
                "corrupt", f"{name}: header cannot be interpreted ({type(exc).__name__})"
            ) from None


def read_header(path: Path) -> Dataset:
    """Read a header without pixel data. Raises DataError naming the file if it is not DICOM."""
    return scan_header(path).dataset


def read_image(path: Path, default_spacing_mm: float, *, hash_pixels: bool = True) -> DicomImage:
    """Decode a single-frame grayscale image and apply its Modality LUT; the VOI LUT is kept, not applied.

    `hash_pixels=False` skips the SHA-256 of the stored pixels (~1 ms per 2 MB image), leaving
    `pixel_sha256` empty: for callers that key images by file content already (preprocess).
    Raises only DataError (naming the file), so a batch can report a bad file and go on.
    """
    with values_unvalidated():
        try:
            with path.open("rb") as fh:
                ds, _ = _open_dataset(fh, path.name)
        except OSError as exc:
            raise DataError(f"{path.name}: cannot be opened ({type(exc).__name__})") from None
        return decode_dataset(ds, path.name, default_spacing_mm, hash_pixels=hash_pixels)


def read_image_bytes(
    data: bytes, name: str, default_spacing_mm: float, *, hash_pixels: bool = True
) -> DicomImage:
    """`read_image` for a DICOM held in memory; `name` is what messages call it."""
    with values_unvalidated(), io.BytesIO(data) as fh:
        ds, _ = _open_dataset(fh, name)
        return decode_dataset(ds, name, default_spacing_mm, hash_pixels=hash_pixels)


def decode_dataset(
    ds: Dataset, name: str, default_spacing_mm: float, *, hash_pixels: bool = True
) -> DicomImage:
    """`read_image` for a dataset already in memory (e.g. a synthesised study): the same decoding,
    so the same pixels give the same tensor. Raises only DataError, naming `name`."""
    with values_unvalidated():
        try:
            return _decode(ds, name, default_spacing_mm, hash_pixels)
        except DataError:
            raise
        except Exception as exc:  # a damaged element raises on first use, with any exception type
            raise DataError(
                f"{name}: header cannot be interpreted ({type(exc).__name__})"
            ) from None


def _decode(
    ds: Dataset, name: str, default_spacing_mm: float, hash_pixels: bool = True
) -> DicomImage:
    try:
        photometric = text_tag(ds, "PhotometricInterpretation").upper()
        samples = int_tag(ds, "SamplesPerPixel", 1)
        frames = int_tag(ds, "NumberOfFrames", 1) or 1
        bits_stored = int_tag(ds, "BitsStored", 0) or 0
    except HeaderValueError as exc:
        raise DataError(f"{name}: {exc}") from None
    if photometric not in GRAYSCALE or samples != 1 or frames != 1:
        raise DataError(
            f"{name}: not a single-frame grayscale image ({photometric or '?'}, "
            f"{samples} samples, {frames} frames)"
        )
    # Screening refuses these from the header already; the reader holds the same line for callers
    # that decode without screening (preprocess), so no decoder ever sees an unbounded frame.
    try:
        refused = pixel_module_problem(ds)
    except HeaderValueError as exc:
        raise DataError(f"{name}: {exc}") from None
    if refused is not None:
        raise DataError(f"{name}: {refused[1]}")
    syntax, inferred = _transfer_syntax(ds)
    mismatch = codestream_mismatch(ds, syntax)
    if mismatch:
        raise DataError(f"{name}: {mismatch}")
    if inferred and syntax:
        # pydicom decodes only with a declared syntax; a file without one was read natively, so say so.
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    try:
        raw = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        # Rust decoders (pylibjpeg-rle) panic on damaged streams with pyo3's PanicException, which
        # derives from BaseException, so `except Exception` would let one bad file stop the batch.
        gap = missing_decoder(syntax, bits_stored) if syntax else None
        raise DataError(
            f"{name}: pixel data cannot be decoded ({gap or f'{type(exc).__name__}: {exc}'})"
        ) from None
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if raw.ndim != 2 or raw.shape != (rows, cols):
        raise DataError(f"{name}: decoded shape {raw.shape} is not Rows x Columns {rows}x{cols}")
    source, slope, intercept = modality_lut_of(ds)  # read once: each tag access converts its value
    problem = rescale_values_problem(slope, intercept)
    if problem:
        raise DataError(f"{name}: {problem}")
    if source == "lut_sequence":
        modality = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    else:
        modality = rescale(raw, slope, intercept)
    return DicomImage(
        pixels=modality,
        photometric=photometric,
        window=window_of(ds),
        spacing=resolve_spacing(ds, default_spacing_mm),
        pixel_sha256=pixel_hash(raw) if hash_pixels else "",
        voi_lut=voi_lut_of(ds),
        modality_lut=source,
    )
