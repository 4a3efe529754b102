"""Git and DVC edge: the code version, data/raw as a DVC data version committed in the workspace's git,
and stage outputs in dvc.lock. Every git and DVC command of flows/ runs through `git` and `dvc` here."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, overload

import yaml

from pipeline_steps.core.errors import WorkspaceError
from pipeline_steps.core.layout import Layout

# What the code version covers: a change under these paths makes the checkout `-dirty`.
CODE_PATHS = ("pipeline_steps", "flows", "pyproject.toml")


class GitError(WorkspaceError):
    """A git command failed; `stderr` holds git's own words."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


@overload
def git(root: Path, *args: str, check: Literal[True] = ...) -> str: ...
@overload
def git(root: Path, *args: str, check: Literal[False]) -> str | None: ...
def git(root: Path, *args: str, check: bool = True) -> str | None:
    """`git -C root ARGS`'s stdout, stripped. When git fails: GitError with `check`, else None."""
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if done.returncode == 0:
        return done.stdout.strip()
    if check:
        stderr = done.stderr.strip()
        raise GitError(f"git {' '.join(args)} failed in {root}: {stderr}", stderr)
    return None


def source_root() -> Path:
    """The radflow checkout this code runs from: the source of dvc.yaml, params.yaml and the code version."""
    return Path(__file__).resolve().parent.parent


def code_version() -> str:
    """The git commit of the radflow code, with `-dirty` when code or params differ from it."""
    root = source_root()
    try:
        commit = git(root, "rev-parse", "HEAD")
        dirty = git(root, "status", "--porcelain", "--", *CODE_PATHS)
    except GitError:
        return "unknown"
    return commit + ("-dirty" if dirty else "")


@contextmanager
def _workspace_lock(root: Path) -> Iterator[None]:
    """DVC fails when two commands share a workspace, so radflow queues its own calls instead."""
    lock = Layout(root).dvc_lock
    lock.parent.mkdir(exist_ok=True)
    with lock.open("w") as fh:
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
    dvc(layout.root, "add", "-q", str(layout.raw.relative_to(layout.root)))
    version = data_version(layout)
    # The git revision of data/raw.dvc is how an auditor finds a data version again. A workspace
    # (`radflow init`) is radflow's to commit in; the radflow source checkout is the developer's.
    if layout.root.resolve() != source_root().resolve():
        commit_data_version(layout, version)
    return version


def commit_data_version(layout: Layout, version: str) -> str | None:
    """Commit only `data/raw.dvc` (and DVC's `data/.gitignore`); the new commit, or None if unchanged."""
    root = layout.root
    paths = [str(p.relative_to(root)) for p in (layout.raw_dvc, layout.raw_gitignore) if p.exists()]
    git(root, "add", "--", *paths, check=False)  # a failure shows in the commit below
    if git(root, "diff", "--cached", "--quiet", "--", *paths, check=False) is not None:
        return None  # this data version is already committed
    identity: list[str] = []
    if not git(root, "config", "user.email", check=False):
        identity = ["-c", "user.name=radflow", "-c", "user.email=radflow@localhost"]
    try:
        git(root, *identity, "commit", "-q", "-m", f"data version {version}", "--", *paths)
    except GitError as exc:
        raise WorkspaceError(
            f"git commit of {paths} failed in {root}: {exc.stderr[-500:]}"
        ) from None
    return git(root, "rev-parse", "HEAD", check=False) or ""


def commit_stages(layout: Layout) -> None:
    """Record the outputs of a Prefect run in dvc.lock, so `dvc status`/`dvc repro` see them as current."""
    dvc(layout.root, "commit", "-f", "-q")


def data_git_rev(layout: Layout) -> str:
    """The workspace commit that holds data/raw.dvc as it is now; "uncommitted" when none does."""
    rel = str(layout.raw_dvc.relative_to(layout.root))
    # Changed, untracked, or not a git repository at all.
    if git(layout.root, "status", "--porcelain", "--", rel, check=False) != "":
        return "uncommitted"
    return git(layout.root, "log", "-1", "--format=%H", "--", rel, check=False) or "uncommitted"


def data_version_at(layout: Layout, rev: str) -> str | None:
    """The DVC md5 recorded in `data/raw.dvc` at git revision `rev` of the workspace."""
    rel = layout.raw_dvc.relative_to(layout.root).as_posix()
    text = (
        git(layout.root, "show", f"{rev}:{rel}", check=False)
        if rev and rev != "uncommitted"
        else None
    )
    if text is None:
        return None
    outs = (yaml.safe_load(text) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "")) or None


def dvc_cache_has(layout: Layout, md5: str) -> bool:
    """Whether the workspace's DVC cache holds the directory listing of data version `md5`."""
    if len(md5) < 3:
        return False
    # DVC 3's cache: files/md5/<first two hex digits>/<the rest>
    return (layout.dvc_cache / "files" / "md5" / md5[:2] / md5[2:]).is_file()
