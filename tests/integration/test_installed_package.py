"""radflow installed from its wheel, outside any checkout: `radflow init DIR`, then `radflow run`,
`predict` and `trace` in DIR, with the code version taken from the package metadata.

The wheel is built from this tree and installed (without dependencies) into a fresh venv whose
`.pth` file adds this environment's site-packages for the dependencies only: radflow's own code
comes from the wheel, which the first test checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import merge

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

TINY = {
    "synth": {"n_images": 24, "native_size": [512, 512], "images_per_patient": [1, 2]},
    "validate": {"min_images": 4},
    "preprocess": {"input_size": 128, "target_spacing_mm": 2.8, "shard_size": 8},
    "train": {"epochs": 1, "batch_size": 4, "width": 8, "depth": 3},
}


def _version() -> str:
    import tomllib

    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | dict[str, str]]:
    base = tmp_path_factory.mktemp("installed")
    wheels, venv = base / "wheels", base / "venv"
    # No PYTHONPATH: a source tree on it would make pip think radflow is installed already.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # What the sdist would hold, copied: setuptools builds in the source folder (build/, egg-info),
    # which should not be the checkout others work in. Links are copied as the files they name.
    src = base / "src"
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("pipeline_steps", "flows"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # Building isolates itself (setuptools from the package index), as `pip wheel .` does anywhere.
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
        cwd=base,
        env=clean,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("radflow-*.whl")
    made = _run([sys.executable, "-m", "venv", str(venv)], cwd=base, env=clean)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            cwd=base,
            env=clean,
        ).stdout.strip()
    )
    # The dependencies from this environment (a path line: its .pth files, the editable radflow
    # among them, are not run), after the venv's own site-packages.
    (site / "zz-radflow-test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # --force-reinstall: the editable radflow of this environment is visible through the .pth file
    pip = _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall"]
        + [str(wheel)],
        cwd=base,
        env=clean,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    env = {
        k: v
        for k, v in clean.items()
        if k
        not in (
            "MLFLOW_TRACKING_URI",
            "MLFLOW_S3_ENDPOINT_URL",
            "PREFECT_API_URL",
            "RADFLOW_LEDGER_URL",
            "RADFLOW_CODE_VERSION",
            "RADFLOW_PSEUDONYM_KEY",
        )
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"
    env["RADFLOW_PSEUDONYM_DEV_MODE"] = "1"
    # Prefect's temporary server gets 20 s to start by default: too few on a loaded 2-core machine.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    outside = base / "elsewhere"  # not in any git repository, nowhere near the checkout
    outside.mkdir()
    return {"wheel": wheel, "venv": venv, "site": site, "env": env, "cwd": outside}


def _radflow(installed, *args: str, cwd: Path | None = None):
    radflow = installed["venv"] / "bin" / "radflow"
    return _run([str(radflow), *args], cwd=cwd or installed["cwd"], env=installed["env"])


def test_the_wheel_ships_the_workspace_files_and_its_code_runs_from_the_package(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert {"flows/workspace_files/params.yaml", "flows/workspace_files/dvc.yaml.template"} <= names
    probe = _run(
        [
            str(installed["venv"] / "bin" / "python"),
            "-c",
            "import flows, pipeline_steps; from flows import versioning as v; "
            "print(flows.__file__); print(pipeline_steps.__file__); print(v.code_version())",
        ],
        cwd=installed["cwd"],
        env=installed["env"],
    )
    assert probe.returncode == 0, probe.stderr
    flows_file, steps_file, code_version = probe.stdout.strip().splitlines()
    for path in (flows_file, steps_file):
        assert Path(path).is_relative_to(installed["site"]) and not Path(path).is_relative_to(ROOT)
    assert code_version == f"radflow=={_version()}"  # package metadata: no git, no checkout


def test_init_outside_any_checkout_makes_a_workspace_bound_to_the_installed_code(installed):
    done = _radflow(installed, "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"radflow {_version()}"
    done = _radflow(installed, "init", "ws-init")
    assert done.returncode == 0, done.stderr[-3000:]
    ws = installed["cwd"] / "ws-init"
    assert yaml.safe_load((ws / "params.yaml").read_text()) == yaml.safe_load(
        (ROOT / "params.yaml").read_text()
    )
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    code_deps = [d for s in stages.values() for d in s["deps"] if d.endswith(".py")]
    # DVC's code deps are the installed files that run (so `dvc status` sees an upgrade)
    assert code_deps and all(
        Path(d).is_relative_to(installed["site"]) and Path(d).is_file() for d in code_deps
    )
    models = _radflow(installed, "models", "--json", cwd=ws)
    assert models.returncode == 0, models.stderr[-3000:]
    assert json.loads(models.stdout) == []


@pytest.mark.slow
def test_init_run_predict_and_trace_from_the_installed_package(installed):
    done = _radflow(installed, "init", "ws")
    assert done.returncode == 0, done.stderr[-3000:]
    ws = installed["cwd"] / "ws"
    params = yaml.safe_load((ws / "params.yaml").read_text())
    (ws / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY)))

    run = _radflow(installed, "run", "--json", cwd=ws)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    image = sorted((ws / "data" / "raw" / "images").glob("*.dcm"))[0]
    out = installed["cwd"] / "preds.jsonl"
    predicted = _radflow(
        installed,
        "predict",
        "--input",
        str(image),
        "--out",
        str(out),
        "--version",
        summary["model_version"],
        cwd=ws,
    )
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    record = json.loads(out.read_text().splitlines()[0])
    assert record["code_version"] == f"radflow=={_version()}"

    traced = _radflow(installed, "trace", record["prediction_id"], "--json", cwd=ws)
    assert traced.returncode == 0, traced.stderr[-4000:]
    t = json.loads(traced.stdout)
    assert t["checks"] and all(ok is True for ok in t["checks"].values()), t["checks"]
    assert t["run"]["code_version"] == f"radflow=={_version()}"
    assert t["run"]["git_commit"] is None  # no git commit is claimed for an installed package
    # a workspace radflow created: the data version is committed on its own branch
    head = subprocess.run(
        ["git", "-C", str(ws), "log", "-1", "--format=%H", "--", "data/raw.dvc"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert t["data"]["data_git_rev"] == head
