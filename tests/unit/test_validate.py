import numpy as np
import pandas as pd
import pytest

from pipeline_steps.core.config import IngestParams, ValidateParams
from pipeline_steps.core.deid import DEV_PSEUDONYM_KEY
from pipeline_steps.core.labels import LABEL_COLUMNS, NO_FINDING
from pipeline_steps.core.screening import METADATA_COLUMNS, build_metadata
from pipeline_steps.validate import label_tables, validate_tables
from tests.conftest import FAKE_PHI, build_dicom

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
    return pd.DataFrame(rows, columns=LABEL_COLUMNS).astype(
        {c: float for c in ("x_min", "y_min", "x_max", "y_max")}
    )


def _failed(report):
    """Failing expectation name -> image ids of its offending rows."""
    return {f.name: {row["image_id"] for row in f.offending} for f in report.failures}


@pytest.fixture(scope="module")
def metadata6(tmp_path_factory):
    """Six accepted 300 x 280 images at 0.35 mm, two per patient."""
    images = tmp_path_factory.mktemp("m6") / "images"
    for i in range(6):
        build_dicom(images / f"img{i}.dcm", patient_id=f"P{i // 2}")
    metadata, _ = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    return metadata


def test_label_tables_join_boxes_with_their_image(metadata6):
    ids = list(metadata6["image_id"])
    labels = _labels(
        [[ids[0], "opacity", 10, 10, 50, 30], [ids[1], NO_FINDING, None, None, None, None]]
    )
    boxes, summary = label_tables(metadata6, labels)
    box = boxes.set_index("image_id").loc[ids[0]]
    assert (box.rows, box.columns) == (300, 280)
    assert box.area_mm2 == pytest.approx((40 * 0.35) * (20 * 0.35))  # 98 mm2
    assert bool(box.is_finding) and bool(box.has_box)
    negative = boxes.set_index("image_id").loc[ids[1]]
    assert not negative.is_finding and not negative.has_box
    by_id = summary.set_index("image_id")
    assert by_id.loc[ids[0], "positive"] == 1.0 and by_id.loc[ids[1], "positive"] == 0.0
    assert by_id.loc[ids[2], "labelled"] == False  # noqa: E712 (numpy bool)
    assert np.isnan(by_id.loc[ids[2], "positive"])


def test_expectations_pass_on_good_tables(metadata6):
    ids = list(metadata6["image_id"])
    labels = _labels(
        [
            [ids[0], "opacity", 10, 10, 50, 50],
            [ids[0], "nodule_mass", 100, 100, 120, 130],
            [ids[1], NO_FINDING, None, None, None, None],
            [ids[2], NO_FINDING, None, None, None, None],
            [ids[3], NO_FINDING, None, None, None, None],
            [ids[4], "opacity", 0, 0, 280, 300],  # the whole image is still inside it
        ]
    )
    report = validate_tables(metadata6, labels, ValidateParams(), INGEST)
    assert report.success, [f.describe() for f in report.failures]
    assert report.positive_fraction == pytest.approx(2 / 5)
    assert report.n_unlabelled == 1
    # The one unlabelled image is a warning that names it.
    assert [(w.name, w.offending) for w in report.warnings] == [
        ("expect_column_values_to_be_in_set(labelled)", [{"image_id": ids[5], "labelled": False}])
    ]
    assert report.data_version == "unversioned"
    assert report.result_id.startswith("unversioned/")
    assert set(report.gx_results) == {"metadata", "labels", "label_summary"}


def test_each_broken_metadata_row_fails_its_expectation(metadata6):
    ids = list(metadata6["image_id"])
    broken = metadata6.copy()
    broken.loc[0, "modality"] = "MR"
    broken.loc[1, "photometric"] = "RGB"
    broken.loc[2, "rows"] = 100
    broken.loc[3, "spacing_col_mm"] = 2.0
    broken.loc[4, "patient_pseudonym"] = None
    broken.loc[5, "image_id"] = ids[0]
    report = validate_tables(broken, _labels([]), ValidateParams(), INGEST)
    assert not report.success
    assert _failed(report) == {
        "expect_column_values_to_be_in_set(modality)": {ids[0]},
        "expect_column_values_to_be_in_set(photometric)": {ids[1]},
        "expect_column_values_to_be_between(rows)": {ids[2]},
        "expect_column_values_to_be_between(spacing_col_mm)": {ids[3]},
        "expect_column_values_to_not_be_null(patient_pseudonym)": {ids[4]},
        "expect_column_values_to_be_unique(image_id)": {ids[0]},
        # no labels at all while training needs them
        "expect_column_mean_to_be_between(positive)": set(),
    }


def test_each_broken_label_fails_its_expectation(metadata6):
    ids = list(metadata6["image_id"])  # images are 280 wide, 300 high
    labels = _labels(
        [
            [ids[0], "opacity", 10, 10, 5000, 50],  # beyond the right edge
            [ids[0], "tumour", 10, 10, 50, 50],  # a class nobody allowed
            [ids[1], "opacity", 10, 10, 50, 400],  # beyond the bottom edge
            [ids[1], "opacity", None, None, None, None],  # a finding without a box
            [ids[2], "opacity", -5, 10, 50, 50],  # left of the image
            [ids[2], "opacity", 100, 100, 101, 101],  # 1 px = 0.12 mm2: not a finding
            [ids[3], "opacity", 50, 10, 10, 50],  # inverted (so its area is negative too)
            [ids[4], NO_FINDING, None, None, None, None],
        ]
    )
    report = validate_tables(metadata6, labels, ValidateParams(), INGEST)
    assert _failed(report) == {
        "expect_column_pair_values_a_to_be_greater_than_b(columns,x_max)": {ids[0]},
        "expect_column_values_to_be_in_set(label)": {ids[0]},
        "expect_column_pair_values_a_to_be_greater_than_b(rows,y_max)": {ids[1]},
        "expect_column_pair_values_to_be_equal(has_box,is_finding)": {ids[1]},
        "expect_column_values_to_be_between(x_min)": {ids[2]},
        "expect_column_values_to_be_between(area_mm2)": {ids[2], ids[3]},
        "expect_column_pair_values_a_to_be_greater_than_b(x_max,x_min)": {ids[3]},
    }
    line = next(f for f in report.failures if f.name.endswith("(columns,x_max)")).describe()
    assert line == (
        "labels: expect_column_pair_values_a_to_be_greater_than_b(columns,x_max) [critical]; "
        f"1 of 8 rows unexpected, e.g. image_id={ids[0]} (columns=280, x_max=5000.0)"
    )


def test_allowed_classes_and_area_come_from_params(metadata6):
    ids = list(metadata6["image_id"])
    labels = _labels([[ids[0], "opacity", 10, 10, 50, 50], [ids[1], NO_FINDING] + [None] * 4])
    params = ValidateParams(allowed_labels=("nodule",), box_area_mm2=(200.0, 1000.0))
    report = validate_tables(metadata6, labels, params, INGEST)
    assert set(_failed(report)) == {
        "expect_column_values_to_be_in_set(label)",
        "expect_column_values_to_be_between(area_mm2)",  # 14 x 14 mm = 196 mm2 < 200
    }


def test_extra_phi_column_fails_critically_without_echoing_it(metadata6):
    metadata = metadata6.copy()
    metadata["PatientName"] = FAKE_PHI["PatientName"]
    ids = list(metadata["image_id"])
    labels = _labels(
        [[ids[0], "opacity", 10, 10, 50, 50], [ids[1], NO_FINDING, None, None, None, None]]
    )
    report = validate_tables(metadata, labels, ValidateParams(), INGEST)
    assert not report.success
    (failure,) = [f for f in report.failures if "columns_to_match_set" in f.name]
    assert "PatientName" in failure.describe()  # the column is named ...
    assert FAKE_PHI["PatientName"] not in repr(report)  # ... its values are not


def test_positive_fraction_outside_the_range_fails(metadata6):
    ids = list(metadata6["image_id"])
    labels = _labels([[i, "opacity", 10, 10, 50, 50] for i in ids])
    report = validate_tables(metadata6, labels, ValidateParams(), INGEST)
    (failure,) = report.failures
    assert failure.name == "expect_column_mean_to_be_between(positive)"
    assert failure.detail == "observed 1.0"


def test_an_unlabelled_dataset_passes_only_when_labels_are_not_required(metadata6):
    report = validate_tables(metadata6, _labels([]), ValidateParams(require_labels=False), INGEST)
    assert report.success
    assert {w.name for w in report.warnings} == {
        "expect_column_mean_to_be_between(positive)",
        "expect_column_values_to_be_in_set(labelled)",
    }
    assert report.n_unlabelled == 6


def test_header_oddities_are_only_warnings(tmp_path, make_dicom):
    images = tmp_path / "images"
    make_dicom(images / "nospacing.dcm", patient_id="P0", spacing=None)
    make_dicom(images / "nobodypart.dcm", patient_id="P1", body_part="")
    make_dicom(
        images / "twowindows.dcm",
        patient_id="P2",
        window=None,
        extra={"WindowCenter": [2048, 1024], "WindowWidth": [4096, 2048]},
    )
    make_dicom(images / "plain.dcm", patient_id="P3")
    metadata, _ = build_metadata(images, INGEST, DEV_PSEUDONYM_KEY)
    labels = _labels(
        [
            [i, "opacity" if n == 0 else NO_FINDING] + ([10, 10, 50, 50] if n == 0 else [None] * 4)
            for n, i in enumerate(sorted(metadata["image_id"]))
        ]
    )
    report = validate_tables(metadata, labels, ValidateParams(), INGEST)
    assert report.success
    assert {w.name: {r["image_id"] for r in w.offending} for w in report.warnings} == {
        "expect_column_values_to_be_in_set(spacing_flagged)": {"nospacing"},
        "expect_column_values_to_be_in_set(body_part_missing)": {"nobodypart"},
        "expect_column_values_to_be_between(window_count)": {"twowindows"},
    }


def test_the_validate_stage_without_a_key_stops_before_writing_anything(
    tmp_path, make_dicom, monkeypatch
):
    from pipeline_steps import validate
    from pipeline_steps.core.config import ValidateParams
    from pipeline_steps.core.errors import ConfigError
    from pipeline_steps.core.layout import Layout

    monkeypatch.delenv("RADFLOW_PSEUDONYM_DEV_MODE")
    monkeypatch.delenv("RADFLOW_PSEUDONYM_KEY", raising=False)
    layout = Layout(tmp_path / "ws")
    for i in range(2):
        make_dicom(layout.raw_images / f"img{i}.dcm", patient_id=f"P{i}")
    before = sorted(p for p in layout.root.rglob("*"))
    with pytest.raises(ConfigError, match="RADFLOW_PSEUDONYM_KEY is not set"):
        validate.run(layout, INGEST, ValidateParams(), data_version="nokey.dir")
    assert sorted(p for p in layout.root.rglob("*")) == before  # no half-written outputs
