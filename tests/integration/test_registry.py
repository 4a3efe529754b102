"""The model registry against a real `mlflow server` on loopback: registration tags and lineage, the gate,
promotion, rollback, history (`--at`), forced promotion, races, and faults. The ledger is SQLite, and
PostgreSQL where a test says so."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import FAKE_PHI, build_dicom

pytestmark = pytest.mark.integration

MODEL = "radflow-detector"
TINY = {
    "preprocess": {"input_size": 64, "target_spacing_mm": 5.0},
    "train": {"width": 4, "depth": 2},
    "gate": {"thresholds": {"ap50": 0.0, "sens_at_1fp": 0.0}, "n_boot": 50},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
            if reply.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session=True, and the workers it started."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def build_workspace(root: Path, n_images: int = 8):
    """A real workspace (git + DVC) holding what the stages before `register` leave behind: raw
    DICOMs recorded by DVC and committed, metadata, manifest, labels, validation report, metrics and
    a small randomly initialised detector. Returns (layout, params)."""
    import keras

    from flows import versioning, workspace
    from pipeline_steps.core.detector import build_detector

    layout = workspace.init(root)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(_merge(yaml.safe_load(params_file.read_text()), TINY)))
    _, params = workspace.open_workspace(layout.root)

    rng = np.random.default_rng(0)
    layout.raw_images.mkdir(parents=True)
    meta, manifest, labels = [], [], []
    for i in range(n_images):
        staged = build_dicom(
            root / "incoming" / f"{i}.dcm",
            rng.integers(0, 4096, size=(300, 280), dtype=np.uint16),
            patient_id=f"{FAKE_PHI['PatientID']}-{i // 2}",
        )
        digest = hashlib.sha256(staged.read_bytes()).hexdigest()
        staged.rename(layout.raw_images / f"{digest}.dcm")
        split = "test" if i % 2 else "train"
        meta.append({"image_id": digest, "file": f"images/{digest}.dcm"})
        manifest.append(
            {
                "image_id": digest,
                "content_hash": digest,
                "patient_pseudonym": f"pseudo-{i // 2}",
                "split": split,
            }
        )
        labels.append({"image_id": digest, "label": "opacity" if i % 4 == 1 else "no_finding"})
        if i % 4 == 1:
            labels[-1].update(x_min=100.0, y_min=120.0, x_max=140.0, y_max=170.0)
    (root / "incoming").rmdir()
    data_version = versioning.record_raw(layout)  # commits data/raw.dvc in a workspace
    committed = subprocess.run(
        ["git", "-C", str(root), "show", "HEAD:data/raw.dvc"], capture_output=True, text=True
    )
    assert data_version in committed.stdout

    layout.interim.mkdir(parents=True)
    layout.processed.mkdir(parents=True)
    layout.reports.mkdir(parents=True)
    pd.DataFrame(meta).to_parquet(layout.metadata)
    pd.DataFrame(manifest).to_parquet(layout.manifest)
    pd.DataFrame(labels).to_parquet(layout.labels)
    layout.validation_report.write_text(
        json.dumps(
            {
                "success": True,
                "n_images": n_images,
                "data_version": data_version,
                "result_id": f"{data_version}/20261123T000000.000000Z",
            }
        )
    )
    layout.metrics.write_text(json.dumps({"ap50": 0.25, "cpm": 0.5, "auroc": None}))
    layout.train_history.write_text(json.dumps({"history": {"loss": [2.0, 1.5]}}))
    keras.utils.set_random_seed(0)
    layout.model.parent.mkdir(parents=True)
    build_detector(params.preprocess.input_size, params.train).save(layout.model)
    return layout, params


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(root / "server.log").open("w"),
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 300, "mlflow server")
        yield f"http://127.0.0.1:{port}", root
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def ws(mlflow_server, tmp_path_factory):
    uri, _ = mlflow_server
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        layout, params = build_workspace(tmp_path_factory.mktemp("ws"))
        yield layout, params


def with_seed(params, seed: int):
    """The params with another train.seed: another fingerprint, so another version."""
    return params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})


@pytest.fixture(scope="module")
def registered(ws):
    """Three versions of one model with identical weights (so a gate between them is a tie),
    registered under three train seeds (the same seed again would be the same version)."""
    from flows import stages

    layout, params = ws
    return [stages.register(layout, with_seed(params, seed)) for seed in (0, 1, 2)]


@pytest.fixture
def fresh(registered, ws, tmp_path, monkeypatch):
    """No aliases, no stage tags, and an empty ledger for this test."""
    from flows import registry

    layout, params = ws
    monkeypatch.setenv("RADFLOW_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    reg = registry.open_registry(layout, MODEL)
    for alias in list(reg.aliases()):
        reg.client.delete_registered_model_alias(MODEL, alias)
    for info in reg.versions():
        for key in ("archived", *registry.GATE_TAGS):
            if key in info.tags:
                reg.client.delete_model_version_tag(MODEL, info.version, key)
    return layout, params, reg


def cli(layout, *args: str) -> tuple[int, str, str]:
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        code = main(["--workspace", str(layout.root), *args])
    return code, out.getvalue(), err.getvalue()


def ledger_of(layout):
    from pipeline_steps.governance.ledger import open_ledger

    return open_ledger(layout.root)


# --------------------------------------------------------------------------------------------
# Registration


def test_registration_tags_lineage_signature_and_no_phi(registered, ws, mlflow_server):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline_steps.serving.serving import INPUT_COLUMN

    layout, _ = ws
    uri, server_root = mlflow_server
    client = MlflowClient(uri)
    first = registered[0]
    assert [r.model_version for r in registered] == ["1", "2", "3"]
    tags = client.get_model_version(MODEL, "1").tags

    md5 = yaml.safe_load(layout.raw_dvc.read_text())["outs"][0]["md5"]
    head = subprocess.run(
        ["git", "-C", str(layout.root), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert tags["data_version"] == md5 and md5.endswith(".dir")
    assert tags["data_git_rev"] == head
    report = layout.validation_report.read_bytes()
    assert tags["validation_result"] == json.loads(report)["result_id"]
    assert tags["validation_report_sha256"] == hashlib.sha256(report).hexdigest()
    assert tags["validation_passed"] == "true"
    assert len(tags["params_hash"]) == 16 and tags["code_version"]
    assert tags["metric.ap50"] == "0.2500" and "metric.auroc" not in tags  # null is not a number

    # The manifest artifact is what the tag hashes, and lists every image with its split.
    local = mlflow.artifacts.download_artifacts(
        run_id=first.run_id, artifact_path="lineage/train_manifest.csv", tracking_uri=uri
    )
    blob = Path(local).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == tags["train_manifest"]
    listed = pd.read_csv(io.BytesIO(blob))
    manifest = pd.read_parquet(layout.manifest)
    assert sorted(zip(listed.content_hash, listed.split, strict=True)) == sorted(
        zip(manifest.content_hash, manifest.split, strict=True)
    )

    # Dataset lineage: the run's input dataset carries the DVC md5 as its digest.
    run = client.get_run(first.run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == md5
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    # The registered model is the pyfunc (DICOM in), with its Keras-native copy in the same run.
    # Through radflow's one door: MLflow puts the model's code_paths copy (the serving modules
    # only) first on sys.path; left there, it shadows the installed radflow for later imports and
    # for spawned children (the racing promotions below), so load_pyfunc restores sys.path.
    from flows.tracking import load_pyfunc

    path_before = list(sys.path)
    pyfunc = load_pyfunc(layout, MODEL, "1")
    assert sys.path == path_before
    signature = pyfunc.metadata.signature
    assert signature.inputs.input_names() == [INPUT_COLUMN]
    assert signature.params.to_dict()[0]["name"] == "score_threshold"
    assert {"boxes", "image_sha256", "error"} <= set(signature.outputs.input_names())
    logged = {m.name for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])}
    assert {"model", "keras_model"} <= logged

    # The input example is a DICOM without any patient attribute; nothing stored holds fake PHI.
    import pydicom

    example = pyfunc.metadata.load_input_example(
        mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", tracking_uri=uri)
    )
    ds = pydicom.dcmread(io.BytesIO(base64.b64decode(example[INPUT_COLUMN][0])))
    assert "PatientName" not in ds and "PatientID" not in ds and ds.Rows == 64
    stored = [p for p in server_root.rglob("*") if p.is_file()]
    leaks = [
        (value, str(p))
        for p in stored
        for value in FAKE_PHI.values()
        if value.encode() in p.read_bytes()
    ]
    assert not leaks, leaks[:3]


def test_registering_the_same_data_code_and_params_again_returns_the_existing_version(
    registered, ws, mlflow_server
):
    from flows import stages
    from tests.integration.conftest import registered_versions

    layout, params = ws
    uri, _ = mlflow_server
    before = registered_versions(uri, MODEL)
    again = stages.register(layout, with_seed(params, 1))
    assert (again.model_version, again.run_id) == (
        registered[1].model_version,
        registered[1].run_id,
    )
    assert registered_versions(uri, MODEL) == before  # no duplicate
    record = json.loads(layout.registration.read_text())
    assert record["model_version"] == registered[1].model_version
    assert record["run_id"] == registered[1].run_id
    # The source hash is recorded too: with uncommitted code (a -dirty code version) it is part of
    # the fingerprint, so other uncommitted code is another model.
    assert len(record["tags"]["code_hash"]) == 16


def test_a_validation_of_another_data_version_does_not_count(tmp_path):
    from pipeline_steps.core.layout import Layout
    from pipeline_steps.register import read_lineage

    layout = Layout(tmp_path)
    layout.reports.mkdir()
    layout.processed.mkdir(parents=True)
    pd.DataFrame({"content_hash": ["b", "a"], "split": ["test", "train"]}).to_parquet(
        layout.manifest
    )
    report = {"success": True, "data_version": "old.dir", "result_id": "old.dir/t"}
    layout.validation_report.write_text(json.dumps(report))
    stale = read_lineage(layout, "new.dir", "uncommitted")
    assert not stale.validation_passed and stale.validation_result == "old.dir/t"
    current = read_lineage(layout, "old.dir", "uncommitted")
    assert current.validation_passed
    assert current.manifest_csv == b"content_hash,split\na,train\nb,test\n"


def test_params_hash_ignores_the_gate_policy():
    from pipeline_steps.core.config import GateParams, Params, RegisterParams
    from pipeline_steps.register import params_hash

    base = Params()
    other_gate = base.model_copy(update={"gate": GateParams(min_delta=0.1, n_boot=100)})
    other_name = base.model_copy(update={"register_": RegisterParams(model_name="other")})
    assert params_hash(base) == params_hash(other_gate)
    assert params_hash(base) != params_hash(other_name)


# --------------------------------------------------------------------------------------------
# The gate


def test_the_first_version_passes_its_gate_to_staging(fresh):
    from flows.gate import run_gate

    layout, params, reg = fresh
    outcome = run_gate(layout, params, "1", data_version="d1", run_id="r1")
    assert outcome.result.passed and outcome.production_version is None
    assert outcome.stages == ("staging",)
    assert reg.aliases() == {"staging": "1"}
    assert reg.version("1").tags["gate.result"] == "passed"
    with ledger_of(layout) as ledger:
        kinds = [e.kind for e in ledger.entries()]
        moves = [
            (e.payload["from_stage"], e.payload["to_stage"])
            for e in ledger.entries(kind="transition")
        ]
        gate = ledger.entries(kind="gate")[0]
    assert kinds == ["transition", "gate", "change_record", "transition"]
    assert moves == [(None, "candidate"), ("candidate", "staging")]
    assert gate.payload["passed"] and gate.payload["n_images"] == 4
    assert str(gate.seq) == reg.version("1").tags["gate.ledger_row"]
    report = json.loads((layout.reports / "gate.json").read_text())
    assert report["passed"] and report["ledger_row"] == gate.seq


def test_a_tie_with_production_fails_the_gate_and_stays_candidate(fresh):
    from flows.gate import run_gate

    layout, params, reg = fresh
    run_gate(layout, params, "1")
    code, _, err = cli(layout, "promote", "1", "--to", "production", "--reason", "first")
    assert code == 0, err
    outcome = run_gate(layout, params, "2")
    result = outcome.result
    assert outcome.production_version == "1"
    assert not result.passed and outcome.stages == ()
    assert result.delta == 0.0 and result.ci_low == 0.0 and result.ci_high == 0.0
    assert "CI of the delta" in result.reason
    assert reg.aliases() == {"production": "1", "champion": "1", "candidate": "2"}
    assert reg.version("2").tags["gate.result"] == "failed"


def test_an_absolute_threshold_fails_the_gate(fresh):
    from flows.gate import run_gate
    from pipeline_steps.core.config import GateParams

    layout, params, reg = fresh
    strict = params.model_copy(update={"gate": GateParams(thresholds={"ap50": 0.99})})
    outcome = run_gate(layout, strict, "3")
    assert not outcome.result.passed and "ap50" in outcome.result.reason
    assert reg.aliases() == {"candidate": "3"}


def test_a_production_model_the_gate_cannot_score_fails_the_gate_cleanly(fresh):
    import keras
    import mlflow

    from flows.gate import run_gate

    layout, params, reg = fresh
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    with mlflow.start_run():  # a Keras-only version, as radflow registered them before the pyfunc
        info = mlflow.keras.log_model(
            keras.models.load_model(layout.model, compile=False),
            name="old",
            registered_model_name=MODEL,
            pip_requirements=[],
        )
    old = str(info.registered_model_version)
    reg.client.set_registered_model_alias(MODEL, "production", old)
    # Unsigned, as registered before signing: refused, so not compared, and the gate fails.
    outcome = run_gate(layout, params, "1")
    assert not outcome.result.passed and f"version {old} is not signed" in outcome.result.reason
    reg.client.delete_registered_model_alias(MODEL, "candidate")
    # Signed deliberately, it loads, and the gate finds it takes no DICOM.
    from flows.tracking import sign_version

    sign_version(layout, MODEL, old)
    outcome = run_gate(layout, params, "1")
    assert not outcome.result.passed and "does not take DICOM input" in outcome.result.reason
    assert outcome.production_version == old
    assert reg.aliases() == {"production": old, "candidate": "1"}
    with ledger_of(layout) as ledger:
        assert ledger.entries(kind="gate")[0].payload["passed"] is False


# --------------------------------------------------------------------------------------------
# Promotion, forced promotion, rollback, history


def test_promote_force_rollback_and_history_at(fresh):
    from flows.gate import run_gate

    layout, params, reg = fresh
    t0 = datetime.now(UTC)
    run_gate(layout, params, "1")
    code, out, err = cli(
        layout, "promote", "1", "--to", "production", "--reason", "first", "--actor", "ada"
    )
    assert code == 0, err
    assert "version 1: staging -> production" in out
    t1 = datetime.now(UTC)

    run_gate(layout, params, "2")  # a tie: fails, stays candidate
    before = reg.aliases()
    code, _, err = cli(layout, "promote", "2", "--to", "production", "--reason", "try")
    assert code == 1 and "failed its gate" in err and "--force" in err
    assert reg.aliases() == before

    code, out, err = cli(
        layout,
        "promote",
        "2",
        "--to",
        "champion",
        "--reason",
        "urgent fix",
        "--actor",
        "bob",
        "--force",
    )
    assert code == 0, err
    assert "version 1: production -> archived" in out
    assert reg.aliases() == {"production": "2", "champion": "2"}
    assert "archived" in reg.version("1").tags
    with ledger_of(layout) as ledger:
        forced = ledger.entries(kind="transition")[-2].payload
    assert forced["version"] == "2" and forced["forced"] and forced["actor"] == "bob"
    assert any("failed its gate" in why for why in forced["overridden"])
    assert forced["evidence"]["passed"] is False  # the gate evidence overridden is recorded
    t2 = datetime.now(UTC)

    code, out, err = cli(layout, "rollback", "--reason", "regression", "--actor", "cy")
    assert code == 0, err
    assert reg.aliases() == {"production": "1", "champion": "1"}
    assert "archived" not in reg.version("1").tags and "archived" in reg.version("2").tags
    t3 = datetime.now(UTC)

    def production_at(moment: datetime) -> str | None:
        code, out, err = cli(layout, "models", "history", "--at", moment.isoformat(), "--json")
        assert code == 0, err
        held = json.loads(out)["stages"].get("production")
        return held and held["version"]

    assert [production_at(t) for t in (t0, t1, t2, t3)] == [None, "1", "2", "1"]
    code, out, _ = cli(layout, "models", "history", "--at", t2.isoformat())
    assert "production version 2" in out and "bob: urgent fix" in out

    code, out, _ = cli(layout, "models", "history", "--json")
    history = json.loads(out)
    assert [(h["payload"]["version"], h["payload"]["to_stage"]) for h in history][-2:] == [
        ("1", "production"),
        ("2", "archived"),
    ]
    assert history[-1]["payload"]["cause"] == "displaced"

    code, out, _ = cli(layout, "models", "--json")
    rows = {r["version"]: r for r in json.loads(out)}
    assert rows["1"]["stage"] == "production" and rows["1"]["promoted_by"] == "cy"
    assert rows["2"]["stage"] == "archived" and rows["3"]["stage"] is None
    assert rows["1"]["metrics"]["ap50"] == 0.25 and rows["1"]["data_version"].endswith(".dir")
    code, out, _ = cli(layout, "models")
    assert code == 0 and "production" in out.splitlines()[1]
    with ledger_of(layout) as ledger:
        assert ledger.verify().ok


def test_a_manual_promotion_needs_validated_data(fresh):
    from flows.gate import run_gate

    layout, params, reg = fresh
    run_gate(layout, params, "1")
    reg.client.set_model_version_tag(MODEL, "1", "validation_passed", "false")
    try:
        code, _, err = cli(layout, "promote", "1", "--to", "production", "--reason", "x")
    finally:
        reg.client.set_model_version_tag(MODEL, "1", "validation_passed", "true")
    assert code == 1 and "validation" in err
    assert reg.aliases() == {"staging": "1"}


def test_a_version_the_gate_never_decided_on_cannot_be_promoted_unless_forced(fresh):
    """What a run killed between `register` and the gate leaves: no gate decision. It is not promoted
    as if it had been judged; --force still can, and the override is recorded."""
    layout, _, reg = fresh
    for stage in ("staging", "production"):
        code, _, err = cli(layout, "promote", "2", "--to", stage, "--reason", "x")
        assert code == 1, err
        assert f"version 2 cannot go to {stage}: version 2 was never evaluated by the gate" in err
        assert "--force" in err
    assert reg.aliases() == {}
    with ledger_of(layout) as ledger:
        assert ledger.entries() == []
    code, _, err = cli(layout, "promote", "2", "--to", "staging", "--reason", "x", "--force")
    assert code == 0, err
    assert reg.aliases() == {"staging": "2"}
    with ledger_of(layout) as ledger:
        (moved,) = ledger.entries(kind="transition")
    assert (
        moved.payload["forced"] and "never evaluated by the gate" in moved.payload["overridden"][0]
    )


def test_the_gate_stage_keeps_the_decision_a_version_already_has(fresh):
    """A registration that returned an existing version must not gate it again (a version in
    production would even be moved back to staging)."""
    from flows import stages

    layout, params, reg = fresh
    record = json.loads(layout.registration.read_text())
    version = record["model_version"]
    try:
        layout.registration.write_text(json.dumps(record | {"model_version": "1"}))
        first = stages.gate(layout, params)
        code, _, err = cli(layout, "promote", "1", "--to", "production", "--reason", "first")
        assert code == 0, err
        again = stages.gate(layout, params)
    finally:
        layout.registration.write_text(json.dumps(record | {"model_version": version}))
    assert again["ledger_row"] == first["ledger_row"] and again["passed"] == first["passed"]
    assert again["reason"] == first["reason"]
    with ledger_of(layout) as ledger:
        assert len(ledger.entries(kind="gate")) == 1  # one decision, made once
    assert reg.aliases() == {"production": "1", "champion": "1"}
    assert (
        json.loads((layout.reports / "gate.json").read_text())["ledger_row"] == first["ledger_row"]
    )


# --------------------------------------------------------------------------------------------
# Bad input and faults


def test_unknown_versions_and_stages_change_nothing(fresh):
    layout, _, reg = fresh
    for args, message in [
        (("99", "--to", "staging"), "has no version 99"),
        (("abc", "--to", "staging"), "not a model version number"),
        (("1", "--to", "prod"), "unknown stage 'prod'"),
        (("1", "--to", "candidate"), "unknown stage 'candidate'"),
    ]:
        code, _, err = cli(layout, "promote", *args, "--reason", "x")
        assert code == 1 and message in err, (args, err)
    code, _, err = cli(layout, "rollback", "--reason", "x")
    assert code == 1 and "nothing to roll back" in err
    assert reg.aliases() == {}
    with ledger_of(layout) as ledger:
        assert ledger.entries() == []


def test_an_unreachable_registry_is_a_clear_error(fresh, monkeypatch):
    layout, _, _ = fresh
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    code, _, err = cli(layout, "promote", "1", "--to", "staging", "--reason", "x")
    assert code == 1 and f"MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']} is not " in err
    assert "reachable (connection refused)" in err and "Nothing was done" in err
    with ledger_of(layout) as ledger:
        assert ledger.entries() == []


class FlakyClient:
    """The real client, whose `fail_at`-th registry write fails; with `stays_down`, so do all later
    ones (the undo included)."""

    WRITES = (
        "set_registered_model_alias",
        "delete_registered_model_alias",
        "set_model_version_tag",
        "delete_model_version_tag",
    )

    def __init__(self, client, fail_at: int, stays_down: bool) -> None:
        self._client, self._fail_at, self._stays_down, self._writes = (
            client,
            fail_at,
            stays_down,
            0,
        )

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if name not in self.WRITES:
            return attr

        def write(*args):
            self._writes += 1
            if self._writes == self._fail_at or (self._stays_down and self._writes > self._fail_at):
                raise ConnectionError("connection reset by peer")
            return attr(*args)

        return write


def test_a_registry_failure_mid_transition_is_undone(fresh):
    from flows import registry
    from flows.gate import run_gate
    from pipeline_steps.core.errors import TrackingError

    layout, params, reg = fresh
    run_gate(layout, params, "1")
    code, _, _ = cli(layout, "promote", "1", "--to", "production", "--reason", "first")
    assert code == 0
    run_gate(layout, params, "2")
    before, tags_before = reg.aliases(), reg.version("1").tags
    with ledger_of(layout) as ledger:
        rows_before = len(ledger.entries())
        # production moves to 2, then moving champion fails: production must be moved back
        flaky = registry.ModelRegistry(FlakyClient(reg.client, 2, stays_down=False), MODEL, "test")
        with pytest.raises(TrackingError, match="No alias or tag was changed"):
            registry.promote(flaky, ledger, "2", "production", actor="t", reason="x", force=True)
        assert reg.aliases() == before and reg.version("1").tags == tags_before
        assert len(ledger.entries()) == rows_before

        # If the registry stays down, the error says what is left in place; the ledger has nothing.
        down = registry.ModelRegistry(FlakyClient(reg.client, 2, stays_down=True), MODEL, "test")
        with pytest.raises(TrackingError, match=r"could not be restored.*alias production -> 2"):
            registry.promote(down, ledger, "2", "production", actor="t", reason="x", force=True)
        assert len(ledger.entries()) == rows_before


def test_a_stale_view_loses_the_race(fresh):
    from flows import registry
    from pipeline_steps.governance.lifecycle import ConcurrentTransition

    layout, _, reg = fresh
    observed = reg.aliases()
    # Forced: these versions were never gated, which is not what this test is about.
    with ledger_of(layout) as ledger:
        registry.promote(
            reg, ledger, "1", "staging", actor="a", reason="a", observed=observed, force=True
        )
        with pytest.raises(ConcurrentTransition, match="staging: - -> 1"):
            registry.promote(
                reg, ledger, "2", "staging", actor="b", reason="b", observed=observed, force=True
            )
        assert [e.payload["version"] for e in ledger.entries()] == ["1"]
    assert reg.aliases() == {"staging": "1"}


def _race(root: str, version: str, ready, go, results) -> None:
    from flows import registry
    from pipeline_steps.core.layout import Layout

    layout = Layout(Path(root))
    reg = registry.open_registry(layout, MODEL)
    with registry.open_ledger(layout.root) as ledger:
        observed = reg.aliases()  # both decide on the same view of the registry
        ready.wait(60)
        go.wait(60)
        try:
            registry.promote(
                reg,
                ledger,
                version,
                "staging",
                actor=f"p{version}",
                reason="race",
                observed=observed,
                force=True,  # never gated, which is not what this test is about
            )
            results.put((version, "ok", ""))
        except Exception as exc:
            results.put((version, type(exc).__name__, str(exc)))


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_backend(request, fresh, monkeypatch):
    if request.param == "sqlite":
        yield os.environ["RADFLOW_LEDGER_URL"]
        return
    postgres = request.getfixturevalue("postgres")  # only here: SQLite runs need no server
    with postgres.database("ledger") as name:
        url = postgres.database_url(name)
        monkeypatch.setenv("RADFLOW_LEDGER_URL", url)
        yield url


def test_two_racing_promotions_one_wins_one_fails_cleanly(fresh, ledger_backend):
    from pipeline_steps.governance.ledger import Ledger

    layout, _, reg = fresh
    ctx = multiprocessing.get_context("spawn")
    ready, go, results = ctx.Barrier(3), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(str(layout.root), v, ready, go, results)) for v in "12"
    ]
    for p in procs:
        p.start()
    ready.wait(120)
    go.set()
    outcomes = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    winners = [o for o in outcomes if o[1] == "ok"]
    losers = [o for o in outcomes if o[1] != "ok"]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert losers[0][1] == "ConcurrentTransition" and "Nothing was changed" in losers[0][2]
    assert reg.aliases() == {"staging": winners[0][0]}
    with Ledger(ledger_backend) as ledger:
        entries = ledger.entries()
        assert [e.payload["version"] for e in entries] == [winners[0][0]]
        assert ledger.verify().ok


def test_tampering_in_sql_is_caught(fresh, ledger_backend):
    import sqlalchemy as sa

    from flows.gate import run_gate
    from pipeline_steps.governance.ledger import TABLE_NAME, Ledger

    layout, params, _ = fresh
    run_gate(layout, params, "1")
    with Ledger(ledger_backend) as ledger:
        # four rows since change control: the gate's decision is seq 2, its change record among them
        assert ledger.verify().ok and len(ledger.entries()) == 4
        assert ledger.entries()[1].kind == "gate" and "passed" in str(ledger.entries()[1].payload)
        with ledger._engine.connect() as conn:
            with pytest.raises(sa.exc.DBAPIError, match="append-only"), conn.begin():
                conn.exec_driver_sql(f"UPDATE {TABLE_NAME} SET subject = 'x' WHERE seq = 2")
            with conn.begin():  # someone with DDL rights drops the guard and edits a row
                conn.exec_driver_sql(
                    f"DROP TRIGGER {TABLE_NAME}_no_change ON {TABLE_NAME}"
                    if ledger.dialect == "postgresql"
                    else f"DROP TRIGGER {TABLE_NAME}_no_update"
                )
                conn.exec_driver_sql(
                    f"UPDATE {TABLE_NAME} SET payload = replace(payload, 'passed', 'PASSED') "
                    "WHERE seq = 2"
                )
        result = ledger.verify()
    assert not result.ok and result.first_bad == 2 and "altered" in result.problem
