"""The prediction core: ids, salted UID hashes, ingestion's verdicts on bad inputs, records in input
order with boxes in original pixels, and a ledger payload that carries no path or raw UID."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from pipeline_steps.core.config import DetectionParams, IngestParams, PreprocessParams, TrainParams
from pipeline_steps.core.deid import image_id_for
from pipeline_steps.core.files import file_sha256
from pipeline_steps.serving.prediction import (
    RECORD_KEYS,
    InputRejected,
    ModelRef,
    Provenance,
    ledger_payload,
    membership,
    new_prediction_id,
    predict_batch,
    read_input,
    uid_hash,
)
from pipeline_steps.serving.serving import ServingConfig
from tests.conftest import FAKE_PHI, build_dicom

KEY = "unit-test-key"
PROVENANCE = Provenance(
    ModelRef("radflow-detector", "3", "production", "run123"), "abc.dir", "c0de"
)


def test_prediction_ids_are_ulids_that_sort_by_time():
    a = new_prediction_id(now_ms=1_700_000_000_000, entropy=b"\xff" * 10)
    b = new_prediction_id(now_ms=1_700_000_000_001, entropy=b"\x00" * 10)
    assert len(a) == len(b) == 26
    assert set(a + b) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    assert a < b  # a later millisecond sorts later whatever the random part
    assert new_prediction_id() != new_prediction_id()
    # the time part decodes back to the millisecond
    value = 0
    for ch in a[:10]:
        value = value * 32 + "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(ch)
    assert value == 1_700_000_000_000


def test_uid_hash_is_keyed_and_never_the_uid():
    uid = "1.2.826.0.1.3680043.8.498.12345"
    assert uid_hash(uid, KEY) == uid_hash(uid, KEY)
    assert uid_hash(uid, KEY) != uid_hash(uid, "another-key")
    assert uid_hash(uid, KEY) != uid_hash(uid + "6", KEY)
    assert uid not in uid_hash(uid, KEY) and "12345" not in uid_hash(uid, KEY)


def test_ingestion_verdicts_become_reason_codes(tmp_path):
    ingest = IngestParams()
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not an image")
    colour = build_dicom(
        tmp_path / "colour.dcm",
        np.zeros((300, 280, 3), np.uint16),
        photometric="RGB",
        samples=3,
    )
    ct = build_dicom(tmp_path / "ct.dcm", modality="CT")
    good = build_dicom(tmp_path / "good.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-5000])
    reasons = {}
    for path in (not_dicom, colour, ct, truncated):
        with pytest.raises(InputRejected) as caught:
            read_input(path, ingest, KEY)
        reasons[path.name] = caught.value.reason
    assert reasons == {
        "notes.txt": "not_dicom",
        "colour.dcm": "colour",
        "ct.dcm": "modality_not_allowed",
        "truncated.dcm": "corrupt",
    }
    screened = read_input(good, ingest, KEY)
    uid = str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID)
    assert screened.sop_instance_uid_hash == uid_hash(uid, KEY)
    assert screened.file_sha256 == file_sha256(good)
    assert screened.image.pixels.shape == (300, 280)


@pytest.fixture(scope="module")
def tiny_model():
    from pipeline_steps.core.detector import build_detector

    model = build_detector(64, TrainParams(width=4, depth=2))
    # Untrained size heads predict ~0 px boxes, which serving drops; give every box ~4 cells.
    box = model.get_layer("box")
    kernel, bias = box.get_weights()
    box.set_weights([kernel * 0.0, np.array([4.0, 4.0, 0.5, 0.5], np.float32)])
    return model


def test_a_batch_keeps_input_order_and_reports_a_bad_file_without_stopping(tmp_path, tiny_model):
    config = ServingConfig(
        PreprocessParams(input_size=64, target_spacing_mm=1.9),  # the images nearly fill 64 px
        DetectionParams(score_threshold=0.0, max_detections=20, flip_tta=False),
        0.35,
    )
    a = build_dicom(tmp_path / "a.dcm", spacing=(0.4, 0.4))
    bad = tmp_path / "b.dcm"
    bad.write_bytes(b"%PDF-1.7 a report, not an image" * 8)
    c = build_dicom(
        tmp_path / "c.dcm",
        np.random.default_rng(1).integers(0, 4096, size=(200, 360), dtype=np.uint16),
        photometric="MONOCHROME1",
    )
    ids = iter(f"id{i}" for i in range(10))
    records = predict_batch(
        tiny_model,
        [("a.dcm", a), ("b.dcm", bad), ("c.dcm", c)],
        config,
        IngestParams(min_size_px=64),
        PROVENANCE,
        threshold=0.0,
        key=KEY,
        new_id=lambda: next(ids),
        clock=lambda: "2026-11-24T00:00:00.000Z",
    )
    assert [r["image"] for r in records] == ["a.dcm", "b.dcm", "c.dcm"]
    assert records[1]["reason"] == "not_dicom" and "b.dcm" in records[1]["error"]
    assert records[1]["boxes"] == []
    for record, (rows, cols) in ((records[0], (300, 280)), (records[2], (200, 360))):
        assert set(RECORD_KEYS) == set(record)
        assert record["model"] == PROVENANCE.model.as_dict()
        assert record["data_version"] == "abc.dir" and record["code_version"] == "c0de"
        assert 1 <= len(record["boxes"]) <= 20  # threshold 0: the max_detections cap
        for box in record["boxes"]:
            assert 0 <= box["x_min"] < box["x_max"] <= cols
            assert 0 <= box["y_min"] < box["y_max"] <= rows
            assert box["label"] == config.label
    assert len({r["prediction_id"] for r in records}) == 3
    json.dumps(records)  # plain JSON data


def test_the_ledger_payload_has_no_path_error_text_or_raw_uid(tmp_path):
    path = build_dicom(tmp_path / f"{FAKE_PHI['PatientName']}.dcm")
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    record = {
        "prediction_id": "X",
        "image": str(path),
        "file_sha256": file_sha256(path),
        "sop_instance_uid_hash": uid_hash(uid, KEY),
        "boxes": [],
    }
    payload = ledger_payload(record)
    text = json.dumps(payload)
    assert "image" not in payload and FAKE_PHI["PatientName"] not in text and uid not in text
    assert payload["training_membership_key"] == image_id_for(file_sha256(path))
    failed = ledger_payload({**record, "error": f"{path.name}: corrupt", "reason": "corrupt"})
    assert "error" not in failed and failed["reason"] == "corrupt"
    assert FAKE_PHI["PatientName"] not in json.dumps(failed)


def test_membership_matches_on_ingestions_file_id():
    record = {"file_sha256": "ab" * 32}
    manifest = {image_id_for("ab" * 32): "train", "f" * 24: "test"}
    assert membership(record, manifest) == "train"
    assert membership(ledger_payload({**record, "image": "x"}), manifest) == "train"
    assert membership({"file_sha256": "cd" * 32}, manifest) is None
    assert membership({"reason": "corrupt"}, manifest) is None
