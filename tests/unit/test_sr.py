"""DICOM SR output: TID 1500 reports that plain pydicom reads back, with the JSON's boxes on the source."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage

from pipeline_steps.core.errors import DataError
from pipeline_steps.serving.sr import build_sr, read_sr_boxes, write_sr
from tests.conftest import FAKE_PHI

PREDICTION_ID = "01J9Z3K7QW0000000000000000"
MODEL = {"model_name": "detector", "model_version": "7"}
# As `radflow predict` writes them to JSON: floats that float32 cannot hold exactly, two labels
# (one longer than a DICOM short code value).
BOXES = json.loads(
    json.dumps(
        [
            {
                "x_min": 10.1,
                "y_min": 20.7,
                "x_max": 120.33,
                "y_max": 250.9,
                "score": 0.8734,
                "label": "opacity",
            },
            {
                "x_min": 0.0,
                "y_min": 151.25,
                "x_max": 280.0,
                "y_max": 300.0,
                "score": 0.31,
                "label": "pleural_thickening",
            },
        ]
    )
)


def _f32(value: float) -> float:
    return float(np.float32(value))


def _groups(ds: Dataset, template: str) -> list[Dataset]:
    """Measurement groups of one template, found by walking the tree with plain pydicom."""
    container = next(item for item in ds.ContentSequence if item.ValueType == "CONTAINER")
    return [
        item
        for item in container.ContentSequence
        if item.ContentTemplateSequence[0].TemplateIdentifier == template
    ]


def _child(group: Dataset, code_value: str) -> Dataset:
    return next(
        item
        for item in group.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == code_value
    )


@pytest.fixture
def source(make_dicom: Callable[..., Path], tmp_path: Path) -> Path:
    path: Path = make_dicom(tmp_path / "in" / "image.dcm")
    return path


def test_sr_is_a_tid1500_report_in_the_source_study(source: Path, tmp_path: Path) -> None:
    out = write_sr(source, BOXES, prediction_id=PREDICTION_ID, out_dir=tmp_path / "out", **MODEL)
    ds = pydicom.dcmread(out)
    src = pydicom.dcmread(source, stop_before_pixels=True)

    assert out == tmp_path / "out" / f"{PREDICTION_ID}.dcm"
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left behind
    assert ds.Modality == "SR"
    assert ds.SOPClassUID == ComprehensiveSRStorage
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.PatientID == src.PatientID
    assert ds.SOPInstanceUID != src.SOPInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    observer = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue")
        for item in ds.ContentSequence
    }
    assert observer["Device Observer Name"] == "radflow"
    assert observer["Device Observer Model Name"] == "detector"


def test_boxes_round_trip_through_plain_pydicom(source: Path, tmp_path: Path) -> None:
    out = write_sr(source, BOXES, prediction_id=PREDICTION_ID, out_dir=tmp_path, **MODEL)
    ds = pydicom.dcmread(out)
    sop_instance_uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID

    read = read_sr_boxes(ds)
    assert read == read_sr_boxes(out)
    assert len(read) == len(BOXES)
    for got, want in zip(read, BOXES, strict=True):
        for key in ("x_min", "y_min", "x_max", "y_max"):
            assert got[key] == _f32(want[key]), key
        assert got["score"] == want["score"]
        assert got["label"] == want["label"]
        assert got["referenced_sop_instance_uid"] == sop_instance_uid


def test_each_box_is_a_closed_polyline_on_the_source_image(source: Path, tmp_path: Path) -> None:
    # Checked without read_sr_boxes, so a reader and writer that agree on a wrong layout still fail.
    ds = pydicom.dcmread(
        write_sr(source, BOXES, prediction_id=PREDICTION_ID, out_dir=tmp_path, **MODEL)
    )
    src = pydicom.dcmread(source, stop_before_pixels=True)
    groups = _groups(ds, "1410")
    assert len(groups) == len(BOXES)
    for i, (group, box) in enumerate(zip(groups, BOXES, strict=True)):
        region = _child(group, "111030")  # Image Region
        assert region.ValueType == "SCOORD"
        assert region.GraphicType == "POLYLINE"
        points = np.asarray(region.GraphicData, dtype=np.float32).reshape(-1, 2)
        x0, y0, x1, y1 = (np.float32(box[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        expected = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]  # (column, row), closed
        np.testing.assert_array_equal(points, np.array(expected, dtype=np.float32))
        image = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert image.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert image.ReferencedSOPClassUID == src.SOPClassUID
        score = _child(group, "111012").MeasuredValueSequence[0]  # Certainty of Finding
        assert score.FloatingPointValue == box["score"]
        assert score.MeasurementUnitsCodeSequence[0].CodeValue == "1"
        finding = _child(group, "121071").ConceptCodeSequence[0]  # Finding
        assert finding.CodingSchemeDesignator == "99RADFLOW"
        assert finding.CodeMeaning == box["label"]
        tracking = _child(group, "112039")  # Tracking Identifier
        assert tracking.TextValue == f"{PREDICTION_ID}/box{i}"


def test_an_image_without_boxes_gets_a_report_saying_nothing_was_found(
    source: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(
        write_sr(source, [], prediction_id=PREDICTION_ID, out_dir=tmp_path, **MODEL)
    )
    src = pydicom.dcmread(source, stop_before_pixels=True)

    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert read_sr_boxes(ds) == []
    assert _groups(ds, "1410") == []
    [group] = _groups(ds, "1501")
    finding = _child(group, "121071").ConceptCodeSequence[0]
    assert (finding.CodeValue, finding.CodingSchemeDesignator) == ("272519000", "SCT")  # Absent
    image = _child(group, "121112").ReferencedSOPSequence[0]  # Source of Measurement
    assert image.ReferencedSOPInstanceUID == src.SOPInstanceUID


def test_a_file_that_is_not_dicom_raises_data_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "scan-0042.dcm"
    bad.write_text("this is a CSV, not a DICOM file\n")
    with pytest.raises(DataError, match="scan-0042.dcm"):
        write_sr(bad, BOXES, prediction_id=PREDICTION_ID, out_dir=tmp_path / "out", **MODEL)
    assert not (tmp_path / "out").exists()


def test_reading_boxes_from_an_image_instead_of_an_sr_raises_data_error(source: Path) -> None:
    with pytest.raises(DataError, match="image.dcm: not an .*SR"):
        read_sr_boxes(source)


def test_a_header_without_the_image_uids_raises_data_error(source: Path) -> None:
    header = pydicom.dcmread(source, stop_before_pixels=True)
    del header.SOPInstanceUID
    with pytest.raises(DataError, match="SOPInstanceUID"):
        build_sr(header, BOXES, prediction_id=PREDICTION_ID, **MODEL)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"x_min": 281.0}, "x_min > x_max"),
        ({"score": float("nan")}, "finite"),
        ({"label": ""}, "label"),
    ],
)
def test_a_bad_box_raises_data_error_naming_it(
    source: Path, change: dict[str, object], match: str
) -> None:
    header = pydicom.dcmread(source, stop_before_pixels=True)
    boxes = [BOXES[0], {**BOXES[1], **change}]
    with pytest.raises(DataError, match=rf"box 1: .*{match}|box 1's {match}"):
        build_sr(header, boxes, prediction_id=PREDICTION_ID, **MODEL)


def test_header_values_reach_no_log_warning_or_error(
    make_dicom: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A one-part name is what highdicom warns about verbatim; it logs the source UID at INFO.
    source = make_dicom(tmp_path / "image.dcm", extra={"PatientName": "TESTPERSONADA"})
    header = pydicom.dcmread(source, stop_before_pixels=True)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_sr(source, BOXES, prediction_id=PREDICTION_ID, out_dir=tmp_path / "out", **MODEL)
    said = caplog.text + "\n".join(str(w.message) for w in caught)
    for value in ("TESTPERSONADA", FAKE_PHI["PatientID"], header.SOPInstanceUID):
        assert value not in said
    assert pydicom.dcmread(tmp_path / "out" / f"{PREDICTION_ID}.dcm").PatientName == "TESTPERSONADA"


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # build_dicom writing the bad date
def test_malformed_patient_values_still_give_an_sr_in_the_study(
    make_dicom: Callable[..., Path], tmp_path: Path
) -> None:
    source = make_dicom(
        tmp_path / "image.dcm", extra={"PatientSex": "U", "PatientBirthDate": "1960-02-14"}
    )
    ds = pydicom.dcmread(
        write_sr(source, BOXES, prediction_id=PREDICTION_ID, out_dir=tmp_path, **MODEL)
    )
    assert ds.StudyInstanceUID == pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
    assert ds.PatientSex == ""
    assert ds.PatientBirthDate == ""
    assert len(read_sr_boxes(ds)) == 2


def test_uids_follow_the_prediction_and_the_caller_header_is_untouched(source: Path) -> None:
    header = pydicom.dcmread(source, stop_before_pixels=True)
    before = header.to_json_dict()
    first = build_sr(header, BOXES, prediction_id=PREDICTION_ID, **MODEL)
    again = build_sr(header, BOXES, prediction_id=PREDICTION_ID, **MODEL)
    other = build_sr(header, BOXES, prediction_id="01J9Z3K7QW0000000000000001", **MODEL)

    assert first.SOPInstanceUID == again.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID == other.SeriesInstanceUID  # one series per study and model
    assert header.to_json_dict() == before  # StudyID etc. were filled in a copy only
    assert "StudyID" not in header


def test_an_sr_file_is_owner_only_whatever_the_umask(source: Path, tmp_path: Path) -> None:
    # The SR carries the patient module (name, ID, birth date) so PACS can file it in the study.
    previous = os.umask(0o022)  # a common default: files 0644, folders 0755
    try:
        out = write_sr(source, BOXES, prediction_id=PREDICTION_ID, out_dir=tmp_path / "sr", **MODEL)
    finally:
        os.umask(previous)
    assert pydicom.dcmread(out).PatientName == "Testperson^Ada"
    assert oct(out.stat().st_mode & 0o777) == oct(0o600)
    assert oct(out.parent.stat().st_mode & 0o777) == oct(0o700)
    # An existing folder of the caller's keeps its mode; the file in it is still 0600.
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o750)
    mine.chmod(0o750)
    again = write_sr(source, [], prediction_id="01J0000000000000000000000B", out_dir=mine, **MODEL)
    assert oct(again.stat().st_mode & 0o777) == oct(0o600)
    assert oct(mine.stat().st_mode & 0o777) == oct(0o750)
