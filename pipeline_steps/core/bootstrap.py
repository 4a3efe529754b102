"""Bootstrap confidence intervals that resample patients, not images (images of one patient are
correlated), for one metric, several, or the paired difference of two detectors."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pipeline_steps.core.boxes import check_inputs

FloatArray = NDArray[np.float64]
MetricFn = Callable[[Sequence[FloatArray], Sequence[FloatArray]], float]

# --------------------------------------------------------------------------------------------------
# Bootstrap


def _patient_groups(n_images: int, patient_ids: Sequence[Hashable] | None) -> list[list[int]]:
    ids: Sequence[Hashable] = list(range(n_images)) if patient_ids is None else patient_ids
    if len(ids) != n_images:
        raise ValueError(f"patient_ids has {len(ids)} entries for {n_images} images")
    groups: dict[Hashable, list[int]] = {}
    for i, pid in enumerate(ids):
        groups.setdefault(pid, []).append(i)
    return list(groups.values())


def _check_bootstrap(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _resamples(members: list[list[int]], n_boot: int, seed: int) -> Iterator[list[int]]:
    """Image indices of each bootstrap replicate: patients drawn with replacement."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        drawn = rng.integers(0, len(members), size=len(members))
        yield [i for k in drawn for i in members[k]]


def _percentile_interval(values: list[float], alpha: float) -> tuple[float, float]:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_cis(
    metric_fns: Mapping[str, MetricFn],
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    patient_ids: Sequence[Hashable] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """`bootstrap_ci` of several metrics over the same replicates (one resampling pass)."""
    _check_bootstrap(n_boot, alpha)
    p, g = check_inputs(preds, gts)
    members = _patient_groups(len(p), patient_ids)
    if not p:
        return {name: (float("nan"), float("nan")) for name in metric_fns}
    values: dict[str, list[float]] = {name: [] for name in metric_fns}
    for idx in _resamples(members, n_boot, seed):
        bp, bg = [p[i] for i in idx], [g[i] for i in idx]
        for name, fn in metric_fns.items():
            values[name].append(fn(bp, bg))
    return {name: _percentile_interval(v, alpha) for name, v in values.items()}


def bootstrap_ci(
    metric_fn: MetricFn,
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    patient_ids: Sequence[Hashable] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` interval of ``metric_fn(preds, gts)`` at level
    ``1 - alpha``.

    Patients are resampled with replacement, each bringing all of its images, because images of
    one patient are not independent. Without ``patient_ids`` each image is its own patient.
    Replicates where the metric is nan (e.g. a resample without ground truth) are dropped; if all
    are, the interval is ``(nan, nan)``.
    """
    return bootstrap_cis(
        {"metric": metric_fn}, preds, gts, patient_ids, n_boot=n_boot, seed=seed, alpha=alpha
    )["metric"]


def paired_bootstrap_ci(
    metric_fn: MetricFn,
    preds_a: Sequence[ArrayLike],
    preds_b: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    patient_ids: Sequence[Hashable] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(a) - metric_fn(b)``: two detectors scored on
    the same resampled patients, so that what the patients share cancels out (the interval of a
    difference is much narrower than the two intervals suggest)."""
    _check_bootstrap(n_boot, alpha)
    pa, g = check_inputs(preds_a, gts)
    pb, _ = check_inputs(preds_b, gts)
    members = _patient_groups(len(g), patient_ids)
    if not g:
        return float("nan"), float("nan")
    values = []
    for idx in _resamples(members, n_boot, seed):
        bg = [g[i] for i in idx]
        values.append(metric_fn([pa[i] for i in idx], bg) - metric_fn([pb[i] for i in idx], bg))
    return _percentile_interval(values, alpha)
