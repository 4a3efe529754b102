"""The DICOM reader on tiny synthetic files: header lies, fallbacks, signed pixels, LUTs, odd files."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline_steps.core.config import IngestParams
from pipeline_steps.core.deid import DEV_PSEUDONYM_KEY
from pipeline_steps.core.dicom_io import read_image, scan_header
from pipeline_steps.core.dicom_tags import (
    HeaderValueError,
    missing_decoder,
    resolve_spacing,
    text_tag,
    window_of,
)
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.screening import build_metadata
from tests.conftest import FAKE_PHI

INGEST = IngestParams()


def _rewrite(path, delete=(), **values):
    """Edit a written file: drop tags, set others (what a vendor's header looks like)."""
    ds = pydicom.dcmread(path)
    for keyword in delete:
        delattr(ds, keyword)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _ds(**values):
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("tags", "source", "row_mm", "flagged"),
    [
        ({"PixelSpacing": [0.143, 0.15]}, "PixelSpacing", 0.143, False),
        ({"ImagerPixelSpacing": [0.2, 0.2]}, "ImagerPixelSpacing", 0.2, False),
        ({}, "default", 0.35, True),  # missing
        ({"PixelSpacing": [0.0, 0.0]}, "default", 0.35, True),  # 0.000 as written by real CR units
        (
            {"PixelSpacing": [0.0, 0.0], "ImagerPixelSpacing": [0.2, 0.2]},
            "ImagerPixelSpacing",
            0.2,
            True,
        ),
        ({"PixelSpacing": [7.5, 7.5]}, "default", 0.35, True),  # absurd: > 5 mm per pixel
        ({"PixelSpacing": [0.2, -0.2]}, "default", 0.35, True),
        ({"PixelSpacing": "0.2"}, "default", 0.35, True),  # one value where two belong
    ],
)
def test_spacing_fallbacks_are_declared_and_flagged(tags, source, row_mm, flagged):
    spacing = resolve_spacing(_ds(**tags), default_mm=0.35)
    assert (spacing.source, spacing.row_mm, spacing.flagged) == (source, row_mm, flagged)


def test_multi_valued_window_takes_the_first_and_counts_them():
    window = window_of(_ds(WindowCenter=[40.0, 400.0, -600.0], WindowWidth=[80.0, 1500.0, 1200.0]))
    assert (window.center, window.width, window.count) == (40.0, 80.0, 3)
    assert window_of(_ds()).count == 0 and window_of(_ds()).center is None


def test_multi_valued_window_reaches_image_and_metadata(tmp_path, make_dicom):
    images = tmp_path / "images"
    path = make_dicom(
        images / "w.dcm", extra={"WindowCenter": [1000.0, 2000.0], "WindowWidth": [500.0, 4000.0]}
    )
    image = read_image(path, 0.35)
    assert (image.window.center, image.window.width) == (1000.0, 500.0)
    metadata, _ = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    row = metadata.iloc[0]
    assert (row["window_center"], row["window_width"], row["window_count"]) == (1000.0, 500.0, 2)


def test_signed_pixels_are_sign_extended_from_bits_stored(tmp_path, make_dicom):
    # 12-bit two's complement in 16-bit words; the top nibble holds junk that must be ignored
    stored = np.array([[0x0FFF, 0x0800], [0x07FF, 0xF001]], dtype=np.uint16)
    path = make_dicom(tmp_path / "s.dcm", stored, bits_stored=12, extra={"PixelRepresentation": 1})
    image = read_image(path, 0.35)
    np.testing.assert_array_equal(image.pixels, [[-1.0, -2048.0], [2047.0, 1.0]])


def test_unsigned_pixels_are_masked_to_bits_stored(tmp_path, make_dicom):
    stored = np.array([[0xF123, 0x0FFF]], dtype=np.uint16)
    image = read_image(make_dicom(tmp_path / "u.dcm", stored, bits_stored=12), 0.35)
    np.testing.assert_array_equal(image.pixels, [[0x123, 0xFFF]])


def test_absent_rescale_means_identity_and_is_recorded(tmp_path, make_dicom):
    images = tmp_path / "images"
    stored = np.full((300, 300), 1000, np.uint16)
    path = _rewrite(
        make_dicom(images / "r.dcm", stored, slope=2.0, intercept=-5.0),
        delete=("RescaleSlope", "RescaleIntercept"),
    )
    image = read_image(path, 0.35)
    assert image.modality_lut == "none" and (image.pixels == 1000.0).all()
    metadata, _ = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert metadata.iloc[0]["modality_lut"] == "none"


def test_lone_rescale_slope_is_applied_with_a_zero_intercept(tmp_path, make_dicom):
    stored = np.full((4, 4), 1000, np.uint16)
    path = _rewrite(
        make_dicom(tmp_path / "r.dcm", stored, slope=2.0, intercept=-5.0),
        delete=("RescaleIntercept",),
    )
    image = read_image(path, 0.35)
    assert image.modality_lut == "rescale_partial" and (image.pixels == 2000.0).all()


def test_zero_rescale_slope_is_quarantined_not_flattened(tmp_path, make_dicom):
    images = tmp_path / "images"
    path = make_dicom(images / "z.dcm", slope=0.0)
    with pytest.raises(DataError, match="RescaleSlope"):
        read_image(path, 0.35)
    _, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert list(quarantine["reason"]) == ["corrupt"]


def test_monochrome1_is_recorded_and_left_uninverted(tmp_path, make_dicom):
    stored = np.arange(300 * 300, dtype=np.uint16).reshape(300, 300) % 4096
    image = read_image(make_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"), 0.35)
    assert image.photometric == "MONOCHROME1"
    # inversion happens once, in preprocessing's display transform; the reader keeps modality values
    np.testing.assert_array_equal(image.pixels, stored)


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_sequence_is_kept_for_the_display_transform(tmp_path, make_dicom, vr):
    item = Dataset()
    item.add_new(
        0x00283002, "US", [4, 10, 12]
    )  # LUTDescriptor: 4 entries, first mapped 10, 12 bits
    table = [0, 100, 200, 4095]
    item.add_new(0x00283006, vr, table if vr == "US" else np.array(table, "<u2").tobytes())
    images = tmp_path / "images"
    path = make_dicom(images / "v.dcm", extra={"VOILUTSequence": Sequence([item])})
    image = read_image(path, 0.35)
    assert image.voi_source == "window+voi_lut" and image.voi_lut is not None
    mapped = image.voi_lut(np.array([-50.0, 10.0, 11.0, 12.0, 13.0, 9999.0]))
    np.testing.assert_array_equal(mapped, [0, 0, 100, 200, 4095, 4095])  # clamped at both ends
    metadata, _ = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert metadata.iloc[0]["voi_source"] == "window+voi_lut"


def test_file_without_preamble_or_meta_is_read_with_its_detected_syntax(tmp_path, make_dicom):
    images = tmp_path / "images"
    original = make_dicom(tmp_path / "orig.dcm")
    ds = pydicom.dcmread(original)
    ds.preamble = None
    del ds.file_meta
    images.mkdir()
    bare = images / "bare.dcm"
    ds.save_as(bare, enforce_file_format=False, implicit_vr=False, little_endian=True)
    assert bare.read_bytes()[128:132] != b"DICM"
    header = scan_header(bare)
    assert header.forced and header.transfer_syntax_inferred
    assert header.transfer_syntax == pydicom.uid.ExplicitVRLittleEndian
    np.testing.assert_array_equal(read_image(bare, 0.35).pixels, read_image(original, 0.35).pixels)
    metadata, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert quarantine.empty and bool(metadata.iloc[0]["transfer_syntax_inferred"])


def test_headerless_garbage_is_not_dicom_and_zeros_are_a_broken_dicom(tmp_path, make_dicom):
    images = tmp_path / "images"
    make_dicom(images / "good.dcm")
    (images / "notes.txt").write_text("patient list, do not ingest")
    (images / "zeros.dcm").write_bytes(b"\x00" * 64)
    (images / ".incoming-partial").write_bytes(b"half a copy")  # ingest's temporary: not an input
    metadata, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert list(metadata["image_id"]) == ["good"]
    assert quarantine.set_index("image_id")["reason"].to_dict() == {
        "notes.txt": "not_dicom",
        "zeros": "corrupt",
    }


def test_image_object_without_pixel_data_is_no_pixel_data(tmp_path, make_dicom):
    images = tmp_path / "images"
    _rewrite(make_dicom(images / "np.dcm"), delete=("PixelData",))
    _, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert list(quarantine["reason"]) == ["no_pixel_data"]


def test_pixel_data_shorter_than_described_is_corrupt(tmp_path, make_dicom):
    images = tmp_path / "images"
    path = make_dicom(images / "short.dcm")
    _rewrite(path, PixelData=pydicom.dcmread(path).PixelData[:-2000])
    _, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert list(quarantine["reason"]) == ["corrupt"]
    assert "needs" in quarantine.iloc[0]["message"]


def test_missing_body_part_is_accepted_flagged_and_warned(tmp_path, make_dicom, caplog):
    images = tmp_path / "images"
    _rewrite(make_dicom(images / "nobp.dcm"), delete=("BodyPartExamined",))
    make_dicom(images / "chest.dcm")
    with caplog.at_level(logging.WARNING, logger="pipeline_steps.validate"):
        metadata, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert quarantine.empty
    assert metadata.set_index("image_id")["body_part_missing"].to_dict() == {
        "chest": False,
        "nobp": True,
    }
    assert "nobp" in caplog.text and "BodyPartExamined" in caplog.text


def test_decoder_availability_names_the_missing_plugin():
    assert missing_decoder(pydicom.uid.ExplicitVRLittleEndian) is None
    assert missing_decoder(pydicom.uid.RLELossless) is None
    assert (
        missing_decoder(pydicom.uid.JPEG2000Lossless) is None
    )  # pylibjpeg-openjpeg, a default dependency
    assert "no decoder" in missing_decoder("1.2.3.4.5")
    if not pydicom.pixels.get_decoder(pydicom.uid.JPEGLosslessSV1).is_available:
        message = missing_decoder(pydicom.uid.JPEGLosslessSV1)
        assert "pylibjpeg-libjpeg" in message and "GPLv3" in message and "`jpeg` extra" in message


def test_no_decoder_is_the_last_check_so_it_counts_recoverable_images(tmp_path, make_dicom):
    # A colour JPEG Lossless file is `colour` whatever is installed; only a usable image is `no_decoder`.
    if pydicom.pixels.get_decoder(pydicom.uid.JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed")
    images = tmp_path / "images"
    gray = make_dicom(images / "gray.dcm")
    colour = make_dicom(
        images / "rgb.dcm", photometric="RGB", samples=3, pixels=np.zeros((300, 300, 3), np.uint16)
    )
    for path in (gray, colour):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xd9"])  # headers only matter here
        ds.save_as(path, enforce_file_format=True)
    _, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert quarantine.set_index("image_id")["reason"].to_dict() == {
        "gray": "no_decoder",
        "rgb": "colour",
    }


def _patch(path, old: bytes, new: bytes):
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def test_a_damaged_length_cannot_smuggle_phi_into_an_exported_column(tmp_path, make_dicom):
    # Manufacturer's length grows from 12 to 200 bytes: its value swallows the names, IDs and
    # dates stored after it. Exported text must be valid for its VR, so the file is refused.
    images = tmp_path / "images"
    make_dicom(images / "good.dcm")
    victim = make_dicom(images / "victim.dcm")
    _patch(victim, b"\x08\x00\x70\x00LO\x0c\x00", b"\x08\x00\x70\x00LO\xc8\x00")
    metadata, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert list(metadata["image_id"]) == ["good"]
    assert quarantine.set_index("image_id").loc["victim", "reason"] == "corrupt"
    text = metadata.to_csv() + quarantine.to_csv()
    assert not [value for value in FAKE_PHI.values() if value in text]


def test_a_damaged_tag_cannot_rename_phi_into_an_exported_column(tmp_path, make_dicom):
    # One flipped bit turns (0008,0090) ReferringPhysicianName into (0008,1090)
    # ManufacturerModelName; without a genuine model name the physician would be exported as one.
    images = tmp_path / "images"
    victim = _rewrite(make_dicom(images / "victim.dcm"), delete=("ManufacturerModelName",))
    _patch(victim, b"\x08\x00\x90\x00PN", b"\x08\x00\x90\x10PN")
    metadata, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert metadata.empty
    assert quarantine.iloc[0]["reason"] == "corrupt" and "PN" in quarantine.iloc[0]["message"]
    assert FAKE_PHI["ReferringPhysicianName"] not in metadata.to_csv() + quarantine.to_csv()


@pytest.mark.parametrize(
    ("keyword", "value", "ok"),
    [
        ("Manufacturer", "Acme Imaging", True),
        ("Manufacturer", "A" * 65, False),  # LO holds at most 64 characters
        ("Manufacturer", "Acme\x08\x00\x80\x00LO", False),  # the bytes of a swallowed tag
        ("Modality", "DX", True),
        ("Modality", "DX" * 9, False),  # CS holds at most 16
    ],
)
def test_exported_text_must_be_valid_for_its_vr(keyword, value, ok):
    ds = _ds(**{keyword: value})
    if ok:
        assert text_tag(ds, keyword) == value
    else:
        with pytest.raises(HeaderValueError) as info:
            text_tag(ds, keyword)
        assert value not in str(info.value)  # the message names the tag, never the value


def test_deflated_files_are_read_and_their_truncation_caught_from_the_header(tmp_path, make_dicom):
    images = tmp_path / "images"
    plain = make_dicom(tmp_path / "plain.dcm")
    ds = pydicom.dcmread(plain)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    images.mkdir()
    deflated = images / "deflated.dcm"
    ds.save_as(deflated, enforce_file_format=True)
    data = deflated.read_bytes()
    (images / "cut.dcm").write_bytes(data[: len(data) * 2 // 3])
    metadata, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert list(metadata["image_id"]) == ["deflated"]
    assert quarantine.set_index("image_id").loc["cut", "reason"] == "corrupt"
    np.testing.assert_array_equal(read_image(deflated, 0.35).pixels, read_image(plain, 0.35).pixels)


def test_deflated_file_with_short_pixel_data_is_corrupt(tmp_path, make_dicom):
    # zlib is happy, the dataset is consistent, but the pixels stop early: only a length check sees it.
    images = tmp_path / "images"
    ds = pydicom.dcmread(make_dicom(tmp_path / "plain.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.PixelData = ds.PixelData[:-4000]
    images.mkdir()
    ds.save_as(images / "short.dcm", enforce_file_format=True)
    _, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert list(quarantine["reason"]) == ["corrupt"] and "needs" in quarantine.iloc[0]["message"]


def test_headerless_bytes_that_only_start_like_dicom_are_corrupt(tmp_path, make_dicom):
    # force=True parses nearly anything; without a SOP class or image description it is not trusted.
    images = tmp_path / "images"
    images.mkdir()
    (images / "junk.dcm").write_bytes(b"\x08\x00\x05\x00" + bytes(range(256)))
    _, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert (
        list(quarantine["reason"]) == ["corrupt"] and "no preamble" in quarantine.iloc[0]["message"]
    )


def test_a_renamed_tag_in_implicit_vr_is_caught_by_its_position(tmp_path, make_dicom):
    # Implicit VR stores no VR, so a renamed element cannot be told by it. Four flipped bits turn
    # (0010,0020) PatientID into (0008,0070) Manufacturer; it then sits after (0008,0080) in the file.
    images = tmp_path / "images"
    ds = pydicom.dcmread(make_dicom(tmp_path / "plain.dcm"))
    del ds.Manufacturer
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    images.mkdir()
    victim = images / "victim.dcm"
    ds.save_as(victim, enforce_file_format=True)
    _patch(victim, b"\x10\x00\x20\x00\x0c\x00\x00\x00", b"\x08\x00\x70\x00\x0c\x00\x00\x00")
    metadata, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert metadata.empty and "order" in quarantine.iloc[0]["message"]
    assert FAKE_PHI["PatientID"] not in quarantine.to_csv()


def test_pydicom_never_logs_or_warns_a_malformed_phi_value(tmp_path, make_dicom, caplog):
    # pydicom's read-time validation quotes the value it rejects (UIs, for one); a damaged length
    # can make a UI swallow a name. Here the name sits in the study UID, which is pseudonymized.
    images = tmp_path / "images"
    path = make_dicom(images / "a.dcm", extra={"StudyInstanceUID": "1.2.Testperson^Ada"})
    mode = pydicom.config.settings.reading_validation_mode
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        caplog.clear()  # writing the fixture warned; only reading is on trial
        metadata, _ = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
        read_image(path, 0.35)
    assert len(metadata) == 1
    assert "Testperson" not in caplog.text
    assert not [w for w in caught if "Testperson" in str(w.message)]
    assert pydicom.config.settings.reading_validation_mode == mode  # restored


def _float64_rescale(raw: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """The reference arithmetic: float64, then rounded once to float32 (the reader's old path)."""
    return np.asarray(raw.astype(np.float64) * slope + intercept, dtype=np.float32)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32])
@pytest.mark.parametrize(
    ("slope", "intercept"),
    [(1.0, 0.0), (1.0, -1024.0), (-1.0, 0.0), (2.0, -5.0), (255.0, 3.0), (0.5, 0.25), (1.0, 0.3)],
)
def test_float32_rescale_is_bit_identical_to_float64_arithmetic(dtype, slope, intercept):
    from pipeline_steps.core.dicom_tags import rescale

    info = np.iinfo(dtype)
    if np.dtype(dtype).itemsize <= 2:
        raw = np.arange(int(info.min), int(info.max) + 1).astype(dtype)  # every stored value
    else:  # the extremes, where float32 rounds, and values around 2**24
        edges = [info.min, info.min + 1, -(2**24) - 1, -(2**24), -1, 0, 1, 2**24 + 1, info.max]
        raw = np.array([v for v in edges if info.min <= v <= info.max], dtype=dtype)
    got = rescale(raw, slope, intercept)
    want = _float64_rescale(raw, slope, intercept)
    assert got.dtype == np.float32
    # Bytes, not ==: -0.0 == 0.0, but a different bit pattern would change the cached output.
    assert got.tobytes() == want.tobytes()


def test_read_image_fast_path_equals_the_float64_path_on_files(tmp_path, make_dicom):
    from pipeline_steps.core.dicom_tags import pixel_hash

    rng = np.random.default_rng(3)
    stored = rng.integers(0, 4096, size=(64, 48), dtype=np.uint16)
    stored[0, 0] = 0
    for slope, intercept in ((1.0, 0.0), (1.0, -1024.0), (-1.0, 0.0), (0.5, 7.25)):
        path = make_dicom(
            tmp_path / f"{slope}_{intercept}.dcm", stored, slope=slope, intercept=intercept
        )
        image = read_image(path, 0.35)
        want = _float64_rescale(pydicom.dcmread(path).pixel_array, slope, intercept)
        assert image.pixels.tobytes() == want.tobytes()
        assert image.pixel_sha256 == pixel_hash(stored)
        unhashed = read_image(path, 0.35, hash_pixels=False)
        assert unhashed.pixel_sha256 == ""
        assert unhashed.pixels.tobytes() == image.pixels.tobytes()
