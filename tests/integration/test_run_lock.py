"""One run per workspace, with real `radflow` processes: a second `radflow run` waits for the first
(saying who holds the workspace) and then finds the model up to date, or with --no-wait refuses at
once and does nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import merge, registered_versions

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The tiny run of the nightly tests, on 24 synthetic images of its own.
TINY = {
    "synth": {"n_images": 24, "native_size": [512, 512], "images_per_patient": [1, 1]},
    "validate": {"min_images": 4},
    "preprocess": {
        "input_size": 64,
        "target_spacing_mm": 5.0,
        "shard_size": 8,
        "split": {"val_fraction": 0.25, "test_fraction": 0.25},
    },
    "train": {"epochs": 1, "batch_size": 4, "width": 4, "depth": 2},
    "gate": {"thresholds": {}, "n_boot": 50},
}


def env() -> dict[str, str]:
    out = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "PREFECT_API_URL",
        "RADFLOW_LEDGER_URL",
    ):
        out.pop(name, None)
    # Others may edit this checkout while the test runs; the code must not look changed between runs.
    out["RADFLOW_CODE_VERSION"] = "run-lock-test-code"
    # Prefect's temporary server can take longer than its default to start on a loaded machine.
    out.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return out


def radflow(ws: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )


def new_workspace(root: Path) -> Path:
    from flows import workspace

    workspace.init(root)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(merge(yaml.safe_load(params.read_text()), TINY)))
    return root


def test_with_no_wait_a_second_run_or_ingest_refuses_at_once_and_does_nothing(tmp_path):
    ws = new_workspace(tmp_path / "ws")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from pathlib import Path
                from flows import retraining, workspace
                layout = workspace.resolve(Path({str(ws)!r}))
                with retraining.exclusive_run(layout, "radflow run"):
                    print("held", flush=True)
                    time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        run = radflow(ws, "run", "--no-wait")
        _, err = run.communicate(timeout=120)
        ingest = radflow(ws, "ingest", "--dicom-dir", str(tmp_path), "--no-wait")
        _, ingest_err = ingest.communicate(timeout=120)
    finally:
        holder.kill()
        holder.wait()
    for code, text in ((run.returncode, err), (ingest.returncode, ingest_err)):
        assert code == 1, text
        assert text.startswith("radflow: error: another run is working in"), text
        assert f"radflow run (pid {holder.pid} on " in text and "Nothing was done" in text
        assert "Traceback" not in text
    assert not (ws / "data" / "raw.dvc").exists()  # no data synthesized, nothing ingested
    assert not (ws / "data" / "raw").exists()


def test_two_runs_started_together_train_and_register_once(tmp_path):
    ws = new_workspace(tmp_path / "ws")
    first, second = radflow(ws, "run", "--json"), radflow(ws, "run", "--json")
    outputs = {}
    for proc in (first, second):
        out, err = proc.communicate(timeout=1500)
        assert proc.returncode == 0, err[-4000:]
        assert "Traceback" not in err, err[-4000:]
        outputs[proc.pid] = (json.loads(out.strip().splitlines()[-1]), err)
    trained = [pid for pid, (summary, _) in outputs.items() if "gate" in summary]
    assert len(trained) == 1, outputs  # one trained; the other found its model up to date
    (waiter,) = set(outputs) - set(trained)
    summary, waited = outputs[waiter]
    assert summary["model_version"] == "1" == outputs[trained[0]][0]["model_version"]
    assert f"waiting for the workspace's run lock, held by radflow run (pid {trained[0]} " in waited
    assert registered_versions(f"sqlite:///{ws / 'mlflow.db'}") == ["1"]
