"""`mlflow models serve -m models:/radflow-detector@production --env-manager local` on loopback answers a
real HTTP request with boxes in original DICOM pixels, computed by the training code's own path, under
the serving rule of every path: DICOM bytes only (no server paths), ingestion's screening with its
reason codes, and each answer in the audit ledger before it is returned. `radflow predict` keeps
paths out of Prefect's database."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FAKE_PHI, build_dicom
from tests.integration.test_registry import build_workspace, free_port, stop, wait_http

pytestmark = pytest.mark.integration


def test_serving_prepares_pixels_exactly_as_the_preprocess_stage(tmp_path):
    from pipeline_steps.core.config import PreprocessParams
    from pipeline_steps.core.dicom_io import read_image
    from pipeline_steps.core.shards import QUANT
    from pipeline_steps.preprocess import PixelJob, process_file
    from pipeline_steps.serving.serving import prepare

    rng = np.random.default_rng(1)
    params = PreprocessParams(input_size=64, target_spacing_mm=2.0)
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        path = build_dicom(
            tmp_path / f"{photometric}.dcm",
            rng.integers(0, 4096, size=(300, 280), dtype=np.uint16),
            photometric=photometric,
        )
        image = read_image(path, 0.35)
        served, geometry = prepare(image, params)
        job = PixelJob("k", str(path), image.spacing.row_mm, image.spacing.col_mm, 300, 280)
        stored = process_file(job, params).pixels  # what training reads from its shard
        assert stored is not None
        assert np.array_equal(served, stored.astype(np.float32) / np.float32(QUANT))
        assert (geometry.orig_rows, geometry.orig_cols) == (300, 280)


def test_a_stored_serving_config_outlives_changes_to_the_params_models():
    from pipeline_steps.core.config import DetectionParams, IngestParams, PreprocessParams
    from pipeline_steps.serving.serving import ServingConfig

    config = ServingConfig.from_params(
        PreprocessParams(input_size=64, target_spacing_mm=2.0, workers=3),
        DetectionParams(score_threshold=0.4, max_detections=3),
        IngestParams(default_spacing_mm=0.2),
    )
    stored = json.loads(config.to_json())
    assert set(stored["preprocess"]) == {"input_size", "target_spacing_mm", "window", "percentiles"}
    # A later radflow dropped an option and reshaped a nested section: the model still loads.
    stored["test"]["retired_option"] = 1
    stored["test"]["baseline"] = {"retired_too": 1.0}
    assert ServingConfig.from_json(json.dumps(stored)) == ServingConfig(
        PreprocessParams(input_size=64, target_spacing_mm=2.0),
        DetectionParams(score_threshold=0.4, max_detections=3),
        0.2,
    )


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    """One registered version of a small detector (random weights), promoted to production."""
    from flows import registry, stages

    root = tmp_path_factory.mktemp("serve-ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workspace's own SQLite store
        mp.delenv("RADFLOW_LEDGER_URL", raising=False)
        layout, params = build_workspace(root, n_images=2)
        version = stages.register(layout, params).model_version
        with registry.governance(layout, params) as (reg, ledger):
            registry.promote(
                reg, ledger, version, "production", actor="test", reason="serve", force=True
            )
    return layout, params


@pytest.fixture(scope="module")
def server(production):
    layout, _ = production
    port = free_port()
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"sqlite:///{layout.mlflow_db}",
        # the served model writes the workspace's ledger (and looks its version up in the registry)
        RADFLOW_LEDGER_URL=f"sqlite:///{layout.root / 'ledger.db'}",
        # the server execs `uvicorn` from PATH: the running environment's scripts must be found
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    for name in ("RADFLOW_SERVING_UNAUDITED", "RADFLOW_SERVING_INPUT_DIR"):
        env.pop(name, None)
    log = (layout.root / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/radflow-detector@production",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        cwd=layout.root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the server runs uvicorn in a child: stop the whole group
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, 240, "mlflow models serve")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


def _invoke(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert reply.status == 200
        return json.loads(reply.read())["predictions"]


def test_the_production_alias_serves_boxes_over_http(server, production, tmp_path):
    import keras

    from pipeline_steps.core.detector import predict_boxes
    from pipeline_steps.core.dicom_io import read_image
    from pipeline_steps.serving.serving import BOX_KEYS, prepare

    layout, params = production
    path = build_dicom(
        tmp_path / "query.dcm",
        np.random.default_rng(7).integers(0, 4096, size=(300, 280), dtype=np.uint16),
    )
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    ct = build_dicom(tmp_path / "ct.dcm", modality="CT")
    rows = _invoke(
        server,
        {
            "dataframe_split": {
                "columns": ["dicom"],
                "data": [
                    [encoded],
                    ["not a DICOM at all"],
                    [base64.b64encode(ct.read_bytes()).decode("ascii")],
                ],
            },
            "params": {"score_threshold": 0.0},
        },
    )
    assert len(rows) == 3
    as_bytes, bad, refused = rows
    assert {row["audit"] for row in rows} == {"recorded"}
    assert refused["reason"] == "modality_not_allowed" and refused["boxes"] == []

    image = read_image(path, params.ingest.default_spacing_mm)
    assert as_bytes["image_sha256"] == image.pixel_sha256 and as_bytes["error"] == ""
    assert (as_bytes["rows"], as_bytes["columns"]) == (300, 280)
    boxes = as_bytes["boxes"]
    # threshold 0: every kept peak, less those wholly in the letterbox padding
    assert 1 <= len(boxes) <= params.test.max_detections
    for box in boxes:
        assert set(box) == {*BOX_KEYS, "label"} and box["label"] == "opacity"
        assert 0 <= box["x_min"] <= box["x_max"] <= 280 and 0 <= box["y_min"] <= box["y_max"] <= 300

    # The server's boxes are the training code's: preprocess, predict, map back to original pixels.
    model = keras.models.load_model(layout.model, compile=False)
    pixels, geometry = prepare(image, params.preprocess)
    found = predict_boxes(
        model, pixels[None], params.test.model_copy(update={"score_threshold": 0.0})
    )[0]
    expected = geometry.inverse(found[:, :4])
    expected[:, [0, 2]] = expected[:, [0, 2]].clip(0, 280)
    expected[:, [1, 3]] = expected[:, [1, 3]].clip(0, 300)
    # boxes wholly in the letterbox padding have no area left in the image: not served
    inside = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
    served = np.array([[b[k] for k in BOX_KEYS] for b in boxes])
    np.testing.assert_allclose(served[:, :4], expected[inside], atol=1e-3)
    np.testing.assert_allclose(served[:, 4], found[inside, 4], atol=1e-5)

    assert bad["boxes"] == [] and bad["reason"] == "not_base64"

    # Without params the model's own operating point applies (0.3): an untrained net finds nothing.
    (default,) = _invoke(server, {"dataframe_split": {"columns": ["dicom"], "data": [[encoded]]}})
    assert default["boxes"] == [] and default["image_sha256"] == image.pixel_sha256

    # Every answer is in the workspace's ledger, traceable to the registered version.
    from pipeline_steps.governance.ledger import open_ledger

    with open_ledger(layout.root) as ledger:
        recorded = {e.subject: e.payload for e in ledger.entries(kind="prediction")}
        assert ledger.verify().ok
    for row in [*rows, default]:
        assert recorded[row["prediction_id"]]["boxes"] == row["boxes"]
    version = recorded[as_bytes["prediction_id"]]["model"]
    assert (version["name"], version["version"]) == ("radflow-detector", "1")
    assert recorded[refused["prediction_id"]]["reason"] == "modality_not_allowed"


def _answer(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "prediction_id"}


def test_server_paths_are_refused_alike_whether_or_not_they_exist(server, tmp_path):
    existing = build_dicom(tmp_path / "on_the_server.dcm")
    missing = tmp_path / "not_there.dcm"
    # one request each, so that each answer is row 0 of its own
    values = [str(existing), str(missing), f"file:{existing}", f"file:{missing}"]
    rows = [
        _invoke(server, {"dataframe_split": {"columns": ["dicom"], "data": [[value]]}})[0]
        for value in values
    ]
    plain, plain_missing, prefixed, prefixed_missing = rows
    assert _answer(plain) == _answer(plain_missing) and plain["reason"] == "not_base64"
    assert _answer(prefixed) == _answer(prefixed_missing)
    assert prefixed["reason"] == "path_not_allowed" and prefixed["boxes"] == []
    assert str(existing) not in json.dumps(rows)


def test_a_decompression_bomb_is_refused_over_http(server):
    from tests.unit.test_serving_rule import _rle_bomb

    encoded = base64.b64encode(_rle_bomb()).decode("ascii")  # 4.5 MB declaring 12000 x 12000
    (row,) = _invoke(server, {"dataframe_split": {"columns": ["dicom"], "data": [[encoded]]}})
    assert row["reason"] == "too_large" and row["boxes"] == [] and row["audit"] == "recorded"


def test_prefect_keeps_no_path_of_a_batch_prediction(production, tmp_path):
    """`radflow predict` over a folder whose names name a patient, with Prefect's temporary server
    keeping its database in a folder of the test's own: the stored flow run's parameters are the job
    id, the image count and the options, and no path or name is anywhere in that database."""
    from tests.e2e.test_smoke import _embedded_env

    layout, _ = production
    inputs = tmp_path / FAKE_PHI["PatientID"]
    build_dicom(inputs / "Testperson_Ada.dcm")
    build_dicom(inputs / "Testperson_Ada_2.dcm")
    out = tmp_path / "Testperson_Ada.jsonl"
    home = tmp_path / "prefect-home"
    env = _embedded_env()
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    env["PREFECT_HOME"] = str(home)
    # a new home migrates a new database first: slower than Prefect's 20 s on a busy machine
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(layout.root), "predict"]
        + ["--input", str(inputs), "--out", str(out), "--version", "1", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (
        summary["images"] == 2 and str(inputs) in out.read_text()
    )  # the caller's records keep them

    with sqlite3.connect(home / "prefect.db") as db:
        (stored,) = db.execute(
            "SELECT flow_run.parameters FROM flow_run JOIN flow ON flow.id = flow_run.flow_id "
            "WHERE flow.name = 'batch_prediction'"
        ).fetchall()
    parameters = json.loads(stored[0])
    assert parameters == {
        "job": summary["job"],
        "images": 2,
        "stage": None,
        "version": "1",
        "threshold": None,
        "sr_out": False,
        "progress_bar": False,
    }
    stored_bytes = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
    for value in ("Testperson", FAKE_PHI["PatientID"], str(tmp_path), str(layout.root)):
        assert value.encode() not in stored_bytes, value
