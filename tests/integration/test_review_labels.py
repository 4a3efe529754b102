"""Reviewer feedback back into the data, in a real workspace (git + DVC, the SQLite ledger): reviewed
findings become labels through `radflow ingest --reviewed`, with their lineage, and `radflow review
monitoring` reports the ledger's numbers. No model is trained: predictions are ledger rows."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml

from flows.review_store import keep_input
from pipeline_steps.core.config import SynthParams
from pipeline_steps.core.deid import image_id_for
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance import review
from pipeline_steps.governance.ledger import open_ledger
from pipeline_steps.serving.prediction import PREDICTION, ledger_payload
from pipeline_steps.synthetic import generate_dataset
from tests.e2e.test_smoke import _embedded_env

pytestmark = pytest.mark.integration

REVIEWER = "Dr. Reviewer Example"
BOXES = [[10.0, 12.0, 60.0, 70.0], [100.0, 100.0, 140.0, 150.0], [200.0, 40.0, 260.0, 90.0]]


def radflow(ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), *args],
        capture_output=True,
        text=True,
        env=_embedded_env(),
        timeout=600,
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _predict(ledger, path: Path, n: int, version: str = "1", day: str = "2026-12-01") -> object:
    """A prediction row shaped as `radflow predict` writes it (ledger_payload of a record)."""
    record = {
        "prediction_id": f"pred-{n:02d}",
        "image": str(path),
        "image_sha256": "0" * 64,
        "file_sha256": _sha(path),
        "sop_instance_uid_hash": f"uid-{n}",
        "boxes": [
            {"x_min": b[0], "y_min": b[1], "x_max": b[2], "y_max": b[3], "score": 0.9 - i / 10}
            | {"label": "nodule"}
            for i, b in enumerate(BOXES)
        ],
        "model": {"name": "radflow-detector", "version": version, "stage": "production"},
        "data_version": "d0",
        "code_version": "c0",
        "threshold": 0.5,
        "created_at": f"{day}T10:00:0{n % 10}.000+00:00",
    }
    return ledger.append(PREDICTION, record["prediction_id"], ledger_payload(record))


def _review(ledger, prediction, size, verdicts, corrections=None, missed=(), previous=None):
    payload = review.build_review(
        prediction,
        reviewer=REVIEWER,
        verdicts=verdicts,
        corrections=corrections or {},
        missed=list(missed),
        image_size=size,
        reviewed_at="2026-12-02T09:00:00+00:00",
        previous=previous,
    )
    return ledger.append(review.REVIEW, prediction.subject, payload)


def _labels(ws: Path) -> pd.DataFrame:
    return pd.read_csv(ws / "data" / "raw" / "labels.csv", dtype={"image_id": str})


def _rows(table: pd.DataFrame, image_id: str) -> list[tuple]:
    rows = table[table["image_id"] == image_id]
    return sorted(
        (r.label, *(None if math.isnan(v) else v for v in (r.x_min, r.y_min, r.x_max, r.y_max)))
        for r in rows.itertuples()
    )


def _data_version(ws: Path) -> str:
    return yaml.safe_load((ws / "data" / "raw.dvc").read_text())["outs"][0]["md5"]


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """A workspace with two ingested images and reviews of six predictions, before --reviewed."""
    ws = tmp_path_factory.mktemp("review-ws")
    assert radflow(ws, "init").returncode == 0
    synth = generate_dataset(
        SynthParams(n_images=6, seed=5, native_size=(512, 512), images_per_patient=(1, 1)),
        tmp_path_factory.mktemp("synth"),
    )
    files = sorted(synth.images_dir.glob("*.dcm"))
    assert len(files) == 6
    ids = [image_id_for(_sha(f)) for f in files]
    sizes = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sizes.append((int(ds.Rows), int(ds.Columns)))

    # Images 0 and 1 are ingested as usual: 0 with a label of its own, 1 without any.
    folder = tmp_path_factory.mktemp("ingest")
    shutil.copy(files[0], folder / "first.dcm")
    shutil.copy(files[1], folder / "second.dcm")
    labels = folder.parent / "first-labels.csv"
    labels.write_text("image_id,label,x_min,y_min,x_max,y_max\nfirst,opacity,5,5,25,25\n")
    done = radflow(ws, "ingest", "--dicom-dir", str(folder), "--labels", str(labels), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    layout = Layout(ws)
    # Images 2, 3 and 5 were predicted and kept for review; image 4's copy was never kept.
    for i in (2, 3, 5):
        assert keep_input(layout, _sha(files[i]), files[i]) is not None

    with open_ledger(ws) as ledger:
        preds = [_predict(ledger, f, n) for n, f in enumerate(files)]
        failed = ledger.append(
            PREDICTION,
            "pred-failed",
            {"prediction_id": "pred-failed", "reason": "corrupt", "boxes": [], "model": {
                "name": "radflow-detector", "version": "1"}, "created_at": "2026-12-01T11:00:00Z"},
        )  # fmt: skip
        later = _predict(ledger, files[5], 9, version="2", day="2026-12-03")
        r0 = _review(ledger, preds[0], sizes[0], {0: "confirmed", 1: "rejected", 2: "rejected"})
        r1 = _review(ledger, preds[1], sizes[1], {0: "confirmed", 1: "rejected", 2: "rejected"})
        # Image 2: read twice; the second reading is the one that counts.
        first = _review(ledger, preds[2], sizes[2], {0: "rejected", 1: "rejected", 2: "rejected"})
        r2 = _review(
            ledger,
            preds[2],
            sizes[2],
            {0: "confirmed", 1: "rejected", 2: "corrected"},
            corrections={2: [205.0, 45.0, 255.5, 95.25]},
            missed=[[300.0, 300.0, 330.0, 340.0]],
            previous=first,
        )
        r3 = _review(ledger, preds[3], sizes[3], {0: "rejected", 1: "rejected", 2: "rejected"})
        r4 = _review(ledger, preds[4], sizes[4], {0: "confirmed", 1: "confirmed", 2: "rejected"})
        # preds[5] and `later` are not reviewed.
    return {
        "ws": ws,
        "files": files,
        "ids": ids,
        "reviews": {0: r0, 1: r1, 2: r2, 3: r3, 4: r4},
        "superseded": first,
        "preds": preds,
        "failed": failed,
        "later": later,
        "labels_before": _labels(ws),
        "version_before": _data_version(ws),
    }


@pytest.fixture(scope="module")
def imported(reviewed):
    done = radflow(reviewed["ws"], "ingest", "--reviewed", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_reviewed_findings_become_labels_and_rejected_ones_do_not(reviewed, imported):
    ws, ids = reviewed["ws"], reviewed["ids"]
    assert imported["imported"] == sorted([ids[1], ids[2], ids[3]])
    table = _labels(ws)
    # Confirmed box kept, corrected box replaced by the reviewer's, missed lesion added, rejected gone.
    assert _rows(table, ids[2]) == sorted(
        [
            ("nodule", *BOXES[0]),
            ("nodule", 205.0, 45.0, 255.5, 95.25),
            ("nodule", 300.0, 300.0, 330.0, 340.0),
        ]
    )
    assert _rows(table, ids[1]) == [("nodule", *BOXES[0])]  # image from data/raw, unlabelled before
    assert _rows(table, ids[3]) == [("no_finding", None, None, None, None)]  # all rejected
    assert imported["label_rows"] == 5
    # The kept copies are now in the dataset, byte for byte.
    for i in (2, 3):
        raw = ws / "data" / "raw" / "images" / f"{ids[i]}.dcm"
        assert raw.read_bytes() == reviewed["files"][i].read_bytes()


def test_already_labelled_and_unkept_images_are_reported_and_left_alone(reviewed, imported):
    ws, ids = reviewed["ws"], reviewed["ids"]
    assert imported["already_labelled"] == [ids[0]]
    assert imported["image_not_kept"] == [ids[4]]
    before, after = reviewed["labels_before"], _labels(ws)
    assert _rows(after, ids[0]) == _rows(before, ids[0]) == [("opacity", 5.0, 5.0, 25.0, 25.0)]
    assert ids[4] not in set(after["image_id"])
    assert not (ws / "data" / "raw" / "images" / f"{ids[4]}.dcm").exists()
    assert ids[5] not in set(after["image_id"])  # predicted and kept, never reviewed


def test_lineage_is_in_the_data_version_and_the_ledger(reviewed, imported):
    ws, ids, reviews = reviewed["ws"], reviewed["ids"], reviewed["reviews"]
    sources = pd.read_csv(ws / "data" / "raw" / "label_sources.csv", dtype={"image_id": str})
    assert sorted(sources.itertuples(index=False, name=None)) == sorted(
        (ids[i], "review", reviews[i].seq, reviews[i].subject) for i in (1, 2, 3)
    )
    assert reviewed["superseded"].seq not in set(sources["review_row"])
    version = _data_version(ws)
    assert version != reviewed["version_before"] and imported["data_version"] == version
    # label_sources.csv is inside the DVC-tracked folder, so it is part of that version.
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "data/raw.dvc"], cwd=ws, capture_output=True,
        text=True, env=_embedded_env(),
    )  # fmt: skip
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout
    with open_ledger(ws) as ledger:
        (row,) = ledger.entries(kind="review_labels")
    assert row.seq == imported["ledger_row"] and row.subject == version
    payload = row.payload
    assert payload["imported_images"] == 3 and payload["label_rows"] == 5
    assert payload["already_labelled"] == 1 and payload["image_not_kept"] == 1
    assert payload["review_rows"] == sorted(reviews[i].seq for i in (1, 2, 3))
    text = json.dumps(payload)
    assert REVIEWER not in text and str(ws) not in text and ".dcm" not in text


def test_running_it_again_adds_nothing(reviewed, imported):
    ws = reviewed["ws"]
    labels = (ws / "data" / "raw" / "labels.csv").read_bytes()
    sources = (ws / "data" / "raw" / "label_sources.csv").read_bytes()
    version = _data_version(ws)
    done = radflow(ws, "ingest", "--reviewed", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(done.stdout.strip().splitlines()[-1])
    assert again["imported"] == [] and again["data_version"] is None
    assert again["unchanged"] == imported["imported"]
    assert (ws / "data" / "raw" / "labels.csv").read_bytes() == labels
    assert (ws / "data" / "raw" / "label_sources.csv").read_bytes() == sources
    assert _data_version(ws) == version
    with open_ledger(ws) as ledger:
        assert len(ledger.entries(kind="review_labels")) == 1
    text = radflow(ws, "ingest", "--reviewed")
    assert text.returncode == 0 and "nothing new" in text.stdout


def test_ingest_takes_exactly_one_source(reviewed, tmp_path):
    ws = reviewed["ws"]
    neither = radflow(ws, "ingest")
    assert neither.returncode == 2 and "--dicom-dir" in neither.stderr
    both = radflow(ws, "ingest", "--reviewed", "--dicom-dir", str(tmp_path))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    labels = radflow(ws, "ingest", "--reviewed", "--labels", str(tmp_path / "x.csv"))
    assert labels.returncode == 1 and "drop --labels" in labels.stderr


def test_reviewed_ingest_waits_for_the_run_lock(reviewed):
    from flows import retraining

    ws = reviewed["ws"]
    with retraining.exclusive_run(Layout(ws), "radflow run"):
        done = radflow(ws, "ingest", "--reviewed", "--no-wait")
    assert done.returncode == 1
    assert done.stderr.startswith("radflow: error: another run is working in"), done.stderr


def test_monitoring_reports_the_ledger_numbers(reviewed, imported):
    ws = reviewed["ws"]
    done = radflow(ws, "review", "monitoring", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    shown = json.loads(done.stdout)
    with open_ledger(ws) as ledger:
        expected = review.monitoring(
            ledger.entries(kind=PREDICTION), ledger.entries(kind=review.REVIEW)
        )
    assert shown == json.loads(json.dumps([m.as_dict() for m in expected]))
    v1, v2 = shown
    # Version 1: six predictions (the failed one not counted), five reviewed; findings: 5
    # confirmed, 1 corrected, 9 rejected (the superseded reading not counted), 1 missed.
    assert (v1["version"], v1["predictions"], v1["reviewed"]) == ("1", 6, 5)
    assert (v1["confirmed"], v1["corrected"], v1["rejected"], v1["missed"]) == (5, 1, 9, 1)
    assert v1["reviewed_precision"] == pytest.approx(6 / 15)
    assert v1["missed_lesion_rate"] == pytest.approx(1 / 7)
    assert (v2["version"], v2["predictions"], v2["reviewed"], v2["coverage"]) == ("2", 1, 0, 0.0)

    table = radflow(ws, "review", "monitoring", "--by-day")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "version", "predictions", "reviewed"]
    assert lines[1].split()[:6] == ["radflow-detector", "1", "6", "5", "0.833", "0.400"]
    assert any(line.split()[:1] == ["2026-12-03"] for line in lines)
    prom = radflow(ws, "review", "monitoring", "--prometheus")
    assert prom.stdout == review.prometheus_text(expected)
