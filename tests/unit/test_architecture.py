"""The house holds: dvc.yaml's code deps match what each stage imports, the stage table matches
dvc.yaml, and modules stay small enough to have one job. (The layer contracts themselves are
import-linter's, in pyproject.toml, run by `make lint`.)"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest
import yaml

from flows.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline_steps", "flows")
# A module longer than this has more than one job, unless its docstring says why it stays whole.
MAX_LINES = 600
WHOLE_MARK = "kept whole:"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES)


@pytest.fixture(scope="module")
def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(module: str) -> str:
    path = Path(*module.split("."))
    return f"{path}.py" if (ROOT / f"{path}.py").exists() else f"{path}/__init__.py"


def code_closure(graph: grimp.ImportGraph, roots: set[str]) -> set[str]:
    """Files of every project module the roots import, directly or not (lazy imports included)."""
    modules = set(roots)
    for root in roots:
        modules |= graph.find_upstream_modules(root)
    return {module_file(m) for m in modules if m.split(".")[0] in PACKAGES}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def stage_code(graph: grimp.ImportGraph, name: str) -> set[str]:
    stage = STAGES[name]
    return code_closure(graph, {stage.module, *stage.calls}) | {"flows/stages.py"}


def test_every_stage_is_in_the_table_and_in_dvc_yaml_under_one_name(dvc_stages):
    assert list(STAGES) == list(dvc_stages)
    for name, stage in STAGES.items():
        assert stage.name == name
        assert stage.module == f"pipeline_steps.{name}", "a stage's module is named as the stage"
        assert dvc_stages[name]["cmd"] == f"radflow step {name}"


def test_dvc_yaml_code_deps_cover_each_stage_import_closure(graph, dvc_stages):
    """Otherwise `dvc repro` would not re-run a stage whose code changed."""
    missing = {}
    for name in STAGES:
        deps = [
            str(d) if not isinstance(d, dict) else next(iter(d)) for d in dvc_stages[name]["deps"]
        ]
        lacking = sorted(p for p in stage_code(graph, name) if not covered(p, deps))
        if lacking:
            missing[name] = lacking
    assert not missing, f"add these to the stage's deps in dvc.yaml: {missing}"


def test_dvc_yaml_lists_no_code_a_stage_does_not_import(graph, dvc_stages):
    """A stale code dep re-runs a stage for nothing; keep the lists exact."""
    extra = {}
    for name in STAGES:
        code = stage_code(graph, name)
        listed = [
            d
            for d in dvc_stages[name]["deps"]
            if isinstance(d, str) and d.startswith(("pipeline_steps/", "flows/"))
        ]
        stale = sorted(d for d in listed if not any(covered(p, [d]) for p in code))
        if stale:
            extra[name] = stale
    assert not extra, f"remove these from the stage's deps in dvc.yaml: {extra}"


def test_the_closure_follows_lazy_imports_and_shared_helpers(graph):
    """The check above is only as good as the closure: it must see imports inside functions
    (the stage table imports step modules lazily) and reach shared helpers through the kernel."""
    assert "pipeline_steps/core/boxes.py" in stage_code(graph, "train")  # via metrics, detector
    assert "pipeline_steps/core/augment.py" in stage_code(graph, "train")
    assert "pipeline_steps/core/augment.py" not in stage_code(graph, "test")
    assert "pipeline_steps/core/report.py" in stage_code(graph, "test")  # the wiring's call
    assert "flows/tracking.py" in stage_code(graph, "register")


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_modules_are_small_or_say_why_they_stay_whole():
    too_long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES and WHOLE_MARK not in _docstring(path):
                too_long.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not too_long, f"split these along their seams: {too_long}"


def test_every_module_says_what_it_is_for():
    silent = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "__init__.py" and not _docstring(path)
    ]
    assert not silent
