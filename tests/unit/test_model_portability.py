"""What a registered model carries to load where radflow is not installed: the radflow source files
the pyfunc imports (its `code_paths`), the distributions they need, and constraints pinned to this
environment. (tests/integration/test_portable_model.py serves such a model from its own environment.)"""

from __future__ import annotations

import ast
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import grimp

from flows import tracking
from pipeline_steps.serving import pyfunc

ROOT = Path(__file__).resolve().parents[2]


def test_the_code_files_are_the_pyfuncs_import_closure_as_grimp_sees_it():
    graph = grimp.build_graph("pipeline_steps")
    modules = {pyfunc.__name__} | graph.find_upstream_modules(pyfunc.__name__)
    packages = {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}
    expected = set()
    for name in modules | packages:
        path = Path(*name.split("."))
        expected.add(path / "__init__.py" if (ROOT / path).is_dir() else path.with_suffix(".py"))
    assert set(pyfunc.code_files()) == expected
    assert Path("pipeline_steps/core/detector.py") in expected  # imported inside serving.serving
    # The served model writes the audit ledger itself, so the ledger travels with it, with the
    # anchor store it publishes its head to; nothing else of governance, and nothing of the
    # synthetic data.
    assert {p for p in expected if p.parts[1] == "governance"} == {
        Path("pipeline_steps/governance/__init__.py"),
        Path("pipeline_steps/governance/anchors.py"),
        Path("pipeline_steps/governance/ledger.py"),
    }
    assert not [p for p in expected if p.parts[1] == "synthetic"]


def test_relative_imports_and_imports_inside_functions_are_followed(tmp_path, monkeypatch):
    package = tmp_path / "pipeline_steps"
    files = {
        "__init__.py": "",
        "a/__init__.py": "",
        "a/b.py": "from . import c\nfrom ..d import helper\n\ndef f():\n    import pipeline_steps.e\n",
        "a/c.py": "import numpy\n",
        "d.py": "helper = 1\n",
        "e.py": "",
        "unused.py": "",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    monkeypatch.setattr(pyfunc, "CODE_ROOT", tmp_path)

    found = {str(p) for p in pyfunc.code_files("pipeline_steps.a.b")}
    assert found == {f"pipeline_steps/{name}" for name in files} - {"pipeline_steps/unused.py"}


def _top_level(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return {node.module.split(".")[0]}
    return set()


def _imported_top_level(path: Path) -> set[str]:
    """The distributions' modules `path` imports, less the optional ones: an import inside a
    `try` that catches ImportError, of a module not installed here (the ledger's psycopg, which
    falls back to psycopg2), is an alternative, not a requirement."""
    tree = ast.parse(path.read_text())
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in {"ImportError", "ModuleNotFoundError"}
            for h in node.handlers
        ):
            optional |= set().union(*(_top_level(n) for b in node.body for n in ast.walk(b)))
    names = set().union(*(_top_level(node) for node in ast.walk(tree)))
    absent = {name for name in optional if importlib.util.find_spec(name) is None}
    return names - absent - set(sys.stdlib_module_names) - {pyfunc.PACKAGE, "__future__"}


def test_every_distribution_the_code_imports_is_a_serving_requirement():
    provided = metadata.packages_distributions()
    listed = {name.lower() for name in pyfunc.SERVING_PACKAGES}
    imported = set().union(*(_imported_top_level(ROOT / p) for p in pyfunc.code_files()))
    assert {"keras", "pydicom", "numpy", "pandas", "mlflow"} <= imported
    missing = {
        name: provided.get(name)
        for name in imported
        if not {d.lower() for d in provided.get(name, [])} & listed
    }
    assert missing == {}, "add their distributions to pyfunc.SERVING_PACKAGES"


def test_requirements_and_constraints_pin_the_installed_versions():
    requirements = tracking.serving_requirements()
    assert f"tensorflow-cpu=={metadata.version('tensorflow-cpu')}" in requirements
    assert f"mlflow=={metadata.version('mlflow')}" in requirements
    assert not [r for r in requirements if "radflow" in r.lower()]

    constraints = tracking.environment_constraints()
    by_name = {c.split("==")[0].lower(): c.split("==")[1] for c in constraints}
    assert len(by_name) == len(constraints)  # one pin per distribution
    assert (
        "radflow" not in by_name
    )  # installed from this folder: the model carries its code instead
    for name in ("fastapi", "protobuf", "keras", "pydicom"):
        assert by_name[name] == metadata.version(name)
