"""Shared fixtures: tiny DICOM files built in code, and throwaway workspaces."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

FAKE_PHI = {
    "PatientName": "Testperson^Ada",
    "PatientID": "MRN-99887766",
    "PatientBirthDate": "19600214",
    "AccessionNumber": "ACC-55501",
    "InstitutionName": "St Example Infirmary",
    "ReferringPhysicianName": "Doctor^Who",
}


def build_dicom(
    path: Path,
    pixels: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    body_part: str = "CHEST",
    spacing: tuple[float, float] | None = (0.35, 0.35),
    patient_id: str = FAKE_PHI["PatientID"],
    bits_stored: int = 12,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = (2048.0, 4096.0),
    samples: int = 1,
    frames: int = 1,
    extra: dict[str, object] | None = None,
) -> Path:
    """Write a minimal but valid single-image DICOM with fake PHI."""
    if pixels is None:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 2**bits_stored, size=(300, 280), dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(path), "series"])
    for key, value in FAKE_PHI.items():
        setattr(ds, key, value)
    ds.PatientID = patient_id
    ds.PatientSex = "F"
    ds.PatientAge = "066Y"
    ds.StudyDate = "20260101"
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.ViewPosition = "PA"
    ds.Manufacturer = "Acme Imaging"
    ds.ManufacturerModelName = "XR-1"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = samples
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if frames > 1:
        ds.NumberOfFrames = frames
    if samples > 1:
        ds.PlanarConfiguration = 0
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def make_dicom() -> Callable[..., Path]:
    return build_dicom


@pytest.fixture(scope="session", autouse=True)
def development_pseudonym_key() -> Iterator[None]:
    """Test data is synthetic: the whole session (and every `radflow` subprocess it starts) uses the
    public development key, explicitly, as `make run` does; a key exported in the shell is ignored so
    that tags and reports read `development`. Tests of the key rules override this with monkeypatch."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADFLOW_PSEUDONYM_DEV_MODE", "1")
        mp.delenv("RADFLOW_PSEUDONYM_KEY", raising=False)
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where TensorFlow sees a GPU; elsewhere they are skipped, saying so."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    from pipeline_steps.core.device_profile import visible_gpus

    if visible_gpus():
        return
    skip = pytest.mark.skip(reason="no GPU visible to TensorFlow (gpu-marked test)")
    for item in gpu_items:
        item.add_marker(skip)
