"""Synthetic DICOM files: pixel encoding, RLE, header geometry, file format and fake PHI."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    RLELossless,
)

from pipeline_steps.synthetic.dataset import SynthSummary
from pipeline_steps.synthetic.dicom import PHI_KEYWORDS, build_dataset, collect_phi, encode_dicom
from pipeline_steps.synthetic.physics import SynthImage
from pipeline_steps.synthetic.plan import IMAGE_ID_PATTERN, ImageSpec
from tests.unit.synthetic_common import read_headers, small_dataset, small_images


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary]:
    return small_dataset(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def images() -> list[tuple[ImageSpec, SynthImage]]:
    return small_images()


def test_pixel_encoding_fields_and_value_range(dataset, images):
    out, _ = dataset
    stored_by_id = {spec.image_id: image.stored for spec, image in images}
    syntaxes, polarities = set(), set()
    for stem, ds in read_headers(out).items():
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0 and ds.SamplesPerPixel == 1
        assert 10 <= ds.BitsStored <= 14 and ds.HighBit == ds.BitsStored - 1
        pixels = ds.pixel_array  # decodes RLE too
        assert pixels.max() < 2**ds.BitsStored
        np.testing.assert_array_equal(pixels, stored_by_id[stem])
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        polarities.add(ds.PhotometricInterpretation)
        lut = "INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
        assert ds.PresentationLUTShape == lut
    assert syntaxes == {ExplicitVRLittleEndian, RLELossless}
    assert polarities == {"MONOCHROME1", "MONOCHROME2"}


def test_rle_round_trips_and_both_encoders_agree(images):
    spec, image = images[0]
    image = replace(image, acquisition=replace(image.acquisition, rle=True))
    ds = build_dataset(image, spec)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    decoded = pydicom.dcmread(io.BytesIO(encode_dicom(ds))).pixel_array
    np.testing.assert_array_equal(decoded, image.stored)
    # Byte-identical datasets across machines need every RLE encoder to agree.
    plain = build_dataset(replace(image, acquisition=replace(image.acquisition, rle=False)), spec)
    encoded = {}
    for plugin in ("pydicom", "pylibjpeg"):
        copy = pydicom.dcmread(io.BytesIO(encode_dicom(plain)))
        try:
            copy.compress(RLELossless, encoding_plugin=plugin, generate_instance_uid=False)
        except (RuntimeError, ValueError):  # plugin not installed here
            continue
        encoded[plugin] = copy.PixelData
    assert len(set(encoded.values())) == 1


def test_header_geometry_and_file_format(dataset):
    out, _ = dataset
    for path in sorted((out / "images").glob("*.dcm")):
        raw = path.read_bytes()
        assert raw[:128] == b"\0" * 128 and raw[128:132] == b"DICM"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition in {"PA", "AP"}
        expected_class = {
            "DX": DigitalXRayImageStorageForPresentation,
            "CR": ComputedRadiographyImageStorage,
        }[ds.Modality]
        assert ds.SOPClassUID == expected_class == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        pixel, imager = float(ds.PixelSpacing[0]), float(ds.ImagerPixelSpacing[0])
        assert 1.0 < imager / pixel <= 1.1
        assert 300 <= max(ds.Rows, ds.Columns) * imager <= 400  # a ~35 cm detector
        assert float(ds.WindowWidth) > 0 and float(ds.RescaleSlope) in {0.5, 1.0, 2.0}
        assert float(ds.RescaleIntercept) in {0.0, -1024.0}


def test_phi_fields_are_present_consistent_and_collected(dataset):
    out, _ = dataset
    headers = read_headers(out)
    phi = collect_phi(out / "images")
    for stem, ds in headers.items():
        for keyword in PHI_KEYWORDS:
            value = str(ds.get(keyword, ""))
            assert value, f"{stem}: {keyword} is empty"
            assert value in phi
        assert "^" in str(ds.PatientName) and "^" in str(ds.ReferringPhysicianName)
        assert ds.PatientSex in {"M", "F"}
        birth = datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
        study = datetime.strptime(ds.StudyDate, "%Y%m%d").date()
        age = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
        assert ds.PatientAge == f"{age:03d}Y"
        # The file name is opaque: neither a UID nor any PHI value.
        assert IMAGE_ID_PATTERN.match(stem)
        assert not any(value in stem for value in phi if len(value) >= 4)
    labels = (out / "labels.csv").read_text()
    assert not [value for value in phi if len(value) >= 6 and value in labels]
