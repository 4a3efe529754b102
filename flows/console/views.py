"""What each console page shows, gathered from the registry, the runs, the ledger and the workspace:
plain dicts for the templates. The same functions as the CLI (`radflow models`, `trace`, `audit
verify`, `changes`) compute every figure and check; this module only selects and arranges."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

from flows import audit, change_control, registry, tracking
from flows import review as review_edge
from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance import review
from pipeline_steps.governance.ledger import Entry
from pipeline_steps.governance.model_card import (
    HEADLINE,
    band_label,
    lesion_table,
    subgroup_table,
)
from pipeline_steps.serving.prediction import PREDICTION

PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000  # the review queue's ?per_page= at most
PLOTS = {"froc": "reports/plots/froc.png", "pr": "reports/plots/pr.png"}
MODEL_CARD_HTML = "model_card/model_card.html"


def parse_time(text: str | None) -> datetime | None:
    """A time the user typed (ISO 8601; a bare date or time without zone is UTC), or DataError."""
    if not text or not text.strip():
        return None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise DataError(
            f"{text[:40]!r} is not a time: write it as ISO 8601, e.g. 2026-12-06T14:30"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _headline(metrics: dict[str, float]) -> list[dict[str, Any]]:
    return [
        {
            "key": key,
            "name": name,
            "value": metrics.get(key),
            "low": metrics.get(f"{key}_ci_low"),
            "high": metrics.get(f"{key}_ci_high"),
        }
        for key, name in HEADLINE
        if key in metrics
    ]


# --------------------------------------------------------------------------------------------
# Models


def models_page(layout: Layout, params: Params, at: datetime | None) -> dict[str, Any]:
    name = params.register_.model_name
    with registry.governance(layout, params) as (reg, ledger):
        versions = registry.list_versions(reg, ledger)
        moves = registry.transitions(ledger, name)
        held_at = registry.stages_at(ledger, name, at) if at is not None else None
        gates = {v["version"]: registry.latest_gate(ledger, name, v["version"]) for v in versions}
    for row in versions:
        _, metrics = tracking.run_record(layout, row["run_id"])
        row["headline"] = _headline(metrics)
        gate = gates.get(row["version"])
        row["gate_passed"] = gate.payload.get("passed") if gate else None
        row["gate_reason"] = gate.payload.get("reason") if gate else None
    timeline = [
        {
            "ledger_row": e.seq,
            "time": e.recorded_at,
            "version": e.payload.get("version"),
            "from": e.payload.get("from_stage"),
            "to": e.payload.get("to_stage"),
            "actor": e.payload.get("actor"),
            "reason": e.payload.get("reason"),
        }
        for e in reversed(moves)
    ]
    return {"model": name, "versions": versions, "timeline": timeline, "at": at, "held": held_at}


# --------------------------------------------------------------------------------------------
# One version


def _manifest_summary(layout: Layout, run_id: str) -> dict[str, int]:
    blob = tracking.run_artifact(layout, run_id, tracking.MANIFEST_ARTIFACT)
    if blob is None:
        return {}
    by_split: dict[str, int] = {}
    for row in csv.DictReader(io.StringIO(blob.decode())):
        split = row.get("split") or "?"
        by_split[split] = by_split.get(split, 0) + 1
    return dict(sorted(by_split.items()))


def version_page(layout: Layout, params: Params, version: str) -> dict[str, Any]:
    name = params.register_.model_name
    with registry.governance(layout, params) as (reg, ledger):
        info = reg.version(version)
        aliases = reg.aliases()
        gate = registry.latest_gate(ledger, name, info.version)
    _, metrics = tracking.run_record(layout, info.run_id)
    tags = info.tags
    card = tracking.run_artifact(layout, info.run_id, MODEL_CARD_HTML) is not None
    return {
        "model": name,
        "version": info.version,
        "run_id": info.run_id,
        "created": info.created.isoformat(timespec="seconds"),
        "stages": sorted(a for a, v in aliases.items() if v == info.version),
        "headline": _headline(metrics),
        "lesion_sizes": [
            {"band": band_label(band), "sens": value}
            for band, value in lesion_table(metrics).items()
        ],
        "subgroups": subgroup_table(metrics),
        "data_version": tags.get("data_version"),
        "code_version": tags.get("code_version"),
        "validation": {
            "passed": tags.get("validation_passed") == "true",
            "result_id": tags.get("validation_result"),
            "report_sha256": tags.get("validation_report_sha256"),
            "data_docs": (layout.data_docs / "index.html").is_file(),
        },
        "manifest": _manifest_summary(layout, info.run_id),
        "manifest_sha256": tags.get("train_manifest"),
        "gate": (
            {"ledger_row": gate.seq, "time": gate.recorded_at, **gate.payload} if gate else None
        ),
        "changes": change_control.list_records(layout, info.version),
        "model_card": card,
        "signature": tags.get(tracking.SIGNATURE_TAG),
        "signature_key": tags.get(tracking.SIGNATURE_KEY_TAG),
    }


def version_artifact(layout: Layout, params: Params, version: str, path: str) -> bytes | None:
    reg = registry.open_registry(layout, params.register_.model_name)
    return tracking.run_artifact(layout, reg.version(version).run_id, path)


# --------------------------------------------------------------------------------------------
# One prediction


CHECK_NAMES = {
    "ledger_chain_intact": "audit ledger chain intact",
    "ledger_row_verified": "this prediction's ledger row verified",
    "run_matches_version": "MLflow run is the version's run",
    "data_version_matches_model": "data version matches the model's",
    "data_version_in_git": "data version committed in git (data/raw.dvc)",
    "data_version_in_dvc_cache": "data version in the DVC cache",
    "validation_report_unaltered": "validation report unaltered (sha256)",
    "validation_of_this_data_version": "validation was of this data version",
    "validation_in_gx_store": "validation results in the GX store",
    "manifest_unaltered": "training manifest unaltered (sha256)",
    "training_stream_unaltered": "streamed training studies unaltered (sha256)",
}


def trace_page(layout: Layout, params: Params, prediction_id: str) -> dict[str, Any]:
    """`radflow trace` (audit.trace: the one implementation) plus what the page draws: the image,
    the boxes, and the prediction's reviews."""
    try:
        t = audit.trace(layout, params, prediction_id)
    except audit.UnknownPrediction:  # the CLI's message names the ledger's location: not for pages
        raise audit.UnknownPrediction(
            f"no prediction or SR {prediction_id!r} in the audit ledger; the review queue lists "
            "the predictions"
        ) from None
    record = t["prediction"]
    links = [
        {"name": CHECK_NAMES.get(key, key), "status": value} for key, value in t["checks"].items()
    ]
    with audit.open_ledger(layout.root) as ledger:
        reviews = ledger.entries(kind=review.REVIEW, subject=record["prediction_id"])
    kept = review_edge.find_image(layout, record) is not None
    size = None
    if kept and not record.get("reason"):
        entry, _ = audit.find_prediction(layout, record["prediction_id"])
        size = review_edge.image_size(layout, params, entry)
    return {
        "trace": t,
        "text": "\n".join(audit.format_trace(t)),
        "links": links,
        "boxes": [{"index": i, **box} for i, box in enumerate(review.findings_of(record))],
        "image_kept": kept,
        "size": size,  # (rows, columns) of the DICOM: the boxes' coordinate frame
        "reviews": [
            {"ledger_row": e.seq, "time": e.recorded_at, **e.payload} for e in reversed(reviews)
        ],
    }


# --------------------------------------------------------------------------------------------
# Ledger, queue, monitoring


def ledger_page(layout: Layout, kind: str | None, page: int) -> dict[str, Any]:
    chain, anchored = audit.verify_anchored(layout)
    with audit.open_ledger(layout.root) as ledger:
        entries = ledger.entries(kind=kind or None)
        kinds = sorted({e.kind for e in ledger.entries()}) if kind else None
    if kinds is None:
        kinds = sorted({e.kind for e in entries})
    newest = list(reversed(entries))
    start = page * PAGE_SIZE
    return {
        "chain": chain,
        "anchors": anchored,
        "kind": kind,
        "kinds": kinds,
        "total": len(entries),
        "page": page,
        "pages": max(1, -(-len(entries) // PAGE_SIZE)),
        "rows": [_ledger_row(e) for e in newest[start : start + PAGE_SIZE]],
    }


def _ledger_row(entry: Entry) -> dict[str, Any]:
    text = json.dumps(entry.payload, sort_keys=True, default=str)
    return {
        "seq": entry.seq,
        "kind": entry.kind,
        "subject": entry.subject,
        "time": entry.recorded_at,
        "row_hash": entry.row_hash,
        "payload": text if len(text) <= 400 else text[:400] + " ...",
    }


def queue_page(
    layout: Layout, page: int, pending_only: bool, per_page: int = PAGE_SIZE
) -> dict[str, Any]:
    with audit.open_ledger(layout.root) as ledger:
        predictions = ledger.entries(kind=PREDICTION)
        reviews = ledger.entries(kind=review.REVIEW)
    rows = review.queue(predictions, reviews, pending_only=pending_only)
    per_page = min(max(per_page, 10), MAX_PAGE_SIZE)
    start = page * per_page
    return {
        "rows": rows[start : start + per_page],
        "total": len(rows),
        "page": page,
        "pages": max(1, -(-len(rows) // per_page)),
        "per_page": per_page,
        "pending_only": pending_only,
    }


def monitoring_page(layout: Layout) -> dict[str, Any]:
    return {"versions": [m.as_dict() for m in review_edge.monitoring(layout)]}
