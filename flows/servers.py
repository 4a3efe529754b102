"""The services a radflow installation talks to: whether MLflow, Prefect and S3 can be reached before a
command starts its work (`check_reachable`), and the long-running processes radflow starts itself: a
local Prefect server (`radflow server start`) and the runner that serves the nightly deployment on its
schedule (`radflow schedule`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import ConfigError
from pipeline_steps.core.layout import Layout

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200


# ---------------------------------------------------------------------------------------------
# Fail fast: every service a command needs is checked before it does any work

# Short: a service that answers at all answers a health check in well under a second on a LAN.
PROBE_TIMEOUT_S = 3.0
# The S3 endpoints radflow's S3 clients take from the environment (boto3, DVC, MLflow's artifacts).
S3_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
# Database schemes MLflow accepts as a tracking URI, and their default ports.
DATABASE_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


class ServiceUnreachable(ConfigError):
    """A service a command needs did not answer; nothing was done."""


@dataclass(frozen=True)
class Service:
    variable: str  # the environment variable that points at it
    url: str
    probe_url: str  # what is asked (a health endpoint), or the URL itself
    advice: str  # what to do about it


def needed_services(
    *, mlflow: bool = False, prefect: bool = False, s3: bool = False, pacs: bool = False
) -> list[Service]:
    """The services named in the environment that a command needing these kinds talks to. Unset
    variables mean local defaults (the workspace's SQLite store, Prefect's temporary server, AWS's
    own S3 endpoint): nothing to check."""
    found = []
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if mlflow and uri and urlsplit(uri).scheme.split("+")[0] in ("http", "https", *DATABASE_PORTS):
        probe = f"{uri.rstrip('/')}/health" if uri.startswith("http") else uri
        found.append(
            Service(
                "MLFLOW_TRACKING_URI",
                uri,
                probe,
                "start the server or unset it to use the local default (the workspace's SQLite store)",
            )
        )
    api = os.environ.get("PREFECT_API_URL", "").strip()
    if prefect and api:
        found.append(
            Service(
                "PREFECT_API_URL",
                api,
                f"{api.rstrip('/')}/health",
                "start the server (`radflow server start`) or unset it to use Prefect's temporary "
                "local server",
            )
        )
    if s3:
        for variable in S3_ENDPOINT_VARIABLES:
            endpoint = os.environ.get(variable, "").strip()
            if endpoint:
                found.append(
                    Service(
                        variable,
                        endpoint,
                        endpoint,
                        "start the S3 service or unset it to use the default endpoint",
                    )
                )
    url = os.environ.get("RADFLOW_PACS_URL", "").strip()
    if pacs and url:
        # Any HTTP answer counts, a 401 included: the credentials are the PACS edge's own check.
        found.append(
            Service("RADFLOW_PACS_URL", url, url, "start the PACS or correct its DICOMweb base URL")
        )
    return found


def probe(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the service at `url` answers; else why not, in a few words. Any HTTP answer below
    500 counts (a health endpoint's 200, an S3 endpoint's 403): the server is there."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    try:
        if scheme in ("http", "https"):
            try:
                with urllib.request.urlopen(url, timeout=timeout_s):
                    return None
            except urllib.error.HTTPError as exc:
                return None if exc.code < 500 else f"it answered HTTP {exc.code}"
        if not parts.hostname:
            return "no host in the URL"
        port = parts.port or DATABASE_PORTS.get(scheme)
        if port is None:
            return None  # a scheme radflow cannot probe: let the tool itself say
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return _why(exc, timeout_s)


def _why(exc: BaseException, timeout_s: float) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.timeout | TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(reason, socket.gaierror):
        return "host name not found"
    text = str(getattr(reason, "strerror", None) or reason).strip()
    return text.splitlines()[0][:200] if text else type(reason).__name__


def check_reachable(
    *,
    mlflow: bool = False,
    prefect: bool = False,
    s3: bool = False,
    pacs: bool = False,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> None:
    """Raise ServiceUnreachable, naming each variable, its value (without a password) and what to do,
    when a service the command needs does not answer within `timeout_s`. Called at the start of every
    command that needs MLflow, Prefect, S3 or the PACS, before it does any work."""
    failures = []
    for service in needed_services(mlflow=mlflow, prefect=prefect, s3=s3, pacs=pacs):
        why = probe(service.probe_url, timeout_s)
        if why is not None:
            failures.append(
                f"{service.variable}={public_url(service.url)} is not reachable ({why}); "
                f"{service.advice}"
            )
    if failures:
        raise ServiceUnreachable("; and ".join(failures) + ". Nothing was done.")


def tool(name: str) -> str:
    """A console script of the running environment (prefect, mlflow, moto_server)."""
    return str(Path(sys.executable).parent / name)


def prefect_api_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def prefect_server_command(host: str, port: int, ui: bool = True) -> list[str]:
    command = [tool("prefect"), "server", "start", "--host", host, "--port", str(port)]
    return command + ["--analytics-off"] + ([] if ui else ["--no-ui"])


def public_url(url: str) -> str:
    """A database or service URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, what: str) -> float:
    """Poll `url` until it answers 200; seconds it took. Raises if the process exits or time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        with suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
            if reply.status == 200:
                return time.monotonic() - start
        time.sleep(0.25)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:g} s")


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; the process is reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def start_prefect_server(host: str, port: int, ui: bool = True) -> int:
    """Run `prefect server start` in the foreground until interrupted.

    The database is Prefect's own setting: SQLite under PREFECT_HOME (~/.prefect/prefect.db) unless
    PREFECT_API_DATABASE_CONNECTION_URL names another (postgresql+asyncpg://... for a team). Unlike
    Prefect's temporary server, this one runs the scheduler, so deployments' schedules fire."""
    from flows.nightly import ensure_concurrency_limit

    database = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or (
        f"SQLite in {os.environ.get('PREFECT_HOME', '~/.prefect')}/prefect.db"
    )
    url = prefect_api_url(host, port)
    proc = subprocess.Popen(prefect_server_command(host, port, ui))

    def forward(signum: int, frame: FrameType | None) -> None:
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        took = wait_ready(f"{url}/health", proc, 180, "prefect server")
        os.environ["PREFECT_API_URL"] = url
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: url}):
            ensure_concurrency_limit(Params().nightly.concurrency_limit)
        print(
            f"Prefect server ready in {took:.0f} s on {public_url(database)}.\n"
            f"In each shell that runs radflow:  export PREFECT_API_URL={url}\n"
            "Then `radflow schedule` serves the nightly deployment. Ctrl-C stops the server.",
            flush=True,
        )
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)
        signal.signal(signal.SIGTERM, previous)


def serve_nightly(layout: Layout, params: Params) -> None:
    """Create (or update) the `radflow-nightly` deployment with the cron of params.yaml and run its
    runner in this process until interrupted: scheduled runs execute here, in subprocesses."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.nightly import (
        DEPLOYMENT_NAME,
        ensure_concurrency_limit,
        nightly_retraining,
        on_server,
    )

    if not on_server():
        raise ConfigError(
            "radflow schedule needs a Prefect server (Prefect's temporary local server runs no "
            "scheduler). Start one with `radflow server start`, then "
            f"`export PREFECT_API_URL={prefect_api_url(DEFAULT_HOST, DEFAULT_PREFECT_PORT)}`."
        )
    nightly = params.nightly
    ensure_concurrency_limit(nightly.concurrency_limit)
    nightly_retraining.serve(
        name=DEPLOYMENT_NAME,
        schedules=[Cron(nightly.cron, timezone=nightly.timezone)],
        parameters={"workspace": str(layout.root)},
        tags=["radflow", "nightly"],
        description=(
            f"Nightly retraining of the workspace {layout.root}: landing sync, ingest, DVC push, "
            "decision, training pipeline and gate."
        ),
        # Loaded as flows.nightly in each run's subprocess, whatever the runner's working directory.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
