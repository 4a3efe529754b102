"""Ledger anchors: the chain's head published after each write batch to a store the database's owner
cannot rewrite, and the rules that compare a ledger (or an export of it) with those anchors.

The hash chain alone proves only its own consistency: rows cut from its end, or a chain recomputed
from a changed row onwards, still verify. An anchor (sequence number and row hash of the head) kept
where the database's owner cannot change it turns both into findings: `truncated` (the ledger ends
before an anchored row) and `rewritten` (an anchored row now has another hash).

Stores: S3 with Object Lock in compliance mode (`flows/anchoring.py`, the edge) or a local folder
(`FolderAnchorStore`, which protects only against someone without write access to that folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pipeline_steps.core.errors import ConfigError, RadflowError

ANCHOR_ENV = "RADFLOW_LEDGER_ANCHOR"
RETENTION_ENV = "RADFLOW_LEDGER_ANCHOR_RETENTION_DAYS"
# Six months: the shortest time an anchor (and so the evidence about the rows it covers) is kept.
DEFAULT_RETENTION_DAYS = 183
KEY_PREFIX = "anchors/"

# Findings, worst first. Exit 1 for the first three (see `Finding.failed`).
TRUNCATED = "truncated"
REWRITTEN = "rewritten"
ANCHORS_ALTERED = "anchors altered"
UNANCHORED_TAIL = "unanchored tail"
NOT_ANCHORED = "not anchored"
OK = "ok"
FAILING = (TRUNCATED, REWRITTEN, ANCHORS_ALTERED)


class AnchorError(RadflowError):
    """The anchor store cannot be reached, read or written."""


@dataclass(frozen=True)
class Anchor:
    """The ledger's head at one moment: `seq` and `row_hash` of its last row, `rows` in it then."""

    seq: int
    row_hash: str
    anchored_at: str
    rows: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "row_hash": self.row_hash,
            "anchored_at": self.anchored_at,
            "rows": self.rows,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.as_dict(), sort_keys=True).encode("utf-8")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> Anchor:
        try:
            seq, digest = int(data["seq"]), str(data["row_hash"])
            anchor = cls(seq, digest, str(data["anchored_at"]), int(data["rows"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise AnchorError(f"anchor {where}: not an anchor record ({exc})") from None
        if len(digest) != 64 or seq < 1:
            raise AnchorError(f"anchor {where}: seq or row_hash out of range")
        return anchor

    @classmethod
    def from_json(cls, blob: bytes, where: str) -> Anchor:
        try:
            data = json.loads(blob)
        except ValueError:
            raise AnchorError(f"anchor {where}: not JSON") from None
        if not isinstance(data, dict):
            raise AnchorError(f"anchor {where}: not a JSON object")
        return cls.from_mapping(data, where)


def anchor_key(seq: int) -> str:
    """One object per anchor, named by its seq so that names sort as numbers do."""
    return f"{KEY_PREFIX}{seq:020d}.json"


def seq_of_key(name: str) -> int | None:
    stem = name.rsplit("/", 1)[-1]
    if not stem.endswith(".json") or not stem[:-5].isdigit() or len(stem) != 25:
        return None
    return int(stem[:-5])


def new_anchor(seq: int, row_hash: str, rows: int, now: datetime | None = None) -> Anchor:
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return Anchor(seq, row_hash, moment.isoformat(timespec="microseconds"), rows)


class AnchorStore(Protocol):
    """Where anchors go. `publish` never replaces an anchor; `findings` names what the store
    itself shows was tried against it (an anchor overwritten, deleted or unreadable)."""

    location: str

    def publish(self, anchor: Anchor) -> None: ...

    def seqs(self) -> list[int]: ...

    def read(self, seq: int) -> Anchor: ...

    def findings(self) -> list[str]: ...


@dataclass
class FolderAnchorStore:
    """Anchors as read-only files in a folder. It protects only against someone who cannot write
    that folder (another account, another host's mount): keep it away from the ledger's owner."""

    root: Path
    location: str = ""
    _findings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.location = self.location or str(self.root)

    def _path(self, seq: int) -> Path:
        return self.root / anchor_key(seq)

    def publish(self, anchor: Anchor) -> None:
        path = self._path(anchor.seq)
        partial = path.with_name(f".{path.name}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial.unlink(missing_ok=True)  # a crashed attempt's, read-only
            with partial.open("wb") as fh:
                fh.write(anchor.to_json())
                fh.flush()
                os.fsync(fh.fileno())  # on disk before it is linked under its name
            os.chmod(partial, 0o444)
            # link(): refuses to replace an existing anchor, unlike rename().
            os.link(partial, path)
            partial.unlink()
        except FileExistsError:
            partial.unlink(missing_ok=True)
            if self.read(anchor.seq).row_hash != anchor.row_hash:
                raise AnchorError(
                    f"anchor store {self.location}: an anchor for row {anchor.seq} with another "
                    "hash is already there; run `radflow audit verify`"
                ) from None
        except OSError as exc:
            raise AnchorError(
                f"anchor store {self.location}: cannot write {path.name} ({exc.strerror})"
            ) from None

    def seqs(self) -> list[int]:
        folder = self.root / KEY_PREFIX
        if not folder.is_dir():
            return []
        found = (seq_of_key(p.name) for p in folder.iterdir())
        return sorted(seq for seq in found if seq is not None)

    def read(self, seq: int) -> Anchor:
        path = self._path(seq)
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise AnchorError(f"anchor {path}: cannot be read ({exc.strerror})") from None
        anchor = Anchor.from_json(blob, str(path))
        if anchor.seq != seq:
            self._findings.append(f"{path.name} holds the anchor of row {anchor.seq}")
        return anchor

    def findings(self) -> list[str]:
        return list(self._findings)


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class AnchorConfig:
    """Where anchors go (`RADFLOW_LEDGER_ANCHOR`: `s3://bucket/prefix` or a folder) and how long the
    S3 store locks each one (`RADFLOW_LEDGER_ANCHOR_RETENTION_DAYS`, default 183)."""

    location: str
    retention_days: int = DEFAULT_RETENTION_DAYS

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    def bucket_and_prefix(self) -> tuple[str, str]:
        bucket, _, prefix = self.location.removeprefix("s3://").partition("/")
        if not bucket:
            raise ConfigError(f"{ANCHOR_ENV}={self.location!r}: no bucket; use s3://BUCKET/PREFIX")
        return bucket, prefix.strip("/")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AnchorConfig | None:
        env = os.environ if env is None else env
        location = env.get(ANCHOR_ENV, "").strip()
        if not location:
            return None
        raw = env.get(RETENTION_ENV, "").strip() or str(DEFAULT_RETENTION_DAYS)
        try:
            days = int(raw)
        except ValueError:
            raise ConfigError(f"{RETENTION_ENV}={raw!r}: a whole number of days") from None
        if days < 1:
            raise ConfigError(f"{RETENTION_ENV}={days}: anchors must be kept at least one day")
        if "://" in location and not location.startswith("s3://"):
            raise ConfigError(
                f"{ANCHOR_ENV}={location!r}: use s3://BUCKET/PREFIX (Object Lock) or a folder"
            )
        return cls(location, days)


S3Opener = Callable[[AnchorConfig], AnchorStore]


def open_anchor_store(
    config: AnchorConfig | None, *, s3: S3Opener | None = None
) -> AnchorStore | None:
    """The store `config` names; S3 needs the edge's opener (`flows.anchoring`), injected here."""
    if config is None:
        return None
    if config.is_s3:
        if s3 is None:
            raise ConfigError(
                f"{ANCHOR_ENV}={config.location}: S3 anchors are written by radflow's own commands; "
                "this process cannot reach them"
            )
        return s3(config)
    return FolderAnchorStore(Path(config.location).expanduser())


# --------------------------------------------------------------------------------------------
# Checking a ledger against its anchors (pure over two lookups)


@dataclass(frozen=True)
class AnchorCheck:
    status: str  # ok | truncated | rewritten | anchors altered | unanchored tail | not anchored
    location: str = ""
    anchors: int = 0
    last_anchored: int = 0  # seq of the newest anchor (0: none)
    ledger_rows: int = 0  # seq of the ledger's last row
    unanchored: int = 0  # rows after the newest anchor
    first_mismatch: int | None = None  # seq of the first anchor whose row has another hash
    problem: str = ""
    findings: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.status in FAILING

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "location": self.location,
            "anchors": self.anchors,
            "last_anchored": self.last_anchored,
            "ledger_rows": self.ledger_rows,
            "unanchored": self.unanchored,
            "first_mismatch": self.first_mismatch,
            "problem": self.problem,
            "findings": list(self.findings),
        }


def check_anchors(
    seqs: Sequence[int],
    read: Callable[[int], Anchor],
    last_seq: int,
    hash_at: Callable[[int], str | None],
    *,
    location: str = "",
    findings: Callable[[], Sequence[str]] = tuple,
) -> AnchorCheck:
    """Compare a ledger whose last row is `last_seq` (`hash_at(seq)`: a row's stored hash) with the
    anchors `seqs` (`read(seq)`). Reads few anchors: every row hash covers the rows before it, so
    the newest anchor inside the ledger decides, and a bisection names the first rewritten one.
    `findings` (asked last, once the anchors were read) is what the store noticed on the way."""
    result = _compare(sorted(seqs), read, last_seq, hash_at, location)
    found = tuple(findings())
    if found and not result.failed:
        result = replace(result, status=ANCHORS_ALTERED, problem="; ".join(found))
    return replace(result, findings=found)


def _compare(
    seqs: list[int],
    read: Callable[[int], Anchor],
    last_seq: int,
    hash_at: Callable[[int], str | None],
    location: str,
) -> AnchorCheck:
    base = AnchorCheck(OK, location=location, anchors=len(seqs), ledger_rows=last_seq)
    if not seqs:
        if not last_seq:
            return base
        problem = f"none of the {last_seq} row(s) is anchored yet"
        return replace(base, status=UNANCHORED_TAIL, unanchored=last_seq, problem=problem)
    newest = seqs[-1]
    base = replace(base, last_anchored=newest)
    inside = [s for s in seqs if s <= last_seq]

    def matches(seq: int) -> bool:
        return hash_at(seq) == read(seq).row_hash

    first_bad: int | None = None
    if inside and not matches(inside[-1]):
        lo, hi = 0, len(inside) - 1  # inside[hi] mismatches; find the first that does
        while lo < hi:
            mid = (lo + hi) // 2
            if matches(inside[mid]):
                lo = mid + 1
            else:
                hi = mid
        first_bad = inside[hi]
    if newest > last_seq:
        problem = (
            f"the ledger ends at row {last_seq} but row {newest} was anchored: "
            f"{newest - last_seq} or more row(s) were deleted from its end"
        )
        if first_bad is not None:
            problem += f"; and the row anchored at {first_bad} was changed"
        return replace(base, status=TRUNCATED, first_mismatch=first_bad, problem=problem)
    if first_bad is not None:
        problem = (
            f"row {first_bad} has another hash than the one anchored for it: the chain was "
            f"recomputed from row {first_bad} or earlier"
        )
        return replace(base, status=REWRITTEN, first_mismatch=first_bad, problem=problem)
    if newest < last_seq:
        problem = (
            f"rows {newest + 1}..{last_seq} are not anchored yet (the next write, or "
            "`radflow audit anchor`, anchors them)"
        )
        return replace(base, status=UNANCHORED_TAIL, unanchored=last_seq - newest, problem=problem)
    return base
