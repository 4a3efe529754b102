"""Workspaces: a git + DVC checkout holding params, data, MLflow store and reports side by side."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from flows import versioning
from pipeline_steps.core.config import Params, load_params
from pipeline_steps.core.errors import WorkspaceError
from pipeline_steps.core.layout import Layout

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
    # champion-model embeddings: derived from the registry's model, not DVC-tracked (extract_features.py)
    "/data/features/embeddings.parquet",
    # Great Expectations Data Docs: rebuilt on every validation, browsed locally
    "/reports/data_docs/",
    # the audit ledger (SQLite by default): append-only local state, not data
    "ledger.db",
    "ledger.db-wal",
    "ledger.db-shm",
]


def resolve(path: Path | None) -> Layout:
    """The workspace at `path` (default: the current directory), checked to be a radflow checkout.
    For commands that need no params (`radflow audit`); the others open it with `open_workspace`."""
    layout = Layout((path or Path.cwd()).resolve())
    markers = (layout.params_file, layout.dvc_yaml, layout.dvc_dir)
    missing = [marker.name for marker in markers if not marker.exists()]
    if missing:
        raise WorkspaceError(
            f"{layout.root} is not a radflow workspace (missing {', '.join(missing)}). "
            f"Run `radflow init {layout.root}` or pass --workspace DIR."
        )
    return layout


def open_workspace(path: Path | None) -> tuple[Layout, Params]:
    """The workspace at `path` (default: the current directory) and its params.yaml, checked: a bad
    params.yaml fails here, before any work starts."""
    layout = resolve(path)
    return layout, load_params(layout.params_file)


def _point_code_deps_at_source(dvc_yaml: Path) -> None:
    """A workspace outside the radflow checkout depends on the code it runs (the checkout's files, or
    the installed package's): DVC takes absolute deps."""
    source = versioning.source_root()
    lines = []
    for line in dvc_yaml.read_text().splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped.startswith(("- pipeline_steps/", "- flows/")):
            indent = line[: len(line) - len(stripped)]
            line = f"{indent}- {source}/{stripped[2:]}"
        lines.append(line)
    dvc_yaml.write_text("".join(lines))


# What a new workspace starts from, shipped as package data (flows/workspace_files/): in the source
# checkout these are links to its own params.yaml and dvc.yaml, so there is one copy of each. The
# template is not named dvc.yaml, which DVC would take for a pipeline of the checkout.
TEMPLATES = {"params.yaml": "params.yaml", "dvc.yaml": "dvc.yaml.template"}


def template(name: str) -> bytes:
    """The packaged template of a workspace file (`params.yaml` or `dvc.yaml`)."""
    return (resources.files("flows") / "workspace_files" / TEMPLATES[name]).read_bytes()


def init(path: Path) -> Layout:
    """Create (or complete) a workspace: git repo, DVC repo with autostage, params.yaml and dvc.yaml.

    A git repository that init creates is radflow's: data versions are committed on its branch
    (`versioning.OWNED_KEY`). In a repository that already existed, they go on radflow's own branch."""
    layout = Layout(path.resolve())
    source_root = versioning.source_root()
    layout.root.mkdir(parents=True, exist_ok=True)
    if not layout.git_dir.exists():
        versioning.git(layout.root, "init", "-q")
        versioning.git(layout.root, "config", versioning.OWNED_KEY, "true")
    for mine in (layout.params_file, layout.dvc_yaml):
        if not mine.exists():
            mine.write_bytes(template(mine.name))
    if layout.root != source_root:
        _point_code_deps_at_source(layout.dvc_yaml)
    if not layout.dvc_dir.exists():
        versioning.dvc(layout.root, "init", "-q")
        versioning.dvc(layout.root, "config", "core.autostage", "true")
        versioning.dvc(layout.root, "config", "core.analytics", "false")
        # Link outs to the cache instead of copying them (data stored once). Not reflink first: on a
        # filesystem without it (ext4), DVC 3 then copies on add/commit. DVC makes linked files
        # read-only, and every stage replaces its outs atomically, so a cached file is never edited.
        versioning.dvc(layout.root, "config", "cache.type", "hardlink,symlink,copy")
    ignore = layout.gitignore
    present = set(ignore.read_text().splitlines()) if ignore.exists() else set()
    with ignore.open("a") as fh:
        for line in WORKSPACE_GITIGNORE:
            if line not in present:
                fh.write(line + os.linesep)
    return layout
