"""What a DICOM header may declare before any of its pixel data is decompressed: the image pixel
module's values, the size of a frame (pixels and bytes), what a deflated dataset may inflate to, and
a compressed frame's own size. One rule for ingestion, validation and every prediction path:
screening applies it to headers, and the reader (`dicom_io`) again before it decodes.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.filereader import _read_file_meta_info
from pydicom.uid import UID

from pipeline_steps.core.dicom_tags import int_tag

# What one frame may declare, checked from the header before any pixel data is decompressed. The
# side is validation's default cap (params `validate.size_px`: 8192); a chest detector's largest
# images are about 4300 x 4300. At 16 bits a frame holds at most 128 MiB, and decoding one costs
# about six times that in memory (raw, Modality LUT in float32, the preprocessing copies).
MAX_FRAME_PIXELS = 8192 * 8192
MAX_FRAME_BYTES = MAX_FRAME_PIXELS * 2
# A deflated dataset is inflated in memory as a whole; it may hold one frame and a header.
MAX_INFLATED_BYTES = MAX_FRAME_BYTES + (16 << 20)
_INFLATE_STEP = 1 << 20
# PS3.5 8.1.1: Bits Allocated is 1 or a multiple of 8; pydicom decodes up to 64.
_BITS_ALLOCATED = (1, 8, 16, 24, 32, 40, 48, 56, 64)


def pixel_module_problem(ds: Dataset) -> tuple[str, str] | None:
    """Why the header's image pixel module cannot describe a decodable frame within the limits, as
    (`too_large` | `corrupt`, message), or None. Reads only header values: nothing is decoded.

    Raises HeaderValueError (naming the tag) when a value is not an integer.
    """
    rows, cols = int_tag(ds, "Rows", 0) or 0, int_tag(ds, "Columns", 0) or 0
    if rows <= 0 or cols <= 0:
        return "corrupt", f"Rows x Columns {rows}x{cols} describes no image"
    bits = int_tag(ds, "BitsAllocated")
    if bits is None:
        return "corrupt", "pixel data without BitsAllocated cannot be decoded"
    if bits not in _BITS_ALLOCATED:
        return (
            "corrupt",
            f"BitsAllocated {bits} is impossible: pixel data is stored in 1 bit or a multiple of "
            "8 bits (at most 64) per value",
        )
    samples = int_tag(ds, "SamplesPerPixel")
    pixels = rows * cols
    if pixels > MAX_FRAME_PIXELS:
        return (
            "too_large",
            f"Rows x Columns {rows}x{cols} declares {pixels:,} pixels per frame; the limit is "
            f"{MAX_FRAME_PIXELS:,} (refused before decoding)",
        )
    frame_bytes = (pixels * max(samples or 1, 1) * bits + 7) // 8
    if frame_bytes > MAX_FRAME_BYTES:
        return (
            "too_large",
            f"a frame of {rows}x{cols} x {samples or 1} sample(s) x {bits} bits declares "
            f"{frame_bytes:,} bytes; the limit is {MAX_FRAME_BYTES:,} (refused before decoding)",
        )
    if samples is None or samples < 1:
        return (
            "corrupt",
            f"SamplesPerPixel {'missing' if samples is None else samples}: the pixel module is incomplete",
        )
    stored = int_tag(ds, "BitsStored")
    if stored is None or not 1 <= stored <= bits:
        what = "missing" if stored is None else f"{stored}, not within 1..BitsAllocated ({bits})"
        return "corrupt", f"BitsStored {what}: the pixel values cannot be read"
    representation = int_tag(ds, "PixelRepresentation")
    if representation not in (0, 1):
        what = "missing" if representation is None else f"{representation}, neither 0 nor 1"
        return "corrupt", f"PixelRepresentation {what}: the pixel values cannot be read"
    return None


def inflated_size(fh: BinaryIO, limit: int) -> int:
    """Bytes the raw deflate stream from the file position inflates to, counted in steps of
    _INFLATE_STEP and given up past `limit` (so at most that much is ever held)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while chunk := fh.read(_INFLATE_STEP):
        pending = chunk
        while pending:
            total += len(inflater.decompress(pending, _INFLATE_STEP))
            if total > limit:
                return total
            pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    return total


def deflate_bomb(fh: BinaryIO) -> str:
    """pydicom inflates a deflated dataset in memory as a whole, before a header can be looked at:
    what it would inflate to is counted first, without keeping it. Returns why the file is refused
    (it inflates past MAX_INFLATED_BYTES), else "". Leaves `fh` at its start."""
    try:
        if fh.read(132)[128:132] != b"DICM":
            return ""
        syntax = _read_file_meta_info(fh).get("TransferSyntaxUID")
        if not syntax or not UID(str(syntax)).is_deflated:
            return ""
        size = inflated_size(fh, MAX_INFLATED_BYTES)
    except Exception:  # a damaged meta or stream: pydicom's own read reports it
        return ""
    finally:
        fh.seek(0)
    if size > MAX_INFLATED_BYTES:
        return (
            f"the deflated dataset inflates to more than {MAX_INFLATED_BYTES:,} bytes "
            "(refused before inflating it)"
        )
    return ""


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG or JPEG-LS codestream's start-of-frame segment, or None."""
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(frame) and pos < 1 << 20:
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack(">H", frame[pos + 2 : pos + 4])[0]
        # SOF0-15 except DHT (C4), JPG (C8) and DAC (CC); SOF55 (F7) is JPEG-LS.
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if pos + 9 > len(frame):
                return None
            rows, cols = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return (rows, cols) if rows else None  # 0: the height comes later (DNL)
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def _j2k_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG 2000 codestream's SIZ segment (bare or in a JP2 file)."""
    start = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if start < 0 or start + 24 > len(frame):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", frame[start + 8 : start + 24])
    return ysiz - yosiz, xsiz - xosiz


def codestream_mismatch(ds: Dataset, syntax: str) -> str:
    """A compressed frame carries its own size, and the decoder allocates by that, not by Rows and
    Columns; a codestream that declares another size than the header is refused before decoding."""
    uid = UID(syntax) if syntax else None
    if uid is None or not uid.is_transfer_syntax or not uid.is_encapsulated or uid.is_deflated:
        return ""
    if "PixelData" not in ds:
        return ""
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception:
        return ""  # the decoder reports a damaged encapsulation in its own words
    if uid.keyword.startswith("JPEG2000") or uid.keyword.startswith("HTJ2K"):
        size = _j2k_size(frame)
    elif uid.keyword.startswith("JPEG"):
        size = _jpeg_size(frame)
    else:  # RLE: the decoder sizes its output from Rows and Columns
        return ""
    rows, cols = int(ds.Rows), int(ds.Columns)
    if size is not None and size != (rows, cols):
        return (
            f"the compressed frame declares {size[0]}x{size[1]} pixels, the header {rows}x{cols} "
            "(refused before decoding)"
        )
    return ""
