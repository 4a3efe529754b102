"""The nightly flow end to end on loopback: landing sync from moto's S3, ingest, `dvc push` to an S3 remote,
the up-to-date decision (shared with `radflow run`), training with the gate, the run summary, overlap
handling, failure notification, and resuming a killed training run from its checkpoint.

Runs in-process against Prefect's test harness (a temporary Prefect server), except where a separate
process is the point (a lock holder, a run that is killed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from flows import decision, landing, nightly
from tests.integration.conftest import (
    AWS_ENV,
    Moto,
    registered_versions,
    set_params,
    synth_to_landing,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_IMAGES = 24


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A workspace after its first nightly run, with S3 (landing + DVC remote) on moto."""
    from prefect.testing.utilities import prefect_test_harness

    from tests.integration.conftest import nightly_workspace

    root = tmp_path_factory.mktemp("night")
    s3_server = Moto(root).start()
    try:
        with pytest.MonkeyPatch.context() as mp, prefect_test_harness(server_startup_timeout=120):
            for key, value in AWS_ENV.items():
                mp.setenv(key, value)
            mp.setenv("AWS_ENDPOINT_URL_S3", s3_server.url)
            # Others may edit this checkout while the tests run; the code must not look changed.
            mp.setenv(decision.CODE_VERSION_ENV, "nightly-test-code")
            for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", nightly.WEBHOOK_ENV):
                mp.delenv(key, raising=False)
            s3 = s3_server.client()
            s3.create_bucket(Bucket="landing")
            s3.create_bucket(Bucket="dvc-store")
            synth_to_landing(s3, "landing", "site-a/2026-11-23", root / "synth", N_IMAGES, seed=3)
            layout = nightly_workspace(
                root / "ws", "s3://landing/site-a", "s3://dvc-store/radflow", s3_server.url, {}
            )
            first = nightly.nightly_retraining(str(layout.root))
            yield layout, first, s3_server
    finally:
        s3_server.stop()


def summaries(layout) -> list[dict]:
    return [json.loads(line) for line in layout.nightly_log.read_text().splitlines()]


def records(layout) -> list[dict]:
    from flows.change_control import list_records

    return list_records(layout)


def tracking(layout) -> str:
    return f"sqlite:///{layout.mlflow_db}"


def test_the_first_night_syncs_versions_pushes_trains_and_summarizes(night):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import Artifact

    layout, first, s3_server = night
    md5 = yaml.safe_load(layout.raw_dvc.read_text())["outs"][0]["md5"]
    assert first["status"] == "trained", first
    assert first["model_version"] == "1" and first["data_version"] == md5
    assert first["previous_data_version"] is None
    assert first["landing"]["new_images"] == N_IMAGES and first["landing"]["label_files"] == 1
    assert len(list(layout.raw_images.iterdir())) == N_IMAGES
    assert first["dvc_push"] == "pushed to team"
    stored = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="dvc-store")["Contents"]]
    assert f"radflow/files/md5/{md5[:2]}/{md5[2:-4]}.dir" in stored
    assert first["gate"] is not None and first["gate"]["passed"] is True  # first version: no rival
    assert first["gate"]["change_record"]["inside_plan"] is True  # no baseline to break a rule of
    assert summaries(layout) == [first]
    assert registered_versions(tracking(layout)) == ["1"]
    assert decision.read_last_run(layout).fingerprint.data_version == md5

    with get_client(sync_client=True) as client:
        # The raw endpoint: the 3.8 sync client sends null for omitted filters, which the API refuses.
        reply = client.request(
            "POST",
            "/artifacts/filter",
            json={
                "artifacts": {"key": {"any_": [nightly.ARTIFACT_KEY]}},
                "flow_runs": {"id": {"any_": [first["flow_run_id"]]}},
                "sort": "CREATED_DESC",
                "limit": 10,
                "offset": 0,
            },
        )
    found = Artifact.model_validate_list(reply.json())
    mine = [a for a in found if str(a.flow_run_id) == first["flow_run_id"]]
    assert len(mine) == 1 and mine[0].type == "markdown"
    assert "| status | **trained** |" in mine[0].data and "| model version | 1 |" in mine[0].data


def test_an_unchanged_night_is_skipped_and_trains_nothing(night):
    layout, first, _ = night
    trained_at = layout.model.stat().st_mtime_ns
    second = nightly.nightly_retraining(str(layout.root))
    assert second["status"] == "skipped"
    assert second["reason"].startswith(
        "data version, params and code unchanged since model version 1"
    )
    assert second["model_version"] == "1" and second["run_id"] == first["run_id"]
    assert second["landing"]["unchanged"] == N_IMAGES + 1 and second["landing"]["new_images"] == 0
    assert second["dvc_push"] == "already pushed"
    assert layout.model.stat().st_mtime_ns == trained_at
    assert registered_versions(tracking(layout)) == ["1"]
    assert summaries(layout)[-1] == second
    (record,) = [r for r in records(layout) if r["ledger_row"] == second["change_record"]]
    assert record["kind"] == "skipped" and record["signature"] == "verified"
    assert record["version"] == "1" and "unchanged" in record["decision"]


def test_radflow_run_says_up_to_date_and_registers_nothing(night, capsys):
    from flows.cli import main

    layout, first, _ = night
    assert main(["--workspace", str(layout.root), "run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"run_id", "model_name", "model_version", "data_version", "metrics"}
    assert out["model_version"] == "1" and out["run_id"] == first["run_id"]
    assert out["data_version"] == first["data_version"]
    assert out["metrics"] == json.loads(layout.metrics.read_text())
    assert main(["--workspace", str(layout.root), "run"]) == 0
    assert capsys.readouterr().out.startswith("up to date: model version 1\n")
    assert registered_versions(tracking(layout)) == ["1"]


def test_the_decision_sees_params_code_and_drift(night, monkeypatch):
    from flows import workspace

    layout, _, _ = night
    _, params = workspace.open_workspace(layout.root)
    assert decision.check(layout, params).up_to_date

    changed = params.model_copy(update={"train": params.train.model_copy(update={"seed": 8})})
    verdict = decision.check(layout, changed)
    assert not verdict.up_to_date and "params" in verdict.reason
    # The gate policy decides what happens to a model, not what it is: no retrain for it.
    policy = params.gate.model_copy(update={"min_delta": 0.05})
    gated = params.model_copy(update={"gate": policy})
    assert decision.check(layout, gated).up_to_date

    monkeypatch.setenv(decision.CODE_VERSION_ENV, "other-code")
    verdict = decision.check(layout, params)
    assert not verdict.up_to_date and "code" in verdict.reason
    monkeypatch.undo()

    drift_file = layout.reports / "drift" / "drift.json"
    original = drift_file.read_text()
    try:
        drift_file.write_text(json.dumps({"status": "compared", "drift": True, "flagged": ["p50"]}))
        verdict = decision.check(layout, params)
        assert not verdict.up_to_date and "drift" in verdict.reason and "p50" in verdict.reason
    finally:
        drift_file.write_text(original)
    assert decision.check(layout, params, force=True).reason.startswith("forced")


def test_an_overlapping_run_is_skipped_clearly(night, tmp_path):
    from prefect.concurrency.sync import concurrency

    layout, _, _ = night
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from flows import retraining, workspace
                layout = workspace.resolve(__import__("pathlib").Path({str(layout.root)!r}))
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
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        skipped = nightly.nightly_retraining(str(layout.root))
        assert time.monotonic() - started < 60
    finally:
        holder.kill()
        holder.wait()
    assert skipped["status"] == "skipped"
    # `radflow run` and the nightly share the workspace's one run lock, and the reason names who holds it.
    assert "another run holds the workspace's run lock" in skipped["reason"]
    assert (
        "run.lock" in skipped["reason"] and f"radflow run (pid {holder.pid} on" in skipped["reason"]
    )
    assert skipped["landing"] == {} and skipped["data_version"] is None  # it did not even sync

    # With a Prefect server (the harness is one), the global concurrency limit guards too: across
    # machines that share the registry, not only this workspace.
    with concurrency("radflow-nightly", occupy=1, timeout_seconds=30, strict=True):
        blocked = nightly.nightly_retraining(str(layout.root))
    assert blocked["status"] == "skipped"
    assert "global concurrency limit 'radflow-nightly'" in blocked["reason"]
    assert summaries(layout)[-2:] == [skipped, blocked]


def test_an_s3_outage_fails_the_night_notifies_and_keeps_nothing(
    night, tmp_path, monkeypatch, webhook
):
    layout, _, _ = night
    outage = Moto(tmp_path).start()
    try:
        s3 = outage.client()
        s3.create_bucket(Bucket="landing")
        synth_to_landing(s3, "landing", "site-a/2026-11-24", tmp_path / "synth", 4, seed=11)
    finally:
        outage.stop()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", outage.url)
    monkeypatch.setenv(nightly.WEBHOOK_ENV, webhook.url)
    raw_before = sorted(p.name for p in layout.raw_images.iterdir())
    dvc_before = layout.raw_dvc.read_text()
    seen_before = layout.landing_seen.read_text()

    with pytest.raises(landing.LandingError, match="failed after retries"):
        nightly.nightly_retraining(str(layout.root))

    failed = summaries(layout)[-1]
    assert failed["status"] == "failed" and failed["error"].startswith("LandingError")
    assert [body["flow_run_id"] for body in webhook.received] == [failed["flow_run_id"]]
    assert webhook.received[0]["status"] == "failed"
    assert "radflow nightly FAILED" in webhook.received[0]["text"]
    assert sorted(p.name for p in layout.raw_images.iterdir()) == raw_before
    assert layout.raw_dvc.read_text() == dvc_before
    assert layout.landing_seen.read_text() == seen_before
    assert not (layout.state / "landing" / "incoming").exists()
    assert registered_versions(tracking(layout)) == ["1"]
    (record,) = [r for r in records(layout) if r["ledger_row"] == failed["change_record"]]
    assert record["kind"] == "failed" and record["signature"] == "verified"
    assert "LandingError" in record["decision"]


def _checkpoint_epochs(layout) -> int:
    states = list(layout.checkpoints.glob("*/state.json"))
    epochs = []
    for state in states:
        try:
            epochs.append(json.loads(state.read_text())["epochs_completed"])
        except (ValueError, KeyError):
            continue
    return max(epochs, default=0)


def test_a_run_killed_mid_training_resumes_from_its_checkpoint(night):
    layout, _, s3_server = night
    set_params(layout.root, {"train": {"epochs": 4}})  # new params: this night retrains
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        AWS_ENDPOINT_URL_S3=s3_server.url,
        **AWS_ENV,
    )
    env.pop("PREFECT_API_URL", None)
    before = {p.parent.name for p in layout.checkpoints.glob("*/state.json")}
    run = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--workspace", str(layout.root), "nightly"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: (
                run.poll() is not None
                or any(
                    p.parent.name not in before
                    and json.loads(p.read_text())["epochs_completed"] >= 1
                    for p in layout.checkpoints.glob("*/state.json")
                )
            ),
            timeout=600,
            what="the first checkpoint of the killed run",
            interval=0.05,
        )
        assert run.poll() is None, "the run finished before it could be killed"
        os.killpg(run.pid, signal.SIGKILL)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    killed_at = _checkpoint_epochs(layout)
    assert 1 <= killed_at < 4
    assert registered_versions(tracking(layout)) == ["1"]

    resumed = nightly.nightly_retraining(str(layout.root))
    history = json.loads(layout.train_history.read_text())
    assert resumed["status"] == "trained" and resumed["model_version"] == "2"
    assert history["resumed_from_epoch"] >= killed_at >= 1
    assert len(history["history"]["loss"]) == 4  # the killed run's epochs and the rest, once each
