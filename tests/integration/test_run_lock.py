"""One run per workspace, with real `radflow` processes: a second `radflow run` waits for the first
(saying who holds the workspace) and then finds the model up to date, or with --no-wait refuses at
once and does nothing."""

from __future__ import annotations

import json
import os
import signal
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
        # What `dvc repro` runs for each stage.
        step = radflow(ws, "step", "validate", "--no-wait")
        _, step_err = step.communicate(timeout=120)
    finally:
        holder.kill()
        holder.wait()
    for code, text in (
        (run.returncode, err),
        (ingest.returncode, ingest_err),
        (step.returncode, step_err),
    ):
        assert code == 1, text
        assert text.startswith("radflow: error: another run is working in"), text
        assert f"radflow run (pid {holder.pid} on " in text and "Nothing was done" in text
        assert "Traceback" not in text
    assert not (ws / "data" / "raw.dvc").exists()  # no data synthesized, nothing ingested
    assert not (ws / "data" / "raw").exists()
    assert not (ws / "reports" / "validation.json").exists()  # the stage did not run


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


def test_a_run_killed_right_after_register_is_gated_recorded_and_marked_crashed_by_the_next(
    tmp_path,
):
    """`kill -9` between `register` and the gate's decision: the version is ungated (and cannot be
    promoted), the flow run is left RUNNING. The next `radflow run` finishes that gate before
    anything else, records the run (so nothing is trained again and no duplicate is registered) and
    marks the flow run crashed."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    ws = new_workspace(tmp_path / "ws")
    # One Prefect server that the killed run, the re-run and this test all talk to.
    with prefect_test_harness(server_startup_timeout=300):
        api = str(PREFECT_API_URL.value())
        _kill_right_after_register(ws, api)
        _check_recovery(ws, api)


def _registered(ws: Path) -> bool:
    try:
        return bool(json.loads((ws / "reports" / "registration.json").read_text())["model_version"])
    except (OSError, ValueError, KeyError):
        return False


def _kill_right_after_register(ws: Path, api: str) -> None:
    from pipeline_steps.governance.ledger import open_ledger
    from tests.integration.conftest import wait_for

    killed = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env() | {"PREFECT_API_URL": api},
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: killed.poll() is not None or _registered(ws),
            timeout=1800,
            what="the registration of the run to kill",
            interval=0.02,
        )
        assert killed.poll() is None, "the run ended before it could be killed"
        os.killpg(killed.pid, signal.SIGKILL)
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    with open_ledger(ws) as ledger:
        assert ledger.entries(kind="gate") == [], "the gate decided before the kill"
    assert registered_versions(f"sqlite:///{ws / 'mlflow.db'}") == ["1"]


def _flow_runs(state: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        # sort and limit given: Prefect 3.8's sync client sends null for them, which its API refuses.
        found = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=200)
    return [r for r in found if r.state_type is not None and r.state_type.value == state]


def _check_recovery(ws: Path, api: str) -> None:
    from pipeline_steps.governance.ledger import open_ledger

    stale = _flow_runs("RUNNING")
    assert len(stale) == 1 and stale[0].parameters["workspace"] == str(ws)

    # An ungated version cannot be promoted.
    promote = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), "promote", "1"]
        + ["--to", "staging", "--reason", "x"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert promote.returncode == 1
    assert "version 1 was never evaluated by the gate" in promote.stderr

    rerun = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), "run", "--json"],
        capture_output=True,
        text=True,
        env=env() | {"PREFECT_API_URL": api},
        timeout=1800,
    )
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["model_version"] == "1" and "gate" not in summary  # not trained again
    assert "finishing its gate first" in rerun.stderr
    assert registered_versions(f"sqlite:///{ws / 'mlflow.db'}") == ["1"]  # no duplicate
    with open_ledger(ws) as ledger:
        (decided,) = ledger.entries(kind="gate")
    assert decided.payload["version"] == "1"
    last = json.loads((ws / ".radflow" / "last_run.json").read_text())
    assert last["model_version"] == "1"
    assert _flow_runs("RUNNING") == []
    crashed = _flow_runs("CRASHED")
    assert [r.id for r in crashed] == [stale[0].id]
    assert "marked crashed by the next run" in (crashed[0].state.message or "")
