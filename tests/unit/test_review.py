"""The review rule and post-deployment monitoring (pipeline_steps/governance/review.py), over a real
SQLite ledger: what a review may say, what it records, and the figures monitoring derives."""

from __future__ import annotations

import math

import pytest

from pipeline_steps.governance import review
from pipeline_steps.governance.ledger import open_ledger
from pipeline_steps.serving import prediction

SIZE = (512, 400)  # rows, columns


def _box(x0, y0, x1, y1, score):
    return {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "score": score, "label": "nodule"}


def predict(ledger, pid, version="1", boxes=(), day="2026-12-01", reason=None):
    payload = {
        "prediction_id": pid,
        "boxes": list(boxes),
        "model": {"name": "radflow-detector", "version": version, "stage": "production"},
        "created_at": f"{day}T10:00:00.000Z",
        "training_membership_key": f"img{pid}",
    }
    if reason:
        payload |= {"reason": reason, "boxes": []}
    return ledger.append(review.PREDICTION, pid, payload)


def reviewed(ledger, entry, verdicts, corrections=None, missed=(), reviewer="dr_a"):
    earlier = ledger.entries(kind=review.REVIEW, subject=entry.subject)
    payload = review.build_review(
        entry,
        reviewer=reviewer,
        verdicts=verdicts,
        corrections=corrections or {},
        missed=list(missed),
        image_size=SIZE,
        reviewed_at="2026-12-02T09:00:00.000Z",
        previous=earlier[-1] if earlier else None,
    )
    return ledger.append(review.REVIEW, entry.subject, payload)


@pytest.fixture
def ledger(tmp_path):
    with open_ledger(tmp_path) as led:
        yield led


def test_the_kinds_agree_with_serving():
    assert review.PREDICTION == prediction.PREDICTION


def test_a_review_records_each_verdict_the_new_box_and_the_missed_lesions(ledger):
    p = predict(ledger, "P1", boxes=[_box(10, 10, 50, 50, 0.9), _box(100, 100, 140, 150, 0.4)])
    row = reviewed(
        ledger, p, {0: "confirmed", 1: "corrected"}, {1: [95, 98, 150, 160]}, [[200, 300, 240, 330]]
    )
    payload = row.payload
    assert payload["prediction_id"] == "P1" and payload["prediction_row"] == p.seq
    assert payload["model"] == {"name": "radflow-detector", "version": "1"}
    assert [f["verdict"] for f in payload["findings"]] == ["confirmed", "corrected"]
    assert payload["findings"][0]["box"] == [10, 10, 50, 50]
    assert payload["findings"][1]["corrected_box"] == [95, 98, 150, 160]
    assert payload["missed"] == [{"box": [200, 300, 240, 330]}]
    assert payload["supersedes"] is None
    again = reviewed(ledger, p, {0: "rejected", 1: "rejected"})
    assert again.payload["supersedes"] == row.seq
    assert ledger.verify().ok


@pytest.mark.parametrize(
    ("verdicts", "corrections", "missed", "message"),
    [
        ({0: "confirmed"}, {}, [], "finding 2 has no verdict"),
        ({0: "confirmed", 1: "maybe"}, {}, [], "unknown verdict 'maybe'"),
        ({0: "confirmed", 1: "confirmed", 2: "rejected"}, {}, [], "finding 3 does not exist"),
        ({0: "confirmed", 1: "corrected"}, {}, [], "finding 2 is marked corrected but has no"),
        ({0: "confirmed", 1: "rejected"}, {1: [1, 1, 5, 5]}, [], "not marked corrected"),
        ({0: "confirmed", 1: "rejected"}, {}, [[10, 10, 450, 40]], "outside the image"),
        ({0: "confirmed", 1: "rejected"}, {}, [[10, 10, 5, 40]], "x_max must exceed x_min"),
        ({0: "confirmed", 1: "rejected"}, {}, [[-1, 10, 5, 40]], "outside the image"),
        ({0: "confirmed", 1: "rejected"}, {}, [[0, 0, math.nan, 4]], "finite"),
        ({0: "confirmed", 1: "corrected"}, {1: [0, 0, 10, 600]}, [], "outside the image"),
        ({0: "confirmed", 1: "rejected"}, {}, [[0, 0, 1, 1]] * 51, "at most 50"),
    ],
)
def test_a_malformed_review_is_refused_naming_what_is_wrong(
    ledger, verdicts, corrections, missed, message
):
    p = predict(ledger, "P1", boxes=[_box(10, 10, 50, 50, 0.9), _box(100, 100, 140, 150, 0.4)])
    with pytest.raises(review.ReviewError, match=message):
        reviewed(ledger, p, verdicts, corrections, missed)
    assert ledger.entries(kind=review.REVIEW) == []


def test_a_failed_prediction_cannot_be_reviewed(ledger):
    p = predict(ledger, "P1", reason="not_dicom")
    with pytest.raises(review.ReviewError, match="nothing to review"):
        reviewed(ledger, p, {})


def test_a_box_on_the_image_edge_is_inside_it(ledger):
    p = predict(ledger, "P1")
    row = reviewed(ledger, p, {}, missed=[[0, 0, SIZE[1], SIZE[0]]])
    assert row.payload["missed"][0]["box"] == [0, 0, 400, 512]


def _monitoring_fixture(ledger):
    """Version 1: 4 predictions on two days, 3 reviewed (one twice); version 2: 2, none reviewed."""
    a = predict(ledger, "A", "1", [_box(1, 1, 9, 9, 0.9), _box(20, 20, 30, 30, 0.5)], "2026-12-01")
    b = predict(ledger, "B", "1", [_box(1, 1, 9, 9, 0.8)], "2026-12-01")
    c = predict(ledger, "C", "1", [], "2026-12-02")
    predict(ledger, "D", "1", [_box(1, 1, 9, 9, 0.7)], "2026-12-02")
    predict(ledger, "E", "1", reason="corrupt", day="2026-12-02")  # not counted
    predict(ledger, "F", "2", [_box(1, 1, 9, 9, 0.7)], "2026-12-03")
    predict(ledger, "G", "2", [], "2026-12-03")
    reviewed(ledger, a, {0: "rejected", 1: "rejected"})  # superseded below
    reviewed(ledger, a, {0: "confirmed", 1: "rejected"}, missed=[[40, 40, 60, 60]])
    reviewed(ledger, b, {0: "corrected"}, {0: [2, 2, 10, 10]})
    reviewed(ledger, c, {}, missed=[[5, 5, 15, 15], [70, 70, 90, 90]])


def test_monitoring_counts_each_prediction_once_with_its_last_review(ledger):
    _monitoring_fixture(ledger)
    v1, v2 = review.monitoring(
        ledger.entries(kind=review.PREDICTION), ledger.entries(kind=review.REVIEW)
    )
    assert (v1.version, v2.version) == ("1", "2")
    t = v1.total
    # A: confirmed 1, rejected 1, missed 1; B: corrected 1; C: missed 2. D unreviewed.
    assert (t.predictions, t.reviewed) == (4, 3)
    assert (t.confirmed, t.corrected, t.rejected, t.missed) == (1, 1, 1, 3)
    assert t.coverage == pytest.approx(3 / 4)
    assert t.reviewed_precision == pytest.approx(2 / 3)
    assert t.missed_lesion_rate == pytest.approx(3 / 5)
    day1, day2 = v1.by_day["2026-12-01"], v1.by_day["2026-12-02"]
    assert (day1.predictions, day1.reviewed, day2.predictions, day2.reviewed) == (2, 2, 2, 1)
    assert day2.reviewed_precision is None  # C had no finding to judge
    assert day2.missed_lesion_rate == 1.0
    assert (v2.total.predictions, v2.total.reviewed, v2.total.coverage) == (2, 0, 0.0)
    assert v2.total.reviewed_precision is None and v2.total.missed_lesion_rate is None


def test_prometheus_text_carries_the_same_figures_and_leaves_out_undefined_rates(ledger):
    _monitoring_fixture(ledger)
    mons = review.monitoring(
        ledger.entries(kind=review.PREDICTION), ledger.entries(kind=review.REVIEW)
    )
    text = review.prometheus_text(mons)
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    v1 = 'model="radflow-detector",version="1"'
    v2 = 'model="radflow-detector",version="2"'
    assert float(lines[f"radflow_review_coverage{{{v1}}}"]) == pytest.approx(0.75)
    assert float(lines[f"radflow_review_reviewed_precision{{{v1}}}"]) == pytest.approx(2 / 3, 1e-5)
    assert float(lines[f"radflow_review_missed_lesion_rate{{{v1}}}"]) == pytest.approx(0.6)
    assert float(lines[f"radflow_review_predictions{{{v2}}}"]) == 2
    assert f"radflow_review_reviewed_precision{{{v2}}}" not in lines
    assert "# TYPE radflow_review_coverage gauge" in text


def test_the_queue_lists_newest_first_with_review_state(ledger):
    _monitoring_fixture(ledger)
    rows = review.queue(ledger.entries(kind=review.PREDICTION), ledger.entries(kind=review.REVIEW))
    assert [r["prediction_id"] for r in rows] == ["G", "F", "D", "C", "B", "A"]
    a = rows[-1]
    assert a["reviewed_by"] == "dr_a" and a["verdicts"] == {
        "confirmed": 1,
        "rejected": 1,
        "missed": 1,
    }
    assert a["findings"] == 2 and a["top_score"] == 0.9
    pending = review.queue(
        ledger.entries(kind=review.PREDICTION),
        ledger.entries(kind=review.REVIEW),
        pending_only=True,
    )
    assert [r["prediction_id"] for r in pending] == ["G", "F", "D"]


def test_reviewed_findings_become_canonical_labels(ledger):
    _monitoring_fixture(ledger)
    rows = review.review_labels(ledger.entries(kind=review.REVIEW))
    by_image: dict[str, list] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    # A: the confirmed box and the missed lesion (the rejected one is gone); B: the corrected box;
    # C: two missed lesions. D was never reviewed.
    assert sorted(by_image) == ["imgA", "imgB", "imgC"]
    assert [(r["x_min"], r["x_max"]) for r in by_image["imgA"]] == [(1, 9), (40, 60)]
    assert [(r["x_min"], r["y_max"]) for r in by_image["imgB"]] == [(2, 10)]
    assert len(by_image["imgC"]) == 2
    assert {r["review_row"] for r in by_image["imgA"]} == {
        max(e.seq for e in ledger.entries(kind=review.REVIEW, subject="A"))
    }


def test_an_image_read_as_clear_becomes_one_no_finding_row(ledger):
    p = predict(ledger, "P1", boxes=[_box(10, 10, 50, 50, 0.9)])
    reviewed(ledger, p, {0: "rejected"})
    (row,) = review.review_labels(ledger.entries(kind=review.REVIEW))
    assert row["label"] == "no_finding" and math.isnan(row["x_min"])
    assert row["prediction_id"] == "P1"
