"""The lineage `radflow trace` verifies: where a data version is committed in git, and a run from a
fresh clone of a (tiny) source checkout whose trace holds on every link."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import versioning, workspace
from pipeline_steps.core.layout import Layout
from tests.integration.conftest import merge

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

TINY = {
    "synth": {"n_images": 24, "native_size": [512, 512], "images_per_patient": [1, 2]},
    "validate": {"min_images": 4},
    "preprocess": {"input_size": 128, "target_spacing_mm": 2.8, "shard_size": 8},
    "train": {"epochs": 1, "batch_size": 4, "width": 8, "depth": 3},
}


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _identity(root: Path) -> None:
    _git(root, "config", "user.name", "Developer")
    _git(root, "config", "user.email", "dev@example.org")


def _dvc(root: Path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def _add_image(layout: Layout, name: str) -> None:
    layout.raw_images.mkdir(parents=True, exist_ok=True)
    (layout.raw_images / name).write_bytes(name.encode() * 10)


def test_a_repository_radflow_did_not_create_gets_data_versions_on_radflows_branch(tmp_path):
    """A developer's repository: HEAD, the branch and the index stay theirs; the data version is a
    commit on `radflow/data` (their tree plus data/raw.dvc) that `data_git_rev` finds."""
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _identity(repo)
    _dvc(repo, "init", "-q")
    (repo / "README.md").write_text("the developer's project\n")
    _git(repo, "add", "README.md")
    _git(repo, "commit", "-q", "-m", "the developer's work")
    head = _git(repo, "rev-parse", "HEAD")
    layout = Layout(repo)

    _add_image(layout, "a.dcm")
    first = versioning.record_raw(layout)

    assert (
        _git(repo, "rev-parse", "HEAD") == head and _git(repo, "branch", "--show-current") == "main"
    )
    assert _git(repo, "log", "--format=%H", "main") == head  # nothing committed on their branch
    rev = versioning.data_git_rev(layout)
    assert rev == _git(repo, "rev-parse", "radflow/data")
    assert versioning.data_version_at(layout, rev) == first
    # the commit is their tree with the data version on top: `git checkout radflow/data` then
    # `dvc checkout` gives back this code and this data
    assert _git(repo, "show", f"{rev}:README.md") == "the developer's project"
    assert head in _git(repo, "log", "-1", "--format=%B", rev)

    _add_image(layout, "b.dcm")
    second = versioning.record_raw(layout)
    rev2 = versioning.data_git_rev(layout)
    assert second != first and rev2 != rev
    assert _git(repo, "rev-parse", f"{rev2}^") == rev  # one line of data versions
    assert versioning.data_version_at(layout, rev2) == second
    assert versioning.record_raw(layout) == second  # the same data again: no new commit
    assert _git(repo, "rev-parse", "radflow/data") == rev2

    # back to the first data version (as `dvc checkout` of an old data/raw.dvc would): found again
    (layout.raw_images / "b.dcm").unlink()
    assert versioning.record_raw(layout) == first
    assert versioning.data_version_at(layout, versioning.data_git_rev(layout)) == first
    assert _git(repo, "rev-parse", "HEAD") == head


def test_init_owns_the_repository_it_creates_and_only_that_one(tmp_path):
    created = workspace.init(tmp_path / "new")
    assert versioning.owns_repository(created.root)
    _identity(created.root)
    _add_image(created, "a.dcm")
    version = versioning.record_raw(created)
    # radflow's workspace: the data version is a commit on its current branch
    assert versioning.data_git_rev(created) == _git(created.root, "rev-parse", "HEAD")
    assert version in _git(created.root, "show", "HEAD:data/raw.dvc")

    existing = tmp_path / "existing"
    existing.mkdir()
    _git(existing, "init", "-q")
    assert not versioning.owns_repository(workspace.init(existing).root)


# --------------------------------------------------------------------------------------------
# A fresh clone of a source checkout, as `make run` does it


def _checkout(src: Path) -> None:
    """A tiny radflow source checkout: this tree's code, dvc.yaml and tiny params, committed."""
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("pipeline_steps", "flows"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    for name in ("pyproject.toml", "dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, src / name)
    (src / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(ROOT / ".dvc" / name, src / ".dvc" / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (src / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY)))
    _git(src, "init", "-q", "-b", "main")
    _identity(src)
    _git(src, "add", ".")
    _git(src, "commit", "-q", "-m", "radflow")


def _env(clone: Path) -> dict[str, str]:
    """The clone's own code (PYTHONPATH comes before the editable install) and embedded services."""
    env = dict(os.environ, PYTHONPATH=str(clone), RADFLOW_PSEUDONYM_DEV_MODE="1")
    # Prefect's temporary server gets 20 s to start by default: too few on a loaded 2-core machine.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "PREFECT_API_URL",
        "RADFLOW_LEDGER_URL",
        "RADFLOW_CODE_VERSION",
        "RADFLOW_PSEUDONYM_KEY",
    ):
        env.pop(name, None)
    return env


def _radflow(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=clone,
        env=_env(clone),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_run_in_a_fresh_clone_of_the_checkout_leaves_a_lineage_trace_verifies(tmp_path):
    src, clone = tmp_path / "src", tmp_path / "clone"
    src.mkdir()
    _checkout(src)
    _git(tmp_path, "clone", "-q", str(src), str(clone))
    head = _git(clone, "rev-parse", "HEAD")
    where = subprocess.run(
        [sys.executable, "-c", "import flows; print(flows.__file__)"],
        cwd=clone,
        env=_env(clone),
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip() == str(clone / "flows" / "__init__.py")  # the checkout's own code

    run = _radflow(clone, "run", "--json")
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    image = sorted((clone / "data" / "raw" / "images").glob("*.dcm"))[0]
    out = tmp_path / "preds.jsonl"
    predicted = _radflow(
        clone,
        "predict",
        "--input",
        str(image),
        "--out",
        str(out),
        "--version",
        summary["model_version"],
    )
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    prediction_id = json.loads(out.read_text().splitlines()[0])["prediction_id"]

    traced = _radflow(clone, "trace", prediction_id, "--json")
    assert traced.returncode == 0, traced.stderr[-4000:]
    t = json.loads(traced.stdout)
    assert t["checks"] and all(ok is True for ok in t["checks"].values()), t["checks"]
    assert t["data"]["data_git_rev"] == _git(clone, "rev-parse", "radflow/data")
    assert t["data"]["raw_dvc_md5_at_rev"] == summary["data_version"]
    assert t["run"]["code_version"] == head and t["run"]["git_commit"] == head
    # the developer's branch is as it was cloned: radflow committed only on its own branch
    assert _git(clone, "rev-parse", "HEAD") == head
    assert _git(clone, "log", "--format=%H", "main") == head
    printed = _radflow(clone, "trace", prediction_id)
    assert "all links verified" in printed.stdout and "not checkable" not in printed.stdout
