"""MLflow edge of the model registry: stages as aliases, every move recorded in the audit ledger.

The rules (which aliases move, what a gate needs) are pure functions in
`pipeline_steps/governance/lifecycle.py`; this module reads MLflow, applies their plans and records them.
A transition holds the ledger's write lock from reading the registry to committing its ledger rows, so
two racing promotions serialize and the one that finds the registry changed under it fails cleanly.
"""

from __future__ import annotations

import getpass
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flows.anchoring import open_ledger
from flows.tracking import mlflow_client, tracking_uri
from flows.tracking import public_uri as _public_uri
from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import TrackingError
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance.change_control import latest_judged, plan_requirements
from pipeline_steps.governance.ledger import (
    Entry,
    Ledger,
    LedgerError,
    timestamp,
)
from pipeline_steps.governance.lifecycle import (
    ARCHIVED,
    LIFECYCLE,
    AliasOp,
    ConcurrentTransition,
    GateDecision,
    Move,
    RegistryOp,
    RequirementsNotMet,
    TransitionError,
    UnknownVersion,
    lifecycle_map,
    lifecycle_of,
    parse_lifecycle,
    plan_transition,
    previous_production,
    promotion_requirements,
    replay,
)

TRANSITION = (
    "transition"  # ledger kinds: transitions are written here, gate decisions by flows/gate.py
)
GATE = "gate"
GATE_TAGS = ("gate.result", "gate.ledger_row")  # version tags the gate sets and `models` shows


def default_actor() -> str:
    return os.environ.get("RADFLOW_ACTOR") or getpass.getuser()


# --------------------------------------------------------------------------------------------
# MLflow


@dataclass(frozen=True)
class VersionInfo:
    version: str
    run_id: str
    created: datetime
    tags: dict[str, str]
    aliases: tuple[str, ...]


class ModelRegistry:
    """One registered model's aliases and version tags in MLflow.

    Every MLflow failure becomes a TrackingError naming the URI; a version that does not exist is an
    UnknownVersion. `apply` undoes what it already did when a later write fails.
    """

    def __init__(self, client: Any, model_name: str, uri: str) -> None:
        self.client = client
        self.model_name = model_name
        self.uri = _public_uri(uri)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                raise
            message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise TrackingError(
                f"MLflow registry at {self.uri}: {what} failed ({message}). "
                "Check MLFLOW_TRACKING_URI and that the server is up, then retry."
            ) from None

    def aliases(self) -> dict[str, str]:
        try:
            model = self._call(
                "reading the model", self.client.get_registered_model, self.model_name
            )
        except TrackingError:
            raise
        except Exception:
            raise TransitionError(
                f"no model named {self.model_name!r} is registered at {self.uri}; "
                "train one first with `radflow run`"
            ) from None
        return {str(k): str(v) for k, v in dict(model.aliases or {}).items()}

    def version(self, version: str) -> VersionInfo:
        if not str(version).isdigit():
            raise UnknownVersion(
                f"{version!r} is not a model version number; `radflow models` lists them"
            )
        try:
            mv = self._call(
                f"reading version {version}",
                self.client.get_model_version,
                self.model_name,
                str(version),
            )
        except TrackingError:
            raise
        except Exception:
            raise UnknownVersion(
                f"{self.model_name} has no version {version}; `radflow models` lists them"
            ) from None
        return _version_info(mv)

    def versions(self) -> list[VersionInfo]:
        found = self._call(
            "listing versions",
            self.client.search_model_versions,
            f"name='{self.model_name}'",
        )
        return sorted((_version_info(mv) for mv in found), key=lambda v: int(v.version))

    def apply(self, ops: Sequence[RegistryOp]) -> None:
        """Apply in order; on a failure, undo the ones applied (in reverse) and raise TrackingError."""
        done: list[RegistryOp] = []
        try:
            for op in ops:
                self._apply_one(op)
                done.append(op)
        except TrackingError as exc:
            try:
                for op in reversed(done):
                    self._apply_one(op.undo())
            except TrackingError:
                undone = [_describe(op) for op in done]
                raise TrackingError(
                    f"{exc}\nThe registry failed mid-transition and could not be restored: "
                    f"these changes are still in place: {undone}. Nothing was recorded in the "
                    "ledger; check `radflow models` and re-run the transition."
                ) from None
            raise TrackingError(
                f"{exc}\nNo alias or tag was changed (partial writes undone)."
            ) from None

    def _apply_one(self, op: RegistryOp) -> None:
        name = self.model_name
        if isinstance(op, AliasOp):
            if op.version is None:
                self._call(
                    f"removing alias {op.alias}",
                    self.client.delete_registered_model_alias,
                    name,
                    op.alias,
                )
            else:
                self._call(
                    f"setting alias {op.alias}",
                    self.client.set_registered_model_alias,
                    name,
                    op.alias,
                    op.version,
                )
        elif op.value is None:
            self._call(
                f"removing tag {op.key} of version {op.version}",
                self.client.delete_model_version_tag,
                name,
                op.version,
                op.key,
            )
        else:
            self._call(
                f"tagging version {op.version}",
                self.client.set_model_version_tag,
                name,
                op.version,
                op.key,
                op.value,
            )


def _describe(op: RegistryOp) -> str:
    if isinstance(op, AliasOp):
        return f"alias {op.alias} -> {op.version or '(removed)'}"
    return (
        f"version {op.version} tag {op.key} = {op.value if op.value is not None else '(removed)'}"
    )


def _version_info(mv: Any) -> VersionInfo:
    return VersionInfo(
        version=str(mv.version),
        run_id=str(mv.run_id or ""),
        created=datetime.fromtimestamp(int(mv.creation_timestamp or 0) / 1000, UTC),
        tags={str(k): str(v) for k, v in dict(mv.tags or {}).items()},
        aliases=tuple(str(a) for a in (mv.aliases or ())),
    )


# What makes two registrations the same model: a version's tags (pipeline_steps/register.version_tags).
# An uncommitted ("-dirty") code version does not pin the code, so it also needs the source hash.
FINGERPRINT_TAGS = ("data_version", "code_version", "params_hash")
CODE_HASH_TAG = "code_hash"


def fingerprint_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The tags of a registration that identify what it was trained from."""
    keys = [*FINGERPRINT_TAGS]
    if tags.get("code_version", "").endswith("-dirty"):
        keys.append(CODE_HASH_TAG)
    return {key: str(tags.get(key, "")) for key in keys}


def find_same_registration(registry: ModelRegistry, tags: Mapping[str, str]) -> VersionInfo | None:
    """The newest version registered from the same data version, code version and params (the
    fingerprint in `tags`), or None. A fingerprint with a value missing matches nothing."""
    wanted = fingerprint_tags(tags)
    if not all(wanted.values()) or any("'" in value for value in wanted.values()):
        return None
    query = f"name='{registry.model_name}' and " + " and ".join(
        f"tags.{key}='{value}'" for key, value in wanted.items()
    )
    found = registry._call(
        "looking up versions of the same fingerprint", registry.client.search_model_versions, query
    )
    same = [
        info
        for info in map(_version_info, found)
        if all(info.tags.get(key) == value for key, value in wanted.items())
    ]
    return max(same, key=lambda info: int(info.version)) if same else None


def open_registry(layout: Layout, model_name: str) -> ModelRegistry:
    uri = tracking_uri(layout)
    return ModelRegistry(mlflow_client(uri), model_name, uri)


@contextmanager
def governance(layout: Layout, params: Params) -> Iterator[tuple[ModelRegistry, Ledger]]:
    """The workspace's registry and audit ledger, together: every transition needs both."""
    registry = open_registry(layout, params.register_.model_name)
    with open_ledger(layout.root) as ledger:
        yield registry, ledger


# --------------------------------------------------------------------------------------------
# Transitions


@dataclass(frozen=True)
class Transition:
    transition_id: str
    moves: tuple[Move, ...]
    entries: tuple[Entry, ...]
    aliases_after: dict[str, str]


def transitions(ledger: Ledger, model_name: str) -> list[Entry]:
    return [e for e in ledger.entries(kind=TRANSITION) if e.payload.get("model") == model_name]


def moves_of(entries: Sequence[Entry]) -> list[Move]:
    return [
        Move(str(e.payload["version"]), e.payload.get("from_stage"), e.payload.get("to_stage"))
        for e in entries
    ]


def latest_gate(ledger: Ledger, model_name: str, version: str) -> Entry | None:
    found = ledger.entries(kind=GATE, subject=f"{model_name}:{version}")
    return found[-1] if found else None


def gate_evidence(entry: Entry) -> dict[str, Any]:
    """A gate decision's ledger row, as the evidence a promotion to production records."""
    p = entry.payload
    keys = ("passed", "reason", "metric", "candidate", "production", "delta", "ci_low", "ci_high")
    return {"ledger_row": entry.seq, "row_hash": entry.row_hash} | {k: p.get(k) for k in keys}


def requirements(
    registry: ModelRegistry, ledger: Ledger, info: VersionInfo, stage: str
) -> tuple[list[str], dict[str, Any] | None]:
    """What keeps `info` from `stage` (empty: nothing; governance/lifecycle's rule, and the change
    control plan: a change outside it goes nowhere past candidate), and the gate evidence found."""
    gate = latest_gate(ledger, registry.model_name, info.version)
    decision = (
        GateDecision(bool(gate.payload.get("passed")), str(gate.payload.get("reason")), gate.seq)
        if gate
        else None
    )
    unmet = promotion_requirements(
        info.version,
        stage,
        decision,
        info.tags.get("validation_passed"),
        info.tags.get("data_version", "?"),
    )
    if parse_lifecycle(stage) != "candidate":
        unmet += plan_requirements(
            latest_judged(ledger, registry.model_name, info.version), info.version
        )
    return unmet, gate_evidence(gate) if gate else None


def _changed(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    keys = sorted(set(before) | set(after))
    return ", ".join(
        f"{k}: {before.get(k, '-')} -> {after.get(k, '-')}"
        for k in keys
        if before.get(k) != after.get(k)
    )


def promote(
    registry: ModelRegistry,
    ledger: Ledger,
    version: str,
    to_stage: str,
    *,
    actor: str,
    reason: str,
    force: bool = False,
    observed: Mapping[str, str] | None = None,
    evidence: Mapping[str, Any] | None = None,
    rollback: bool = False,
    allowed: Sequence[str] = LIFECYCLE,
) -> Transition:
    """Move `version` to `to_stage`, archive what it displaces from production, and record both moves.

    `observed` is the alias map the caller decided on (default: read now); if the registry differs
    once the ledger lock is held, another transition won the race and this one is refused. Errors
    leave the registry and the ledger as they were.
    """
    stage = parse_lifecycle(to_stage, allowed)
    version = str(version).strip()
    if not reason.strip():
        raise TransitionError("a transition needs a --reason; it is kept in the audit ledger")
    seen = dict(observed) if observed is not None else registry.aliases()
    info = registry.version(version)
    unmet: list[str] = []
    gate_evidence = dict(evidence) if evidence is not None else None
    if stage != "candidate" and not rollback:
        unmet, found = requirements(registry, ledger, info, stage)
        gate_evidence = gate_evidence or found
        if unmet and not force:
            raise RequirementsNotMet(
                f"version {version} cannot go to {stage}: {'; '.join(unmet)}. "
                "Pass --force with a --reason to override; the override is recorded."
            )
    applied: tuple[RegistryOp, ...] = ()
    try:
        with ledger.writing() as writer:
            current = registry.aliases()
            if current != seen:
                raise ConcurrentTransition(
                    f"the registry changed while this transition waited ({_changed(seen, current)}); "
                    "another transition won. Nothing was changed: check `radflow models` and "
                    "re-run if you still mean it."
                )
            displaced = lifecycle_map(current).get(stage)
            archived = {
                v: tag
                for v in {version, displaced}
                if v is not None
                and (tag := (info if v == version else registry.version(v)).tags.get(ARCHIVED))
            }
            when = timestamp(datetime.now(UTC))
            plan = plan_transition(current, archived, version, stage, when)
            transition_id = str(uuid.uuid4())
            for move in plan.moves:
                writer.append(
                    TRANSITION,
                    f"{registry.model_name}:{move.version}",
                    {
                        "transition_id": transition_id,
                        "model": registry.model_name,
                        "version": move.version,
                        "from_stage": move.from_stage,
                        "to_stage": move.to_stage,
                        "actor": actor,
                        "reason": reason,
                        "cause": "displaced"
                        if move.version != version
                        else ("rollback" if rollback else "promotion"),
                        "forced": bool(force and unmet),
                        "overridden": unmet if force else [],
                        "evidence": gate_evidence,
                        "registry": registry.uri,
                        "aliases_before": plan.aliases_before,
                        "aliases_after": plan.aliases_after,
                    },
                )
            registry.apply(plan.ops)
            applied = plan.ops
            entries = tuple(writer.appended)
    except LedgerError:
        if applied:  # the ledger could not commit what the registry already shows: take it back
            registry.apply([op.undo() for op in reversed(applied)])
            raise LedgerError(
                "the audit ledger could not record the transition, so the registry change was undone"
            ) from None
        raise
    return Transition(transition_id, plan.moves, entries, plan.aliases_after)


def rollback(registry: ModelRegistry, ledger: Ledger, *, actor: str, reason: str) -> Transition:
    """Production goes back to the version that held it before the current one."""
    current = registry.aliases()
    live = lifecycle_map(current).get("production")
    moves = moves_of(transitions(ledger, registry.model_name))
    recorded = replay(moves).get("production")
    if live is None:
        raise TransitionError("no version is in production; there is nothing to roll back")
    if live != recorded:
        raise TransitionError(
            f"MLflow says version {live} is in production but the ledger says "
            f"{recorded or 'none'}: the alias was moved outside radflow. Promote the intended "
            "version explicitly (`radflow promote N --to production --reason ...`)."
        )
    target = previous_production(moves)
    if target is None:
        raise TransitionError(
            f"version {live} is the first production version; there is none to go back to"
        )
    return promote(
        registry,
        ledger,
        target,
        "production",
        actor=actor,
        reason=reason,
        observed=current,
        rollback=True,
    )


def stages_at(ledger: Ledger, model_name: str, at: datetime) -> dict[str, dict[str, Any]]:
    """Which version held each stage at time `at`, with the ledger row that put it there."""
    state: dict[str, dict[str, Any]] = {}
    for entry in transitions(ledger, model_name):
        if entry.time > at:
            break  # the chain's times never run backwards (see LedgerWriter.append)
        p = entry.payload
        frm, to = p.get("from_stage"), p.get("to_stage")
        if frm in LIFECYCLE and state.get(frm, {}).get("version") == p["version"]:
            del state[frm]
        if to in LIFECYCLE:
            state[to] = {
                "version": p["version"],
                "since": entry.recorded_at,
                "actor": p.get("actor"),
                "reason": p.get("reason"),
                "ledger_row": entry.seq,
            }
    return state


def list_versions(registry: ModelRegistry, ledger: Ledger) -> list[dict[str, Any]]:
    """Every version with its stage, key metrics, data version, creation and who put it there; none
    while the model is not registered."""
    versions = registry.versions()
    if not versions:
        return []
    aliases = registry.aliases()
    last: dict[str, Entry] = {}
    for entry in transitions(ledger, registry.model_name):
        last[str(entry.payload["version"])] = entry
    rows = []
    for info in versions:
        stage = lifecycle_of(info.version, aliases) or (ARCHIVED if ARCHIVED in info.tags else None)
        moved = last.get(info.version)
        rows.append(
            {
                "version": info.version,
                "stage": stage,
                "aliases": sorted(a for a, v in aliases.items() if v == info.version),
                "metrics": {
                    k.removeprefix("metric."): float(v)
                    for k, v in sorted(info.tags.items())
                    if k.startswith("metric.")
                },
                "data_version": info.tags.get("data_version"),
                "code_version": info.tags.get("code_version"),
                "gate": info.tags.get(GATE_TAGS[0]),
                "created": timestamp(info.created),
                "promoted_by": moved.payload.get("actor") if moved else None,
                "promoted_at": moved.recorded_at if moved else None,
                "run_id": info.run_id,
            }
        )
    return rows
