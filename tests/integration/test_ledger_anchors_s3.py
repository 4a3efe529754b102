"""Ledger anchors in S3 with Object Lock (compliance mode), against moto's S3 server over HTTP on
loopback: each write batch puts one locked anchor; the lock refuses deleting an anchor's version
within its retention; a second put of a name is refused, and a later version or delete marker is
found and ignored (the locked first version decides); truncation and a recomputed chain are named;
a bucket without Object Lock is refused; and the same with the ledger in PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from botocore.exceptions import ClientError

from flows.anchoring import COMPLIANCE, S3AnchorStore, anchor_store
from pipeline_steps.governance.anchors import (
    ANCHORS_ALTERED,
    OK,
    REWRITTEN,
    TRUNCATED,
    AnchorConfig,
    AnchorError,
    anchor_key,
    new_anchor,
)
from pipeline_steps.governance.ledger import Ledger
from tests.unit.test_ledger_anchors import rewrite_from, tamper

pytestmark = pytest.mark.integration

BUCKET = "audit-anchors"
PREFIX = "radflow/ledger"


@pytest.fixture
def s3(moto, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.url)
    client = moto.client()
    client.create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
    return client


@pytest.fixture
def store(s3, monkeypatch) -> S3AnchorStore:
    monkeypatch.setenv("RADFLOW_LEDGER_ANCHOR", f"s3://{BUCKET}/{PREFIX}")
    monkeypatch.setenv("RADFLOW_LEDGER_ANCHOR_RETENTION_DAYS", "200")
    found = anchor_store()
    assert isinstance(found, S3AnchorStore)  # the edge, from the environment
    return found


def write(ledger: Ledger, batches: list[int]) -> None:
    n = 0
    for size in batches:
        with ledger.writing() as writer:
            for _ in range(size):
                n += 1
                writer.append("transition", f"m:{n}", {"n": n})


def test_each_batch_puts_one_anchor_under_a_compliance_lock(tmp_path, s3, store):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", anchors=store) as ledger:
        write(ledger, [2, 3])
        head = ledger.head()
        assert ledger.check_anchors().status == OK
    key = f"{PREFIX}/{anchor_key(5)}"
    got = s3.get_object(Bucket=BUCKET, Key=key)
    assert got["ObjectLockMode"] == COMPLIANCE
    retained = got["ObjectLockRetainUntilDate"] - datetime.now(UTC)
    assert timedelta(days=199) < retained <= timedelta(days=200)
    assert store.seqs() == [2, 5] and store.read(5).row_hash == head.row_hash


def test_object_lock_refuses_to_delete_or_replace_an_anchor(tmp_path, s3, store):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", anchors=store) as ledger:
        write(ledger, [3])
        key = f"{PREFIX}/{anchor_key(3)}"
        version = s3.list_object_versions(Bucket=BUCKET, Prefix=key)["Versions"][0]["VersionId"]

        with pytest.raises(ClientError) as refused:
            s3.delete_object(Bucket=BUCKET, Key=key, VersionId=version)
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
        with pytest.raises(ClientError) as refused:  # radflow's own put never overwrites
            s3.put_object(Bucket=BUCKET, Key=key, Body=b"{}", IfNoneMatch="*")
        assert refused.value.response["Error"]["Code"] == "PreconditionFailed"

        # A plain put adds a version and a plain delete a marker: the original stays, locked.
        forged = new_anchor(3, "f" * 64, 3).to_json()
        s3.put_object(Bucket=BUCKET, Key=key, Body=forged)
        s3.delete_object(Bucket=BUCKET, Key=key)
        check = ledger.check_anchors()
        assert check.status == ANCHORS_ALTERED and check.failed
        assert any("written again" in f for f in check.findings)
        assert any("deleted" in f for f in check.findings)
        assert store.read(3).row_hash == ledger.head().row_hash  # the locked first version
        assert s3.get_object(Bucket=BUCKET, Key=key, VersionId=version)["Body"].read()


def test_truncation_and_a_recomputed_chain_are_named(tmp_path, store):
    db = tmp_path / "ledger.db"
    with Ledger(f"sqlite:///{db}", anchors=store) as ledger:
        write(ledger, [1, 1, 1, 1])
    rewrite_from(db, 2, {"n": 99})
    with Ledger(f"sqlite:///{db}", anchors=store) as ledger:
        assert ledger.verify().ok
        check = ledger.check_anchors()
        assert check.status == REWRITTEN and check.first_mismatch == 2
    with tamper(db) as con:
        con.execute("DELETE FROM radflow_ledger WHERE seq > 2")
    with Ledger(f"sqlite:///{db}", anchors=store) as ledger:
        assert ledger.check_anchors().status == TRUNCATED


def test_a_bucket_without_object_lock_is_refused(tmp_path, s3, monkeypatch):
    s3.create_bucket(Bucket="plain")
    store = S3AnchorStore.from_config(AnchorConfig("s3://plain/x"))
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", anchors=store) as ledger:
        ledger.append("transition", "m:1", {})  # recorded all the same
        assert "no Object Lock" in ledger.anchor_error
        with pytest.raises(AnchorError, match="no Object Lock"):
            ledger.anchor_head()
    assert "Contents" not in s3.list_objects_v2(Bucket="plain")


def test_an_unreachable_store_keeps_the_write_and_names_no_secret(tmp_path, s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    store = S3AnchorStore.from_config(AnchorConfig(f"s3://{BUCKET}/{PREFIX}"))
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", anchors=store) as ledger:
        entry = ledger.append("transition", "m:1", {})
        assert ledger.head() == entry and ledger.anchor_error
        assert "radflow-test-secret" not in ledger.anchor_error
        assert "AWS_ENDPOINT_URL_S3" in ledger.anchor_error


def test_anchoring_a_postgresql_ledger(postgres, store):
    with postgres.database("anchors") as name:
        url = postgres.database_url(name)
        with Ledger(url, anchors=store) as ledger:
            write(ledger, [2, 2])
            assert store.seqs() == [2, 4] and ledger.check_anchors().status == OK
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
        with engine.begin() as conn:  # an owner with DDL rights removes the last row
            conn.exec_driver_sql("ALTER TABLE radflow_ledger DISABLE TRIGGER USER")
            conn.exec_driver_sql("DELETE FROM radflow_ledger WHERE seq = 4")
        engine.dispose()
        with Ledger(url, anchors=store) as ledger:
            assert ledger.verify().ok
            assert ledger.check_anchors().status == TRUNCATED


def test_the_commands_anchor_to_s3_and_an_export_verifies_offline(
    tmp_path, store, capsys, monkeypatch
):
    """`radflow audit` with RADFLOW_LEDGER_ANCHOR=s3://...: the commands' ledger anchors there,
    verify reads it back, and the export checks out with S3 gone."""
    import json
    import shutil
    from pathlib import Path

    import flows.cli
    from flows.anchoring import open_ledger
    from flows.cli import main

    source = Path(__file__).resolve().parents[2]
    ws = tmp_path / "ws"
    (ws / ".dvc").mkdir(parents=True)
    shutil.copyfile(source / "params.yaml", ws / "params.yaml")
    shutil.copyfile(source / "dvc.yaml", ws / "dvc.yaml")
    monkeypatch.setattr(flows.cli, "_setup_environment", lambda: None)
    monkeypatch.delenv("RADFLOW_LEDGER_URL", raising=False)
    with open_ledger(ws) as ledger:
        write(ledger, [1, 2])
    assert main(["--workspace", str(ws), "audit", "verify", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == OK and result["anchoring"]["location"] == f"s3://{BUCKET}/{PREFIX}"
    assert result["anchoring"]["anchors"] == 2 and result["anchoring"]["last_anchored"] == 3

    out = tmp_path / "audit.jsonl"
    assert main(["--workspace", str(ws), "audit", "export", "--out", str(out)]) == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # S3 gone: offline
    assert main(["audit", "verify", "--export", str(out), "--json"]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert checked["status"] == OK and checked["rows"] == 3 and checked["anchors"] == 2
