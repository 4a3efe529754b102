"""The audit export an auditor verifies offline: the ledger's rows (with their hashes), a copy of
its anchors and a summary line, as JSON lines; and the check of such a file without the database
or the anchor store.

Lines: one `{"export": {...}}` summary first (with `public_keys`, the keys trusted to verify signed
records), then the rows (`seq`, ..., `row_hash`, as the ledger holds them; a signed record's row
carries its DSSE envelope), then one `{"anchor": {...}}` per anchor. The anchors and keys in the
file are copies: compare them with the store and the keys the auditor trusts (an auditor's own
keys can be passed to the check) when the file's own integrity is in doubt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline_steps.governance.anchors import (
    ANCHORS_ALTERED,
    NOT_ANCHORED,
    OK,
    REWRITTEN,
    TRUNCATED,
    UNANCHORED_TAIL,
    Anchor,
    AnchorError,
)
from pipeline_steps.governance.ledger import GENESIS, Entry, row_hash
from pipeline_steps.governance.signing import SignatureError, verify_envelope

FORMAT = "radflow-audit-export/1"
BROKEN = "broken"  # a row does not match its own hash or link: edited after export or in the db


def export_lines(
    rows: Sequence[Entry],
    anchors: Sequence[Anchor],
    *,
    summary: Mapping[str, Any],
) -> Iterator[str]:
    """The export, line by line. `summary` says what was asked (filters) and what the ledger
    held (`ledger_last_seq`), so that the check knows whether the rows should be complete."""
    head = {"format": FORMAT, "rows": len(rows), "anchors": len(anchors), **summary}
    yield json.dumps({"export": head}, sort_keys=True)
    for entry in rows:
        yield json.dumps(entry.as_dict(), sort_keys=True)
    for anchor in anchors:
        yield json.dumps({"anchor": anchor.as_dict()}, sort_keys=True)


@dataclass(frozen=True)
class ExportCheck:
    status: str  # ok | broken | truncated | rewritten | unanchored tail | not anchored
    rows: int
    anchors: int
    complete: bool  # the export holds the whole ledger (no filter)
    problems: tuple[str, ...] = ()
    signed: int = 0  # rows carrying a signed record whose signature verified
    keys_from: str = ""  # whose public keys checked the signatures: "export" or "auditor"
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status in (BROKEN, TRUNCATED, REWRITTEN, ANCHORS_ALTERED)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "ok": not self.failed,
            "rows": self.rows,
            "anchors": self.anchors,
            "complete": self.complete,
            "signed": self.signed,
            "keys_from": self.keys_from,
            "problems": list(self.problems),
        }


class ExportError(AnchorError):
    """The file is not a radflow audit export."""


def _parse(
    lines: Iterable[str], where: str
) -> tuple[dict[str, Any], list[dict[str, Any]], list[Anchor]]:
    summary: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = []
    anchors: list[Anchor] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise ExportError(f"{where} line {number}: not JSON") from None
        if not isinstance(item, dict):
            raise ExportError(f"{where} line {number}: not a JSON object")
        if "export" in item:
            if summary is not None or number != 1:
                raise ExportError(f"{where} line {number}: a second summary line")
            summary = dict(item["export"])
        elif "anchor" in item:
            anchors.append(Anchor.from_mapping(item["anchor"], f"{where} line {number}"))
        else:
            rows.append(item)
    if summary is None or summary.get("format") != FORMAT:
        raise ExportError(f"{where}: not a radflow audit export (no {FORMAT} summary line)")
    return summary, rows, anchors


def _check_signatures(
    rows: Sequence[Mapping[str, Any]], trusted: Sequence[bytes | str]
) -> tuple[int, list[str]]:
    """Each row that carries a DSSE envelope: its signature by a trusted key, and the signed
    record's sha256 against the one the row holds."""
    verified, problems = 0, []
    for row in rows:
        payload = row.get("payload")
        if not isinstance(payload, Mapping) or "envelope" not in payload:
            continue
        try:
            signed = verify_envelope(payload["envelope"], trusted)
        except SignatureError as exc:
            problems.append(f"row {row.get('seq')}: {exc}")
            continue
        expected = payload.get("record_sha256")
        if expected is not None and hashlib.sha256(signed).hexdigest() != expected:
            problems.append(f"row {row.get('seq')}: the signed record is not the one it names")
            continue
        verified += 1
    return verified, problems


def check_export(
    lines: Iterable[str], where: str = "export", *, trusted_keys: Sequence[bytes] | None = None
) -> ExportCheck:
    """Re-check every row's hash and link, the row count against the summary, every anchor
    against the row it names, and every signed record against `trusted_keys` (default: the
    export's own `public_keys`). A filtered export (a window, one kind) checks what it holds."""
    summary, rows, anchors = _parse(lines, where)
    filters = summary.get("filters") or {}
    complete = not any(filters.values())
    problems: list[str] = []
    status = OK
    by_seq: dict[int, str] = {}
    prev_seq, prev_hash = 0, GENESIS
    fields = ("seq", "kind", "subject", "recorded_at", "payload", "prev_hash")
    for row in rows:
        try:
            seq = int(row["seq"])
            digest = row_hash(*(row[f] for f in fields))
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{where}: a row without its fields ({exc})") from None
        if digest != row.get("row_hash"):
            problems.append(f"row {seq}: its content does not match its hash (altered)")
        elif seq == prev_seq + 1 and (prev_seq or complete) and row["prev_hash"] != prev_hash:
            problems.append(f"row {seq}: prev_hash does not match row {prev_seq}'s hash")
        elif complete and seq != prev_seq + 1:
            problems.append(f"row {seq}: expected row {prev_seq + 1} here (rows missing)")
        by_seq[seq] = str(row.get("row_hash"))
        prev_seq, prev_hash = seq, str(row.get("row_hash"))
    if summary.get("rows") != len(rows):
        problems.append(
            f"the summary counts {summary.get('rows')} rows, the file holds {len(rows)}"
        )
    exported_keys = [str(k.get("pem", "")) for k in summary.get("public_keys") or ()]
    trusted = list(trusted_keys) if trusted_keys is not None else exported_keys
    signed, signature_problems = _check_signatures(rows, trusted)
    problems += signature_problems
    if problems:
        status = BROKEN
    last = int(summary.get("ledger_last_seq") or 0) if complete else (prev_seq if rows else 0)
    if complete and prev_seq != last:
        problems.append(f"the ledger ended at row {last}, the export at row {prev_seq}")
        status = BROKEN
    wrong = [a.seq for a in anchors if a.seq in by_seq and by_seq[a.seq] != a.row_hash]
    beyond = [a.seq for a in anchors if a.seq > prev_seq]
    if complete and beyond and status == OK:
        status = TRUNCATED
        problems.append(f"row {max(beyond)} was anchored but the export ends at row {prev_seq}")
    if wrong:
        status = REWRITTEN if status == OK else status  # truncation named first, as live
        problems.append(
            f"row {min(wrong)} has another hash than the one anchored for it (rewritten)"
        )
    if status == OK:
        if not anchors:
            status = NOT_ANCHORED if rows else OK
        else:
            newest = max(a.seq for a in anchors)
            if newest < prev_seq:
                status = UNANCHORED_TAIL
                problems.append(f"rows {newest + 1}..{prev_seq} are not anchored")
    keys_from = "auditor" if trusted_keys is not None else "export"
    return ExportCheck(
        status, len(rows), len(anchors), complete, tuple(problems), signed, keys_from, summary
    )
