"""Real services on loopback for the integration tests: moto's S3 server, PostgreSQL (postgres.py),
MLflow and Prefect servers, and a TCP proxy that injects network faults. Every process started here is
stopped by the fixture that started it, pass or fail."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from flows.servers import prefect_api_url, prefect_server_command, stop, tool, wait_ready
from tests.integration.orthanc import Orthanc, OrthancUnavailable, orthanc_server
from tests.integration.postgres import Postgres, PostgresUnavailable, postgres_server

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "radflow-test",
    "AWS_SECRET_ACCESS_KEY": "radflow-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server subprocess with its log in a file; `start()` waits until `ready_url` answers."""

    def __init__(
        self,
        name: str,
        command: list[str],
        ready_url: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        timeout: float = 180,
    ) -> None:
        self.name, self.command, self.ready_url = name, command, ready_url
        self.log = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.env = dict(os.environ, **(env or {}))
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        try:
            wait_ready(self.ready_url, self.proc, self.timeout, self.name)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n--- {self.log} ---\n{self.log_tail()}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@contextmanager
def server(*args: object, **kwargs: object) -> Iterator[ServerProcess]:
    proc = ServerProcess(*args, **kwargs)  # type: ignore[arg-type]
    try:
        yield proc.start()
    finally:
        proc.stop()


# -- S3 ------------------------------------------------------------------------------------------


class Moto:
    """moto's standalone S3 server on a fixed loopback port; stop() is an outage, start() a restart
    (moto keeps its state in memory, so a restart starts empty)."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = ServerProcess(
            "moto",
            [tool("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            f"{self.url}/moto-api/",
            log_dir,
            timeout=60,
        )

    def start(self) -> Moto:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, **_boto_kwargs())


def _boto_kwargs() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
    }


@pytest.fixture
def aws_env(monkeypatch):
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def moto(tmp_path_factory, aws_env) -> Iterator[Moto]:
    """A fresh S3 server for one test."""
    server = Moto(tmp_path_factory.mktemp("moto")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def moto_module(tmp_path_factory) -> Iterator[Moto]:
    """One S3 server shared by a module's tests (set AWS_* yourself, e.g. with aws_env)."""
    server = Moto(tmp_path_factory.mktemp("moto")).start()
    try:
        yield server
    finally:
        server.stop()


class FlakyProxy:
    """A TCP proxy on loopback in front of a server. `down()` makes it drop every connection (an
    outage as clients see it); `fail_next(n)` drops only the next n; `connections` counts attempts."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self._drop_all = False
        self._drop_next = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        with self._lock:
            self._drop_all = True
            for sock in list(self._open):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def up(self) -> None:
        with self._lock:
            self._drop_all = False

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._drop_next = n

    def close(self) -> None:
        self._closed = True
        self.down()
        with suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                drop = self._drop_all or self._drop_next > 0
                self._drop_next = max(self._drop_next - 1, 0)
            if drop:
                # RST rather than FIN: the client sees "connection reset", as in a real outage.
                client.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with self._lock:
                    self._open.discard(sock)


@pytest.fixture
def flaky_s3(moto) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(moto.port)
    try:
        yield proxy
    finally:
        proxy.close()


# -- PostgreSQL ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The server at RADFLOW_TEST_POSTGRES_URL, else a throwaway cluster for the session. Tests make
    their own databases in it (`postgres.database(prefix)`). No server fails the tests, never skips."""
    try:
        with postgres_server() as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


# -- Orthanc (a PACS with DICOMweb) ----------------------------------------------------------------


@pytest.fixture
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    """A fresh Orthanc with DICOMweb and authentication on, on a free loopback port. No Orthanc
    installed fails the test, never skips (`make test` installs it as root on Debian/Ubuntu)."""
    try:
        with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
            yield server
    except OrthancUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


# -- MLflow and Prefect servers -------------------------------------------------------------------


def mlflow_server(
    log_dir: Path, backend: str, artifacts: str, env: dict[str, str], port: int | None = None
) -> ServerProcess:
    port = port or free_port()
    return ServerProcess(
        "mlflow",
        [
            tool("mlflow"),
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            artifacts,
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        f"http://127.0.0.1:{port}/health",
        log_dir,
        env=env,
    )


def prefect_server(log_dir: Path, database_url: str, home: Path) -> ServerProcess:
    port = free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Deployments' schedules become runs within seconds, not the default minute.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
    }
    return ServerProcess(
        "prefect",
        prefect_server_command("127.0.0.1", port, ui=False),
        f"{prefect_api_url('127.0.0.1', port)}/health",
        log_dir,
        env=env,
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# -- nightly workspaces ------------------------------------------------------------------------------

# Small enough to train in seconds: 24 one-image patients at 64 px, one epoch of a 4-channel network.
TINY_NIGHTLY: dict = {
    "validate": {"min_images": 4},
    "preprocess": {
        "input_size": 64,
        "target_spacing_mm": 5.0,
        "shard_size": 8,
        "split": {"val_fraction": 0.25, "test_fraction": 0.25},
    },
    "train": {"epochs": 1, "batch_size": 4, "width": 4, "depth": 2},
    "gate": {"thresholds": {}, "n_boot": 50},
    "nightly": {"download_attempts": 2, "retries": 1, "retry_delay_s": 0.2},
}


def merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, key by key; an empty mapping replaces (e.g. no gate floors)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and value:
            out[key] = merge(base.get(key) or {}, value)
        else:
            out[key] = value
    return out


def set_params(root: Path, override: dict) -> None:
    import yaml

    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(merge(yaml.safe_load(params_file.read_text()), override)))


def synth_to_landing(s3, bucket: str, prefix: str, out: Path, n_images: int, seed: int) -> int:
    """Synthetic radiographs and their RSNA labels, dropped into s3://bucket/prefix/ as a site would."""
    from pipeline_steps.core.config import SynthParams
    from pipeline_steps.synthetic import generate_dataset

    summary = generate_dataset(
        SynthParams(native_size=(512, 512), images_per_patient=(1, 1)),
        out,
        n_images=n_images,
        seed=seed,
    )
    for path in sorted(summary.images_dir.iterdir()):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    s3.put_object(Bucket=bucket, Key=f"{prefix}/labels.csv", Body=summary.labels_path.read_bytes())
    return summary.n_images


def nightly_workspace(root: Path, landing: str, dvc_remote: str, s3_url: str, override: dict):
    """A workspace whose nightly syncs `landing` and pushes to the DVC remote `dvc_remote` on S3."""
    from flows import versioning, workspace

    layout = workspace.init(root)
    set_params(root, merge(TINY_NIGHTLY, merge({"nightly": {"landing": landing}}, override)))
    versioning.dvc(root, "remote", "add", "-d", "team", dvc_remote)
    versioning.dvc(root, "remote", "modify", "team", "endpointurl", s3_url)
    return layout


def registered_versions(tracking_uri: str, name: str = "radflow-detector") -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return sorted(
        (str(mv.version) for mv in client.search_model_versions(f"name='{name}'")), key=int
    )


class WebhookReceiver:
    """An HTTP endpoint on loopback that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/radflow"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    try:
        yield receiver
    finally:
        receiver.close()
