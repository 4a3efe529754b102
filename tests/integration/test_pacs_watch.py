"""`radflow pacs watch` against a real Orthanc: a new study gets one SR in the original study (boxes
as the ledger recorded them, traceable by the SR's UID), a second poll adds nothing, an outage or a
crash between the ledger and the STOW is finished by the next poll without a second prediction,
unusable instances are refused with a reason, wrong credentials name the settings, SIGTERM stops
the service, and no patient identity reaches the ledger, the logs or the watcher's files."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid

from flows.pacs import Pacs, PacsSettings, PacsUnavailable
from tests.integration.pacs_common import synthetic_studies
from tests.integration.test_model_serving import production  # noqa: F401  (a module fixture)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def watched(production):  # noqa: F811
    """The production workspace, watching every study date, with every box in the SR (the model's
    random weights find nothing at its own operating point)."""
    layout, _ = production
    data = yaml.safe_load(layout.params_file.read_text())
    data.setdefault("pacs", {})["watch"] = {
        "interval_s": 0.5,
        "modalities": ["DX", "CR"],
        "lookback_days": 0,
        "series_number": 9001,
        "score_threshold": 0.0,
    }
    data["pacs"].update({"timeout_s": 5.0, "attempts": 2, "backoff_s": 0.1})
    layout.params_file.write_text(yaml.safe_dump(data))
    from flows.workspace import open_workspace

    return open_workspace(layout.root)


@pytest.fixture
def pacs_env(orthanc, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workspace's own SQLite store
    monkeypatch.delenv("RADFLOW_LEDGER_URL", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for name, value in orthanc.env().items():
        monkeypatch.setenv(name, value)
    return orthanc.env()


def _study(tmp_path: Path, seed: int) -> tuple[Path, Dataset]:
    (path,) = synthetic_studies(tmp_path / f"study-{seed}", 1, seed=seed)
    return path, pydicom.dcmread(path)


def _pdf_in(study: Dataset) -> bytes:
    """A referral letter (Encapsulated PDF) filed in the same study: not an image."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EncapsulatedPDFStorage, meta.MediaStorageSOPInstanceUID
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyID"):
        if keyword in study:
            setattr(ds, keyword, study.data_element(keyword).value)
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n% a referral letter\n%%EOF\n"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _srs(pacs: Pacs, study_uid: str) -> list[dict]:
    return pacs.client.search_for_instances(study_uid, search_filters={"Modality": "SR"})


def _uid(item: dict, tag: str) -> str:
    return str(item[tag]["Value"][0])


def _predictions(layout) -> list[dict]:
    from pipeline_steps.governance.ledger import open_ledger

    with open_ledger(layout.root) as ledger:
        return [e.payload for e in ledger.entries(kind="prediction")]


def _watcher(layout, params, env, pacs_class=Pacs):
    from flows.pacs_watch import Watcher
    from pipeline_steps.core.deid import pseudonym_key

    settings = PacsSettings.from_env(env, timeout_s=5, attempts=2, backoff_s=0.1)
    return Watcher(layout, params, pacs_class(settings), pseudonym_key().secret)


def _cli(layout, *args: str) -> int:
    """`radflow pacs watch ARGS` in this process, without the CLI's start-up (which would route
    logging to this test's captured stderr for good); an error raises as the CLI would report it."""
    from flows.cli import build_parser

    parsed = build_parser().parse_args(["pacs", "watch", *args])
    parsed.workspace = str(layout.root)
    return int(parsed.func(parsed))


def _once(layout) -> tuple[int, dict]:
    """One poll as `radflow pacs watch --once --json` makes it: the exit status and the summary line.
    (The command's own printing is exercised by the service test, in a subprocess.)"""
    from flows.pacs_watch import StopRequest, open_watcher, serve_polls

    polls: list[dict] = []
    watcher = open_watcher(layout.root)
    rc = serve_polls(watcher, interval_s=0.0, once=True, stop=StopRequest(), report=polls.append)
    (summary,) = polls
    return rc, summary


def _phi(ds: Dataset) -> list[str]:
    return [
        str(ds.PatientName),
        str(ds.PatientID),
        str(ds.StudyInstanceUID),
        str(ds.SOPInstanceUID),
    ]


def test_a_new_study_gets_one_sr_in_its_study_traceable_by_its_uid(
    watched, orthanc, pacs_env, tmp_path, caplog
):
    from pipeline_steps.serving.sr import build_sr, read_sr_boxes

    layout, _ = watched
    path, source = _study(tmp_path, seed=31)
    # Another producer's SR in the study: never predicted on.
    foreign = build_sr(
        source, [], prediction_id="foreign", model_name="other-cad", model_version="7"
    )
    buffer = io.BytesIO()
    foreign.save_as(buffer, enforce_file_format=True)
    orthanc.upload([path, _pdf_in(source), buffer.getvalue()])
    before = len(_predictions(layout))

    import logging

    # Prefect's logging set-up may stop radflow's loggers from propagating: listen on them directly.
    watch_logger = logging.getLogger("radflow")
    watch_logger.addHandler(caplog.handler)
    caplog.set_level("DEBUG", logger="radflow")
    rc, summary = _once(layout)
    assert rc == 0
    assert summary["status"] == "ok" and summary["predicted"] == 1
    assert summary["refused"] == {"not_image": 1}, summary
    assert summary["reports_stored"] == 1 and summary["store_failed"] == 0
    rows = _predictions(layout)[before:]
    assert len(rows) == 2  # the image and the letter; the SRs are not predicted on
    (row,) = [r for r in rows if "reason" not in r]
    (refused,) = [r for r in rows if "reason" in r]
    assert refused["reason"] == "not_image" and "sr_sop_instance_uid" not in refused

    # The SR is in the ORIGINAL study, in a new series, with the boxes the ledger recorded.
    pacs = Pacs.from_env()
    ours = [
        i
        for i in _srs(pacs, source.StudyInstanceUID)
        if _uid(i, "00080018") == row["sr_sop_instance_uid"]
    ]
    assert len(ours) == 1
    series = _uid(ours[0], "0020000E")
    assert series != source.SeriesInstanceUID
    sr = pacs.retrieve(source.StudyInstanceUID, series, row["sr_sop_instance_uid"])
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert (sr.Manufacturer, sr.ManufacturerModelName) == ("radflow", row["model"]["name"])
    assert sr.SoftwareVersions == row["model"]["version"] == "1"
    boxes = read_sr_boxes(sr)
    assert boxes and len(boxes) == len(row["boxes"])
    assert {b["referenced_sop_instance_uid"] for b in boxes} == {source.SOPInstanceUID}
    keys = ("x_min", "y_min", "x_max", "y_max", "score")
    np.testing.assert_allclose(
        [[b[k] for k in keys] for b in boxes],
        [[b[k] for k in keys] for b in row["boxes"]],
        rtol=1e-5,
        atol=1e-3,
    )

    # `radflow trace <SR UID>` leads to the model version, its run and the training data version.
    # In a subprocess, as a user runs it: run in this process, trace left pytest's captured streams
    # closed behind it (seen here; the cause was not pinned down).
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(layout.root)]
        + ["trace", row["sr_sop_instance_uid"], "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    # exit 1: this workspace has no GX store to check the validation against; the rest holds
    traced = json.loads(done.stdout.strip().splitlines()[-1])
    assert traced["checks"]["ledger_row_verified"] and traced["checks"]["run_matches_version"]
    assert traced["prediction"]["prediction_id"] == row["prediction_id"]
    assert traced["model"]["version"] == "1" and traced["run"]["run_id"] == row["model"]["run_id"]
    assert traced["data"]["data_version"] == row["data_version"] and row["data_version"]
    assert traced["checks"]["data_version_matches_model"]

    # A second poll stores no second SR and records no second prediction.
    rc, again = _once(layout)
    assert rc == 0
    assert again["instances"] == 0 and again["reports_stored"] == 0
    assert len(_predictions(layout)) == before + 2
    assert len(_srs(pacs, source.StudyInstanceUID)) == 2  # ours and the other producer's

    # No patient identity or original UID in the ledger, the logs or the watcher's files.
    ledger_text = json.dumps(_predictions(layout))
    watch_logger.removeHandler(caplog.handler)
    logs = caplog.text
    assert "pacs watch: poll done" in logs  # the logs were captured
    files = b"".join(p.read_bytes() for p in layout.pacs_watch_state.rglob("*") if p.is_file())
    for value in _phi(source):
        assert value not in ledger_text and value not in logs, value
        assert value.encode() not in files, value
    assert orthanc.password not in logs


def test_an_outage_fails_the_poll_cleanly_and_the_next_poll_resumes(
    watched, orthanc, pacs_env, tmp_path
):
    layout, params = watched
    path, source = _study(tmp_path, seed=32)
    orthanc.upload([path])
    before = len(_predictions(layout))
    watcher = _watcher(layout, params, pacs_env)

    def outage() -> bool:  # after the study search, before the study's instances are asked for
        orthanc.stop()
        return False

    with pytest.raises(PacsUnavailable) as err:
        watcher.poll(outage)
    assert "RADFLOW_PACS_URL" in str(err.value) and orthanc.password not in str(err.value)
    assert len(_predictions(layout)) == before  # nothing recorded, nothing marked handled

    orthanc.start()
    summary = watcher.poll()
    assert summary.reports_stored == 1 and summary.predicted == 1
    assert len(_predictions(layout)) == before + 1
    assert len(_srs(watcher.pacs, source.StudyInstanceUID)) == 1


class _CrashBeforeStore(Pacs):
    """The PACS goes down between the ledger write and the STOW (a real outage, at that moment)."""

    orthanc = None

    def store(self, datasets, study_uid=None):
        self.orthanc.stop()
        return super().store(datasets, study_uid)


def test_a_crash_between_ledger_and_stow_is_finished_without_a_second_prediction(
    watched, orthanc, pacs_env, tmp_path
):
    layout, params = watched
    path, source = _study(tmp_path, seed=33)
    orthanc.upload([path])
    before = len(_predictions(layout))
    _CrashBeforeStore.orthanc = orthanc
    with pytest.raises(PacsUnavailable):
        _watcher(layout, params, pacs_env, _CrashBeforeStore).poll()
    (recorded,) = _predictions(layout)[before:]  # the ledger row came first

    orthanc.start()
    watcher = _watcher(layout, params, pacs_env)
    summary = watcher.poll()
    assert (summary.predicted, summary.reports_stored, summary.finished_from_ledger) == (0, 1, 1)
    assert len(_predictions(layout)) == before + 1
    (sr,) = _srs(watcher.pacs, source.StudyInstanceUID)
    assert _uid(sr, "00080018") == recorded["sr_sop_instance_uid"]

    # Even with its state lost, the watcher asks the PACS before storing: nothing twice.
    layout.pacs_watch_handled.unlink()
    summary = watcher.poll()
    assert (summary.predicted, summary.reports_stored, summary.already_in_pacs) == (0, 0, 1)
    assert len(_predictions(layout)) == before + 1
    assert len(_srs(watcher.pacs, source.StudyInstanceUID)) == 1


def test_a_wrong_password_is_an_error_naming_the_settings(watched, orthanc, pacs_env, monkeypatch):
    from flows.pacs import PacsAuthError

    layout, _ = watched
    monkeypatch.setenv("RADFLOW_PACS_PASSWORD", "not-the-password-456")
    with pytest.raises(PacsAuthError) as err:
        _cli(layout, "--once")
    message = str(err.value)  # what `radflow` prints after "radflow: error:", exit status 1
    assert (
        "RADFLOW_PACS_USER" in message and "RADFLOW_PACS_PASSWORD" in message and "401" in message
    )
    assert "not-the-password-456" not in message and orthanc.password not in message


def test_the_service_polls_until_sigterm_and_stops_cleanly(watched, orthanc, pacs_env, tmp_path):
    layout, _ = watched
    path, source = _study(tmp_path, seed=34)
    orthanc.upload([path])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--workspace", str(layout.root)]
        + ["pacs", "watch", "--interval", "0.5", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        polls = []
        deadline = time.monotonic() + 240
        while len(polls) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"the watcher exited: {proc.stderr.read()[-3000:]}"
            polls.append(json.loads(line))
        assert polls[0]["reports_stored"] == 1 and polls[1]["reports_stored"] == 0
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert rc == 0, err[-3000:]
    assert "stopped by SIGTERM" in err
    for value in _phi(source):
        assert value not in err, value


def test_the_prefect_flow_is_one_poll_with_no_study_in_its_parameters(
    watched, orthanc, pacs_env, tmp_path
):
    from flows.pacs_watch import pacs_watch

    layout, _ = watched
    path, source = _study(tmp_path, seed=35)
    orthanc.upload([path])
    assert set(pacs_watch.parameters.properties) == {"workspace", "stage"}
    summary = pacs_watch.fn(str(layout.root))  # the flow's body, as a deployment run calls it
    assert summary["reports_stored"] == 1 and summary["model"]["version"] == "1"
    assert len(_srs(Pacs.from_env(), source.StudyInstanceUID)) == 1
