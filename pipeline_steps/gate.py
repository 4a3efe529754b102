"""Stage `gate`: the champion/challenger rules. The new version is scored against production on the
same test split; it passes the absolute floors, the minimum margin and a patient-level paired bootstrap
interval, or it stays a candidate. Pure functions on plain arrays; `flows/gate.py` applies them to MLflow."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline_steps.core.bootstrap import MetricFn, paired_bootstrap_ci
from pipeline_steps.core.config import GateParams
from pipeline_steps.core.metrics import average_precision, evaluate_detections, froc, image_auroc

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
    """metric(candidate) - metric(production) on all images, and the percentile interval of that
    difference from the kernel's patient-level paired bootstrap (both models scored on the same
    resampled patients). Replicates where the difference is undefined are dropped; none left gives
    nan bounds."""
    delta = metric_fn(candidate, gts) - metric_fn(production, gts)
    low, high = paired_bootstrap_ci(
        metric_fn, candidate, production, gts, patient_ids, n_boot, seed, alpha=1.0 - level
    )
    return float(delta), low, high


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


def _holds(value: float, bound: float, strict: bool) -> bool:
    return bool(np.isfinite(value) and (value > bound if strict else value >= bound))


def _shown(value: float, bound: float, strict: bool) -> str:
    """`value` to 3 decimals, or to as many more as it takes to compare with `bound` as the value
    itself does: 0.49996 against a floor of 0.5 reads 0.49996, not 0.500."""
    if not np.isfinite(value):
        return "nan"
    for digits in range(3, 10):
        text = f"{value:.{digits}f}"
        if _holds(float(text), bound, strict) == _holds(value, bound, strict):
            return text
    return repr(value)


def _bound_check(
    name: str, what: str, value: float, bound_name: str, bound: float, strict: bool = False
) -> Check:
    """Whether `value` reaches `bound` (>=, or > when strict), worded the way the comparison came
    out: "ap50 0.470 < floor 0.5" for a failure, "ap50 0.612 >= floor 0.5" for a pass."""
    ok = _holds(value, bound, strict)
    target = f"{bound_name} {bound:g}" if bound_name else f"{bound:g}"
    if not np.isfinite(value):
        return Check(
            name, False, f"{what} is undefined (nan), needs {'>' if strict else '>='} {target}"
        )
    op = (">" if strict else ">=") if ok else ("<=" if strict else "<")
    return Check(name, ok, f"{what} {_shown(value, bound, strict)} {op} {target}")


def decide_gate(
    candidate_metrics: Mapping[str, float],
    production_metrics: Mapping[str, float] | None,
    delta_ci: tuple[float, float, float] | None,
    params: GateParams,
    n_images: int,
    n_patients: int,
    auto_promote: bool = False,
) -> GateResult:
    """Pass only if every absolute threshold holds and, when there is a production model, the
    candidate beats it by at least `min_delta` with the CI's lower bound above 0. A pass goes to
    staging, and on to production with `auto_promote` (change_control.auto_promote)."""
    checks = []
    for name, floor in sorted(params.thresholds.items()):
        value = candidate_metrics.get(name, float("nan"))
        checks.append(_bound_check(f"threshold:{name}", name, value, "floor", floor))
    delta = low = high = None
    if production_metrics is None or delta_ci is None:
        checks.append(
            Check("champion", True, "no production model to compare with: thresholds decide")
        )
    else:
        delta, low, high = delta_ci
        checks.append(
            _bound_check(
                "min_delta",
                f"{params.metric} delta over production",
                delta,
                "min_delta",
                params.min_delta,
            )
        )
        interval = (
            f"[{_shown(low, 0.0, True)}, {'nan' if not np.isfinite(high) else f'{high:.3f}'}]"
        )
        checks.append(
            _bound_check(
                "ci_lower_bound",
                f"{params.ci_level:.0%} CI of the delta {interval}: lower bound",
                low,
                "",
                0.0,
                strict=True,
            )
        )
    failed = [c.detail for c in checks if not c.passed]
    passed = not failed
    promote_to: tuple[str, ...] = ()
    if passed:
        promote_to = ("staging", "production") if auto_promote else ("staging",)
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
    auto_promote: bool = False,
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
        auto_promote=auto_promote,
    )
