"""The whole PACS loop against a real Orthanc: annotated studies stored in the PACS -> `radflow nightly`
pulls them and trains -> the version is promoted to production -> a new study arrives in the PACS ->
`pacs watch` predicts it -> its SR is in the original study (queried back over QIDO-RS and parsed)
-> `radflow trace <SR UID>` leads to the training data version the nightly pulled."""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import pytest

from flows import decision, nightly, workspace
from flows.pacs import Pacs, json_value
from tests.integration.conftest import TINY_NIGHTLY, merge, set_params
from tests.integration.pacs_common import synthetic_studies
from tests.integration.test_pacs_nightly import annotated_studies

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _radflow(ws, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_pull_train_promote_watch_and_trace_the_sr_back_to_the_pulled_data(
    orthanc, tmp_path, monkeypatch
):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pacs_watch import StopRequest, open_watcher, serve_polls
    from pipeline_steps.serving.sr import read_sr_boxes

    for name, value in orthanc.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RADFLOW_PSEUDONYM_DEV_MODE", "1")
    monkeypatch.setenv(decision.CODE_VERSION_ENV, "pacs-loop-test-code")
    for key in (
        "MLFLOW_TRACKING_URI",
        "PREFECT_API_URL",
        "RADFLOW_LEDGER_URL",
        nightly.WEBHOOK_ENV,
    ):
        monkeypatch.delenv(key, raising=False)

    # 1. What the PACS holds: 8 radiographs, each with its annotation SR.
    orthanc.upload(annotated_studies(tmp_path / "synth", 8))
    layout = workspace.init(tmp_path / "ws")
    set_params(
        layout.root,
        merge(
            TINY_NIGHTLY,
            {
                "nightly": {"pacs": True},
                "pacs": {
                    "attempts": 2,
                    "backoff_s": 0.05,
                    # every study date, and every box in the SR (a one-epoch model scores low)
                    "watch": {"lookback_days": 0, "score_threshold": 0.0},
                },
                "validate": {"positive_fraction": [0.0, 1.0]},
            },
        ),
    )

    # 2. The nightly run pulls them from the PACS and trains.
    with prefect_test_harness(server_startup_timeout=120):
        night = nightly.nightly_retraining(str(layout.root))
    assert night["status"] == "trained", night
    assert night["pacs"]["new_images"] == 8 and night["pacs"]["sr_label_sources"] == 8
    version, data_version = night["model_version"], night["data_version"]

    # 3. A person promotes it to production, through the gate's evidence and the ledger.
    promoted = _radflow(
        layout.root, "promote", version, "--to", "production", "--reason", "PACS loop test"
    )
    assert promoted.returncode == 0, promoted.stderr

    # 4. The watcher starts (its first poll works through what the PACS already holds: the 8
    # training images, not their annotation SRs); then a new study arrives, and the next poll
    # predicts it alone.
    watcher = open_watcher(layout.root)
    polls: list[dict] = []
    for _ in range(2):
        assert (
            serve_polls(watcher, interval_s=0.0, once=True, stop=StopRequest(), report=polls.append)
            == 0
        )
        if len(polls) == 1:
            assert polls[0]["predicted"] == 8, polls
            (path,) = synthetic_studies(tmp_path / "new", 1, seed=123)
            source = pydicom.dcmread(path)
            orthanc.upload([path])
    assert polls[1]["predicted"] == 1 and polls[1]["reports_stored"] == 1, polls

    # 5. The SR is in the original study, made by the production version.
    pacs = Pacs.from_env()
    (sr_item,) = pacs.client.search_for_instances(
        source.StudyInstanceUID, search_filters={"Modality": "SR"}
    )
    sr_uid = json_value(sr_item, "00080018")
    sr = pacs.retrieve(source.StudyInstanceUID, json_value(sr_item, "0020000E"), sr_uid)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SoftwareVersions == version
    boxes = read_sr_boxes(sr)
    assert {b["referenced_sop_instance_uid"] for b in boxes} <= {source.SOPInstanceUID}

    # 6. Its UID leads back to the model version and the data version the nightly pulled.
    done = _radflow(layout.root, "trace", sr_uid, "--json")
    traced = json.loads(done.stdout.strip().splitlines()[-1])
    assert traced["checks"]["ledger_row_verified"], traced["checks"]
    assert traced["model"]["version"] == version
    assert traced["data"]["data_version"] == data_version
    assert str(source.PatientName) not in done.stdout + done.stderr
    assert orthanc.password not in done.stdout + done.stderr
