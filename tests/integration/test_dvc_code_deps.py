"""`dvc repro` re-runs the stages whose code changed, and only those: real DVC on a copy of the
code, with every stage recorded as done (`dvc commit`), then one shared helper edited."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.stages import STAGES
from tests.unit.test_architecture import ROOT, stage_code


def _dvc(ws: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=ws, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _touch(path: Path) -> None:
    """A dummy file or folder where dvc.yaml expects data: DVC only hashes it."""
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{path.name}\n")
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "part").write_text(f"{path.name}\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("dvc-deps")
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("pipeline_steps", "flows"):
        shutil.copytree(ROOT / package, ws / package, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, ws / name)
    _dvc(ws, "init", "--no-scm", "-q")
    _dvc(ws, "config", "core.analytics", "false")
    for stage in yaml.safe_load((ws / "dvc.yaml").read_text())["stages"].values():
        for entry in [*stage.get("deps", []), *stage.get("outs", []), *stage.get("metrics", [])]:
            path = ws / (entry if isinstance(entry, str) else next(iter(entry)))
            if not path.exists():
                _touch(path)
    _dvc(ws, "commit", "-f", "-q")
    return ws


def _changed(ws: Path) -> set[str]:
    return {key.split(":")[-1] for key in json.loads(_dvc(ws, "status", "--json") or "{}")}


@pytest.mark.integration
@pytest.mark.parametrize(
    "helper",
    [
        "pipeline_steps/core/augment.py",
        "pipeline_steps/core/plots.py",
        "pipeline_steps/core/boxes.py",
    ],
)
def test_editing_a_shared_helper_flags_exactly_the_stages_that_import_it(workspace, helper):
    assert _changed(workspace) == set(), "every stage starts recorded as up to date"
    path = workspace / helper
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        expected = {name for name in STAGES if helper in stage_code_of(name)}
        assert expected, f"no stage imports {helper}?"
        assert _changed(workspace) == expected
    finally:
        path.write_text(original)
    assert _changed(workspace) == set()


def stage_code_of(name: str) -> set[str]:
    import grimp

    return stage_code(grimp.build_graph("pipeline_steps", "flows"), name)


@pytest.mark.integration
def test_known_helpers_flag_their_known_stages(workspace):
    """Spelled out, so the test above cannot pass by computing the same wrong set twice."""
    for helper, stages in [
        ("pipeline_steps/core/augment.py", {"train"}),
        ("pipeline_steps/core/plots.py", {"test"}),
        ("pipeline_steps/core/metrics.py", {"train", "test", "gate"}),  # val AP, scores, the gate
    ]:
        path = workspace / helper
        original = path.read_text()
        try:
            path.write_text(original + "\n# an edit\n")
            assert _changed(workspace) == stages
        finally:
            path.write_text(original)
