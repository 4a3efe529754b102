"""Model stages as registry aliases: the rules of moving between them, replaying their history, and the
champion/challenger gate. Pure functions on plain data; `flows/registry.py` applies them to MLflow."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline_steps.core.config import GateParams
from pipeline_steps.core.errors import RadflowError
from pipeline_steps.evaluate import (
    average_precision,
    evaluate_detections,
    froc,
    image_auroc,
)

STAGES = ("candidate", "staging", "production")
# `champion` is the same stage as production, kept as a second alias for models:/name@champion.
STAGE_ALIASES: dict[str, tuple[str, ...]] = {
    "candidate": ("candidate",),
    "staging": ("staging",),
    "production": ("production", "champion"),
}
SYNONYMS = {"champion": "production"}
STAGE_OF_ALIAS = {alias: stage for stage, aliases in STAGE_ALIASES.items() for alias in aliases}
# Not an alias: a version that left production carries this tag (its value: when it left).
ARCHIVED = "archived"

MetricFn = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]


class TransitionError(RadflowError):
    """A stage transition was refused; nothing in the registry or the ledger changed."""


class UnknownStage(TransitionError):
    pass


class UnknownVersion(TransitionError):
    pass


class RequirementsNotMet(TransitionError):
    pass


class ConcurrentTransition(TransitionError):
    """The registry moved between reading it and acting on it."""


# --------------------------------------------------------------------------------------------
# Stages and aliases


def parse_stage(name: str, allowed: Sequence[str] = STAGES) -> str:
    stage = SYNONYMS.get(name.strip().lower(), name.strip().lower())
    if stage not in allowed:
        raise UnknownStage(
            f"unknown stage {name!r}: expected one of {', '.join(allowed)} "
            "(champion means production)"
        )
    return stage


def stage_map(aliases: Mapping[str, str]) -> dict[str, str]:
    """Stage -> version, read from each stage's first alias (production, not champion)."""
    return {
        stage: aliases[names[0]] for stage, names in STAGE_ALIASES.items() if names[0] in aliases
    }


def stage_of(version: str, aliases: Mapping[str, str]) -> str | None:
    for stage, holder in stage_map(aliases).items():
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
    to_stage = parse_stage(to_stage)
    current = stage_of(version, aliases)
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
    for alias in STAGE_ALIASES[to_stage]:
        ops.append(AliasOp(alias, version, aliases.get(alias)))
        after[alias] = version
    for alias, holder in sorted(aliases.items()):
        if holder == version and alias in STAGE_OF_ALIAS and alias not in STAGE_ALIASES[to_stage]:
            ops.append(AliasOp(alias, None, version))
            del after[alias]
    moves = [Move(version, current or (ARCHIVED if version in archived else None), to_stage)]
    if version in archived:
        ops.append(TagOp(version, ARCHIVED, None, archived[version]))
    displaced = stage_map(aliases).get(to_stage)
    if displaced is not None and displaced != version:
        if to_stage == "production":
            moves.append(Move(displaced, "production", ARCHIVED))
            ops.append(TagOp(displaced, ARCHIVED, when, archived.get(displaced)))
        else:
            moves.append(Move(displaced, to_stage, None))
    return Plan(tuple(moves), tuple(ops), dict(aliases), after)


def replay(moves: Iterable[Move]) -> dict[str, str]:
    """Stage -> version after the moves, in order (the state the ledger says the registry is in)."""
    state: dict[str, str] = {}
    for move in moves:
        if move.from_stage in STAGES and state.get(move.from_stage) == move.version:
            del state[move.from_stage]
        if move.to_stage in STAGES:
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


# --------------------------------------------------------------------------------------------
# Champion/challenger gate


def gate_metric(name: str) -> MetricFn:
    """The gate's headline metric as a function of (preds, gts), for the bootstrap."""
    if name == "ap50":
        return lambda p, g: average_precision(p, g, 0.5)
    if name == "cpm":
        return lambda p, g: float(froc(p, g)["cpm"])
    if name == "sens_at_1fp":
        return lambda p, g: float(froc(p, g, fp_rates=(1.0,))["sensitivity_at_rates"][0])
    if name == "auroc":
        return image_auroc
    raise ValueError(f"no gate metric {name!r}")


def paired_bootstrap(
    metric_fn: MetricFn,
    candidate: Sequence[np.ndarray],
    production: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    patient_ids: Sequence[Hashable],
    n_boot: int,
    seed: int,
    level: float,
) -> tuple[float, float, float]:
    """metric(candidate) - metric(production) on all images, and its percentile interval.

    Each replicate draws patients with replacement (each brings all of its images, which are not
    independent) and scores both models on the same draw, so the interval is that of the paired
    difference, far narrower than two separate intervals would suggest. Replicates where the
    difference is undefined (no ground truth drawn) are dropped; none left gives nan bounds.
    """
    if not len(candidate) == len(production) == len(gts) == len(patient_ids):
        raise ValueError("candidate, production, gts and patient_ids must be aligned by image")
    delta = metric_fn(candidate, gts) - metric_fn(production, gts)
    groups: dict[Hashable, list[int]] = {}
    for i, pid in enumerate(patient_ids):
        groups.setdefault(pid, []).append(i)
    members = list(groups.values())
    if not members:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = [i for k in rng.integers(0, len(members), size=len(members)) for i in members[k]]
        g = [gts[i] for i in idx]
        value = metric_fn([candidate[i] for i in idx], g) - metric_fn(
            [production[i] for i in idx], g
        )
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float(delta), float("nan"), float("nan")
    alpha = 1.0 - level
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(delta), float(low), float(high)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateResult:
    """The gate's decision with the numbers behind it, as recorded in the ledger and on the version."""

    passed: bool
    promote_to: tuple[
        str, ...
    ]  # stages to move the candidate to, in order (empty: stays candidate)
    reason: str
    metric: str
    candidate: float
    production: float | None  # None: there was no production model to compare with
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    checks: tuple[Check, ...]
    params: dict[str, Any]
    n_images: int
    n_patients: int
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    production_metrics: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: float | None) -> str:
    return "nan" if value is None or not np.isfinite(value) else f"{value:.4f}"


def decide_gate(
    candidate_metrics: Mapping[str, float],
    production_metrics: Mapping[str, float] | None,
    delta_ci: tuple[float, float, float] | None,
    params: GateParams,
    n_images: int,
    n_patients: int,
) -> GateResult:
    """Pass only if every absolute threshold holds and, when there is a production model, the
    candidate beats it by at least `min_delta` with the CI's lower bound above 0."""
    checks = []
    for name, floor in sorted(params.thresholds.items()):
        value = candidate_metrics.get(name, float("nan"))
        ok = bool(np.isfinite(value) and value >= floor)
        checks.append(Check(f"threshold:{name}", ok, f"{name} {_fmt(value)} >= {floor:g}"))
    delta = low = high = None
    if production_metrics is None or delta_ci is None:
        checks.append(
            Check("champion", True, "no production model to compare with: thresholds decide")
        )
    else:
        delta, low, high = delta_ci
        checks.append(
            Check(
                "min_delta",
                bool(np.isfinite(delta) and delta >= params.min_delta),
                f"{params.metric} delta {_fmt(delta)} >= {params.min_delta:g}",
            )
        )
        checks.append(
            Check(
                "ci_lower_bound",
                bool(np.isfinite(low) and low > 0.0),
                f"{params.ci_level:.0%} CI of the delta [{_fmt(low)}, {_fmt(high)}] lies above 0",
            )
        )
    failed = [c.detail for c in checks if not c.passed]
    passed = not failed
    promote_to: tuple[str, ...] = ()
    if passed:
        promote_to = ("staging", "production") if params.auto_promote else ("staging",)
    reason = (
        ("failed: " + "; ".join(failed))
        if failed
        else "passed: " + "; ".join(c.detail for c in checks)
    )
    return GateResult(
        passed=passed,
        promote_to=promote_to,
        reason=reason,
        metric=params.metric,
        candidate=float(candidate_metrics.get(params.metric, float("nan"))),
        production=None
        if production_metrics is None
        else float(production_metrics.get(params.metric, float("nan"))),
        delta=delta,
        ci_low=low,
        ci_high=high,
        checks=tuple(checks),
        params=params.model_dump(mode="json"),
        n_images=n_images,
        n_patients=n_patients,
        candidate_metrics=dict(candidate_metrics),
        production_metrics=None if production_metrics is None else dict(production_metrics),
    )


def evaluate_gate(
    candidate: Sequence[np.ndarray],
    production: Sequence[np.ndarray] | None,
    gts: Sequence[np.ndarray],
    patient_ids: Sequence[Hashable],
    params: GateParams,
) -> GateResult:
    """Score the candidate (and production, on the same images) and decide.

    Predictions are (k, 5) arrays per image in the same coordinates as `gts` (k, 4).
    """
    cand_metrics = evaluate_detections(candidate, gts, patient_ids)
    prod_metrics = None
    delta_ci = None
    if production is not None:
        prod_metrics = evaluate_detections(production, gts, patient_ids)
        delta_ci = paired_bootstrap(
            gate_metric(params.metric),
            candidate,
            production,
            gts,
            patient_ids,
            params.n_boot,
            params.seed,
            params.ci_level,
        )
    return decide_gate(
        cand_metrics,
        prod_metrics,
        delta_ci,
        params,
        n_images=len(gts),
        n_patients=len(set(patient_ids)),
    )
