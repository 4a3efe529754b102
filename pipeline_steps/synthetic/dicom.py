"""DICOM encoding of one synthetic image, with its fake PHI in the headers, and reading that PHI
back out of a folder of files (for leak checks)."""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path

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

from pipeline_steps.synthetic.physics import SynthImage
from pipeline_steps.synthetic.plan import ImageSpec, name_uid

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
_IMPLEMENTATION_VERSION = "RADFLOW_SYNTH1"


def _age_on(birth: date, day: date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


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
    meta.ImplementationClassUID = UID(name_uid(0, "implementation", _IMPLEMENTATION_VERSION))
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
    _set_display_tags(ds, image)
    ds.RescaleType = "US"
    ds.PixelIntensityRelationship = "LOG"
    # +1: lower values mean less X-ray intensity (MONOCHROME1 here); -1 the other way round.
    ds.PixelIntensityRelationshipSign = 1 if acq.monochrome1 else -1
    ds.PresentationLUTShape = "INVERSE" if acq.monochrome1 else "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    _set_pixels(ds, image)
    if acq.rle:
        # pylibjpeg-rle and pydicom's own encoder write the same bytes; the former is ~10x faster.
        encoder = get_encoder(RLELossless)
        plugin = "pylibjpeg" if "pylibjpeg" in encoder.available_plugins else "pydicom"
        ds.compress(RLELossless, encoding_plugin=plugin, generate_instance_uid=False)
    return ds


def _set_display_tags(ds: Dataset, image: SynthImage) -> None:
    """What a reader needs to turn stored values into display intensities (and mm)."""
    acq = image.acquisition
    ds.PixelSpacing = [_ds(acq.pixel_spacing_mm)] * 2
    ds.WindowCenter = _ds(image.window_center)
    ds.WindowWidth = _ds(image.window_width)
    ds.RescaleIntercept = _ds(acq.rescale_intercept)
    ds.RescaleSlope = _ds(acq.rescale_slope)


def _set_pixels(ds: Dataset, image: SynthImage) -> None:
    acq = image.acquisition
    photometric = "MONOCHROME1" if acq.monochrome1 else "MONOCHROME2"
    ds.set_pixel_data(image.stored, photometric, acq.bits_stored, generate_instance_uid=False)


def pixel_dataset(image: SynthImage) -> Dataset:
    """The image alone, uncompressed, with the same pixel and display tags `build_dataset` writes
    and no identity at all: what training reads a streamed study from."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _set_display_tags(ds, image)
    _set_pixels(ds, image)
    return ds


def streamed_dataset(image: SynthImage, seed: int, index: int) -> Dataset:
    """A streamed training study as a DICOM file a viewer opens: the pixel dataset plus its SOP
    class and a UID named after (seed, index). No patient: a streamed study never had one."""
    acq = image.acquisition
    ds = pixel_dataset(image)
    sop_class = (
        DigitalXRayImageStorageForPresentation
        if acq.modality == "DX"
        else ComputedRadiographyImageStorage
    )
    uid = UID(name_uid(seed, "streamed-study", index))
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.Modality = acq.modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = acq.view
    ds.SeriesDescription = f"radflow streamed training study {index} (seed {seed})"
    return ds


def encode_dicom(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


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
