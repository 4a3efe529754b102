"""Predictions with an audit trail, end to end in a real workspace: train (Prefect, one epoch), promote,
`radflow predict` (JSONL + DICOM SR), the ledger, `radflow trace`, `radflow audit verify/export`,
and `radflow serve-api` over real HTTP on loopback, including an alias move and a busy ledger."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pydicom
import pytest
import yaml

from tests.e2e.test_smoke import TINY_PARAMS, _embedded_env, _merge
from tests.integration.test_registry import free_port, stop, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def radflow(ws: Path, *args: str, env: dict | None = None, timeout: float = 900):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), *args],
        capture_output=True,
        text=True,
        env=env or _embedded_env(),
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A trained, registered and promoted version 1, and a folder of inputs to predict."""
    from pipeline_steps.core.config import SynthParams
    from pipeline_steps.synthetic import generate_dataset

    ws = tmp_path_factory.mktemp("pred-ws")
    assert radflow(ws, "init").returncode == 0
    params = yaml.safe_load((ws / "params.yaml").read_text())
    (ws / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY_PARAMS)))
    run = radflow(ws, "run", "--json")
    assert run.returncode == 0, run.stderr[-4000:]
    done = radflow(ws, "promote", "1", "--to", "production", "--reason", "audit test", "--force")
    assert done.returncode == 0, done.stderr[-2000:]

    manifest = pd.read_parquet(ws / "data" / "processed" / "manifest.parquet")
    train = manifest[manifest["split"] == "train"].sort_values("image_id").iloc[0]
    test = manifest[manifest["split"] == "test"].sort_values("image_id").iloc[0]
    inputs = tmp_path_factory.mktemp("inputs")
    raw = ws / "data" / "raw" / "images"
    # A file name that names a patient: it may be in the caller's JSONL, never in the ledger.
    shutil.copy(raw / f"{train['image_id']}.dcm", inputs / "a_Testperson_Ada.dcm")
    shutil.copy(raw / f"{test['image_id']}.dcm", inputs / "b_test.dcm")
    new = generate_dataset(
        SynthParams.model_validate(_merge(params["synth"], TINY_PARAMS["synth"])),
        tmp_path_factory.mktemp("new"),
        n_images=1,
        seed=99,
    )
    shutil.copy(next(new.images_dir.glob("*.dcm")), inputs / "c_new.dcm")
    good = (inputs / "b_test.dcm").read_bytes()
    (inputs / "d_truncated.dcm").write_bytes(good[: len(good) // 3])
    (inputs / "e_notes.txt").write_text("a referral letter, not an image")
    return {
        "ws": ws,
        "inputs": inputs,
        "train_split": str(train["split"]),
        "run": json.loads(run.stdout.strip().splitlines()[-1]),
    }


@pytest.fixture(scope="module")
def predicted(workspace, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("out")
    out, sr = out_dir / "preds.jsonl", out_dir / "sr"
    done = radflow(
        workspace["ws"],
        "predict",
        "--input",
        str(workspace["inputs"]),
        "--out",
        str(out),
        "--sr-out",
        str(sr),
        "--threshold",
        "0.0",
        "--json",
    )
    # Two of the five inputs cannot be used: the batch exits 1, with every record written.
    assert done.returncode == 1, done.stderr[-4000:]
    assert "2 of 5 file(s) failed; the reason of each is in its record's `reason`" in done.stderr
    assert str(out) in done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return {
        "summary": json.loads(done.stdout.strip().splitlines()[-1]),
        "records": records,
        "log": done.stdout + done.stderr,
    }


def _ledger_rows(ws: Path, kind: str = "prediction") -> list[dict]:
    from pipeline_steps.governance.ledger import open_ledger

    with open_ledger(ws) as ledger:
        return [e.as_dict() for e in ledger.entries(kind=kind)]


def test_predict_writes_one_record_per_file_and_reports_bad_ones(workspace, predicted):
    records, summary = predicted["records"], predicted["summary"]
    names = [Path(r["image"]).name for r in records]
    assert names == [
        "a_Testperson_Ada.dcm",
        "b_test.dcm",
        "c_new.dcm",
        "d_truncated.dcm",
        "e_notes.txt",
    ]
    assert summary["predicted"] == 3 and summary["failed"] == 2
    assert records[3]["reason"] == "corrupt" and records[4]["reason"] == "not_dicom"
    md5 = yaml.safe_load((workspace["ws"] / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    for record in records[:3]:
        assert record["model"] == {
            "name": "radflow-detector",
            "version": "1",
            "stage": "production",
            "run_id": workspace["run"]["run_id"],
        }
        assert record["data_version"] == md5 and record["code_version"]
        ds = pydicom.dcmread(record["image"])
        assert record["sop_instance_uid_hash"] and str(ds.SOPInstanceUID) not in json.dumps(record)
        assert len(record["image_sha256"]) == 64
        assert (
            record["file_sha256"] == hashlib.sha256(Path(record["image"]).read_bytes()).hexdigest()
        )
        for box in record["boxes"]:  # original DICOM pixel coordinates
            assert 0 <= box["x_min"] < box["x_max"] <= ds.Columns
            assert 0 <= box["y_min"] < box["y_max"] <= ds.Rows
    assert sum(len(r["boxes"]) for r in records[:3]) > 0  # threshold 0 keeps the top peaks
    assert len({r["prediction_id"] for r in records}) == 5


def test_predicted_inputs_outside_the_dataset_are_kept_for_review(workspace, predicted):
    from pipeline_steps.core.deid import image_id_for

    ws, records = workspace["ws"], predicted["records"]
    ids = {image_id_for(r["file_sha256"]): r for r in records if "reason" not in r}
    in_raw = {i for i in ids if (ws / "data" / "raw" / "images" / f"{i}.dcm").exists()}
    assert len(ids) == 3 and len(in_raw) == 2  # a_ and b_ come from the dataset, c_ is new
    store = ws / ".radflow" / "review" / "images"
    # Only the successful input that is not in data/raw; the refused ones are not kept.
    assert {p.name for p in store.iterdir()} == {f"{i}.dcm" for i in set(ids) - in_raw}
    for image_id in set(ids) - in_raw:
        kept = store / f"{image_id}.dcm"
        assert kept.read_bytes() == Path(ids[image_id]["image"]).read_bytes()
        assert kept.stat().st_mode & 0o777 == 0o600 and store.stat().st_mode & 0o777 == 0o700


def test_every_prediction_is_in_the_ledger_without_paths_or_identifiers(workspace, predicted):
    from pipeline_steps.synthetic import collect_phi

    rows = _ledger_rows(workspace["ws"])
    by_id = {row["subject"]: row for row in rows}
    for record in predicted["records"]:
        payload = by_id[record["prediction_id"]]["payload"]
        assert "image" not in payload and "error" not in payload
        assert payload["boxes"] == record["boxes"]
    blob = (workspace["ws"] / "ledger.db").read_bytes()
    phi = {v for v in collect_phi(workspace["inputs"]) if len(v) >= 6}
    uids = {
        str(pydicom.dcmread(r["image"], stop_before_pixels=True).SOPInstanceUID)
        for r in predicted["records"][:3]
    }
    assert phi and uids
    leaks = [v for v in phi | uids | {"Testperson", "a_Testperson_Ada"} if v.encode() in blob]
    assert not leaks, leaks
    # nor in what the command printed (Prefect's run log included)
    assert not [v for v in phi | uids | {"Testperson"} if v in predicted["log"]]


def test_sr_reports_hold_the_same_boxes_and_reference_the_source(predicted, tmp_path):
    from pipeline_steps.serving.sr import read_sr_boxes

    sr_dir = Path(predicted["summary"]["out"]).parent / "sr"
    assert predicted["summary"]["reports"] == 3
    for record in predicted["records"][:3]:
        path = sr_dir / f"{record['prediction_id']}.dcm"
        sr = pydicom.dcmread(path)
        source = pydicom.dcmread(record["image"], stop_before_pixels=True)
        assert sr.Modality == "SR" and sr.StudyInstanceUID == source.StudyInstanceUID
        boxes = read_sr_boxes(sr)
        assert len(boxes) == len(record["boxes"])
        for got, want in zip(boxes, record["boxes"], strict=True):
            assert got["referenced_sop_instance_uid"] == str(source.SOPInstanceUID)
            assert got["label"] == want["label"]
            for k in ("x_min", "y_min", "x_max", "y_max", "score"):
                assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-3)


def _trace(ws: Path, prediction_id: str, env: dict | None = None):
    done = radflow(ws, "trace", prediction_id, "--json", env=env)
    return done, (json.loads(done.stdout) if done.stdout.strip() else None)


def test_trace_resolves_every_link_to_the_real_objects(workspace, predicted):
    from pipeline_steps.register import manifest_csv, manifest_table

    ws, records = workspace["ws"], predicted["records"]
    done, t = _trace(ws, records[0]["prediction_id"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(t["checks"].values()), t["checks"]
    assert t["prediction"]["prediction_id"] == records[0]["prediction_id"]
    assert t["model"]["version"] == "1" and t["model"]["stage_at_prediction"] == ["production"]
    assert t["run"]["run_id"] == workspace["run"]["run_id"]
    assert t["run"]["params"]["train.epochs"] == "1"
    assert len(t["run"]["git_commit"]) == 40
    # data version: the DVC md5, and the git commit that holds it
    rev = subprocess.run(
        ["git", "-C", str(ws), "log", "-1", "--format=%H", "--", "data/raw.dvc"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    md5 = yaml.safe_load((ws / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    assert t["data"] == {"data_version": md5, "data_git_rev": rev, "raw_dvc_md5_at_rev": md5}
    # validation: the GX run of this data version, found in the workspace's GX store
    report = json.loads((ws / "reports" / "validation.json").read_text())
    assert t["validation"]["result_id"] == report["result_id"]
    # the test data is pseudonymized in development mode: the report, the version tag (which the
    # trace reads), the HTML test report and the printed trace all say so
    assert report["pseudonym_key"] == "development"
    assert t["validation"]["pseudonym_key"] == "development"
    assert "PUBLIC development key" in (ws / "reports" / "latest" / "index.html").read_text()
    printed = radflow(ws, "trace", records[0]["prediction_id"])
    assert "pseudonyms  development key: trained on pseudonyms under the PUBLIC" in printed.stdout
    assert set(t["validation"]["gx_results"]) == {"metadata", "labels", "label_summary"}
    assert all(r["success"] for r in t["validation"]["gx_results"].values())
    # training images: the manifest artifact is the workspace's manifest, byte for byte
    manifest = manifest_table(pd.read_parquet(ws / "data" / "processed" / "manifest.parquet"))
    assert t["training_manifest"]["sha256"] == hashlib.sha256(manifest_csv(manifest)).hexdigest()
    assert t["training_manifest"]["images"] == len(manifest)
    assert t["image_in_training_data"] == {
        "member": True,
        "split": workspace["train_split"],
        "matched_on": "file content hash (ingestion's image id)",
    }
    _, new = _trace(ws, records[2]["prediction_id"])
    assert new["image_in_training_data"]["member"] is False
    _, failed = _trace(ws, records[3]["prediction_id"])
    assert failed["prediction"]["reason"] == "corrupt"
    missing = radflow(ws, "trace", "01NOSUCHPREDICTION0000000")
    assert missing.returncode == 1 and "no prediction" in missing.stderr


def test_predict_and_the_api_refuse_to_start_without_a_pseudonym_key(
    workspace, predicted, tmp_path
):
    ws = workspace["ws"]
    env = _embedded_env()
    env.pop("RADFLOW_PSEUDONYM_DEV_MODE", None)
    env.pop("RADFLOW_PSEUDONYM_KEY", None)
    rows = len(_ledger_rows(ws))
    out = tmp_path / "preds.jsonl"
    done = radflow(ws, "predict", "--input", str(workspace["inputs"]), "--out", str(out), env=env)
    assert done.returncode == 1 and "RADFLOW_PSEUDONYM_KEY is not set" in done.stderr
    assert not out.exists() and len(_ledger_rows(ws)) == rows
    api = radflow(
        ws, "serve-api", "--port", str(free_port()), "--insecure-no-auth", env=env, timeout=120
    )
    assert api.returncode == 1 and "secrets.token_hex(32)" in api.stderr


def test_audit_verify_names_the_first_tampered_row(workspace, predicted, tmp_path):
    ws = workspace["ws"]
    done = radflow(ws, "audit", "verify")
    assert done.returncode == 0 and "ledger intact" in done.stdout
    copy = tmp_path / "ledger.db"
    with sqlite3.connect(ws / "ledger.db") as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    target = predicted["records"][1]["prediction_id"]
    with sqlite3.connect(copy) as db:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE radflow_ledger SET payload = '{}' WHERE subject = ?", (target,))
        db.execute("DROP TRIGGER radflow_ledger_no_update")  # what an insider with DDL could do
        seq, payload = db.execute(
            "SELECT seq, payload FROM radflow_ledger WHERE subject = ?", (target,)
        ).fetchone()
        forged = json.loads(payload)
        forged["threshold"] = 0.99  # "the model was run at a stricter threshold"
        db.execute(
            "UPDATE radflow_ledger SET payload = ? WHERE seq = ?",
            (json.dumps(forged, sort_keys=True, separators=(",", ":")), seq),
        )
    env = dict(_embedded_env(), RADFLOW_LEDGER_URL=f"sqlite:///{copy}")
    broken = radflow(ws, "audit", "verify", "--json", env=env)
    assert broken.returncode == 1
    result = json.loads(broken.stdout)
    assert result["ok"] is False and result["first_bad"] == seq and result["rows"] == seq - 1
    done, t = _trace(ws, target, env=env)
    assert done.returncode == 1 and t["checks"]["ledger_row_verified"] is False
    _, earlier = _trace(ws, predicted["records"][0]["prediction_id"], env=env)
    assert earlier["checks"]["ledger_row_verified"] is True  # rows before the break still verify


def test_audit_export_writes_a_window_an_auditor_can_recheck(workspace, predicted, tmp_path):
    from pipeline_steps.governance.ledger import row_hash

    ws = workspace["ws"]
    rows = _ledger_rows(ws)
    since, until = rows[1]["recorded_at"], rows[3]["recorded_at"]
    out = tmp_path / "audit.jsonl"
    done = radflow(ws, "audit", "export", "--since", since, "--until", until, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["export"]["filters"]["kind"] is None  # the summary line, then the rows
    exported = [item for item in lines if "seq" in item]
    assert exported and all(since <= r["recorded_at"] <= until for r in exported)
    everything = [r for r in _ledger_rows(ws, kind=None) if since <= r["recorded_at"] <= until]
    assert [r["seq"] for r in exported] == [r["seq"] for r in everything]
    for before, row in zip(exported, exported[1:], strict=False):
        assert row["prev_hash"] == before["row_hash"]
    for row in exported:
        fields = ("seq", "kind", "subject", "recorded_at", "payload", "prev_hash")
        assert row_hash(*(row[f] for f in fields)) == row["row_hash"]


# --------------------------------------------------------------------------------------------
# The online API


@pytest.fixture(scope="module")
def api_token(workspace, tmp_path_factory):
    """A token made by `radflow api-token add`: printed once, only its salted hash on disk."""
    tokens = tmp_path_factory.mktemp("tokens") / "api-tokens"
    made = radflow(workspace["ws"], "api-token", "add", "tests", "--file", str(tokens))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token and token not in tokens.read_text()
    return tokens, token


@pytest.fixture(scope="module")
def api(workspace, api_token):
    ws = workspace["ws"]
    port = free_port()
    log = (ws / "serve-api.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), "serve-api"]
        + ["--port", str(port), "--poll-seconds", "1"],
        env=dict(_embedded_env(), RADFLOW_API_TOKENS_FILE=str(api_token[0])),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc, 180, "radflow serve-api")
        yield url
    finally:
        stop(proc)
        log.close()
    assert api_token[1] not in (ws / "serve-api.log").read_text()  # no token in the server's log


@pytest.fixture(scope="module")
def auth(api_token):
    return {"authorization": f"Bearer {api_token[1]}"}


def test_the_api_refuses_to_start_without_tokens(workspace, tmp_path):
    env = _embedded_env()
    env.pop("RADFLOW_API_TOKENS_FILE", None)
    env.pop("RADFLOW_API_TOKENS", None)
    port = str(free_port())
    done = radflow(workspace["ws"], "serve-api", "--port", port, env=env, timeout=120)
    assert done.returncode == 1 and "serve-api has no API tokens" in done.stderr
    assert "radflow api-token add NAME --file FILE" in done.stderr
    # the development flag serves loopback only
    wide = radflow(workspace["ws"], "serve-api", "--host", "0.0.0.0", "--insecure-no-auth", env=env)
    assert wide.returncode == 1 and "is not a loopback address" in wide.stderr


def test_the_api_answers_with_a_ledgered_record(workspace, api, auth):
    ws, inputs = workspace["ws"], workspace["inputs"]
    health = httpx.get(f"{api}/healthz", headers=auth).json()
    assert health["model"]["version"] == "1" and health["model"]["stage"] == "production"
    with (inputs / "c_new.dcm").open("rb") as fh:
        reply = httpx.post(
            f"{api}/predict", files={"file": ("c_new.dcm", fh)}, headers=auth, timeout=60
        )
    assert reply.status_code == 200, reply.text
    record = reply.json()
    # in the ledger by the time the answer arrived
    by_id = {row["subject"]: row for row in _ledger_rows(ws)}
    assert record["prediction_id"] in by_id
    assert by_id[record["prediction_id"]]["payload"]["boxes"] == record["boxes"]
    assert record["image"] == "c_new.dcm" and record["model"]["version"] == "1"
    # the same image as raw bytes: same pixels, same boxes
    raw = httpx.post(
        f"{api}/predict",
        content=(inputs / "c_new.dcm").read_bytes(),
        headers={"content-type": "application/dicom", **auth},
        timeout=60,
    ).json()
    assert raw["image_sha256"] == record["image_sha256"] and raw["boxes"] == record["boxes"]
    bad = httpx.post(
        f"{api}/predict",
        files={"file": ("x.dcm", (inputs / "d_truncated.dcm").read_bytes())},
        headers=auth,
        timeout=60,
    )
    assert bad.status_code == 422 and bad.json()["reason"] == "corrupt"
    assert bad.json()["prediction_id"] in {row["subject"] for row in _ledger_rows(ws)}
    assert (
        httpx.post(
            f"{api}/predict", content=b"x", headers={"content-type": "text/plain", **auth}
        ).status_code
        == 415
    )


def test_the_api_refuses_to_answer_what_the_ledger_did_not_record(workspace, api, auth):
    ws = workspace["ws"]
    before = len(_ledger_rows(ws, kind=None))
    holder = sqlite3.connect(ws / "ledger.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the ledger
    try:
        reply = httpx.post(
            f"{api}/predict",
            content=(workspace["inputs"] / "c_new.dcm").read_bytes(),
            headers={"content-type": "application/dicom", **auth},
            timeout=60,
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert reply.status_code == 503 and "not recorded" in reply.json()["detail"]
    assert len(_ledger_rows(ws, kind=None)) == before


def test_the_api_follows_the_production_alias(workspace, api, auth):
    ws = workspace["ws"]
    # Version 2 from the same trained files: registration is idempotent for the same data, code
    # and params, so another train seed makes it a new version.
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["seed"] = int(params["train"].get("seed", 7)) + 1
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    registered = radflow(ws, "step", "register")
    assert registered.returncode == 0, registered.stderr[-3000:]
    moved = radflow(ws, "promote", "2", "--to", "production", "--reason", "reload", "--force")
    assert moved.returncode == 0, moved.stderr[-2000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(f"{api}/healthz", headers=auth).json()["model"]["version"] == "2":
            break
        time.sleep(0.5)
    else:
        pytest.fail("the API did not load version 2 within 60 s of the alias move")
    reply = httpx.post(
        f"{api}/predict",
        content=(workspace["inputs"] / "c_new.dcm").read_bytes(),
        headers={"content-type": "application/dicom", **auth},
        timeout=60,
    ).json()
    assert reply["model"]["version"] == "2"
    # and the trace of that answer sees version 2 in production at the time
    done, t = _trace(ws, reply["prediction_id"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert t["model"]["version"] == "2" and t["model"]["stage_at_prediction"] == ["production"]
