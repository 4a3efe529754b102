"""End to end on a handful of images for one epoch: Prefect flow, then `dvc repro`, in a throwaway workspace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TINY_PARAMS = {
    "synth": {"n_images": 24, "native_size": [512, 512], "images_per_patient": [1, 2]},
    "validate": {"min_images": 4},
    "preprocess": {"input_size": 128, "target_spacing_mm": 2.8, "shard_size": 8},
    "train": {"epochs": 1, "batch_size": 4, "width": 8, "depth": 3},
}


def _embedded_env() -> dict[str, str]:
    """The embedded defaults, whatever earlier tests in this process exported (mlflow.set_tracking_uri
    sets MLFLOW_TRACKING_URI in os.environ, for one)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "PREFECT_API_URL",
        "RADFLOW_LEDGER_URL",
    ):
        env.pop(name, None)
    return env


def _radflow(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = _embedded_env()
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(workspace), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    done = _radflow(ws, "init")
    assert done.returncode == 0, done.stderr
    params = yaml.safe_load((ws / "params.yaml").read_text())
    (ws / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY_PARAMS)))
    run = _radflow(ws, "run", "--json")
    assert run.returncode == 0, run.stderr[-4000:]
    return ws, run


def _version_tags(ws: Path, name: str, version: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    return dict(client.get_model_version(name, version).tags)


def test_run_registers_a_version_tagged_with_the_dvc_data_version(trained):
    ws, run = trained
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(summary) == {
        "run_id",
        "model_name",
        "model_version",
        "data_version",
        "metrics",
        "gate",
    }
    # the first version faces no production model; the tiny model misses the absolute floors
    assert summary["gate"]["production_version"] is None
    assert summary["gate"]["passed"] is False and summary["gate"]["stages"] == []
    md5 = yaml.safe_load((ws / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    assert summary["data_version"] == md5
    assert summary["model_version"] == "1"
    tags = _version_tags(ws, summary["model_name"], summary["model_version"])
    assert tags["data_version"] == md5
    assert len(tags["params_hash"]) == 16
    assert tags["code_version"] != ""
    assert {"ap50", "cpm", "sens_at_1fp", "auroc"} <= set(summary["metrics"])


def test_no_phi_leaves_ingestion(trained):
    from pipeline_steps.synthetic import collect_phi

    ws, run = trained
    phi = {v for v in collect_phi(ws / "data" / "raw" / "images") if len(v) >= 6}
    assert phi, "the synthetic data must carry fake PHI for this test to mean anything"
    places = [
        ws / "mlflow.db",
        ws / "mlartifacts",
        ws / "reports",
        ws / "metrics.json",
        ws / "data" / "interim",
        ws / "data" / "processed",
        ws / "data" / "features",
    ]
    files = [
        p
        for place in places
        for p in ([place] if place.is_file() else place.rglob("*"))
        if p.is_file()
    ]
    assert any(f.suffix == ".parquet" for f in files) and (ws / "mlflow.db").is_file()
    blobs = {str(f): f.read_bytes() for f in files}
    blobs["run log"] = (run.stdout + run.stderr).encode()
    leaks = [
        (value, where) for value in phi for where, blob in blobs.items() if value.encode() in blob
    ]
    assert not leaks, leaks[:5]


def test_dvc_repro_runs_the_same_stages_without_prefect(trained):
    ws, _ = trained
    manifest_before = pd.read_parquet(ws / "data" / "processed" / "manifest.parquet")
    env = _embedded_env()
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"], cwd=ws, capture_output=True, text=True, env=env
    )
    assert "up to date" in status.stdout.lower(), (
        status.stdout
    )  # the Prefect run was recorded in dvc.lock
    repro = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "-f"],
        cwd=ws,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert repro.returncode == 0, (repro.stdout + repro.stderr)[-4000:]
    assert "prefect" not in repro.stdout.lower()
    for stage in ("validate", "preprocess", "extract_features", "train", "test", "register"):
        assert f"'{stage}'" in repro.stdout
    pd.testing.assert_frame_equal(
        manifest_before, pd.read_parquet(ws / "data" / "processed" / "manifest.parquet")
    )
    registration = json.loads((ws / "reports" / "registration.json").read_text())
    # The same data, code and params: registration gives back the version the Prefect run made.
    assert registration["model_version"] == "1"
    md5 = yaml.safe_load((ws / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    assert _version_tags(ws, registration["model_name"], "1")["data_version"] == md5
