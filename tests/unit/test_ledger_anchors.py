"""Ledger anchors with the embedded SQLite ledger and a folder store: each write batch anchors its
head; rows deleted from the end are named `truncated`, a chain recomputed with new hashes
`rewritten`, rows after the newest anchor the `unanchored tail`; an anchoring failure keeps the
write and is reported; an export verifies offline and a tampered one does not."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from pipeline_steps.core.errors import ConfigError
from pipeline_steps.governance import anchors as anchors_module
from pipeline_steps.governance.anchors import (
    NOT_ANCHORED,
    OK,
    REWRITTEN,
    TRUNCATED,
    UNANCHORED_TAIL,
    AnchorConfig,
    AnchorError,
    FolderAnchorStore,
    anchor_key,
    new_anchor,
)
from pipeline_steps.governance.export import BROKEN, check_export, export_lines
from pipeline_steps.governance.ledger import GENESIS, Ledger, canonical_json, row_hash

SOURCE = Path(__file__).resolve().parents[2]


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def store(tmp_path: Path) -> FolderAnchorStore:
    return FolderAnchorStore(tmp_path / "anchors-elsewhere")


def fill(db: Path, store: FolderAnchorStore | None, batches: list[int]) -> Ledger:
    ledger = Ledger(url_of(db), anchors=store)
    n = 0
    for size in batches:
        with ledger.writing() as writer:
            for _ in range(size):
                n += 1
                writer.append("transition", f"m:{n}", {"n": n, "reason": f"row {n}"})
    return ledger


def tamper(db: Path) -> sqlite3.Connection:
    """What an insider with DDL rights on the ledger's database can do."""
    con = sqlite3.connect(db)
    con.execute("DROP TRIGGER IF EXISTS radflow_ledger_no_update")
    con.execute("DROP TRIGGER IF EXISTS radflow_ledger_no_delete")
    return con


def rewrite_from(db: Path, first: int, change: dict) -> None:
    """Change row `first`'s payload and recompute every hash from it on: a consistent chain."""
    with tamper(db) as con:
        rows = con.execute(
            "SELECT seq, kind, subject, recorded_at, payload, prev_hash FROM radflow_ledger "
            "ORDER BY seq"
        ).fetchall()
        prev = GENESIS if first == 1 else None
        for seq, kind, subject, recorded_at, payload, old_prev in rows:
            if seq < first:
                continue
            prev = prev if prev is not None else old_prev
            body = json.loads(payload) | (change if seq == first else {})
            digest = row_hash(seq, kind, subject, recorded_at, body, prev)
            con.execute(
                "UPDATE radflow_ledger SET payload = ?, prev_hash = ?, row_hash = ? WHERE seq = ?",
                (canonical_json(body), prev, digest, seq),
            )
            prev = digest


def test_each_write_batch_anchors_its_head(db, store):
    ledger = fill(db, store, [2, 1, 3])
    assert store.seqs() == [2, 3, 6]  # one anchor per batch, at the batch's last row
    newest = store.read(6)
    assert newest.row_hash == ledger.head().row_hash and newest.rows == 6
    assert (store.root / anchor_key(6)).stat().st_mode & 0o222 == 0  # written read-only
    # An anchor holds the head's position and hash only: nothing of any row's subject or payload.
    stored = json.loads((store.root / anchor_key(6)).read_text())
    assert set(stored) == {"seq", "row_hash", "anchored_at", "rows"}
    assert "m:6" not in json.dumps(stored) and "row 6" not in json.dumps(stored)
    check = ledger.check_anchors()
    assert check.status == OK and not check.failed and check.unanchored == 0
    assert ledger.verify().ok


def test_deleting_the_last_rows_is_named_truncated(db, store):
    fill(db, store, [2, 2, 2]).close()
    with tamper(db) as con:
        con.execute("DELETE FROM radflow_ledger WHERE seq > 4")
    with Ledger(url_of(db), anchors=store) as ledger:
        assert ledger.verify().ok  # the chain alone cannot see it
        check = ledger.check_anchors()
    assert check.status == TRUNCATED and check.failed
    assert check.ledger_rows == 4 and check.last_anchored == 6
    assert "row 6 was anchored" in check.problem


def test_a_chain_recomputed_with_new_hashes_is_named_rewritten(db, store):
    fill(db, store, [1, 1, 1, 1, 1]).close()
    rewrite_from(db, 3, {"reason": "forged"})
    with Ledger(url_of(db), anchors=store) as ledger:
        assert ledger.verify().ok  # internally consistent again
        check = ledger.check_anchors()
    assert check.status == REWRITTEN and check.failed
    assert check.first_mismatch == 3  # the bisection names the first changed anchor
    assert "recomputed from row 3" in check.problem


def test_rewriting_the_whole_chain_from_row_one_is_rewritten(db, store):
    fill(db, store, [3, 3]).close()
    rewrite_from(db, 1, {"reason": "forged"})
    with Ledger(url_of(db), anchors=store) as ledger:
        check = ledger.check_anchors()
    assert check.status == REWRITTEN and check.first_mismatch == 3


def test_rows_written_without_anchoring_are_the_unanchored_tail(db, store):
    fill(db, store, [2]).close()
    with Ledger(url_of(db)) as bare:  # e.g. a process with no anchor store configured
        bare.append("prediction", "p1", {})
        bare.append("prediction", "p2", {})
    with Ledger(url_of(db), anchors=store) as ledger:
        check = ledger.check_anchors()
        assert check.status == UNANCHORED_TAIL and not check.failed and check.unanchored == 2
        assert ledger.anchor_head().seq == 4  # `radflow audit anchor`
        assert ledger.check_anchors().status == OK


def test_an_anchoring_failure_keeps_the_write_and_says_so(db, tmp_path, store, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    broken = FolderAnchorStore(blocker / "anchors")
    with Ledger(url_of(db), anchors=broken) as ledger:
        entry = ledger.append("transition", "m:1", {"reason": "kept"})
        assert ledger.head() == entry  # the record is not lost for want of the anchor store
        assert "cannot write" in ledger.anchor_error
        assert "recorded but not anchored" in caplog.text
        with pytest.raises(AnchorError, match="cannot write"):
            ledger.anchor_head()
    with Ledger(url_of(db), anchors=store) as ledger:
        assert ledger.check_anchors().status == UNANCHORED_TAIL
        ledger.append("transition", "m:2", {"reason": "next write"})  # anchors both rows
        assert ledger.anchor_error == "" and ledger.check_anchors().status == OK


def test_a_folder_anchor_is_never_replaced_by_another(store):
    store.publish(new_anchor(5, "a" * 64, 5))
    store.publish(new_anchor(5, "a" * 64, 5))  # the same anchor again (a retry) is fine
    with pytest.raises(AnchorError, match="another hash"):
        store.publish(new_anchor(5, "b" * 64, 5))
    assert store.read(5).row_hash == "a" * 64


def test_configuration_from_the_environment():
    assert AnchorConfig.from_env({}) is None
    config = AnchorConfig.from_env({"RADFLOW_LEDGER_ANCHOR": "s3://audit-anchors/radflow"})
    assert config.retention_days == 183 and config.bucket_and_prefix() == (
        "audit-anchors",
        "radflow",
    )
    with pytest.raises(ConfigError, match="RETENTION_DAYS"):
        AnchorConfig.from_env(
            {"RADFLOW_LEDGER_ANCHOR": "/x", "RADFLOW_LEDGER_ANCHOR_RETENTION_DAYS": "0"}
        )
    with pytest.raises(ConfigError, match="s3://BUCKET"):
        AnchorConfig.from_env({"RADFLOW_LEDGER_ANCHOR": "gs://bucket/x"})
    with pytest.raises(ConfigError, match="cannot reach"):
        anchors_module.open_anchor_store(config)  # the domain has no S3: the edge injects it


# --------------------------------------------------------------------------------------------
# Export, verified offline


def exported(ledger: Ledger, store: FolderAnchorStore, **filters) -> list[str]:
    rows = ledger.entries()
    head = ledger.head()
    anchors = [store.read(s) for s in store.seqs()]
    summary = {
        "ledger_last_seq": head.seq if head else 0,
        "filters": {"since": None, "until": None, "kind": None} | filters,
    }
    return list(export_lines(rows, anchors, summary=summary))


def test_an_export_verifies_offline_and_a_tampered_one_fails(db, store):
    ledger = fill(db, store, [2, 2])
    lines = exported(ledger, store)
    ledger.close()
    assert check_export(lines).status == OK

    # One row's content edited in the file.
    edited = [json.loads(line) for line in lines]
    edited[2]["payload"]["reason"] = "forged"
    tampered = [json.dumps(item) for item in edited]
    result = check_export(tampered)
    assert result.status == BROKEN and result.failed and "row 2" in result.problems[0]

    # The rows recomputed consistently in the file: the anchors copied into it still disagree.
    rows = [json.loads(line) for line in lines[1:5]]
    prev = GENESIS
    for row in rows:
        if row["seq"] == 2:
            row["payload"]["reason"] = "forged"
        row["prev_hash"] = prev
        fields = ("seq", "kind", "subject", "recorded_at", "payload", "prev_hash")
        row["row_hash"] = prev = row_hash(*(row[f] for f in fields))
    recomputed = [lines[0], *(json.dumps(r) for r in rows), *lines[5:]]
    result = check_export(recomputed)
    assert result.status == REWRITTEN and result.failed

    # The last rows cut from the file, the summary's count fixed to match.
    summary = json.loads(lines[0])
    summary["export"]["rows"] = 3
    summary["export"]["ledger_last_seq"] = 3
    cut = [json.dumps(summary), *lines[1:4], *lines[5:]]
    result = check_export(cut)
    assert result.status == TRUNCATED and result.failed


def test_an_export_without_anchors_says_so(db):
    ledger = fill(db, None, [2])
    lines = list(
        export_lines(
            ledger.entries(), [], summary={"ledger_last_seq": 2, "filters": {"kind": None}}
        )
    )
    assert check_export(lines).status == NOT_ANCHORED
    assert not check_export(lines).failed


def test_signed_records_in_an_export_verify_offline_and_a_forged_one_fails(tmp_path, db):
    from pipeline_steps.governance import signing

    keys = signing.load_keys(tmp_path / "state", {})  # a development pair, made here
    statement = b'{"decision": "inside the plan"}'
    envelope = signing.sign_payload(keys, statement, "application/vnd.in-toto+json")
    payload = {"record_sha256": hashlib.sha256(statement).hexdigest(), "envelope": envelope}
    with Ledger(url_of(db)) as ledger:
        ledger.append("change_record", "m:1", payload)
        rows = ledger.entries()
    pem = keys.public_pems[0].decode()
    summary = {"ledger_last_seq": 1, "filters": {}, "public_keys": [{"pem": pem}]}
    lines = list(export_lines(rows, [], summary=summary))
    result = check_export(lines)
    assert result.status == NOT_ANCHORED and result.signed == 1 and result.keys_from == "export"

    # The signed statement changed and the row re-hashed: the chain holds, the signature does not.
    row = json.loads(lines[1])
    forged = b'{"decision": "outside the plan"}'
    row["payload"]["envelope"]["payload"] = base64.b64encode(forged).decode()
    fields = ("seq", "kind", "subject", "recorded_at", "payload", "prev_hash")
    row["row_hash"] = row_hash(*(row[f] for f in fields))
    result = check_export([lines[0], json.dumps(row)])
    assert result.status == BROKEN and "signature does not match" in result.problems[0]

    # Checked with the auditor's own keys, a record signed by another key is refused.
    other = signing.load_keys(tmp_path / "other", {}).public_pems[0]
    result = check_export(lines, trusted_keys=[other])
    assert result.failed and result.keys_from == "auditor" and "Unknown key" in result.problems[0]


# --------------------------------------------------------------------------------------------
# The command line


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: FolderAnchorStore) -> Path:
    import flows.cli

    root = tmp_path / "ws"
    (root / ".dvc").mkdir(parents=True)
    shutil.copyfile(SOURCE / "params.yaml", root / "params.yaml")
    shutil.copyfile(SOURCE / "dvc.yaml", root / "dvc.yaml")
    monkeypatch.setattr(flows.cli, "_setup_environment", lambda: None)
    monkeypatch.delenv("RADFLOW_LEDGER_URL", raising=False)
    monkeypatch.setenv("RADFLOW_LEDGER_ANCHOR", str(store.root))
    return root


def audit(ws: Path, capsys, *args: str) -> tuple[int, dict]:
    from flows.cli import main

    code = main(["--workspace", str(ws), "audit", *args])
    out = capsys.readouterr().out
    return code, json.loads(out) if "--json" in args else out


def test_audit_verify_names_truncation_and_export_verifies_offline(ws, store, capsys, tmp_path):
    from flows.anchoring import open_ledger

    with open_ledger(ws) as ledger:  # the commands' ledger: anchored from the environment
        for n in range(4):
            ledger.append("transition", f"m:{n}", {"n": n})
    code, result = audit(ws, capsys, "verify", "--json")
    assert code == 0 and result["ok"] and result["status"] == OK
    assert result["anchoring"]["anchors"] == 4

    out = tmp_path / "audit.jsonl"
    assert audit(ws, capsys, "export", "--out", str(out))[0] == 0
    code, checked = audit(ws, capsys, "verify", "--export", str(out), "--json")
    assert code == 0 and checked["status"] == OK and checked["rows"] == 4
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:1] + [lines[1].replace('"n": 0', '"n": 7')] + lines[2:]))
    code, checked = audit(ws, capsys, "verify", "--export", str(out), "--json")
    assert code == 1 and checked["status"] == BROKEN

    with tamper(ws / "ledger.db") as con:
        con.execute("DELETE FROM radflow_ledger WHERE seq = 4")
    code, result = audit(ws, capsys, "verify", "--json")
    assert code == 1 and result["status"] == TRUNCATED and not result["ok"]


def test_audit_verify_without_an_anchor_store_says_what_it_cannot_see(ws, capsys, monkeypatch):
    monkeypatch.delenv("RADFLOW_LEDGER_ANCHOR")
    with Ledger(url_of(ws / "ledger.db")) as ledger:
        ledger.append("transition", "m:1", {})
    code, result = audit(ws, capsys, "verify", "--json")
    assert code == 0 and result["status"] == NOT_ANCHORED
    assert "cannot be detected" in result["anchoring"]["problem"]
    assert "RADFLOW_LEDGER_ANCHOR" in result["anchoring"]["problem"]


def test_audit_anchor_covers_rows_written_without_anchoring(ws, store, capsys):
    with Ledger(url_of(ws / "ledger.db")) as bare:  # e.g. the served model, with S3 anchors
        bare.append("prediction", "p1", {})
        bare.append("prediction", "p2", {})
    code, result = audit(ws, capsys, "verify", "--json")
    assert code == 0 and result["status"] == UNANCHORED_TAIL
    assert result["anchoring"]["unanchored"] == 2
    code, out = audit(ws, capsys, "anchor")
    assert code == 0 and "anchored row 2" in out
    code, result = audit(ws, capsys, "verify", "--json")
    assert code == 0 and result["status"] == OK and store.seqs() == [2]
