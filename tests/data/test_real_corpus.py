"""The real-world corpus: pydicom's bundled test files (many vendors and encoders), ingested as one folder."""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from pipeline_steps.core.config import IngestParams
from pipeline_steps.core.deid import DEV_PSEUDONYM_KEY
from pipeline_steps.core.dicom_io import read_image
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.screening import REASONS, build_metadata

# The wheel's own files; get_testdata_file is never called because it may try to download.
CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
HAVE_LIBJPEG = (
    importlib.util.find_spec("libjpeg") is not None
)  # pylibjpeg-libjpeg, the `jpeg` extra
NO_LIBJPEG = "pylibjpeg-libjpeg (GPLv3, the optional `jpeg` extra) is not installed"
# JPEG-LS is also decoded by pyjpegls (BSD-3), a default dependency.
HAVE_JPEGLS = HAVE_LIBJPEG or importlib.util.find_spec("jpeg_ls") is not None

# Widened so that MR/CT/NM/... images reach the decoding checks; ABDOMEN stays out on purpose.
WIDE = IngestParams(
    allowed_modalities=("DX", "CR", "MR", "CT", "OT", "NM", "US"),
    allowed_body_parts=("CHEST", "CSPINE", "HEAD", "WHOLE BODY"),
    min_size_px=16,
)

# Each verified by reading the file's header (SOP class, Modality, PhotometricInterpretation,
# SamplesPerPixel, NumberOfFrames, transfer syntax) or its bytes.
EXPECTED = {
    # non-images, including ones read without preamble/meta and ones that do carry pixels
    "rtplan.dcm": "not_image",
    "rtstruct.dcm": "not_image",  # no preamble, no file meta: read with force
    "ExplVR_BigEndNoMeta.dcm": "not_image",  # RT Ion Plan, big endian, no meta
    "ExplVR_LitEndNoMeta.dcm": "not_image",
    "rtdose.dcm": "not_image",  # RT Dose has pixels, but they are a dose grid
    "rtdose_1frame.dcm": "not_image",
    "badVR.dcm": "not_image",  # RT Dose whose NumberOfFrames is '1A'
    "test-SR.dcm": "not_image",
    "reportsi.dcm": "not_image",
    "waveform_ecg.dcm": "not_image",
    "liver_1frame.dcm": "not_image",  # SEG: a label map
    "dicomdirtests/DICOMDIR": "not_image",
    # colour, whatever the encoding
    "ExplVR_BigEnd.dcm": "colour",  # US RGB, big endian
    "SC_rgb_rle.dcm": "colour",
    "SC_rgb_jpeg_dcmtk.dcm": "colour",  # YBR_FULL
    "SC_ybr_full_422_uncompressed.dcm": "colour",  # subsampled: shorter pixel data is legitimate
    "SC_rgb_jpeg.dcm": "colour",  # implicit VR body under an explicit VR syntax
    "SC_rgb_jpeg_gdcm.dcm": "colour",  # colour wins over the missing JPEG Lossless decoder
    "examples_palette.dcm": "colour",  # PALETTE COLOR, 1 sample
    "examples_jpeg2k.dcm": "colour",  # YBR_RCT
    # multi-frame
    "SC_rgb_rle_2frame.dcm": "multiframe",
    "SC_rgb_rle_16bit_2frame.dcm": "multiframe",
    "examples_ybr_color.dcm": "multiframe",  # 30-frame ultrasound cine
    # not DICOM at all
    "README.txt": "not_dicom",
    "crayons.icc": "not_dicom",
    "test1.json": "not_dicom",
    "rtplan.dump": "not_dicom",
    "zipMR.gz": "not_dicom",
    "no_meta.dcm": "not_dicom",  # a stray byte before the dataset; even force=True parses nothing
    # truncated or corrupt
    "MR_truncated.dcm": "corrupt",
    "rtplan_truncated.dcm": "corrupt",
    "nested_priv_SQ.dcm": "corrupt",  # pixel data without Rows/Columns
    "meta_missing_tsyntax.dcm": "corrupt",
    # image objects without pixels
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000000": "no_pixel_data",
    "UN_sequence.dcm": "no_pixel_data",
    # policy
    "examples_overlay.dcm": "body_part_not_allowed",  # MR ABDOMEN
    "JPEGLSNearLossless_08.dcm": "modality_not_allowed",  # no Modality at all
    "CT_small.dcm": None,
    "image_dfl.dcm": None,  # deflated
    "dicomdirtests/77654033/CR1/6154": None,  # extensionless CR, MONOCHROME1
}
NEEDS_LIBJPEG = {
    "JPEG-lossy.dcm": "12-bit JPEG Extended",  # Pillow decodes only 8-bit
    "JPGExtended.dcm": "12-bit JPEG Extended",
}
# Accepted from its header, but no installed plugin decodes its codestream (pylibjpeg: "failed to
# read the header"); preprocess reports it. A header-only check cannot know this.
KNOWN_UNDECODABLE = {"JPEG2000-embedded-sequence-delimiter"}

pytestmark = pytest.mark.skipif(
    not CORPUS.is_dir(), reason=f"{CORPUS} is not in this pydicom wheel"
)


def _image_id(rel: str) -> str:
    return rel[:-4] if rel.endswith(".dcm") else rel


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    images = tmp_path_factory.mktemp("corpus") / "images"
    shutil.copytree(CORPUS, images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns loudly about the deliberately broken files
        metadata, quarantine = build_metadata(images, WIDE, DEV_PSEUDONYM_KEY)
    return images, metadata, quarantine


def test_every_file_is_accounted_for_exactly_once(ingested):
    images, metadata, quarantine = ingested
    files = {f"images/{p.relative_to(images).as_posix()}" for p in images.rglob("*") if p.is_file()}
    assert len(files) > 150  # subfolders and extensionless files are inputs too
    assert len(metadata) + len(quarantine) == len(files)
    assert set(metadata["file"]) | set(quarantine["file"]) == files
    assert not set(metadata["file"]) & set(quarantine["file"])
    assert metadata["image_id"].is_unique and quarantine["image_id"].is_unique
    assert set(quarantine["reason"]) <= set(REASONS)
    assert quarantine["message"].str.len().gt(10).all()


@pytest.mark.parametrize(("name", "reason"), sorted(EXPECTED.items()))
def test_known_files_get_the_right_verdict(ingested, name, reason):
    _, metadata, quarantine = ingested
    image_id = _image_id(name)
    verdicts = quarantine.set_index("image_id")["reason"]
    if reason is None:
        assert image_id in set(metadata["image_id"]), verdicts.get(image_id)
    else:
        assert verdicts.get(image_id) == reason


@pytest.mark.parametrize(("name", "what"), sorted(NEEDS_LIBJPEG.items()))
def test_missing_decoder_is_named_or_the_image_decodes(ingested, name, what):
    images, metadata, quarantine = ingested
    image_id = _image_id(name)
    if HAVE_LIBJPEG:
        row = metadata.set_index("image_id").loc[image_id]
        assert read_image(images / name, 1.0).pixels.shape == (row["rows"], row["columns"])
    else:
        row = quarantine.set_index("image_id").loc[image_id]
        assert row["reason"] == "no_decoder"
        assert "pylibjpeg-libjpeg" in row["message"] and "`jpeg` extra" in row["message"]


def test_jpeg_ls_decodes_with_the_default_dependencies(ingested):
    images, metadata, _ = ingested
    name = "MR_small_jpeg_ls_lossless.dcm"
    assert HAVE_JPEGLS, "pyjpegls is a dependency: the environment is incomplete"
    row = metadata.set_index("image_id").loc[_image_id(name)]
    assert read_image(images / name, 1.0).pixels.shape == (row["rows"], row["columns"])


def test_gzip_is_named_so_the_user_knows_what_to_do(ingested):
    _, _, quarantine = ingested
    assert "gzip" in quarantine.set_index("image_id").loc["zipMR.gz", "message"]


def test_accepted_files_decode_to_their_described_shape(ingested):
    images, metadata, _ = ingested
    failed = set()
    for row in metadata.itertuples():
        try:
            image = read_image(images.parent / row.file, 1.0)
        except DataError:
            failed.add(row.image_id)
            continue
        assert image.pixels.shape == (row.rows, row.columns), row.image_id
        assert image.pixels.dtype == np.float32 and np.isfinite(image.pixels).all()
        assert image.photometric == row.photometric
    assert failed <= KNOWN_UNDECODABLE
    decoded = metadata[~metadata["image_id"].isin(failed)]
    syntaxes = set(decoded["transfer_syntax"])
    assert {
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.2",  # explicit VR big endian
        "1.2.840.10008.1.2.1.99",  # deflated
        "1.2.840.10008.1.2.5",  # RLE lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
    } <= syntaxes


VARIANTS = [
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_padded.dcm",
    pytest.param(
        "MR_small_jpeg_ls_lossless.dcm",
        marks=pytest.mark.skipif(not HAVE_JPEGLS, reason="no JPEG-LS decoder installed"),
    ),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_image_under_every_syntax_decodes_to_identical_pixels(variant):
    reference = read_image(CORPUS / "MR_small.dcm", 1.0)
    other = read_image(CORPUS / variant, 1.0)
    assert reference.pixels.std() > 0  # a real image, not a blank that would match anything
    np.testing.assert_array_equal(other.pixels, reference.pixels)
    # the content hash ignores the syntax, byte order included
    assert other.pixel_sha256 == reference.pixel_sha256


def test_real_header_quirks_are_recorded(ingested):
    images, metadata, _ = ingested
    rows = metadata.set_index("image_id")

    cr = rows.loc["dicomdirtests/77654033/CR1/6154"]
    assert cr["photometric"] == "MONOCHROME1" and not cr["body_part_missing"]
    # CR carries only ImagerPixelSpacing (at the detector): used, and not a fallback
    assert cr["spacing_source"] == "ImagerPixelSpacing" and not cr["spacing_flagged"]
    assert cr["spacing_row_mm"] == pytest.approx(0.1)
    assert read_image(images / "dicomdirtests/77654033/CR1/6154", 1.0).photometric == "MONOCHROME1"

    ds = pydicom.dcmread(CORPUS / "J2K_pixelrep_mismatch.dcm", stop_before_pixels=True)
    j2k = rows.loc["J2K_pixelrep_mismatch"]
    assert j2k["window_count"] == len(ds.WindowCenter) == 3
    assert j2k["window_center"] == float(ds.WindowCenter[0])
    assert j2k["window_width"] == float(ds.WindowWidth[0])

    ct = rows.loc["CT_small"]
    assert ct["modality_lut"] == "rescale" and ct["voi_source"] == "none" and ct["pixel_signed"]
    raw = pydicom.dcmread(CORPUS / "CT_small.dcm").pixel_array
    np.testing.assert_array_equal(read_image(CORPUS / "CT_small.dcm", 1.0).pixels, raw - 1024.0)

    mr = rows.loc["MR_small"]
    assert mr["modality_lut"] == "none" and mr["voi_source"] == "window" and mr["body_part_missing"]
    assert rows.loc["image_dfl", "transfer_syntax"] == "1.2.840.10008.1.2.1.99"


def test_no_patient_identity_from_the_corpus_leaves_ingestion(ingested):
    images, metadata, quarantine = ingested
    identities, manufacturers = set(), set()
    for path in CORPUS.rglob("*"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        manufacturers.add(str(ds.get("Manufacturer", "") or "").strip())
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName"):
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 4 and value.strip("^ ") and not value.isdigit():
                identities.add(value)
    # Some vendors fill InstitutionName with their own name, which is kept as `manufacturer`.
    identities = {v for v in identities if not any(v in m for m in manufacturers)}
    assert len(identities) > 10
    text = metadata.to_csv() + quarantine.to_csv()
    assert not {value for value in identities if value in text}


PIXEL_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
SEQUENCE_END = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm"])
def test_damaged_compressed_copies_are_caught_from_the_header(tmp_path, name):
    blob = (CORPUS / name).read_bytes()
    first_item = blob.index(PIXEL_TAG) + 12  # tag, VR, 2 reserved bytes, undefined length
    assert blob[first_item : first_item + 4] == b"\xfe\xff\x00\xe0"
    end = blob.rfind(SEQUENCE_END)  # these files carry further bytes after it
    images = tmp_path / "images"
    images.mkdir()
    (images / "intact.dcm").write_bytes(blob)
    (images / "cut.dcm").write_bytes(blob[: end - 20])  # inside the last fragment
    (images / "no_end.dcm").write_bytes(blob[:end])  # fragments whole, end marker gone
    broken = bytearray(blob)
    broken[first_item + 1] ^= 0x01  # (FFFE,E000) item tag -> (FEFE,E000)
    (images / "bad_item.dcm").write_bytes(bytes(broken))
    params = IngestParams(
        allowed_modalities=("MR", "NM"), allowed_body_parts=("WHOLE BODY",), min_size_px=16
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metadata, quarantine = build_metadata(images, params, DEV_PSEUDONYM_KEY)
    assert list(metadata["image_id"]) == ["intact"]
    messages = quarantine.set_index("image_id")["message"]
    assert set(quarantine["reason"]) == {"corrupt"}
    assert "truncated" in messages["cut"] and "truncated" in messages["no_end"]
    assert "malformed" in messages["bad_item"]


def test_a_decoder_panic_on_a_damaged_stream_is_a_data_error(tmp_path):
    # pylibjpeg-rle is Rust: on this stream it panics with pyo3's PanicException, a BaseException
    # that `except Exception` misses. The header is intact, so only decoding can find the damage.
    blob = bytearray((CORPUS / "MR_small_RLE.dcm").read_bytes())
    blob[blob.index(PIXEL_TAG) + 40] ^= 0x01  # a byte of the RLE segment header
    path = tmp_path / "rle.dcm"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="cannot be decoded"):
        read_image(path, 1.0)
