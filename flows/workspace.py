"""Workspaces: a git + DVC checkout holding params, data, MLflow store and reports side by side."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pipeline_steps.core.config import Params, load_params
from pipeline_steps.core.errors import WorkspaceError
from pipeline_steps.core.layout import Layout

TEMPLATE_FILES = ("params.yaml", "dvc.yaml")
WORKSPACE_GITIGNORE = [
    "mlflow.db",
    "mlartifacts/",
    "mlruns/",
    ".radflow/",
    "__pycache__/",
    # cached DVC outs that `dvc commit` (after a Prefect run) does not add to .gitignore itself
    "/models/detector.keras",
    "/reports/test_predictions.parquet",
    "/reports/baseline_predictions.parquet",
    # champion-model embeddings: derived from the registry's model, not DVC-tracked (features.py)
    "/data/features/embeddings.parquet",
    # Great Expectations Data Docs: rebuilt on every validation, browsed locally
    "/reports/data_docs/",
    # the audit ledger (SQLite by default): append-only local state, not data
    "ledger.db",
    "ledger.db-wal",
    "ledger.db-shm",
]


def source_root() -> Path:
    """The radflow checkout this code runs from: the source of dvc.yaml, params.yaml and the code version."""
    return Path(__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise WorkspaceError(f"git {' '.join(args)} failed in {root}: {done.stderr.strip()}")
    return done.stdout.strip()


def code_version() -> str:
    """The git commit of the radflow code, with `-dirty` when code or params differ from it."""
    root = source_root()
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = _git(
            root, "status", "--porcelain", "--", "pipeline_steps", "flows", "pyproject.toml"
        )
    except WorkspaceError:
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def resolve(path: Path | None) -> Layout:
    """The workspace at `path` (default: the current directory), checked to be a radflow checkout."""
    root = (path or Path.cwd()).resolve()
    missing = [name for name in ("params.yaml", "dvc.yaml", ".dvc") if not (root / name).exists()]
    if missing:
        raise WorkspaceError(
            f"{root} is not a radflow workspace (missing {', '.join(missing)}). "
            f"Run `radflow init {root}` or pass --workspace DIR."
        )
    return Layout(root)


def load(layout: Layout) -> Params:
    return load_params(layout.root / "params.yaml")


def _point_code_deps_at_source(dvc_yaml: Path) -> None:
    """A workspace outside the radflow checkout depends on the code it runs: DVC takes absolute deps."""
    source = source_root()
    lines = []
    for line in dvc_yaml.read_text().splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped.startswith(("- pipeline_steps/", "- flows/")):
            indent = line[: len(line) - len(stripped)]
            line = f"{indent}- {source}/{stripped[2:]}"
        lines.append(line)
    dvc_yaml.write_text("".join(lines))


def init(path: Path) -> Layout:
    """Create (or complete) a workspace: git repo, DVC repo with autostage, params.yaml and dvc.yaml."""
    root = path.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / ".git").exists():
        _git(root, "init", "-q")
    for name in TEMPLATE_FILES:
        if not (root / name).exists():
            shutil.copyfile(source_root() / name, root / name)
    if root != source_root():
        _point_code_deps_at_source(root / "dvc.yaml")
    if not (root / ".dvc").exists():
        from flows import versioning

        versioning.dvc(root, "init", "-q")
        versioning.dvc(root, "config", "core.autostage", "true")
        versioning.dvc(root, "config", "core.analytics", "false")
    ignore = root / ".gitignore"
    present = set(ignore.read_text().splitlines()) if ignore.exists() else set()
    with ignore.open("a") as fh:
        for line in WORKSPACE_GITIGNORE:
            if line not in present:
                fh.write(line + os.linesep)
    return Layout(root)
