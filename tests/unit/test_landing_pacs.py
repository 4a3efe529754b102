"""The PACS source's bookkeeping without a PACS: instances keyed by a hash of their SOP Instance UID,
what is asked for again (nothing pulled before), what is skipped and why, the index's format, and
label rows from CSV keys and from TID 1500 SR annotations."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from pipeline_steps.core.labels import LABEL_COLUMNS, import_labels, read_label_file
from pipeline_steps.landing import (
    IMAGE,
    INGESTED,
    NOT_AN_IMAGE,
    OTHER,
    SR,
    LandingError,
    PacsIndex,
    PacsInstance,
    Pulled,
    dump_pacs_index,
    instance_kind,
    is_radflow_sr,
    plan_pull,
    query_key,
    read_pacs_index,
    rekey_labels,
    sop_key,
    sr_label_rows,
    study_date_range,
    valid_uid,
)
from pipeline_steps.serving.sr import build_sr, read_sr_boxes
from tests.conftest import build_dicom

STUDY = "1.2.826.0.1.3680043.8.498.1"
SOPS = [f"1.2.826.0.1.3680043.8.498.1.{i}" for i in range(4)]


def inst(sop: str, sop_class: str = "1.2.840.10008.5.1.4.1.1.1.1") -> PacsInstance:
    return PacsInstance(STUDY, STUDY + ".9", sop, sop_class)


def test_an_instance_is_named_by_the_sha256_of_its_sop_instance_uid():
    assert sop_key(SOPS[0]) == hashlib.sha256(SOPS[0].encode()).hexdigest()
    assert sop_key(f" {SOPS[0]} ") == sop_key(SOPS[0])  # padding a PACS may add is not identity
    assert sop_key(SOPS[0]) != sop_key(SOPS[1])
    assert inst(SOPS[2]).key == sop_key(SOPS[2])


def test_instances_in_the_index_are_never_asked_for_again_and_a_repeat_is_handled_once():
    index = PacsIndex({sop_key(SOPS[0]): Pulled(INGESTED, "aa", "t")}, {})
    listing = [inst(SOPS[1]), inst(SOPS[0]), inst(SOPS[2]), inst(SOPS[1]), inst("1.2.x/../3")]
    todo, bad, known = plan_pull(listing, index)
    assert sorted(i.sop_uid for i in todo) == [SOPS[1], SOPS[2]]
    assert [i.key for i in todo] == sorted(i.key for i in todo)  # an order that names no study
    assert known == 1
    assert [i.sop_uid for i in bad] == ["1.2.x/../3"]


def test_uids_are_digits_and_dots_of_at_most_64_characters():
    assert valid_uid(SOPS[0])
    for bad in ("", "1..2", ".1", "1.2.", "1.2.a", "../1", "1" * 65):
        assert not valid_uid(bad), bad


def test_sop_classes_decide_what_is_retrieved():
    assert instance_kind("1.2.840.10008.5.1.4.1.1.1.1") == IMAGE  # DX
    assert instance_kind("1.2.840.10008.5.1.4.1.1.1") == IMAGE  # CR
    assert instance_kind("") == IMAGE  # not said: retrieved, kept only with pixel data
    for sr in ("1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33"):
        assert instance_kind(sr) == SR
    for other in (
        "1.2.840.10008.5.1.4.1.1.104.1",  # encapsulated PDF
        "1.2.840.10008.5.1.4.1.1.88.59",  # key object selection
        "1.2.840.10008.5.1.4.1.1.88.11",  # basic text SR: no planar ROIs
        "1.2.840.10008.5.1.4.1.1.11.1",  # grayscale presentation state
    ):
        assert instance_kind(other) == OTHER, other


def test_radflow_s_own_prediction_srs_are_recognised():
    assert is_radflow_sr("radflow", "")
    assert is_radflow_sr("Acme", "radflow detections")
    assert not is_radflow_sr("Acme Annotate", "Reference boxes")


def test_the_index_round_trips_and_holds_hashes_not_uids():
    index = PacsIndex(
        {
            sop_key(s): Pulled(INGESTED if i else NOT_AN_IMAGE, "ab" * 32, "t")
            for i, s in enumerate(SOPS)
        },
        {query_key("http://pacs/dicom-web", ["DX", "CR"], "", ""): {"last_study_date": "20261130"}},
    )
    text = dump_pacs_index(index)
    assert read_pacs_index(text, "pulled.json") == index
    assert not any(s in text for s in SOPS) and STUDY not in text
    with pytest.raises(LandingError, match=r"pulled\.json.*Delete it"):
        read_pacs_index('{"instances": []}', "pulled.json")


def test_study_dates_and_queries():
    assert study_date_range("", "") == ""
    assert study_date_range("20260101", "") == "20260101-"
    assert study_date_range("", "20261231") == "-20261231"
    assert study_date_range("20260101", "20261231") == "20260101-20261231"
    assert query_key("u", ["DX", "CR"], "a", "b") == query_key("u", ["CR", "DX"], "a", "b")


def test_csv_rows_naming_images_by_sop_uid_are_keyed_like_the_staged_files(tmp_path: Path):
    path = tmp_path / "labels.csv"
    path.write_text(
        f"patientId,x,y,width,height,Target\n{SOPS[0]},10,20,30,40,1\n{SOPS[1]},,,,,0\n"
    )
    table = rekey_labels(read_label_file(path), "rsna")
    stems = {sop_key(s): {f"img{i}"} for i, s in enumerate(SOPS[:2])}
    imported = import_labels(table, stems, "rsna")
    assert imported.issues.empty
    rows = imported.labels.set_index("image_id")
    assert rows.loc["img0", "label"] == "opacity" and rows.loc["img0", "x_max"] == 40.0
    assert rows.loc["img1", "label"] == "no_finding"


def test_sr_annotations_become_canonical_rows_on_the_referenced_image(tmp_path: Path):
    source = pydicom.dcmread(build_dicom(tmp_path / "src.dcm", np.zeros((300, 280), np.uint16)))
    boxes = [
        {
            "x_min": 10,
            "y_min": 20,
            "x_max": 110,
            "y_max": 150,
            "score": 1.0,
            "label": "Nodule/Mass",
        },
        {"x_min": 5, "y_min": 5, "x_max": 50, "y_max": 60, "score": 1.0, "label": "opacity"},
    ]
    sr = build_sr(
        source,
        boxes,
        prediction_id="annotation-1",
        model_name="Annotate",
        model_version="1",
        manufacturer="Acme",
    )
    rows, unlabelled = sr_label_rows(read_sr_boxes(sr))
    assert unlabelled == 0
    assert list(rows.columns) == LABEL_COLUMNS
    assert set(rows["image_id"]) == {sop_key(str(source.SOPInstanceUID))}
    assert sorted(rows["label"]) == ["nodule_mass", "opacity"]
    nodule = rows[rows["label"] == "nodule_mass"].iloc[0]
    assert (nodule.x_min, nodule.y_min, nodule.x_max, nodule.y_max) == (10, 20, 110, 150)


def test_sr_boxes_without_a_finding_are_counted_not_imported():
    boxes = [
        {
            "x_min": 1,
            "y_min": 2,
            "x_max": 3,
            "y_max": 4,
            "label": "",
            "referenced_sop_instance_uid": SOPS[0],
        },
        {
            "x_min": 1,
            "y_min": 2,
            "x_max": 9,
            "y_max": 9,
            "label": "opacity",
            "referenced_sop_instance_uid": SOPS[1],
        },
    ]
    rows, unlabelled = sr_label_rows(boxes)
    assert unlabelled == 1
    assert rows.to_dict("records") == [
        {
            "image_id": sop_key(SOPS[1]),
            "label": "opacity",
            "x_min": 1.0,
            "y_min": 2.0,
            "x_max": 9.0,
            "y_max": 9.0,
        }
    ]
    empty, _ = sr_label_rows([])
    assert list(empty.columns) == LABEL_COLUMNS and isinstance(empty, pd.DataFrame)
