"""Edges of change control: each retrain, gate decision, skipped or failed night and forced promotion
becomes a signed change record (an in-toto Statement in a DSSE envelope), kept in the audit ledger as a
`change_record` row with its sha256, logged on the version's MLflow run, and listed by `radflow changes`.

The rules (what changed, the plan, the acceptance criteria, the record) are pure functions in
`pipeline_steps/governance/change_control.py`; this module gathers their inputs from MLflow, the
workspace and the ledger, signs with `pipeline_steps/governance/signing.py` and writes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows import tracking
from pipeline_steps.core.config import Params
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance import change_control as cc
from pipeline_steps.governance.ledger import Entry, Ledger, jsonable, timestamp

if TYPE_CHECKING:
    from flows.registry import ModelRegistry, VersionInfo
    from pipeline_steps.gate import GateResult

log = logging.getLogger("radflow")

RECORDS_ARTIFACT = "change_control"  # folder of a version's run holding its signed records
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def _keys(layout: Layout) -> Any:
    from pipeline_steps.governance import signing

    return signing.load_keys(layout.state)


def dependency_lock() -> dict[str, Any]:
    """sha256 of constraints.txt, the pinned environment radflow is installed from (None when this
    installation has none beside it)."""
    digest = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest() if CONSTRAINTS.is_file() else None
    return {"file": "constraints.txt", "sha256": digest}


def write_record(
    layout: Layout, ledger: Ledger, predicate: dict[str, Any], subjects: list[dict[str, Any]]
) -> Entry:
    """Sign the record as a DSSE envelope and append its ledger row (which carries the envelope)."""
    from pipeline_steps.governance import signing

    stmt = cc.statement(subjects, predicate)
    keys = _keys(layout)
    envelope = signing.sign_payload(keys, cc.statement_bytes(stmt), cc.PAYLOAD_TYPE)
    return ledger.append(
        cc.LEDGER_KIND,
        cc.ledger_subject(predicate["model"], predicate["version"]),
        {
            "kind": predicate["kind"],
            "model": predicate["model"],
            "version": predicate["version"],
            "inside_plan": predicate["inside_plan"],
            "violations": predicate["violations"],
            "decision": predicate["decision"],
            "record_sha256": cc.record_sha256(stmt),
            "key_id": keys.key_id,
            "key": envelope.get("key"),
            "envelope": envelope,
        },
    )


def _now() -> str:
    return timestamp(datetime.now(UTC))


# --------------------------------------------------------------------------------------------
# A gate decision (after a retrain, or on a version registered before)


@dataclass(frozen=True)
class GateRecord:
    entry: Entry
    stages: tuple[str, ...]  # lifecycle stages the version goes to, in order
    decision: str
    predicate: dict[str, Any]


def _baseline(registry: ModelRegistry, version: str, production: str | None) -> VersionInfo | None:
    """What the change is judged against: production, else the latest version registered before."""
    if production and production != version:
        return registry.version(production)
    earlier = [v for v in registry.versions() if int(v.version) < int(version)]
    return earlier[-1] if earlier else None


def _manifest_hashes(layout: Layout, run_id: str) -> list[str] | None:
    blob = tracking.run_artifact(layout, run_id, tracking.MANIFEST_ARTIFACT)
    if blob is None:
        return None
    return [row["content_hash"] for row in csv.DictReader(io.StringIO(blob.decode("ascii")))]


def _previous_lock(ledger: Ledger, model: str, version: str | None) -> str | None:
    if version is None:
        return None
    entry = cc.latest_judged(ledger, model, version)
    if entry is None:
        return None
    # The ledger's hash chain vouches for the row; `radflow changes` checks the signature.
    stmt = _unverified_statement(entry)
    lock = stmt.get("predicate", {}).get("changes", {}).get("dependency_lock", {})
    return lock.get("sha256") if isinstance(lock, dict) else None


def _unverified_statement(entry: Entry) -> dict[str, Any]:
    import base64

    try:
        return dict(json.loads(base64.b64decode(entry.payload["envelope"]["payload"])))
    except Exception:
        return {}


def _model_subject(layout: Layout, model: str, version: str) -> dict[str, Any] | None:
    """The version's model file as an in-toto subject, when the workspace's model is that version's
    (reports/registration.json names it); else None."""
    try:
        registration = json.loads(layout.registration.read_text())
    except (OSError, ValueError):
        return None
    if str(registration.get("model_version")) != version or not layout.model.is_file():
        return None
    digest = hashlib.sha256(layout.model.read_bytes()).hexdigest()
    return {"name": f"models:/{model}/{version}/{layout.model.name}", "digest": {"sha256": digest}}


def record_gate(
    layout: Layout,
    params: Params,
    registry: ModelRegistry,
    ledger: Ledger,
    version: str,
    result: GateResult,
    *,
    production: str | None,
    actor: str,
    retrained: bool,
) -> GateRecord:
    """The change record of a gate decision on `version`: what changed against the baseline, the
    plan's verdict, each acceptance criterion, and where the version goes."""
    plan = params.change_control
    model = registry.model_name
    info = registry.version(version)
    baseline = _baseline(registry, version, production)
    params_now, metrics_now = tracking.run_record(layout, info.run_id)
    base_params: dict[str, str] = {}
    base_metrics: dict[str, float] | None = None
    if baseline is not None:
        base_params, base_metrics = tracking.run_record(layout, baseline.run_id)
    data = cc.data_change(
        baseline.tags.get("data_version") if baseline else None,
        info.tags.get("data_version", ""),
        _manifest_hashes(layout, baseline.run_id) if baseline else None,
        _manifest_hashes(layout, info.run_id) or [],
    )
    diff = cc.param_diff(base_params, params_now) if baseline else {}
    violations = cc.check_plan(plan, diff, data) if baseline else []
    production_metrics = base_metrics if baseline and baseline.version == production else None
    criteria = cc.evaluate_acceptance(
        plan,
        params.gate.thresholds,
        result.as_dict(),
        metrics_now,
        production_metrics,
        info.tags.get("validation_passed") == "true",
    )
    stages, decision = cc.decide(
        not violations, result.passed, cc.accepted(criteria), plan.auto_promote
    )
    lock = dependency_lock()
    base_version = baseline.version if baseline else None
    predicate = cc.build_predicate(
        "retrain" if retrained else "gate",
        model=model,
        version=version,
        time=_now(),
        actor=actor,
        decision=decision,
        baseline={
            "version": base_version,
            "role": None
            if baseline is None
            else ("production" if base_version == production else "previous version"),
        },
        changes={
            "data": data,
            "code": {
                "version": info.tags.get("code_version"),
                "previous": baseline.tags.get("code_version") if baseline else None,
            },
            "params": diff,
            "dependency_lock": lock | {"previous": _previous_lock(ledger, model, base_version)},
        },
        violations=violations,
        criteria=criteria,
        plan=plan,
        details={"gate": {k: v for k, v in result.as_dict().items() if k != "checks"}},
    )
    subjects = [
        s
        for s in (
            _model_subject(layout, model, version),
            cc.data_subject(info.tags.get("data_version", "unknown")),
        )
        if s is not None
    ]
    entry = write_record(layout, ledger, predicate, subjects)
    # The ledger row is the record; the run's copy and the card are views of it, so a failure to
    # log them is reported rather than undoing a decision already recorded.
    try:
        _log_on_run(layout, info.run_id, entry)
    except Exception as exc:
        log.warning("change record of version %s not logged on its run: %s", version, exc)
    try:
        from flows import model_card

        model_card.write_and_log(layout, params, info, metrics_now, predicate, entry)
    except Exception as exc:
        log.warning("model card of version %s not written: %s", version, exc)
    return GateRecord(entry, stages, decision, predicate)


def _log_on_run(layout: Layout, run_id: str, entry: Entry) -> None:
    name = f"record-{entry.seq:06d}-{entry.payload['kind']}.dsse.json"
    body = json.dumps(jsonable(entry.payload["envelope"]), indent=2, sort_keys=True).encode()
    tracking.log_run_files(layout, run_id, {name: body}, RECORDS_ARTIFACT)


# --------------------------------------------------------------------------------------------
# A night that trained nothing, and a promotion forced past the plan


def record_night(layout: Layout, params: Params, summary: dict[str, Any]) -> Entry:
    """The change record of a skipped or failed night: nothing was changed, and why."""
    from flows.anchoring import open_ledger

    kind = "failed" if summary.get("status") == "failed" else "skipped"
    data_version = summary.get("data_version") or summary.get("previous_data_version")
    predicate = cc.build_predicate(
        kind,
        model=params.register_.model_name,
        version=summary.get("model_version"),
        time=_now(),
        actor="radflow-pipeline",
        decision=f"no change: {summary.get('error') or summary.get('reason') or kind}",
        changes={
            "data": {
                "version": summary.get("data_version"),
                "previous_version": summary.get("previous_data_version"),
                "landing": summary.get("landing") or {},
            },
            "dependency_lock": dependency_lock(),
        },
        details={
            "flow_run_id": summary.get("flow_run_id"),
            "started_at": summary.get("started_at"),
        },
    )
    subjects = [cc.data_subject(str(data_version))] if data_version else []
    if not subjects:
        digest = hashlib.sha256(str(summary.get("flow_run_id")).encode()).hexdigest()
        subjects = [
            {"name": f"nightly-run/{summary.get('flow_run_id')}", "digest": {"sha256": digest}}
        ]
    with open_ledger(layout.root) as ledger:
        return write_record(layout, ledger, predicate, subjects)


def record_override(
    layout: Layout, params: Params, ledger: Ledger, transition: Any, *, actor: str, reason: str
) -> Entry | None:
    """After `radflow promote --force`: the override as a change record of its own (None when the
    promotion overrode nothing)."""
    first = transition.entries[0].payload if transition.entries else {}
    if not first.get("forced"):
        return None
    version = str(first["version"])
    model = params.register_.model_name
    judged = cc.latest_judged(ledger, model, version)
    predicate = cc.build_predicate(
        "override",
        model=model,
        version=version,
        time=_now(),
        actor=actor,
        decision=f"promoted to {first['to_stage']} by override: {reason}",
        changes={"overridden": first.get("overridden") or []},
        details={
            "transition_id": transition.transition_id,
            "transition_row": transition.entries[0].seq,
            "overrides_record_row": judged.seq if judged else None,
            "overrides_record_sha256": judged.payload.get("record_sha256") if judged else None,
        },
    )
    subjects = [
        {"name": f"{model}:{version}", "digest": {"sha256": transition.entries[0].row_hash}}
    ]
    entry = write_record(layout, ledger, predicate, subjects)
    try:
        from flows.registry import open_registry

        _log_on_run(layout, open_registry(layout, model).version(version).run_id, entry)
    except Exception as exc:
        log.warning("override record not logged on version %s's run: %s", version, exc)
    return entry


# --------------------------------------------------------------------------------------------
# Reading them back: `radflow changes`


def verified(layout: Layout, entry: Entry) -> tuple[dict[str, Any] | None, str]:
    """The record's statement when its signature verifies with a trusted key and its sha256 is the
    ledger's, else None and why."""
    from pipeline_steps.governance import signing

    try:
        payload = signing.verify_envelope(entry.payload["envelope"], _keys(layout))
    except signing.SignatureError as exc:
        return None, str(exc)
    except (KeyError, TypeError) as exc:
        return None, f"malformed ledger row ({exc})"
    if hashlib.sha256(payload).hexdigest() != entry.payload.get("record_sha256"):
        return None, "the signed record's sha256 is not the one the ledger holds"
    stmt = json.loads(payload)
    if stmt.get("_type") != cc.STATEMENT_TYPE or stmt.get("predicateType") != cc.PREDICATE_TYPE:
        return None, "not a radflow change record statement"
    return stmt, "verified"


def list_records(layout: Layout, version: str | None = None) -> list[dict[str, Any]]:
    """Every change record (of one version), oldest first, each with its signature checked."""
    from flows.anchoring import open_ledger

    rows = []
    with open_ledger(layout.root) as ledger:
        entries = ledger.entries(kind=cc.LEDGER_KIND)
    for entry in entries:
        p = entry.payload
        if version is not None and str(p.get("version")) != str(version):
            continue
        stmt, why = verified(layout, entry)
        predicate = (stmt or {}).get("predicate", {})
        rows.append(
            {
                "ledger_row": entry.seq,
                "time": entry.recorded_at,
                "kind": p.get("kind"),
                "version": p.get("version"),
                "inside_plan": p.get("inside_plan"),
                "decision": p.get("decision"),
                "record_sha256": p.get("record_sha256"),
                "signature": "verified" if stmt is not None else "INVALID",
                "signature_detail": why,
                "key": p.get("key"),
                "consistent": stmt is None
                or all(predicate.get(k) == p.get(k) for k in ("kind", "version", "decision")),
                "record": stmt if version is not None else None,
            }
        )
    return rows
