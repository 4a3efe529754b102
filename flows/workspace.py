"""Workspaces: a git + DVC checkout holding params, data, MLflow store and reports side by side; and
the training outputs of a run, kept aside until its registration succeeded."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from importlib import resources
from pathlib import Path

import yaml

from flows import versioning
from pipeline_steps.core.config import Params, load_params
from pipeline_steps.core.errors import WorkspaceError
from pipeline_steps.core.layout import Layout

log = logging.getLogger("radflow")

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


# ---------------------------------------------------------------------------------------------
# Training outputs: a failed run leaves the previous ones in place
#
# The train and test stages write their outs where dvc.yaml declares them (`dvc repro` and `radflow
# step` need them there). A run through Prefect first copies the previous outs aside (copies, not
# links: a stage that rewrote a file in place would change a linked copy too); when the run fails
# before its registration succeeded they are put back, so `models/detector.keras` and `metrics.json`
# always belong to a registered version (or to none, as before the first run). After a crash the next
# run puts them back first (flows/retraining.recover).

# The stages whose outs a run puts aside: what training produces and the registration that names it.
OUTPUT_STAGES = ("train", "test", "register")
_COMPLETE = ".complete"  # written last: a set-aside without it was cut short and is not restored


def _aside(layout: Layout) -> Path:
    return layout.previous_outputs


def training_outputs(layout: Layout) -> list[Path]:
    """The outs and metrics of OUTPUT_STAGES as the workspace's dvc.yaml declares them."""
    stages = (yaml.safe_load(layout.dvc_yaml.read_text()) or {}).get("stages") or {}
    found: list[Path] = []
    for name in OUTPUT_STAGES:
        for kind in ("outs", "metrics"):
            for entry in (stages.get(name) or {}).get(kind) or []:
                rel = entry if isinstance(entry, str) else next(iter(entry))
                path = layout.root / str(rel)
                if path not in found:
                    found.append(path)
    return found


def set_aside_outputs(layout: Layout) -> Path:
    """Copy the current training outputs aside (a folder under .radflow); returns it."""
    aside = _aside(layout)
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir(parents=True)
    for path in training_outputs(layout):
        target = aside / path.relative_to(layout.root)
        if path.is_dir():
            shutil.copytree(path, target, symlinks=True)
        elif path.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    (aside / _COMPLETE).touch()
    return aside


def has_set_aside(layout: Layout) -> bool:
    return _aside(layout).exists()


def registered_since_set_aside(layout: Layout) -> bool:
    """Whether a registration happened after the outputs were set aside (reports/registration.json
    is not the one set aside)."""
    current = layout.registration
    saved = _aside(layout) / current.relative_to(layout.root)
    if not current.exists():
        return False
    return not saved.exists() or saved.read_bytes() != current.read_bytes()


def restore_outputs(layout: Layout) -> list[str]:
    """Put the set-aside outputs back (and remove outputs that did not exist before); the paths put
    back, relative to the workspace. A set-aside that was cut short is dropped instead."""
    aside = _aside(layout)
    if not (aside / _COMPLETE).exists():
        shutil.rmtree(aside, ignore_errors=True)
        return []
    restored = []
    for path in training_outputs(layout):
        rel = path.relative_to(layout.root)
        saved = aside / rel
        if not saved.exists() and not path.exists():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with suppress(FileNotFoundError):
                path.unlink()
        if saved.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(saved, path)
        restored.append(str(rel))
    shutil.rmtree(aside, ignore_errors=True)
    return restored


def discard_set_aside(layout: Layout) -> None:
    shutil.rmtree(_aside(layout), ignore_errors=True)


@contextmanager
def outputs_kept_until_registered(layout: Layout) -> Iterator[Callable[[], None]]:
    """Set the training outputs aside for the block; it calls the yielded `registered()` once its
    registration succeeded. Leaving the block by an exception before that puts them back."""
    set_aside_outputs(layout)
    done = False

    def registered() -> None:
        nonlocal done
        discard_set_aside(layout)
        done = True

    try:
        yield registered
    except BaseException:
        if not done:
            restored = restore_outputs(layout)
            log.warning(
                "the run failed before its registration: the previous training outputs are back "
                "in place (%s)",
                ", ".join(restored) or "there were none",
            )
        raise
    if not done:
        discard_set_aside(layout)
