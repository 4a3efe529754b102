"""The audit ledger: canonical rows, the hash chain, tamper detection, append-only storage, locking."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sqlite3
import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from pipeline_steps.governance.ledger import (
    GENESIS,
    TABLE_NAME,
    Ledger,
    LedgerBusy,
    canonical_json,
    jsonable,
    ledger_url,
)


@pytest.fixture
def ledger(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as opened:
        yield opened


def _raw(tmp_path) -> sqlite3.Connection:
    """A plain SQL session on the ledger file, as someone with database access would have."""
    conn = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    conn.execute(f"DROP TRIGGER IF EXISTS {TABLE_NAME}_no_update")
    conn.execute(f"DROP TRIGGER IF EXISTS {TABLE_NAME}_no_delete")
    return conn


def test_canonical_json_is_one_text_per_value():
    a = canonical_json({"b": [1, 2.5], "a": "é"})
    b = canonical_json({"a": "é", "b": [1, 2.5]})
    assert a == b == '{"a":"é","b":[1,2.5]}'
    assert jsonable({"x": float("nan"), "y": (1, float("inf"))}) == {"x": None, "y": [1, None]}
    with pytest.raises(TypeError, match="JSON data only"):
        jsonable({"x": object()})


def test_rows_are_chained_by_the_hash_of_their_canonical_json(ledger):
    first = ledger.append("transition", "m:1", {"to": "staging", "score": 0.5})
    second = ledger.append("prediction", "p-1", {"boxes": []})
    assert first.seq == 1 and second.seq == 2
    assert first.prev_hash == GENESIS and second.prev_hash == first.row_hash
    body = {
        "seq": 2,
        "kind": "prediction",
        "subject": "p-1",
        "recorded_at": second.recorded_at,
        "payload": {"boxes": []},
        "prev_hash": first.row_hash,
    }
    expected = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert second.row_hash == expected
    result = ledger.verify()
    assert result.ok and result.rows == 2 and result.head == second.row_hash


def test_an_altered_row_is_named(ledger, tmp_path):
    for i in range(5):
        ledger.append("transition", f"m:{i}", {"reason": f"r{i}"})
    with _raw(tmp_path) as conn:
        conn.execute(f"UPDATE {TABLE_NAME} SET payload = ? WHERE seq = 3", ('{"reason":"nope"}',))
    result = ledger.verify()
    assert not result.ok
    assert result.first_bad == 3 and "altered" in result.problem
    assert result.rows == 2  # rows 1 and 2 still check out


def test_an_altered_and_rehashed_row_breaks_the_next_link(ledger, tmp_path):
    from pipeline_steps.governance.ledger import row_hash

    entries = [ledger.append("transition", "m:1", {"n": i}) for i in range(4)]
    target = entries[1]
    forged = row_hash(
        target.seq, target.kind, target.subject, target.recorded_at, {"n": 99}, target.prev_hash
    )
    with _raw(tmp_path) as conn:
        conn.execute(
            f"UPDATE {TABLE_NAME} SET payload = ?, row_hash = ? WHERE seq = 2",
            ('{"n":99}', forged),
        )
    result = ledger.verify()
    assert result.first_bad == 3 and "prev_hash" in result.problem


def test_a_removed_row_is_named(ledger, tmp_path):
    for i in range(4):
        ledger.append("transition", "m:1", {"n": i})
    with _raw(tmp_path) as conn:
        conn.execute(f"DELETE FROM {TABLE_NAME} WHERE seq = 2")
    result = ledger.verify()
    assert result.first_bad == 3 and "missing" in result.problem


def test_the_database_refuses_updates_and_deletes(ledger, tmp_path):
    ledger.append("transition", "m:1", {"n": 1})
    conn = sqlite3.connect(tmp_path / "ledger.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute(f"UPDATE {TABLE_NAME} SET kind = 'x'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute(f"DELETE FROM {TABLE_NAME}")
    conn.close()
    assert ledger.verify().ok and len(ledger.entries()) == 1


def test_a_failed_block_appends_nothing(ledger):
    ledger.append("transition", "m:1", {"n": 0})
    with pytest.raises(RuntimeError), ledger.writing() as writer:
        writer.append("transition", "m:1", {"n": 1})
        writer.append("transition", "m:2", {"n": 2})
        raise RuntimeError("the registry refused")
    assert [e.payload["n"] for e in ledger.entries()] == [0]
    assert ledger.append("transition", "m:1", {"n": 3}).seq == 2


def test_time_never_runs_backwards_along_the_chain(tmp_path):
    times = iter(
        [
            datetime(2026, 1, 2, tzinfo=UTC),
            datetime(2026, 1, 1, tzinfo=UTC),  # a writer whose clock is behind
            datetime(2026, 1, 3, tzinfo=UTC),
        ]
    )
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}", clock=lambda: next(times)) as ledger:
        stamps = [ledger.append("t", "s", {}).recorded_at for _ in range(3)]
    assert stamps == sorted(stamps)
    assert stamps[1] == stamps[0]


def test_entries_filter_by_kind_subject_and_time(tmp_path):
    start = datetime(2026, 3, 1, tzinfo=UTC)
    ticks = iter(start + timedelta(hours=h) for h in range(10))
    with Ledger(f"sqlite:///{tmp_path / 'l.db'}", clock=lambda: next(ticks)) as ledger:
        for i in range(6):
            ledger.append("transition" if i % 2 else "prediction", f"s{i % 3}", {"i": i})
        assert [e.payload["i"] for e in ledger.entries(kind="transition")] == [1, 3, 5]
        assert [e.payload["i"] for e in ledger.entries(subject="s0")] == [0, 3]
        window = ledger.entries(since=start + timedelta(hours=2), until=start + timedelta(hours=4))
        assert [e.payload["i"] for e in window] == [2, 3, 4]


def test_an_empty_ledger_reads_and_verifies(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'never.db'}") as ledger:
        assert ledger.entries() == [] and ledger.head() is None
        assert ledger.verify().ok and ledger.verify().head == GENESIS


def test_a_held_lock_makes_a_second_writer_fail_clearly(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    holder, waiter = Ledger(url), Ledger(url, lock_timeout_s=0.3)
    holder.append("t", "s", {})
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with holder.writing() as writer:
            writer.append("t", "s", {"by": "holder"})
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(10)
        with pytest.raises(LedgerBusy, match="nothing was recorded"):
            waiter.append("t", "s", {"by": "waiter"})
    finally:
        release.set()
        thread.join()
    assert [e.payload.get("by") for e in holder.entries()] == [None, "holder"]
    assert holder.verify().ok


def _append_many(url: str, who: str, n: int, start: multiprocessing.synchronize.Event) -> None:
    start.wait(30)
    with Ledger(url, lock_timeout_s=30) as ledger:
        for i in range(n):
            ledger.append("prediction", f"{who}-{i}", {"who": who, "i": i})


def test_concurrent_writers_in_two_processes_keep_one_chain(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    Ledger(url).append("t", "genesis", {})  # create the schema before the race
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_many, args=(url, who, 20, start)) for who in "ab"]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with Ledger(url) as ledger:
        entries = ledger.entries()
        assert len(entries) == 41
        assert [e.seq for e in entries] == list(range(1, 42))
        for who in "ab":  # each writer's rows are all there, in its own order
            mine = [e.payload["i"] for e in entries if e.payload.get("who") == who]
            assert mine == list(range(20))
        assert ledger.verify().ok


def test_the_unique_link_refuses_a_fork_that_bypasses_the_lock(ledger, tmp_path):
    head = ledger.append("t", "s", {})
    conn = sqlite3.connect(tmp_path / "ledger.db")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            f"INSERT INTO {TABLE_NAME} (seq, kind, subject, recorded_at, payload, prev_hash, "
            "row_hash) VALUES (2, 't', 's', ?, '{}', ?, ?)",
            (head.recorded_at, GENESIS, "f" * 64),
        )
    conn.close()


def test_url_comes_from_the_environment_or_the_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("RADFLOW_LEDGER_URL", raising=False)
    assert ledger_url(tmp_path) == f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("RADFLOW_LEDGER_URL", "postgresql://u:secret@db/ledger")
    assert ledger_url(tmp_path) == "postgresql://u:secret@db/ledger"
    assert "secret" not in Ledger("postgresql://u:secret@db/ledger").display_url


def test_a_bad_url_is_a_clear_error():
    from pipeline_steps.governance.ledger import LedgerError

    with pytest.raises(LedgerError, match="cannot be opened"):
        Ledger("nosuchdialect://x/y")
    assert sa  # the store is SQLAlchemy: any URL it knows works
