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

from pipeline_steps.core.errors import WorkspaceError
from pipeline_steps.core.layout import Layout


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
    """`dvc add data/raw`, commit `data/raw.dvc` in a workspace's git, and return the data version."""
    from flows.workspace import source_root

    dvc(layout.root, "add", "-q", str(layout.raw.relative_to(layout.root)))
    version = data_version(layout)
    # The git revision of data/raw.dvc is how an auditor finds a data version again. A workspace
    # (`radflow init`) is radflow's to commit in; the radflow source checkout is the developer's.
    if layout.root.resolve() != source_root().resolve():
        commit_data_version(layout, version)
    return version


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)


def commit_data_version(layout: Layout, version: str) -> str | None:
    """Commit only `data/raw.dvc` (and DVC's `data/.gitignore`); the new commit, or None if unchanged."""
    paths = [
        str(p.relative_to(layout.root))
        for p in (layout.raw_dvc, layout.raw_dvc.parent / ".gitignore")
        if p.exists()
    ]
    _git(layout.root, "add", "--", *paths)
    if _git(layout.root, "diff", "--cached", "--quiet", "--", *paths).returncode == 0:
        return None  # this data version is already committed
    identity: list[str] = []
    if not _git(layout.root, "config", "user.email").stdout.strip():
        identity = ["-c", "user.name=radflow", "-c", "user.email=radflow@localhost"]
    done = _git(
        layout.root, *identity, "commit", "-q", "-m", f"data version {version}", "--", *paths
    )
    if done.returncode != 0:
        raise WorkspaceError(
            f"git commit of {paths} failed in {layout.root}: {done.stderr.strip()[-500:]}"
        )
    return _git(layout.root, "rev-parse", "HEAD").stdout.strip()


def commit_stages(layout: Layout) -> None:
    """Record the outputs of a Prefect run in dvc.lock, so `dvc status`/`dvc repro` see them as current."""
    dvc(layout.root, "commit", "-f", "-q")
