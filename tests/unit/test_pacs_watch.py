"""The PACS watcher's bookkeeping (pipeline_steps/serving/watch.py), the SR's fixed UID and the trace
of an SR's UID back to its ledger row."""

from __future__ import annotations

import json
from datetime import date

import pydicom.uid
import pytest

from pipeline_steps.serving.prediction import uid_hash
from pipeline_steps.serving.watch import (
    Instance,
    Study,
    WatchState,
    WatchStateError,
    instances_from,
    load_state,
    recorded_predictions,
    save_state,
    studies_from,
    study_filters,
)

KEY = "unit-test-key-0123456789abcdef"
STUDY = "1.2.826.0.1.3680043.8.498.11"
SOP = "1.2.826.0.1.3680043.8.498.12"


def _qido(**tags: str) -> dict:
    return {tag: {"vr": "UI", "Value": [value]} for tag, value in tags.items()}


def test_study_filters_ask_for_one_modality_from_the_lookback_day_on():
    assert study_filters("DX", 2, date(2026, 3, 1)) == {
        "ModalitiesInStudy": "DX",
        "StudyDate": "20260227-",
    }
    assert study_filters("CR", 0, date(2026, 3, 1)) == {"ModalitiesInStudy": "CR"}


def test_studies_are_distinct_and_known_by_a_keyed_hash():
    answers = [
        _qido(**{"0020000D": STUDY, "00201208": "3"}),
        _qido(**{"0020000D": STUDY, "00201208": "3"}),  # found again by the CR search
        _qido(**{"0020000D": STUDY + ".2"}),
        {},  # no UID: not a study
    ]
    studies = studies_from(answers, KEY)
    assert [s.uid for s in studies] == [STUDY, STUDY + ".2"]
    assert [s.instances for s in studies] == [3, -1]
    assert STUDY not in studies[0].key and studies[0].key != studies_from(answers, KEY + "x")[0].key


def test_reports_are_never_pending_and_handled_instances_not_again():
    answers = [
        _qido(**{"00080018": SOP, "00080016": "1.2.840.10008.5.1.4.1.1.1.1", "00080060": "DX"}),
        _qido(**{"00080018": SOP + ".1", "00080016": "1.2.840.10008.5.1.4.1.1.88.33"}),
        _qido(**{"00080018": SOP + ".2", "00080016": "1.2.3", "00080060": "SR"}),
        _qido(**{"00080018": SOP + ".3", "00080016": "1.2.840.10008.5.1.4.1.1.104.1"}),
    ]
    instances = instances_from(answers, lambda uid: uid_hash(uid, KEY))
    assert [i.is_report for i in instances] == [False, True, True, False]
    state = WatchState(handled={instances[3].key: "not_image"})
    assert state.pending(instances) == [instances[0]]
    assert instances[0].key == uid_hash(SOP, KEY) and SOP not in instances[0].key


def test_a_study_is_listed_again_only_when_its_instance_count_changed():
    state = WatchState(studies={"stu-a": 2})
    assert state.unchanged(Study("x", "stu-a", 2))
    assert not state.unchanged(Study("x", "stu-a", 3))  # a new instance (or radflow's SR)
    assert not state.unchanged(Study("x", "stu-a", -1))  # the PACS gives no count: always list
    assert not state.unchanged(Study("x", "stu-b", 2))


def test_state_round_trips_atomically_and_a_broken_one_says_what_to_do(tmp_path):
    path = tmp_path / "watch" / "handled.json"
    assert load_state(path) == WatchState()
    state = WatchState({"sop-1": "sr", "sop-2": "not_image"}, {"stu-1": 4})
    save_state(path, state)
    assert load_state(path) == state
    assert [p.name for p in path.parent.iterdir()] == ["handled.json"]  # no temporary left
    path.write_text("{not json")
    with pytest.raises(WatchStateError, match=r"handled.json.*move it aside"):
        load_state(path)
    path.write_text(json.dumps({"version": 99, "handled": {}, "studies": {}}))
    with pytest.raises(WatchStateError, match="version 99"):
        load_state(path)


def _payload(key: str, version: str = "3", channel: str = "pacs_watch", **extra) -> dict:
    return {
        "sop_instance_uid_hash": key,
        "channel": channel,
        "model": {"name": "radflow-detector", "version": version},
        **extra,
    }


def test_an_earlier_attempt_is_found_for_the_same_instance_and_version_only():
    rows = [
        _payload("sop-a", channel="batch"),  # `radflow predict` of the same file: not the watcher's
        _payload("sop-a", version="2"),  # the previous production version
        _payload("sop-a", prediction_id="first"),
        _payload("sop-a", prediction_id="second"),  # cannot happen; the first one counts
        _payload("sop-b", reason="not_image"),
        _payload("sop-c"),  # not asked for
    ]
    found = recorded_predictions(rows, "radflow-detector", "3", {"sop-a", "sop-b", "sop-d"})
    assert set(found) == {"sop-a", "sop-b"}
    assert found["sop-a"]["prediction_id"] == "first"
    assert found["sop-b"]["reason"] == "not_image"
    assert recorded_predictions(rows, "other-model", "3", {"sop-a"}) == {}


def test_the_sr_uid_is_fixed_by_instance_and_version_and_used_by_build_sr(tmp_path):
    from pipeline_steps.core.dicom_io import read_header
    from pipeline_steps.serving.sr import build_sr, report_uid
    from tests.conftest import build_dicom

    uid = report_uid("sop-abc", "radflow-detector", "3")
    assert uid == report_uid("sop-abc", "radflow-detector", "3")
    assert (
        len(
            {
                uid,
                report_uid("sop-abc", "radflow-detector", "4"),
                report_uid("sop-x", "radflow-detector", "3"),
            }
        )
        == 3
    )
    assert pydicom.uid.UID(uid).is_valid
    source = read_header(build_dicom(tmp_path / "a.dcm"))
    box = {"x_min": 1, "y_min": 2, "x_max": 30, "y_max": 40, "score": 0.5, "label": "nodule"}
    made = [
        build_sr(
            source,
            [box],
            prediction_id=pid,
            model_name="radflow-detector",
            model_version="3",
            sop_instance_uid=uid,
        )
        for pid in ("01JAAAAAAAAAAAAAAAAAAAAAAA", "01JBBBBBBBBBBBBBBBBBBBBBBB")
    ]
    assert {str(sr.SOPInstanceUID) for sr in made} == {uid}
    assert made[0].StudyInstanceUID == source.StudyInstanceUID
    assert made[0].SeriesInstanceUID != source.SeriesInstanceUID
    # IHE AI Results: the algorithm's name, version and manufacturer are in the SR.
    assert (made[0].ManufacturerModelName, made[0].SoftwareVersions) == ("radflow-detector", "3")
    assert made[0].Manufacturer == "radflow"


def test_trace_finds_a_prediction_by_the_uid_of_its_sr(tmp_path):
    from flows.audit import UnknownPrediction, find_prediction
    from pipeline_steps.core.layout import Layout
    from pipeline_steps.governance.ledger import open_ledger

    layout = Layout(tmp_path)
    sr_uid = "2.25.1234567890"
    with open_ledger(tmp_path) as ledger:
        ledger.append("prediction", "01JOTHER", _payload("sop-z", prediction_id="01JOTHER"))
        ledger.append(
            "prediction",
            "01JWATCH",
            _payload("sop-a", prediction_id="01JWATCH", sr_sop_instance_uid=sr_uid),
        )
    entry, chain = find_prediction(layout, f" {sr_uid} ")
    assert entry.subject == "01JWATCH" and chain.ok
    assert find_prediction(layout, "01JWATCH")[0].seq == entry.seq
    with pytest.raises(UnknownPrediction, match="no prediction or SR '2.25.99'"):
        find_prediction(layout, "2.25.99")


def test_an_instance_key_is_the_ledgers_uid_hash():
    (instance,) = instances_from([_qido(**{"00080018": SOP})], lambda uid: uid_hash(uid, KEY))
    assert instance == Instance("", SOP, "", "", uid_hash(SOP, KEY))
