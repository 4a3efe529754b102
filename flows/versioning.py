"""Git and DVC edge: the code version, data/raw as a DVC data version committed in git, and stage
outputs in dvc.lock. Every git and DVC command of flows/ runs through `git` and `dvc` here.

Where a data version is committed: on the current branch of a workspace that `radflow init` created
(radflow owns that repository); in any other repository (the radflow source checkout, a project of
yours) on radflow's own branch `radflow/data`, built without touching your branch, index or working
tree. Either way `data_git_rev` names a commit whose `data/raw.dvc` holds the data version."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Literal, overload

import yaml

from pipeline_steps.core import locks
from pipeline_steps.core.errors import WorkspaceError
from pipeline_steps.core.layout import Layout

# What the code version covers: a change under these paths makes the checkout `-dirty`.
CODE_PATHS = ("pipeline_steps", "flows", "pyproject.toml")

# The source files whose content is the code's identity (code_hash), beside the git code version.
CODE_GLOBS = ("pipeline_steps/**/*.py", "flows/**/*.py", "pyproject.toml")
# Names the code outright (e.g. an image tag or digest in a container deployment) instead of git and
# the source files. Also what keeps a shared checkout that others are editing from looking changed.
CODE_VERSION_ENV = "RADFLOW_CODE_VERSION"

# radflow's own branch for data versions, in a repository radflow did not create.
DATA_BRANCH = "radflow/data"
# Set (in .git/config) by `radflow init` on the repository it creates: radflow commits data versions
# on that repository's current branch. Set it yourself to opt a repository of yours in.
OWNED_KEY = "radflow.workspace"


class GitError(WorkspaceError):
    """A git command failed; `stderr` holds git's own words."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


@overload
def git(
    root: Path, *args: str, check: Literal[True] = ..., env: Mapping[str, str] | None = ...
) -> str: ...
@overload
def git(
    root: Path, *args: str, check: Literal[False], env: Mapping[str, str] | None = ...
) -> str | None: ...
def git(
    root: Path, *args: str, check: bool = True, env: Mapping[str, str] | None = None
) -> str | None:
    """`git -C root ARGS`'s stdout, stripped. When git fails: GitError with `check`, else None.
    `env` adds to the environment (e.g. GIT_INDEX_FILE)."""
    done = subprocess.run(
        ["git", "-C", str(root), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env} if env else None,
    )
    if done.returncode == 0:
        return done.stdout.strip()
    if check:
        stderr = done.stderr.strip()
        raise GitError(f"git {' '.join(args)} failed in {root}: {stderr}", stderr)
    return None


def source_root() -> Path:
    """Where the running radflow code lives: the folder holding `pipeline_steps/` and `flows/` (a
    source checkout, or site-packages for an installed wheel). A workspace's DVC code deps point here."""
    return Path(__file__).resolve().parent.parent


def source_checkout() -> Path | None:
    """The git checkout the running code is the top of, or None (an installed package, or a source
    tree without git). A wheel installed in a venv inside some repository is not that repository's code."""
    root = source_root()
    top = git(root, "rev-parse", "--show-toplevel", check=False)
    if top and Path(top).resolve() == root and (root / "pyproject.toml").is_file():
        return root
    return None


def package_version() -> str:
    """radflow's version from the installed package's metadata ("unknown" when not installed)."""
    try:
        return metadata.version("radflow")
    except metadata.PackageNotFoundError:
        return "unknown"


def _editable_install() -> bool:
    """Whether radflow is installed in editable mode (PEP 610's direct_url.json says so)."""
    try:
        raw = metadata.distribution("radflow").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return False
    try:
        return bool(raw and json.loads(raw).get("dir_info", {}).get("editable"))
    except ValueError:
        return False


def code_version() -> str:
    """What code ran, as recorded on model versions and predictions.

    In a git checkout: its commit, with `-dirty` when code or pyproject.toml differ from it. Anywhere
    else, the package metadata: `radflow==0.1.0` for an installed release (the code is the package's
    files), with ` (source tree without git)` for an editable install of a tree git does not track."""
    checkout = source_checkout()
    if checkout is not None:
        commit = git(checkout, "rev-parse", "--verify", "-q", "HEAD", check=False)
        if commit:
            dirty = git(checkout, "status", "--porcelain", "--", *CODE_PATHS, check=False)
            return commit + ("-dirty" if dirty else "")
    version = f"radflow=={package_version()}"
    return version + (" (source tree without git)" if _editable_install() else "")


def code_hash(root: Path) -> str:
    """sha256 of the pipeline's source files (what `dvc repro` would see as code deps)."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in CODE_GLOBS for p in root.glob(pattern) if p.is_file()})
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def current_code_hash() -> str:
    """The code_hash of the running code: of RADFLOW_CODE_VERSION when it names the code, else of the
    source files."""
    pinned = os.environ.get(CODE_VERSION_ENV, "").strip()
    if pinned:
        return hashlib.sha256(pinned.encode()).hexdigest()[:16]
    return code_hash(source_root())


@contextmanager
def _workspace_lock(root: Path, command: str) -> Iterator[None]:
    """DVC fails when two commands share a workspace, so radflow queues its own calls instead."""
    with locks.exclusive(Layout(root).dvc_lock, f"dvc {command}"):
        yield


def dvc(root: Path, *args: str) -> str:
    """Run DVC in `root`; its output is captured. A failure raises WorkspaceError with DVC's own
    message, which `-q` would silence, so quiet flags are dropped."""
    args = tuple(a for a in args if a not in ("-q", "--quiet"))
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    # Stage commands call `radflow step ...`; make sure the running environment's scripts are found.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with _workspace_lock(root, args[0] if args else ""):
        done = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, env=env
        )
    if done.returncode != 0:
        detail = (done.stderr + done.stdout).strip()[-2000:]
        raise WorkspaceError(
            f"dvc {' '.join(args)} failed in {root}:\n"
            f"{detail or f'exit status {done.returncode}, no message'}"
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
    """`dvc add data/raw`, commit `data/raw.dvc` in git (see the module docstring for where), and
    return the data version."""
    dvc(layout.root, "add", "-q", str(layout.raw.relative_to(layout.root)))
    version = data_version(layout)
    # The git revision of data/raw.dvc is how an auditor finds a data version again.
    commit_data_version(layout, version)
    return version


def owns_repository(root: Path) -> bool:
    """Whether radflow may commit on the current branch of the git repository at `root`: one that
    `radflow init` created (or that its owner marked with `git config radflow.workspace true`)."""
    return git(root, "config", "--bool", OWNED_KEY, check=False) == "true"


def _identity(root: Path) -> list[str]:
    if git(root, "config", "user.email", check=False):
        return []
    return ["-c", "user.name=radflow", "-c", "user.email=radflow@localhost"]


def _data_paths(layout: Layout) -> list[str]:
    root = layout.root
    return [str(p.relative_to(root)) for p in (layout.raw_dvc, layout.raw_gitignore) if p.exists()]


def commit_data_version(layout: Layout, version: str) -> str | None:
    """Commit `data/raw.dvc` (and DVC's `data/.gitignore`): on the current branch of a repository
    radflow owns, else on radflow's own branch. The new commit, or None when this data version is
    already committed there or `layout.root` is not in a git work tree."""
    root = layout.root
    if git(root, "rev-parse", "--is-inside-work-tree", check=False) != "true":
        return None
    if owns_repository(root):
        return _commit_on_current_branch(layout, version)
    return _commit_on_data_branch(layout, version)


def _commit_on_current_branch(layout: Layout, version: str) -> str | None:
    root = layout.root
    paths = _data_paths(layout)
    git(root, "add", "--", *paths, check=False)  # a failure shows in the commit below
    if git(root, "diff", "--cached", "--quiet", "--", *paths, check=False) is not None:
        return None  # this data version is already committed
    try:
        git(root, *_identity(root), "commit", "-q", "-m", f"data version {version}", "--", *paths)
    except GitError as exc:
        raise WorkspaceError(
            f"git commit of {paths} failed in {root}: {exc.stderr[-500:]}"
        ) from None
    return git(root, "rev-parse", "HEAD", check=False) or ""


def _commit_on_data_branch(layout: Layout, version: str) -> str | None:
    """A commit on `radflow/data` whose tree is HEAD's with the data files as they are now, so that
    `git checkout radflow/data && dvc checkout` gives back this code and this data. Built in a
    temporary index with git plumbing: HEAD, your index and your working tree stay as they were."""
    root = layout.root
    paths = _data_paths(layout)
    ref = f"refs/heads/{DATA_BRANCH}"
    tip = git(root, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}", check=False) or None
    if tip and all(
        git(root, "rev-parse", "-q", "--verify", f"{tip}:{path}", check=False)
        == git(root, "hash-object", "--", path, check=False)
        for path in paths
    ):
        return None  # this data version is already the branch's tip
    head = git(root, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False) or None
    try:
        with tempfile.TemporaryDirectory(prefix="radflow-index-") as tmp:
            index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            git(root, "read-tree", *([head] if head else ["--empty"]), env=index)
            git(root, "update-index", "--add", "--", *paths, env=index)
            tree = git(root, "write-tree", env=index)
        message = f"data version {version}\n\ncode: {head or 'no commit yet'}"
        parents = ["-p", tip] if tip else []
        commit = git(root, *_identity(root), "commit-tree", tree, *parents, "-m", message)
        git(root, "update-ref", "-m", f"radflow: data version {version}", ref, commit, tip or "")
    except GitError as exc:
        raise WorkspaceError(
            f"recording data version {version} on branch {DATA_BRANCH} failed in {root}: "
            f"{exc.stderr[-500:]}"
        ) from None
    return commit


def commit_stages(layout: Layout) -> None:
    """Record the outputs of a Prefect run in dvc.lock, so `dvc status`/`dvc repro` see them as current."""
    dvc(layout.root, "commit", "-f", "-q")


def data_git_rev(layout: Layout) -> str:
    """A commit that holds data/raw.dvc as it is now: the last one on the current branch when the
    file is committed there, else the newest on radflow's own branch; "uncommitted" when none does."""
    root = layout.root
    rel = layout.raw_dvc.relative_to(root).as_posix()
    status = git(root, "status", "--porcelain", "--", rel, check=False)
    if status is None:
        return "uncommitted"  # not a git repository at all
    if status == "":
        rev = git(root, "log", "-1", "--format=%H", "--", rel, check=False)
        if rev:
            return rev
    blob = git(root, "hash-object", "--", rel, check=False)
    return (_data_branch_commit_holding(root, rel, blob) if blob else None) or "uncommitted"


def _data_branch_commit_holding(root: Path, rel: str, blob: str) -> str | None:
    """The newest commit on radflow's branch whose `rel` is the blob `blob` (as `--raw` lists it)."""
    log = git(
        root,
        "log",
        "--root",
        "--raw",
        "--no-abbrev",
        "--format=commit %H",
        f"refs/heads/{DATA_BRANCH}",
        "--",
        rel,
        check=False,
    )
    commit = None
    for line in (log or "").splitlines():
        if line.startswith("commit "):
            commit = line.split()[1]
        # :<old mode> <new mode> <old blob> <new blob> <status>\t<path>
        elif line.startswith(":") and commit and line.split("\t", 1)[0].split()[3] == blob:
            return commit
    return None


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
