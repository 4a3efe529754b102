"""`test.baseline.enabled: false`: the whole `radflow run` (Prefect flow, then `dvc commit` of the
stages' outs) succeeds without the classical baseline, and a failing `dvc commit` says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flows import versioning
from pipeline_steps.core.errors import WorkspaceError
from pipeline_steps.core.layout import Layout

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TINY = {
    "synth": {"n_images": 16, "native_size": [512, 512], "images_per_patient": [1, 2]},
    "validate": {"min_images": 4},
    "preprocess": {"input_size": 64, "target_spacing_mm": 5.0, "shard_size": 8},
    "train": {
        "epochs": 1,
        "batch_size": 4,
        "width": 4,
        "depth": 2,
        "crop_size": 0,
        "synthetic": {"fraction": 0.0},
        "hard_negative_fraction": 0.0,
    },
    "test": {"baseline": {"enabled": False}},
    "gate": {"thresholds": {}, "n_boot": 20},
}


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _radflow(ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # the embedded defaults, whatever earlier tests in this process exported
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "PREFECT_API_URL",
        "RADFLOW_LEDGER_URL",
    ):
        env.pop(name, None)
    # Prefect's temporary server may take long to start on a loaded machine (default 20 s)
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("nobaseline")
    assert _radflow(ws, "init").returncode == 0
    params = yaml.safe_load((ws / "params.yaml").read_text())
    (ws / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY)))
    return ws


def test_a_run_without_the_baseline_registers_and_commits_its_outs(workspace: Path) -> None:
    stale = Layout(workspace).froc_baseline_csv  # an earlier run's curve, with the baseline on
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("fp_per_image,sensitivity\n1,0.5\n")
    run = _radflow(workspace, "run", "--json")
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["model_version"] == "1"
    metrics = json.loads((workspace / "metrics.json").read_text())
    assert "ap50" in metrics and not any(k.startswith("baseline_") for k in metrics)
    # an out of the test stage either way: written empty, and recorded in dvc.lock
    layout = Layout(workspace)
    assert pd.read_parquet(layout.baseline_predictions).empty
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    outs = {o["path"] for o in lock["stages"]["test"]["outs"]}
    assert "reports/baseline_predictions.parquet" in outs
    assert not stale.exists()  # not plotted as this run's


def test_a_failing_dvc_commit_carries_dvcs_own_message(workspace: Path) -> None:
    layout = Layout(workspace)
    if not layout.baseline_predictions.exists():
        pytest.skip("needs the run of the test above")
    layout.baseline_predictions.unlink()  # a stage out gone missing
    with pytest.raises(WorkspaceError, match=r"baseline_predictions\.parquet.*does not exist"):
        versioning.commit_stages(layout)
