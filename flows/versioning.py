"""DVC edge: recording data/raw as a data version and stage outputs in dvc.lock, one DVC command at a time."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from pipeline_steps.errors import WorkspaceError
from pipeline_steps.layout import Layout


@contextmanager
def _workspace_lock(root: Path) -> Iterator[None]:
    """DVC fails when two commands share a workspace, so radflow queues its own calls instead."""
    lock_dir = root / ".radflow"
    lock_dir.mkdir(exist_ok=True)
    with (lock_dir / "dvc.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dvc(root: Path, *args: str) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    # Stage commands call `radflow step ...`; make sure the running environment's scripts are found.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with _workspace_lock(root):
        done = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, env=env
        )
    if done.returncode != 0:
        raise WorkspaceError(
            f"dvc {' '.join(args)} failed in {root}:\n{(done.stderr + done.stdout).strip()[-2000:]}"
        )
    return done.stdout


def data_version(layout: Layout) -> str:
    """The DVC md5 of data/raw (ends in `.dir`), as recorded in data/raw.dvc."""
    if not layout.raw_dvc.exists():
        raise WorkspaceError(
            f"{layout.raw_dvc}: no data version yet. Run `radflow ingest` or `radflow run`."
        )
    record = yaml.safe_load(layout.raw_dvc.read_text())
    return str(record["outs"][0]["md5"])


def record_raw(layout: Layout) -> str:
    """`dvc add data/raw` and return the new data version."""
    dvc(layout.root, "add", "-q", str(layout.raw.relative_to(layout.root)))
    return data_version(layout)


def commit_stages(layout: Layout) -> None:
    """Record the outputs of a Prefect run in dvc.lock, so `dvc status`/`dvc repro` see them as current."""
    dvc(layout.root, "commit", "-f", "-q")
