"""The audit ledger: append-only, hash-chained rows for registry transitions, gate decisions and predictions.

SQLite in the workspace (`ledger.db`) by default; PostgreSQL (any SQLAlchemy URL) from `RADFLOW_LEDGER_URL`.
Each row stores the SHA-256 of its canonical JSON, which includes the previous row's hash, so a
row altered, removed or inserted afterwards breaks the chain at a row that `verify` names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pipeline_steps.core.errors import RadflowError
from pipeline_steps.governance.anchors import (
    AnchorCheck,
    AnchorConfig,
    AnchorError,
    AnchorStore,
    check_anchors,
    new_anchor,
    open_anchor_store,
)

LEDGER_URL_ENV = "RADFLOW_LEDGER_URL"
LEDGER_FILE = "ledger.db"
GENESIS = "0" * 64
TABLE_NAME = "radflow_ledger"
# One cluster-wide advisory lock serializes appenders on PostgreSQL (SQLite: BEGIN IMMEDIATE).
_PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"radflow-ledger").digest()[:8], "big", signed=True)
log = logging.getLogger("radflow.ledger")

_metadata = sa.MetaData()
_table = sa.Table(
    TABLE_NAME,
    _metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(32), nullable=False, index=True),
    sa.Column("subject", sa.String(200), nullable=False, index=True),
    sa.Column("recorded_at", sa.String(40), nullable=False, index=True),
    sa.Column("payload", sa.Text, nullable=False),
    # Unique: two rows can never extend the same head, even if a writer bypassed the lock.
    sa.Column("prev_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("row_hash", sa.String(64), nullable=False, unique=True),
)

# The database refuses UPDATE and DELETE too, so a mistake in code (not only policy) cannot rewrite
# history. Someone with DDL rights can drop these; the hash chain is what catches that.
_APPEND_ONLY_DDL = {
    "sqlite": [
        f"CREATE TRIGGER IF NOT EXISTS {TABLE_NAME}_no_update BEFORE UPDATE ON {TABLE_NAME} "
        f"BEGIN SELECT RAISE(ABORT, '{TABLE_NAME} is append-only'); END",
        f"CREATE TRIGGER IF NOT EXISTS {TABLE_NAME}_no_delete BEFORE DELETE ON {TABLE_NAME} "
        f"BEGIN SELECT RAISE(ABORT, '{TABLE_NAME} is append-only'); END",
    ],
    "postgresql": [
        f"CREATE OR REPLACE FUNCTION {TABLE_NAME}_append_only() RETURNS trigger LANGUAGE plpgsql "
        f"AS $$ BEGIN RAISE EXCEPTION '{TABLE_NAME} is append-only'; END $$",
        f"CREATE OR REPLACE TRIGGER {TABLE_NAME}_no_change BEFORE UPDATE OR DELETE ON {TABLE_NAME} "
        f"FOR EACH ROW EXECUTE FUNCTION {TABLE_NAME}_append_only()",
        f"CREATE OR REPLACE TRIGGER {TABLE_NAME}_no_truncate BEFORE TRUNCATE ON {TABLE_NAME} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {TABLE_NAME}_append_only()",
    ],
}


class LedgerError(RadflowError):
    """The audit ledger cannot be opened, read or written."""


class LedgerBusy(LedgerError):
    """Another writer held the ledger for longer than the lock timeout."""


# --------------------------------------------------------------------------------------------
# Canonical form and the chain (pure)


def jsonable(value: Any) -> Any:
    """`value` as plain JSON data: NaN/inf become null, numpy scalars and tuples become Python's."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalar
        return jsonable(value.item())
    raise TypeError(f"ledger payloads hold JSON data only, got {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8, no NaN: one text per value (in the spirit of RFC 8785)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def row_hash(
    seq: int, kind: str, subject: str, recorded_at: str, payload: Any, prev_hash: str
) -> str:
    """SHA-256 of the row's canonical JSON, which includes the previous row's hash."""
    body = {
        "seq": seq,
        "kind": kind,
        "subject": subject,
        "recorded_at": recorded_at,
        "payload": payload,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def timestamp(moment: datetime) -> str:
    """The one stored time format (UTC, microseconds), so stored times also sort as text."""
    if moment.tzinfo is None:
        raise ValueError("ledger times must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    subject: str
    recorded_at: str
    payload: dict[str, Any]
    prev_hash: str
    row_hash: str

    @property
    def time(self) -> datetime:
        return datetime.fromisoformat(self.recorded_at)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "kind": self.kind,
            "subject": self.subject,
            "recorded_at": self.recorded_at,
            "payload": self.payload,
            "prev_hash": self.prev_hash,
            "row_hash": self.row_hash,
        }


@dataclass(frozen=True)
class StoredRow:
    """A row as the database holds it; the payload is still text, as it may have been tampered with."""

    seq: int
    kind: str
    subject: str
    recorded_at: str
    payload: str
    prev_hash: str
    row_hash: str


@dataclass(frozen=True)
class Verification:
    ok: bool
    rows: int  # rows checked
    head: str  # hash of the last row that checked out (GENESIS when none): anchor it elsewhere
    first_bad: int | None = None  # seq of the first broken row
    problem: str = ""


def verify_rows(rows: Iterable[StoredRow]) -> Verification:
    """Walk the chain in seq order; stop at the first row whose content, link or position is wrong.

    A chain cannot show rows cut from its end: compare `rows`/`head` with a copy kept elsewhere.
    """
    expected_seq, prev, checked = 1, GENESIS, 0
    for row in rows:
        if row.seq != expected_seq:
            what = "missing" if row.seq > expected_seq else "duplicated"
            return Verification(
                False,
                checked,
                prev,
                row.seq,
                f"row {row.seq}: expected row {expected_seq} here; rows are {what}",
            )
        try:
            payload = json.loads(row.payload)
        except ValueError:
            return Verification(
                False, checked, prev, row.seq, f"row {row.seq}: payload is not JSON"
            )
        recomputed = row_hash(
            row.seq, row.kind, row.subject, row.recorded_at, payload, row.prev_hash
        )
        if recomputed != row.row_hash:
            return Verification(
                False,
                checked,
                prev,
                row.seq,
                f"row {row.seq}: its content does not match its stored hash (the row was altered)",
            )
        if row.prev_hash != prev:
            return Verification(
                False,
                checked,
                prev,
                row.seq,
                f"row {row.seq}: prev_hash does not match the hash of row {row.seq - 1} "
                "(an earlier row was altered and re-hashed, or rows were removed or inserted)",
            )
        prev, expected_seq, checked = row.row_hash, expected_seq + 1, checked + 1
    return Verification(True, checked, prev)


# --------------------------------------------------------------------------------------------
# Storage


def ledger_url(root: Path) -> str:
    """RADFLOW_LEDGER_URL when set (a team's PostgreSQL), else `ledger.db` in the workspace."""
    return os.environ.get(LEDGER_URL_ENV) or f"sqlite:///{root / LEDGER_FILE}"


def _with_installed_driver(url: sa.URL) -> sa.URL:
    """`postgresql://` means psycopg 3 to SQLAlchemy 2.1; fall back to psycopg2 when that is what
    is installed, so the URL the team already uses for MLflow works here too."""
    if url.drivername == "postgresql":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return url.set(drivername="postgresql+psycopg2")
    return url


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _entry(row: Any) -> Entry:
    return Entry(
        int(row.seq),
        str(row.kind),
        str(row.subject),
        str(row.recorded_at),
        json.loads(row.payload),
        str(row.prev_hash),
        str(row.row_hash),
    )


@dataclass
class LedgerWriter:
    """Appends inside one exclusive transaction: they commit together, or none does."""

    _conn: sa.Connection
    _clock: Callable[[], datetime]
    head: Entry | None
    appended: list[Entry] = field(default_factory=list)

    def append(self, kind: str, subject: str, payload: Mapping[str, Any]) -> Entry:
        seq = (self.head.seq if self.head else 0) + 1
        prev = self.head.row_hash if self.head else GENESIS
        now = self._clock()
        # Seq order is the truth; time never runs backwards along it, so "state at time T" is a
        # prefix of the chain even when writers' clocks disagree slightly.
        if self.head is not None and now < self.head.time:
            now = self.head.time
        recorded_at = timestamp(now)
        body = jsonable(dict(payload))
        digest = row_hash(seq, kind, subject, recorded_at, body, prev)
        self._conn.execute(
            _table.insert().values(
                seq=seq,
                kind=kind,
                subject=subject,
                recorded_at=recorded_at,
                payload=canonical_json(body),
                prev_hash=prev,
                row_hash=digest,
            )
        )
        entry = Entry(seq, kind, subject, recorded_at, body, prev, digest)
        self.head = entry
        self.appended.append(entry)
        return entry


class Ledger:
    """One audit ledger behind a SQLAlchemy URL. The application only ever inserts.

    With `anchors`, each committed write batch publishes the new head there. A batch whose anchor
    cannot be written stays committed (the record is not lost for want of S3): the failure is
    logged and kept in `anchor_error`, the next batch's anchor covers its rows too, and until then
    `check_anchors` (`radflow audit verify`) reports them as the unanchored tail.
    """

    def __init__(
        self,
        url: str,
        *,
        lock_timeout_s: float = 10.0,
        clock: Callable[[], datetime] = _utcnow,
        anchors: AnchorStore | None = None,
    ) -> None:
        self.url = url
        self.lock_timeout_s = lock_timeout_s
        self._clock = clock
        self.anchors = anchors
        self.anchor_error = ""
        parsed = _with_installed_driver(sa.engine.make_url(url))
        self.display_url = parsed.render_as_string(hide_password=True)
        self.dialect = parsed.get_backend_name()
        try:
            self._engine = self._create_engine(parsed)
        except Exception as exc:  # bad URL, missing driver
            raise LedgerError(f"ledger {self.display_url}: cannot be opened ({exc})") from None
        self._schema_ready = False

    def _create_engine(self, url: sa.URL) -> sa.Engine:
        if self.dialect != "sqlite":
            return sa.create_engine(url, pool_pre_ping=True)
        engine = sa.create_engine(url, connect_args={"timeout": self.lock_timeout_s})

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # pysqlite must not BEGIN on its own; we do it below
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: sa.Connection) -> None:
            # IMMEDIATE takes the write lock at BEGIN: the head read below cannot go stale.
            write = conn.get_execution_options().get("ledger_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[LedgerWriter]:
        """Hold the ledger's write lock for the block; the block's appends commit at its end.

        Raises LedgerBusy when another writer holds the lock beyond `lock_timeout_s`. An exception
        in the block rolls its appends back.
        """
        deadline = time.monotonic() + self.lock_timeout_s
        try:
            with self._engine.connect() as conn:
                conn.execution_options(ledger_write=True)
                with conn.begin():
                    if self.dialect == "postgresql":
                        self._pg_lock(conn, deadline)
                    self._ensure_schema(conn)
                    writer = LedgerWriter(conn, self._clock, self._head(conn))
                    yield writer
        except sa.exc.OperationalError as exc:
            if "locked" in str(exc.orig).lower():
                raise LedgerBusy(
                    f"ledger {self.display_url}: another transition or prediction held it for "
                    f"more than {self.lock_timeout_s:g} s; nothing was recorded. Try again."
                ) from None
            raise LedgerError(
                f"ledger {self.display_url}: cannot be written ({exc.orig})"
            ) from None
        except sa.exc.IntegrityError as exc:
            raise LedgerError(
                f"ledger {self.display_url}: refused an append ({exc.orig}); "
                "run `radflow audit verify`"
            ) from None
        # Committed. Anchored after the commit, never before: an anchor must not name a row that
        # a failed commit left out (verify would call that truncation).
        if writer.appended and writer.head is not None:
            self._publish(writer.head)

    def _publish(self, head: Entry) -> bool:
        if self.anchors is None:
            return False
        try:
            self.anchors.publish(new_anchor(head.seq, head.row_hash, head.seq, self._clock()))
        except AnchorError as exc:
            self.anchor_error = str(exc)
            log.warning(
                "ledger row %s is recorded but not anchored (%s); the next write anchors it, "
                "or run `radflow audit anchor`",
                head.seq,
                exc,
            )
            return False
        self.anchor_error = ""
        return True

    def anchor_head(self) -> Entry | None:
        """Publish the current head now (after an anchoring failure, or on a schedule).

        Raises AnchorError when no store is configured or the store refuses it."""
        if self.anchors is None:
            raise AnchorError("no anchor store is configured (RADFLOW_LEDGER_ANCHOR)")
        head = self.head()
        if head is not None and not self._publish(head):
            raise AnchorError(self.anchor_error)
        return head

    def append(self, kind: str, subject: str, payload: Mapping[str, Any]) -> Entry:
        with self.writing() as writer:
            return writer.append(kind, subject, payload)

    def _pg_lock(self, conn: sa.Connection, deadline: float) -> None:
        query = sa.text("SELECT pg_try_advisory_xact_lock(:key)")
        while not conn.execute(query, {"key": _PG_LOCK_KEY}).scalar():
            if time.monotonic() > deadline:
                raise LedgerBusy(
                    f"ledger {self.display_url}: another writer held it for more than "
                    f"{self.lock_timeout_s:g} s; nothing was recorded. Try again."
                )
            time.sleep(0.05)

    def _ensure_schema(self, conn: sa.Connection) -> None:
        if self._schema_ready:
            return
        if not sa.inspect(conn).has_table(TABLE_NAME):
            _metadata.create_all(conn)
            for statement in _APPEND_ONLY_DDL.get(self.dialect, []):
                conn.exec_driver_sql(statement)
        self._schema_ready = True

    @staticmethod
    def _head(conn: sa.Connection) -> Entry | None:
        row = conn.execute(sa.select(_table).order_by(_table.c.seq.desc()).limit(1)).first()
        return _entry(row) if row is not None else None

    # -- reading -----------------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[sa.Connection | None]:
        """A read connection, or None when nothing was ever written (no table yet)."""
        try:
            with self._engine.connect() as conn, conn.begin():
                yield conn if sa.inspect(conn).has_table(TABLE_NAME) else None
        except sa.exc.OperationalError as exc:
            raise LedgerError(f"ledger {self.display_url}: cannot be read ({exc.orig})") from None

    def entries(
        self,
        *,
        kind: str | None = None,
        subject: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[Entry]:
        """Rows in chain order, optionally of one kind/subject and within [since, until]."""
        query = sa.select(_table).order_by(_table.c.seq)
        if kind is not None:
            query = query.where(_table.c.kind == kind)
        if subject is not None:
            query = query.where(_table.c.subject == subject)
        if since is not None:
            query = query.where(_table.c.recorded_at >= timestamp(since))
        if until is not None:
            query = query.where(_table.c.recorded_at <= timestamp(until))
        with self._reading() as conn:
            return [] if conn is None else [_entry(row) for row in conn.execute(query)]

    def head(self) -> Entry | None:
        with self._reading() as conn:
            return None if conn is None else self._head(conn)

    def hash_at(self, seq: int) -> str | None:
        """The stored hash of row `seq` (None when there is no such row)."""
        with self._reading() as conn:
            if conn is None:
                return None
            query = sa.select(_table.c.row_hash).where(_table.c.seq == seq)
            found = conn.execute(query).scalar()
            return None if found is None else str(found)

    def check_anchors(self) -> AnchorCheck | None:
        """This ledger against its anchor store (None when it has none); see `check_anchors`."""
        if self.anchors is None:
            return None
        store = self.anchors
        head = self.head()
        return check_anchors(
            store.seqs(),
            store.read,
            head.seq if head else 0,
            self.hash_at,
            location=store.location,
            findings=store.findings,
        )

    def verify(self) -> Verification:
        """Check the whole chain; the answer names the first broken row."""
        with self._reading() as conn:
            if conn is None:
                return Verification(True, 0, GENESIS)
            result = conn.execution_options(yield_per=1000).execute(
                sa.select(_table).order_by(_table.c.seq)
            )
            return verify_rows(
                StoredRow(
                    int(r.seq),
                    str(r.kind),
                    str(r.subject),
                    str(r.recorded_at),
                    str(r.payload),
                    str(r.prev_hash),
                    str(r.row_hash),
                )
                for r in result
            )


def open_ledger(root: Path, **options: Any) -> Ledger:
    """The ledger of the workspace at `root` (or the shared one named by RADFLOW_LEDGER_URL).

    Pass `anchors=` for anchoring; `flows.anchoring.open_ledger` does, from the environment."""
    return Ledger(ledger_url(root), **options)


def local_anchor_store() -> AnchorStore | None:
    """The anchor store for a process without radflow's S3 edge (the served model): the folder that
    RADFLOW_LEDGER_ANCHOR names. For S3, None: such a process's rows are anchored by the next write
    of a radflow command or serve-api (each anchor covers every row before it)."""
    try:
        config = AnchorConfig.from_env()
    except RadflowError as exc:
        raise LedgerError(str(exc)) from None
    if config is None or config.is_s3:
        if config is not None:
            log.warning(
                "this process does not write S3 anchors; its rows are anchored by the next write "
                "of a radflow command (`radflow audit anchor`)"
            )
        return None
    return open_anchor_store(config)
