"""DICOM Structured Reports of predicted boxes for PACS: one TID 1500 measurement report per image,
built with highdicom, that holds each box as a planar ROI on the source image.

`build_sr(source, boxes, prediction_id=, model_name=, model_version=)` returns the SR dataset;
`write_sr(source_path, boxes, ..., out_dir=)` reads the source header and writes
`out_dir/<prediction_id>.dcm`; `read_sr_boxes(sr)` parses the boxes back as
`{x_min, y_min, x_max, y_max, score, label, referenced_sop_instance_uid}`. Boxes are in original
pixel coordinates (x = column, y = row, (0, 0) the top-left corner of the image, as SCOORD has it).
The SR carries the source's patient, study and image UIDs so PACS files it with the study: it may only
be written to the caller's output folder, and no value of it is ever logged or put in a message.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    generate_uid,
)
from pydicom.valuerep import DA, TM

from pipeline_steps.core.dicom_io import read_header
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import atomic_path

BOX_KEYS = ("x_min", "y_min", "x_max", "y_max", "score", "label")
DEVICE_NAME = "radflow"
SERIES_DESCRIPTION = "radflow detections"
# The detector's labels are radflow's own vocabulary (`validate.allowed_labels`), not a reviewed
# mapping to SNOMED or RadLex, so they are coded in a local scheme: PS3.3 8.2 reserves designators
# starting with "99" for those, and the SR declares it in its Coding Scheme Identification Sequence.
LABEL_SCHEME = "99RADFLOW"
# SCT 399208008 "Plain X-ray of chest" (procedure): what the report is about (TID 1500 row 4).
PROCEDURE = Code("399208008", "SCT", "Plain X-ray of chest")
# DCM 111012 "Certainty of Finding" is the CAD concept for how sure a detector is of a finding;
# "Probability" would overstate an uncalibrated score. The raw score is kept, so the unit is
# UCUM "1" (no units) rather than the percent that mammography CAD uses.
SCORE = codes.DCM.CertaintyOfFinding
SCORE_UNIT = codes.UCUM.NoUnits
# An image without boxes still gets a report, so PACS shows that the algorithm ran. highdicom 0.28
# refuses a TID 1500 without measurement groups, so that report holds one image-level group
# (TID 1501) stating DCM 121071 "Finding" = SCT 272519000 "Absent".
NOTHING_FOUND = (codes.DCM.Finding, codes.SCT.Absent)
# The source image must be referable, and these are how it is referred to.
_SOURCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Type 2 attributes (present, may be empty) that highdicom reads from the evidence as attributes:
# a de-identified or minimal header often lacks some, StudyID and StudyTime above all.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
# Reading accepts every SR class that can hold TID 1500 with 2D regions, not only the one written.
_SR_CLASSES: dict[
    str, type[hd.sr.EnhancedSR] | type[hd.sr.ComprehensiveSR] | type[hd.sr.Comprehensive3DSR]
] = {
    EnhancedSRStorage: hd.sr.EnhancedSR,
    ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
    Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
}
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_LO = 64  # characters of a DICOM LO value (names, labels as code meanings)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's value validation, warnings and highdicom's logging while an SR is handled.

    Both quote header values (highdicom warns a one-part PatientName verbatim and logs the source's
    SOP Instance UID), and those may appear only in the SR itself. The settings are process-wide and
    restored on exit; `radflow predict` writes its reports from one thread.
    """
    hd_logger = logging.getLogger("highdicom")
    level = hd_logger.level
    hd_logger.setLevel(logging.CRITICAL + 1)
    try:
        with pydicom.config.disable_value_validation(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hd_logger.setLevel(level)


# --------------------------------------------------------------------------------------------
# Building


def _text(value: str, what: str, prediction_id: str) -> str:
    text = str(value)
    if not text.strip() or len(text) > _MAX_LO or "\\" in text or not text.isprintable():
        raise DataError(
            f"prediction {prediction_id}: {what} must be 1-{_MAX_LO} printable characters without "
            "a backslash (a DICOM LO value); fix the model or label name"
        )
    return text


def _box(box: Mapping[str, Any], index: int, prediction_id: str) -> tuple[np.ndarray, float, str]:
    """The closed rectangle as 5 (column, row) points, the score and the label of one box."""
    where = f"prediction {prediction_id}, box {index}"
    missing = [key for key in BOX_KEYS if key not in box]
    if missing:
        raise DataError(f"{where}: missing {missing}; a box needs {list(BOX_KEYS)}")
    try:
        x0, y0, x1, y1, score = (float(box[key]) for key in BOX_KEYS[:5])
    except (TypeError, ValueError):
        raise DataError(f"{where}: coordinates and score must be numbers") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1, score)):
        raise DataError(f"{where}: coordinates and score must be finite")
    if x0 > x1 or y0 > y1:
        raise DataError(
            f"{where}: x_min > x_max or y_min > y_max; boxes are (x_min, y_min, x_max, y_max)"
        )
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
    return corners, score, _text(box["label"], f"box {index}'s label", prediction_id)


def _label_code(label: str) -> hd.sr.CodedConcept:
    # A label over 16 characters (e.g. pleural_thickening) goes to Long Code Value; highdicom picks.
    return hd.sr.CodedConcept(value=label, scheme_designator=LABEL_SCHEME, meaning=label)


def _parses(kind: type[DA] | type[TM], value: object) -> bool:
    try:
        kind(str(value))
    except (TypeError, ValueError):
        return False
    return True


def _evidence(source: Dataset, prediction_id: str) -> Dataset:
    """A copy of the source header whose Type 2 patient/study attributes highdicom can take."""
    missing = [key for key in _SOURCE_UIDS if not str(source.get(key, "") or "").strip()]
    if missing:
        raise DataError(
            f"prediction {prediction_id}: the source image header has no {', '.join(missing)}, so "
            "an SR cannot reference it; write SRs only for the original (not de-identified) file"
        )
    # A new Dataset: Dataset.copy() shares the element dict, and the caller's header must not change.
    evidence = Dataset()
    for element in source:
        evidence.add(element)
    # Type 2 means present but possibly empty. highdicom reads these as attributes and parses a few,
    # so an absent one (StudyID, StudyTime in minimal headers) or a malformed one (PatientSex "U",
    # a dashed date) would cost the image its SR; they go in empty instead. PACS files the SR by its
    # Study Instance UID, which is copied unchanged.
    for key in _TYPE2:
        if key not in evidence:
            setattr(evidence, key, None)
    if str(evidence.PatientSex or "") not in ("", "M", "F", "O"):
        evidence.PatientSex = None
    for key, kind in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        value = evidence.get(key)
        if value and not _parses(kind, value):
            setattr(evidence, key, None)
    return evidence


def build_sr(
    source: Dataset,
    boxes: Sequence[Mapping[str, Any]],
    *,
    prediction_id: str,
    model_name: str,
    model_version: str,
    series_number: int = 9001,
    instance_number: int = 1,
    manufacturer: str = "radflow",
    sop_instance_uid: str | None = None,
) -> hd.sr.ComprehensiveSR:
    """A TID 1500 Comprehensive SR with one TID 1410 planar ROI group per box, in the source's study.

    `source` is the image header (pixels not needed); `boxes` are dicts with `BOX_KEYS` in original
    pixel coordinates. UIDs are derived from the prediction id, model and study, so rebuilding the
    same prediction gives the same SR instance and all of one model's SRs of a study share a series.
    `sop_instance_uid` overrides the SR's own UID (the PACS watcher's `report_uid`, fixed before the
    prediction is recorded). Raises DataError naming the prediction id (never a header value) on
    unusable input.
    """
    if not _SAFE_ID.fullmatch(str(prediction_id)):
        raise DataError(
            "a prediction id must be 1-128 letters, digits, '.', '_' or '-' (it names the SR file); "
            "use ids from prediction.new_prediction_id"
        )
    name = _text(model_name, "the model name", prediction_id)
    version = _text(model_version, "the model version", prediction_id)
    maker = _text(manufacturer, "the manufacturer", prediction_id)
    if series_number < 1 or instance_number < 1:
        raise DataError(f"prediction {prediction_id}: series and instance numbers must be >= 1")
    parsed = [_box(box, i, prediction_id) for i, box in enumerate(boxes)]

    with _quiet():
        evidence = _evidence(source, prediction_id)
        sop_class = str(evidence.SOPClassUID)
        sop_instance = str(evidence.SOPInstanceUID)
        study = str(evidence.StudyInstanceUID)
        algorithm = hd.sr.AlgorithmIdentification(name=name, version=version, manufacturer=maker)
        groups: list[
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
            | hd.sr.MeasurementsAndQualitativeEvaluations
        ] = []
        for i, (corners, score, label) in enumerate(parsed):
            tracking = f"{prediction_id}/box{i}"
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=corners,
                source_image=hd.sr.SourceImageForRegion(sop_class, sop_instance),
            )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=generate_uid(entropy_srcs=["radflow-sr-tracking", tracking]),
                        identifier=tracking,
                    ),
                    referenced_region=region,
                    finding_type=_label_code(label),
                    algorithm_id=algorithm,
                    measurements=[hd.sr.Measurement(name=SCORE, value=score, unit=SCORE_UNIT)],
                )
            )
        if not groups:
            tracking = f"{prediction_id}/image"
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=generate_uid(entropy_srcs=["radflow-sr-tracking", tracking]),
                        identifier=tracking,
                    ),
                    algorithm_id=algorithm,
                    qualitative_evaluations=[hd.sr.QualitativeEvaluation(*NOTHING_FOUND)],
                    source_images=[hd.sr.SourceImageForMeasurementGroup(sop_class, sop_instance)],
                )
            )
        observer = hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=generate_uid(entropy_srcs=["radflow-sr-device", name, version]),
                name=DEVICE_NAME,
                manufacturer_name=maker,
                model_name=name,
            ),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=PROCEDURE,
            imaging_measurements=groups,
        )
        label_scheme = CodingSchemeIdentificationItem(
            designator=LABEL_SCHEME, name="radflow finding labels", responsible_organization=maker
        )
        try:
            return hd.sr.ComprehensiveSR(
                evidence=[evidence],
                content=report,
                series_instance_uid=generate_uid(
                    entropy_srcs=["radflow-sr-series", study, name, version]
                ),
                series_number=series_number,
                sop_instance_uid=sop_instance_uid
                or generate_uid(entropy_srcs=["radflow-sr", prediction_id, name, version]),
                instance_number=instance_number,
                manufacturer=maker,
                manufacturer_model_name=name,
                software_versions=version,
                series_description=SERIES_DESCRIPTION,
                # Complete: the algorithm reported all it found. Not final and unverified: it is
                # machine output awaiting a radiologist, not the definitive report.
                is_complete=True,
                is_final=False,
                coding_schemes=[label_scheme],
            )
        except (ValueError, TypeError) as exc:
            # highdicom checks the copied patient/study values here, and its text may quote them.
            raise DataError(
                f"prediction {prediction_id}: the source's patient/study attributes cannot go into "
                f"an SR ({type(exc).__name__}); check the file with a DICOM validator (dciodvfy)"
            ) from None


def report_uid(instance_key: str, model_name: str, model_version: str) -> str:
    """The SOP Instance UID of the SR that `model_name` version `model_version` stores for one source
    instance, named by its keyed UID hash: the same for every attempt, so a retried STOW stores the
    same instance again (a PACS keeps one), and known before the prediction is recorded, so the
    ledger row can name it. Derived from the keyed hash, never from the source UID itself."""
    return str(
        generate_uid(entropy_srcs=["radflow-pacs-sr", instance_key, model_name, model_version])
    )


# --------------------------------------------------------------------------------------------
# Files


def write_sr(
    source_path: Path,
    boxes: Sequence[Mapping[str, Any]],
    *,
    prediction_id: str,
    model_name: str,
    model_version: str,
    out_dir: Path,
    series_number: int = 9001,
    instance_number: int = 1,
    manufacturer: str = "radflow",
) -> Path:
    """Write `out_dir/<prediction_id>.dcm` atomically (through core.files.atomic_path) and return its path.

    `out_dir` must be the caller's own output folder: the SR holds the source's identifiers and
    patient module, so the file is written 0600 (and a new `out_dir` 0700).
    Raises DataError naming the source file when it is not readable DICOM.
    """
    source = read_header(source_path)
    try:
        sr = build_sr(
            source,
            boxes,
            prediction_id=prediction_id,
            model_name=model_name,
            model_version=model_version,
            series_number=series_number,
            instance_number=instance_number,
            manufacturer=manufacturer,
        )
    except DataError as exc:
        raise DataError(f"{source_path.name}: {exc}") from None
    target = out_dir / f"{prediction_id}.dcm"
    try:
        # The SR carries the patient module (PACS files it in the original study): the folder is
        # made 0700 when it is new, and the file is 0600 whatever the process's umask, from the
        # moment it exists (created with that mode, not chmod-ed after writing).
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_path(target) as partial, _quiet():
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                sr.save_as(fh, enforce_file_format=True)
    except OSError as exc:
        raise DataError(
            f"{out_dir}: cannot write the SR for prediction {prediction_id} "
            f"({type(exc).__name__}); check that the folder is writable and has space"
        ) from None
    return target


# --------------------------------------------------------------------------------------------
# Reading back


def read_sr_boxes(sr: Dataset | Path) -> list[dict[str, Any]]:
    """The planar ROIs of a TID 1500 SR as box dicts (`BOX_KEYS` + `referenced_sop_instance_uid`).

    Coordinates come back at the float32 precision of SCOORD graphic data. Raises DataError when
    the file or dataset is not a TID 1500 SR with rectangle ROIs in image coordinates.
    """
    name = sr.name if isinstance(sr, Path) else "SR dataset"
    dataset = read_header(sr) if isinstance(sr, Path) else sr
    sr_class = _SR_CLASSES.get(str(dataset.get("SOPClassUID", "")))
    if sr_class is None:
        raise DataError(f"{name}: not an Enhanced, Comprehensive or Comprehensive 3D SR")
    with _quiet():
        try:
            report = sr_class.from_dataset(dataset).content
            if not isinstance(report, hd.sr.MeasurementReport):
                raise DataError(f"{name}: not a TID 1500 measurement report")
            return [
                _read_group(group, name) for group in report.get_planar_roi_measurement_groups()
            ]
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            # Another producer's SR can break the template in many ways; values stay out of the text.
            raise DataError(f"{name}: SR content cannot be parsed ({type(exc).__name__})") from None


def _read_group(
    group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations, name: str
) -> dict[str, Any]:
    region = group.roi
    if not isinstance(region, hd.sr.ImageRegion):
        raise DataError(f"{name}: a planar ROI has no 2D image region (SCOORD)")
    # SCOORD graphic data is FL: normalise to float32 so a built and a re-read SR agree.
    points = np.asarray(region.value, dtype=np.float32)
    lo, hi = points.min(axis=0), points.max(axis=0)
    finding = group.finding_type
    if finding is None:
        label = ""
    elif finding.scheme_designator == LABEL_SCHEME:
        label = str(finding.value)
    else:
        label = str(finding.meaning)
    scores = group.get_measurements(name=SCORE)
    return {
        "x_min": float(lo[0]),
        "y_min": float(lo[1]),
        "x_max": float(hi[0]),
        "y_max": float(hi[1]),
        "score": float(scores[0].value) if scores else float("nan"),
        "label": label,
        "referenced_sop_instance_uid": str(
            region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        ),
    }
