"""A dead service is found first: every command that needs MLflow, Prefect or S3 checks it before any
work and names the variable that points at it; and a run that fails after training (its registry went
away) leaves the previous model and metrics in place."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from flows import servers
from tests.integration.conftest import (
    FlakyProxy,
    free_port,
    merge,
    mlflow_server,
    registered_versions,
    wait_for,
)

pytestmark = pytest.mark.integration

TINY = {
    "synth": {"n_images": 24, "native_size": [512, 512], "images_per_patient": [1, 1]},
    "validate": {"min_images": 4},
    "preprocess": {
        "input_size": 64,
        "target_spacing_mm": 5.0,
        "shard_size": 8,
        "split": {"val_fraction": 0.25, "test_fraction": 0.25},
    },
    "train": {"epochs": 1, "batch_size": 4, "width": 4, "depth": 2},
    "gate": {"thresholds": {}, "n_boot": 50},
}
# What a workspace held before the run: a model and its metrics that must survive a failed run.
BEFORE = {
    "models/detector.keras": b"the previous model",
    "metrics.json": b'{"ap50": 0.5}',
    "reports/train_history.json": b'{"history": {"loss": [1.0]}}',
}


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "PREFECT_API_URL",
        "RADFLOW_LEDGER_URL",
        *servers.S3_ENDPOINT_VARIABLES,
    ):
        out.pop(name, None)
    out["RADFLOW_CODE_VERSION"] = "fail-fast-test-code"
    out.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return out | extra


def radflow(ws: Path, *args: str, timeout: float = 120, **extra: str):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), *args],
        capture_output=True,
        text=True,
        env=env(**extra),
        timeout=timeout,
    )


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    from flows import workspace

    root = tmp_path / "ws"
    workspace.init(root)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(merge(yaml.safe_load(params.read_text()), TINY)))
    for rel, blob in BEFORE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blob)
    return root


def unchanged(ws: Path) -> bool:
    return all((ws / rel).read_bytes() == blob for rel, blob in BEFORE.items())


def dead_url(path: str = "") -> str:
    return f"http://127.0.0.1:{free_port()}{path}"


def test_a_dead_tracking_server_stops_run_before_any_work(ws):
    url = dead_url()
    done = radflow(ws, "run", MLFLOW_TRACKING_URI=url)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip() == (
        f"radflow: error: MLFLOW_TRACKING_URI={url} is not reachable (connection refused); start "
        "the server or unset it to use the local default (the workspace's SQLite store). "
        "Nothing was done."
    )
    assert not (ws / "data" / "raw.dvc").exists()  # nothing synthesized, nothing trained
    assert unchanged(ws)


def test_a_dead_prefect_or_s3_endpoint_stops_run_and_nightly_naming_each(ws):
    prefect, s3 = dead_url("/api"), dead_url()
    done = radflow(ws, "run", PREFECT_API_URL=prefect)
    assert done.returncode == 1
    assert f"PREFECT_API_URL={prefect} is not reachable (connection refused)" in done.stderr
    assert "radflow server start" in done.stderr and "Traceback" not in done.stderr

    done = radflow(ws, "nightly", PREFECT_API_URL=prefect, AWS_ENDPOINT_URL_S3=s3)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"PREFECT_API_URL={prefect} is not reachable" in done.stderr
    assert f"AWS_ENDPOINT_URL_S3={s3} is not reachable (connection refused)" in done.stderr
    assert not (ws / "data" / "raw.dvc").exists() and unchanged(ws)


def test_registry_commands_fail_fast_on_a_dead_tracking_server(ws):
    url = dead_url()
    for args in (
        ("models",),
        ("promote", "1", "--to", "staging", "--reason", "x"),
        ("rollback", "--reason", "x"),
    ):
        done = radflow(ws, *args, MLFLOW_TRACKING_URI=url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="7")
        assert done.returncode == 1, (args, done.stderr)
        assert f"MLFLOW_TRACKING_URI={url} is not reachable (connection refused)" in done.stderr
        assert "Traceback" not in done.stderr
    # The history is the ledger's alone: it needs no MLflow.
    assert radflow(ws, "models", "history", MLFLOW_TRACKING_URI=url).returncode == 0


def test_serve_api_fails_fast_on_a_dead_tracking_server(ws):
    url = dead_url()
    done = radflow(
        ws, "serve-api", "--insecure-no-auth", "--port", str(free_port()), MLFLOW_TRACKING_URI=url
    )
    assert done.returncode == 1, done.stderr
    assert f"MLFLOW_TRACKING_URI={url} is not reachable (connection refused)" in done.stderr
    assert "Nothing was done" in done.stderr and "Traceback" not in done.stderr


class _Answer(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(int(self.path.strip("/").split("/")[0] or 200))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_probe_takes_any_answer_below_500_and_names_the_rest():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert servers.probe(f"{base}/200") is None
        assert (
            servers.probe(f"{base}/403") is None
        )  # an S3 endpoint without credentials: it is there
        assert servers.probe(f"{base}/503") == "it answered HTTP 503"
        assert servers.probe(dead_url()) == "connection refused"
        assert servers.probe("http://no-such-host.invalid:5000") == "host name not found"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
def test_a_run_whose_registry_goes_away_after_training_keeps_the_previous_outputs(ws, tmp_path):
    """The registry answers the start-up check, then goes down once the model is trained: the run
    fails at `register`, and the model and metrics the workspace had are back in place."""
    mlflow = mlflow_server(
        tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), env={}
    ).start()
    proxy = FlakyProxy(int(mlflow.ready_url.split(":")[2].split("/")[0]))
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "--workspace", str(ws), "run"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(
                MLFLOW_TRACKING_URI=proxy.url,
                MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                MLFLOW_HTTP_REQUEST_TIMEOUT="5",
            ),
        )
        model = ws / "models" / "detector.keras"
        try:
            wait_for(
                lambda: (
                    run.poll() is not None or model.read_bytes() != BEFORE["models/detector.keras"]
                ),
                timeout=900,
                what="the train stage's new model",
                interval=0.1,
            )
            assert run.poll() is None, run.communicate()[1][-3000:]
            proxy.down()
            _, err = run.communicate(timeout=900)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        assert run.returncode == 1, err[-3000:]
        # Registration is where it failed: the first call to the registry after training.
        assert re.search(rf"radflow: error: MLflow (registry )?at {proxy.url}", err), err[-3000:]
        assert unchanged(ws)  # the previous model, metrics and history, byte for byte
        assert not (ws / ".radflow" / "previous_outputs").exists()
        proxy.up()
        assert registered_versions(proxy.url) == []
    finally:
        proxy.close()
        mlflow.stop()
