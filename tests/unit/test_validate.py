import numpy as np
import pandas as pd
import pytest

from pipeline_steps.config import IngestParams, ValidateParams
from pipeline_steps.deid import DEV_PSEUDONYM_KEY
from pipeline_steps.ingest import LABEL_COLUMNS, NO_FINDING
from pipeline_steps.validate import METADATA_COLUMNS, build_metadata, validate_tables
from tests.conftest import FAKE_PHI

INGEST = IngestParams()


def _metadata(tmp_path, make_dicom, n=4):
    images = tmp_path / "images"
    for i in range(n):
        make_dicom(
            images / f"img{i}.dcm",
            patient_id=f"P{i // 2}",
            photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
        )
    return build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)


def test_metadata_has_only_allowed_columns_and_no_phi(tmp_path, make_dicom):
    metadata, quarantine = _metadata(tmp_path, make_dicom)
    assert list(metadata.columns) == METADATA_COLUMNS
    assert len(metadata) == 4 and quarantine.empty
    text = metadata.to_csv()
    for value in FAKE_PHI.values():
        assert value not in text
    assert metadata["patient_pseudonym"].nunique() == 2  # same patient, same pseudonym
    assert set(metadata["photometric"]) == {"MONOCHROME1", "MONOCHROME2"}
    assert (metadata["age_years"] == 66).all()


def test_unusable_spacing_falls_back_and_is_flagged(tmp_path, make_dicom):
    images = tmp_path / "images"
    make_dicom(images / "zero.dcm", spacing=(0.0, 0.0), extra={"ImagerPixelSpacing": [0.2, 0.2]})
    make_dicom(images / "none.dcm", spacing=None)
    metadata, _ = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    by_src = metadata.set_index("image_id")
    assert by_src.loc["zero", "spacing_source"] == "ImagerPixelSpacing"
    assert bool(by_src.loc["zero", "spacing_flagged"])
    assert by_src.loc["none", "spacing_source"] == "default"
    assert by_src.loc["none", "spacing_row_mm"] == INGEST.default_spacing_mm
    assert bool(by_src.loc["none", "spacing_flagged"])


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"modality": "CT"}, "modality_not_allowed"),
        ({"body_part": "KNEE"}, "body_part_not_allowed"),
        (
            {"photometric": "RGB", "samples": 3, "pixels": np.zeros((300, 300, 3), np.uint16)},
            "colour",
        ),
        ({"frames": 2, "pixels": np.zeros((2, 300, 300), np.uint16)}, "multiframe"),
        ({"pixels": np.zeros((100, 100), np.uint16)}, "too_small"),
        ({"extra": {"BurnedInAnnotation": "YES"}}, "burned_in_annotation"),
    ],
)
def test_rejections_carry_a_reason(tmp_path, make_dicom, kwargs, reason):
    images = tmp_path / "images"
    make_dicom(images / "good.dcm")
    make_dicom(images / "bad.dcm", **kwargs)
    metadata, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert list(metadata["image_id"]) == ["good"]
    assert quarantine.set_index("image_id").loc["bad", "reason"] == reason


def test_corrupt_file_is_quarantined_and_batch_goes_on(tmp_path, make_dicom):
    images = tmp_path / "images"
    make_dicom(images / "good.dcm")
    (images / "junk.dcm").write_bytes(b"\x00" * 10)
    metadata, quarantine = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    assert list(metadata["image_id"]) == ["good"]
    assert list(quarantine["reason"]) == ["corrupt"]


def _labels(rows):
    return pd.DataFrame(rows, columns=LABEL_COLUMNS)


def test_expectations_pass_on_good_tables(tmp_path, make_dicom):
    metadata, _ = _metadata(tmp_path, make_dicom)
    ids = list(metadata["image_id"])
    labels = _labels(
        [
            [ids[0], "opacity", 10, 10, 50, 50],
            [ids[1], NO_FINDING, None, None, None, None],
            [ids[2], NO_FINDING, None, None, None, None],
        ]
    )
    report = validate_tables(metadata, labels, ValidateParams(), INGEST)
    assert report.success, report.failures
    assert report.positive_fraction == pytest.approx(1 / 3)


def test_out_of_bounds_box_fails_critically(tmp_path, make_dicom):
    metadata, _ = _metadata(tmp_path, make_dicom)
    ids = list(metadata["image_id"])
    labels = _labels(
        [[ids[0], "opacity", 10, 10, 5000, 50], [ids[1], NO_FINDING, None, None, None, None]]
    )
    report = validate_tables(metadata, labels, ValidateParams(), INGEST)
    assert not report.success
    assert any("x_over" in f.name for f in report.failures)


def test_extra_phi_column_fails_critically(tmp_path, make_dicom):
    metadata, _ = _metadata(tmp_path, make_dicom)
    metadata["PatientName"] = "leak"
    ids = list(metadata["image_id"])
    labels = _labels(
        [[ids[0], "opacity", 10, 10, 50, 50], [ids[1], NO_FINDING, None, None, None, None]]
    )
    report = validate_tables(metadata, labels, ValidateParams(), INGEST)
    assert not report.success
    assert any("columns_to_match_set" in f.name for f in report.failures)


def test_flagged_spacing_is_only_a_warning(tmp_path, make_dicom):
    images = tmp_path / "images"
    for i in range(4):
        make_dicom(
            images / f"img{i}.dcm", patient_id=f"P{i}", spacing=None if i == 0 else (0.35, 0.35)
        )
    metadata, _ = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    ids = list(metadata["image_id"])
    labels = _labels(
        [[ids[0], "opacity", 10, 10, 50, 50], [ids[1], NO_FINDING, None, None, None, None]]
    )
    report = validate_tables(metadata, labels, ValidateParams(), INGEST)
    assert report.success
    assert [w.name for w in report.warnings] == [
        "expect_column_values_to_be_in_set(spacing_flagged)"
    ]
