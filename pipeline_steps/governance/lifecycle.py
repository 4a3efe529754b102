"""A model version's lifecycle (candidate, staging, production) as registry aliases: the rules of moving
between lifecycle stages and replaying their history. Pure functions on plain data; `flows/registry.py`
applies them to MLflow. ("Stage" alone means a pipeline stage elsewhere in the code.)"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pipeline_steps.core.errors import RadflowError

LIFECYCLE = ("candidate", "staging", "production")
# `champion` is the same stage as production, kept as a second alias for models:/name@champion.
LIFECYCLE_ALIASES: dict[str, tuple[str, ...]] = {
    "candidate": ("candidate",),
    "staging": ("staging",),
    "production": ("production", "champion"),
}
SYNONYMS = {"champion": "production"}
LIFECYCLE_OF_ALIAS = {
    alias: stage for stage, aliases in LIFECYCLE_ALIASES.items() for alias in aliases
}
# Not an alias: a version that left production carries this tag (its value: when it left).
ARCHIVED = "archived"


class TransitionError(RadflowError):
    """A stage transition was refused; nothing in the registry or the ledger changed."""


class UnknownLifecycle(TransitionError):
    pass


class UnknownVersion(TransitionError):
    pass


class RequirementsNotMet(TransitionError):
    pass


class ConcurrentTransition(TransitionError):
    """The registry moved between reading it and acting on it."""


# --------------------------------------------------------------------------------------------
# Lifecycle stages and their aliases


def parse_lifecycle(name: str, allowed: Sequence[str] = LIFECYCLE) -> str:
    stage = SYNONYMS.get(name.strip().lower(), name.strip().lower())
    if stage not in allowed:
        raise UnknownLifecycle(
            f"unknown stage {name!r}: expected one of {', '.join(allowed)} "
            "(champion means production)"
        )
    return stage


def lifecycle_map(aliases: Mapping[str, str]) -> dict[str, str]:
    """Stage -> version, read from each stage's first alias (production, not champion)."""
    return {
        stage: aliases[names[0]]
        for stage, names in LIFECYCLE_ALIASES.items()
        if names[0] in aliases
    }


def lifecycle_of(version: str, aliases: Mapping[str, str]) -> str | None:
    for stage, holder in lifecycle_map(aliases).items():
        if holder == version:
            return stage
    return None


@dataclass(frozen=True)
class AliasOp:
    """Point `alias` at `version` (None: remove it); `previous` is where it pointed before."""

    alias: str
    version: str | None
    previous: str | None

    def undo(self) -> AliasOp:
        return AliasOp(self.alias, self.previous, self.version)


@dataclass(frozen=True)
class TagOp:
    """Set a version tag (value None: remove it); `previous` is its value before."""

    version: str
    key: str
    value: str | None
    previous: str | None

    def undo(self) -> TagOp:
        return TagOp(self.version, self.key, self.previous, self.value)


RegistryOp = AliasOp | TagOp


@dataclass(frozen=True)
class Move:
    """One version's change of stage. Stages: a stage name, `archived`, or None (no stage)."""

    version: str
    from_stage: str | None
    to_stage: str | None


@dataclass(frozen=True)
class Plan:
    moves: tuple[Move, ...]  # the version first, then the one it displaced (if any)
    ops: tuple[RegistryOp, ...]  # in the order to apply; undo in reverse
    aliases_before: dict[str, str]
    aliases_after: dict[str, str]


def plan_transition(
    aliases: Mapping[str, str],
    archived: Mapping[str, str],
    version: str,
    to_stage: str,
    when: str,
) -> Plan:
    """The alias and tag changes that put `version` in `to_stage`, keeping one stage per version.

    `aliases` is the registered model's alias -> version map, `archived` the versions carrying the
    archived tag (-> its value), `when` the time stamped on a version that leaves production.
    Production can only be left through another version's promotion (or a rollback), which
    archives the one it displaces.
    """
    to_stage = parse_lifecycle(to_stage)
    current = lifecycle_of(version, aliases)
    if current == to_stage:
        raise TransitionError(f"version {version} is already in {to_stage}; nothing to do")
    if current == "production":
        raise TransitionError(
            f"version {version} is in production; it leaves production when another version is "
            "promoted, or with `radflow rollback`"
        )
    if to_stage == "candidate" and current is not None:
        raise TransitionError(
            f"version {version} is in {current}; only a newly registered version becomes a candidate"
        )
    ops: list[RegistryOp] = []
    after = dict(aliases)
    # Set the new aliases first: each is one atomic write that also takes the stage from its holder.
    for alias in LIFECYCLE_ALIASES[to_stage]:
        ops.append(AliasOp(alias, version, aliases.get(alias)))
        after[alias] = version
    for alias, holder in sorted(aliases.items()):
        if (
            holder == version
            and alias in LIFECYCLE_OF_ALIAS
            and alias not in LIFECYCLE_ALIASES[to_stage]
        ):
            ops.append(AliasOp(alias, None, version))
            del after[alias]
    moves = [Move(version, current or (ARCHIVED if version in archived else None), to_stage)]
    if version in archived:
        ops.append(TagOp(version, ARCHIVED, None, archived[version]))
    displaced = lifecycle_map(aliases).get(to_stage)
    if displaced is not None and displaced != version:
        if to_stage == "production":
            moves.append(Move(displaced, "production", ARCHIVED))
            ops.append(TagOp(displaced, ARCHIVED, when, archived.get(displaced)))
        else:
            moves.append(Move(displaced, to_stage, None))
    return Plan(tuple(moves), tuple(ops), dict(aliases), after)


@dataclass(frozen=True)
class GateDecision:
    """The gate's latest decision on a version, as its ledger row records it."""

    passed: bool
    reason: str
    ledger_row: int


def promotion_requirements(
    version: str,
    to_stage: str,
    gate: GateDecision | None,
    validation_passed: str | None,
    data_version: str = "?",
) -> list[str]:
    """What keeps `version` from `to_stage`; empty: nothing. Every stage past candidate needs the gate
    to have decided on the version: a run that stopped between registering and gating leaves it
    undecided, and it must not move on as if it had been judged. Production also needs a passed gate
    and validated data (`validation_passed` is the version's tag, "true" when it passed)."""
    stage = parse_lifecycle(to_stage)
    if stage == "candidate":
        return []
    unmet = []
    if gate is None:
        unmet.append(
            f"version {version} was never evaluated by the gate (its run stopped before the gate "
            "decided; `radflow run` finishes that gate first)"
        )
    elif stage == "production" and not gate.passed:
        unmet.append(
            f"version {version} failed its gate (ledger row {gate.ledger_row}: {gate.reason})"
        )
    if stage == "production" and validation_passed != "true":
        unmet.append(
            f"the validation of its data version {data_version} did not pass (tag validation_passed="
            f"{validation_passed or 'missing'})"
        )
    return unmet


def replay(moves: Iterable[Move]) -> dict[str, str]:
    """Stage -> version after the moves, in order (the state the ledger says the registry is in)."""
    state: dict[str, str] = {}
    for move in moves:
        if move.from_stage in LIFECYCLE and state.get(move.from_stage) == move.version:
            del state[move.from_stage]
        if move.to_stage in LIFECYCLE:
            state[move.to_stage] = move.version
    return state


def previous_production(moves: Sequence[Move]) -> str | None:
    """The version that was in production before the current one arrived there (for rollback)."""
    succession = [m.version for m in moves if m.to_stage == "production"]
    if not succession:
        return None
    current = succession[-1]
    for version in reversed(succession[:-1]):
        if version != current:
            return version
    return None
