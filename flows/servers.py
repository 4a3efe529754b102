"""Long-running processes of a radflow installation: a local Prefect server (`radflow server start`) and the
runner that serves the nightly deployment on its schedule (`radflow schedule`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import ConfigError
from pipeline_steps.core.layout import Layout

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200


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
