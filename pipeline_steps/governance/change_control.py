"""Change control: what a retrain changed against its baseline, whether that is inside the predetermined
change control plan (params `change_control`), how it fares against each acceptance criterion, and the
record of it as an in-toto Statement. Pure functions on plain data; `flows/change_control.py` gathers
the inputs, signs the statement and records it."""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline_steps.core.change_control_params import ChangeControlParams
from pipeline_steps.governance.ledger import Entry, Ledger, canonical_json, jsonable

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://radflow.dev/change-record/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"  # the DSSE payload type of an in-toto statement
LEDGER_KIND = "change_record"
# retrain: a new version and its gate decision; gate: a decision on a version registered before;
# skipped / failed: a night that trained nothing; override: a promotion forced past the plan.
KINDS = ("retrain", "gate", "skipped", "failed", "override")
JUDGED_KINDS = ("retrain", "gate")  # the records whose plan check governs a version's promotion


@dataclass(frozen=True)
class Violation:
    """A plan rule the change breaks: `rule` names it (e.g. `fixed:train.width`)."""

    rule: str
    detail: str


@dataclass(frozen=True)
class Criterion:
    """One acceptance criterion: passed None means reported but not judged (no data to judge by)."""

    name: str
    passed: bool | None
    value: float | None
    interval: tuple[float | None, float | None] | None
    bound: float | None
    detail: str


# --------------------------------------------------------------------------------------------
# What changed


def param_diff(
    baseline: Mapping[str, str], current: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """Flat params (`train.width` -> "24", as registered) that differ: {key: {from, to}}; a key only
    one side has is None on the other."""
    keys = sorted(set(baseline) | set(current))
    return {
        k: {"from": baseline.get(k), "to": current.get(k)}
        for k in keys
        if baseline.get(k) != current.get(k)
    }


def data_change(
    previous_version: str | None,
    current_version: str,
    previous_hashes: Iterable[str] | None,
    current_hashes: Iterable[str],
) -> dict[str, Any]:
    """The data versions (DVC md5 of data/raw) and the images (by content hash) added and dropped.
    Without the baseline's images the counts are None (unknown), not 0."""
    now = set(current_hashes)
    before = None if previous_hashes is None else set(previous_hashes)
    return {
        "version": current_version,
        "previous_version": previous_version,
        "changed": previous_version is not None and previous_version != current_version,
        "n_images": len(now),
        "new_images": None if before is None else len(now - before),
        "removed_images": None if before is None else len(before - now),
        "content_sha256": hashlib.sha256("\n".join(sorted(now)).encode()).hexdigest(),
    }


# --------------------------------------------------------------------------------------------
# The plan


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_plan(
    plan: ChangeControlParams, diff: Mapping[str, Mapping[str, Any]], data: Mapping[str, Any]
) -> list[Violation]:
    """The plan rules the change breaks (empty: inside the plan). Params are judged only where they
    changed: the plan governs modifications, not the baseline."""
    out = []
    for key, change in sorted(diff.items()):
        moved = f"{key} changed {change['from']} -> {change['to']}"
        if key in plan.fixed:
            out.append(
                Violation(f"fixed:{key}", f"{moved}; the plan fixes it (change_control.fixed)")
            )
        elif key in plan.ranges:
            low, high = plan.ranges[key]
            value = _number(change["to"])
            if value is None or not low <= value <= high:
                out.append(
                    Violation(
                        f"range:{key}",
                        f"{moved}; the plan allows [{low:g}, {high:g}] (change_control.ranges)",
                    )
                )
        elif not any(fnmatch.fnmatchcase(key, pattern) for pattern in plan.may_change):
            out.append(
                Violation(
                    f"unlisted:{key}",
                    f"{moved}; the plan lets it neither move within a range nor change freely "
                    "(change_control.ranges / may_change)",
                )
            )
    if data.get("changed") and not plan.allow_new_data:
        out.append(
            Violation(
                "data:new",
                f"the data version changed ({data.get('previous_version')} -> "
                f"{data.get('version')}); the plan does not allow retraining on new data",
            )
        )
    removed = data.get("removed_images")
    if removed and not plan.allow_removed_data:
        out.append(
            Violation(
                "data:removed",
                f"{removed} image(s) the baseline trained or was tested on are gone; the plan "
                "does not allow dropping data (change_control.allow_removed_data)",
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Acceptance: the gate's decision, with each floor's interval and each subgroup beside production


def _interval(metrics: Mapping[str, Any], name: str) -> tuple[float | None, float | None]:
    return _number(metrics.get(f"{name}_ci_low")), _number(metrics.get(f"{name}_ci_high"))


def _shown(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def evaluate_acceptance(
    plan: ChangeControlParams,
    thresholds: Mapping[str, float],
    gate: Mapping[str, Any],
    candidate_metrics: Mapping[str, Any],
    production_metrics: Mapping[str, Any] | None,
    validation_passed: bool | None,
) -> list[Criterion]:
    """Each acceptance criterion with its number and interval. `gate` is the gate's decision
    (GateResult.as_dict()); `candidate_metrics` the version's test metrics (with `<m>_ci_low/high`
    and `subgroup.<attribute>.<value>.<m>`); `production_metrics` production's, as registered."""
    out = []
    for name, floor in sorted(thresholds.items()):
        point = _number(candidate_metrics.get(name))
        low, high = _interval(candidate_metrics, name)
        judged = low if plan.floor_bound == "ci_low" else point
        what = "95% CI lower bound" if plan.floor_bound == "ci_low" else "point estimate"
        out.append(
            Criterion(
                f"floor:{name}",
                judged is not None and judged >= floor,
                point,
                (low, high),
                floor,
                f"{name} {_shown(point)} [{_shown(low)}, {_shown(high)}]: {what} "
                f"{_shown(judged)} {'>=' if judged is not None and judged >= floor else '<'} "
                f"floor {floor:g}",
            )
        )
    for check in gate.get("checks", ()):
        if str(check["name"]).startswith("threshold:"):
            continue  # judged above, with the interval
        interval = None
        if check["name"] == "ci_lower_bound":
            interval = (_number(gate.get("ci_low")), _number(gate.get("ci_high")))
        out.append(
            Criterion(
                f"gate:{check['name']}",
                bool(check["passed"]),
                _number(gate.get("delta")) if check["name"] != "champion" else None,
                interval,
                None,
                str(check["detail"]),
            )
        )
    out.extend(_subgroups(plan, candidate_metrics, production_metrics))
    out.append(
        Criterion(
            "validation",
            bool(validation_passed) if plan.require_validation else None,
            None,
            None,
            None,
            "the data version's validation passed"
            if validation_passed
            else "the data version's validation did not pass (or is missing)",
        )
    )
    return out


def _subgroups(
    plan: ChangeControlParams,
    candidate: Mapping[str, Any],
    production: Mapping[str, Any] | None,
) -> list[Criterion]:
    metric = plan.subgroup_metric
    out = []
    for key in sorted(
        k for k in candidate if k.startswith("subgroup.") and k.endswith(f".{metric}")
    ):
        group = key.removeprefix("subgroup.").removesuffix(f".{metric}")
        value = _number(candidate[key])
        low, high = _interval(candidate, key)
        n_images = _number(candidate.get(f"subgroup.{group}.n_images")) or 0.0
        reference = None if production is None else _number(production.get(key))
        name = f"subgroup:{group}"
        if reference is None:
            why = "no production model" if production is None else "production has no value here"
            out.append(
                Criterion(name, None, value, (low, high), None, f"{metric} {_shown(value)} ({why})")
            )
            continue
        bound = reference - plan.subgroup_margin
        passed: bool | None
        if n_images < plan.min_subgroup_images:
            passed, verdict = (
                None,
                f"not judged: {n_images:.0f} images < {plan.min_subgroup_images}",
            )
        else:
            passed = value is not None and value >= bound
            verdict = f"{'>=' if passed else '<'} production {reference:.3f} - margin {plan.subgroup_margin:g}"
        out.append(
            Criterion(
                name,
                passed,
                value,
                (low, high),
                bound,
                f"{metric} {_shown(value)} [{_shown(low)}, {_shown(high)}] {verdict}",
            )
        )
    return out


def accepted(criteria: Sequence[Criterion]) -> bool:
    """Every judged criterion passed (those reported but not judged do not count)."""
    return all(c.passed is not False for c in criteria)


# --------------------------------------------------------------------------------------------
# The decision and the record


def decide(
    inside: bool, gate_passed: bool, criteria_met: bool, auto_promote: bool
) -> tuple[tuple[str, ...], str]:
    """The lifecycle stages the version goes to, in order, and the decision in words."""
    held = [
        why
        for why, holds in (
            ("the gate failed", not gate_passed),
            ("the change is outside the change control plan (promotion needs --force)", not inside),
        )
        if holds
    ]
    if held:
        return (), "stays candidate: " + "; ".join(held)
    if not criteria_met:
        return ("staging",), "staging: the gate passed, an acceptance criterion did not"
    if auto_promote:
        return ("staging", "production"), "production: inside the plan and accepted (auto_promote)"
    return ("staging",), "staging: inside the plan and accepted; a person promotes to production"


def build_predicate(
    kind: str,
    *,
    model: str,
    version: str | None,
    time: str,
    actor: str,
    decision: str,
    baseline: Mapping[str, Any] | None = None,
    changes: Mapping[str, Any] | None = None,
    violations: Sequence[Violation] = (),
    criteria: Sequence[Criterion] = (),
    plan: ChangeControlParams | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record: what changed, against which baseline, the plan's verdict, the evaluation and the
    decision. `inside_plan` is None where nothing was changed to judge (a skipped or failed night)."""
    if kind not in KINDS:
        raise ValueError(f"unknown change record kind {kind!r}; expected one of {KINDS}")
    judged = kind in JUDGED_KINDS
    return jsonable(
        {
            "kind": kind,
            "model": model,
            "version": version,
            "time": time,
            "actor": actor,
            "baseline": dict(baseline or {}),
            "changes": dict(changes or {}),
            "inside_plan": (not violations) if judged else None,
            "violations": [asdict(v) for v in violations],
            "acceptance": [asdict(c) for c in criteria],
            "accepted": accepted(criteria) if criteria else None,
            "decision": decision,
            "plan": plan.model_dump(mode="json") if plan is not None else None,
            "details": dict(details or {}),
        }
    )


def statement(
    subjects: Sequence[Mapping[str, Any]], predicate: Mapping[str, Any]
) -> dict[str, Any]:
    """An in-toto Statement v1 about `subjects` ({name, digest: {algorithm: hex}})."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [dict(s) for s in subjects],
        "predicateType": PREDICATE_TYPE,
        "predicate": dict(predicate),
    }


def statement_bytes(stmt: Mapping[str, Any]) -> bytes:
    """The one serialisation that is signed and hashed (canonical JSON, UTF-8)."""
    return canonical_json(jsonable(stmt)).encode("utf-8")


def record_sha256(stmt: Mapping[str, Any]) -> str:
    return hashlib.sha256(statement_bytes(stmt)).hexdigest()


def data_subject(data_version: str) -> dict[str, Any]:
    """The data version as an in-toto subject: DVC's md5 of data/raw (without DVC's `.dir`)."""
    return {"name": "data/raw", "digest": {"md5": data_version.removesuffix(".dir")}}


# --------------------------------------------------------------------------------------------
# The ledger: each record's row, and what a record means for a promotion


def ledger_subject(model: str, version: str | None) -> str:
    return f"{model}:{version if version is not None else '-'}"


def latest_judged(ledger: Ledger, model: str, version: str) -> Entry | None:
    """The latest retrain or gate record of `version` (an override does not replace it)."""
    found = [
        e
        for e in ledger.entries(kind=LEDGER_KIND, subject=ledger_subject(model, version))
        if e.payload.get("kind") in JUDGED_KINDS
    ]
    return found[-1] if found else None


def plan_requirements(entry: Entry | None, version: str) -> list[str]:
    """What the change control record of `version` says against promoting it (empty: nothing; a
    version without a record, registered before change control, is judged by the gate alone)."""
    if entry is None or entry.payload.get("inside_plan") is not False:
        return []
    rules = "; ".join(f"{v['rule']} ({v['detail']})" for v in entry.payload.get("violations") or ())
    return [
        f"version {version} is outside the change control plan (change record, ledger row "
        f"{entry.seq}): {rules or 'see `radflow changes --version ' + version + '`'}"
    ]
