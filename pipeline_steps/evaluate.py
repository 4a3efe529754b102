"""Stage `test`: detection metrics (COCO AP, RSNA score, FROC, AUROC, calibration) on the held-out split.

Core functions are pure numpy on per-image arrays; the ``plot_*`` functions at the end are the only
edge that writes files.

Conventions shared by every function here:

- ``preds`` is a sequence with one ``(k, 5)`` array per image: ``x_min, y_min, x_max, y_max, score``.
- ``gts`` is a sequence with one ``(m, 4)`` array per image: ``x_min, y_min, x_max, y_max``.
- Both are in the same pixel coordinates and aligned by image; an image without boxes may be given
  as any empty array (``np.empty((0, 5))``, ``np.array([])``).
- Box areas and IoU are continuous (``(x_max - x_min) * (y_max - y_min)``, no ``+1`` pixel), as in
  pycocotools.
- A metric that is undefined on the input (no ground truth for AP or sensitivity, a single class for
  AUROC, nothing left to score for the RSNA metric) is ``nan``, never an exception.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pipeline_steps.core.config import TestParams
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.layout import Layout

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from pipeline_steps.preprocess import Geometry

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

# Built exactly as pycocotools builds them, so that recall/IoU comparisons agree to the last bit.
COCO_IOU_THRESHOLDS: FloatArray = np.linspace(0.5, 0.95, 10)
COCO_RECALL_THRESHOLDS: FloatArray = np.linspace(0.0, 1.0, 101)
# Rounded so that the thresholds equal the decimal literals 0.40, 0.45, ..., 0.75.
RSNA_IOU_THRESHOLDS: FloatArray = np.round(np.linspace(0.4, 0.75, 8), 2)
FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FROC_HIT_RULES = ("center_or_iou", "center", "iou")

MetricFn = Callable[[Sequence[FloatArray], Sequence[FloatArray]], float]


class FrocResult(TypedDict):
    """The output of `froc`: sensitivities at the requested rates and the whole curve."""

    fp_rates: FloatArray  # the requested FP/image rates, in the order given
    sensitivity_at_rates: FloatArray  # aligned with fp_rates
    cpm: float  # mean of sensitivity_at_rates (the competition performance metric)
    fps_per_image: FloatArray  # curve x, one point per distinct score, starting at (0, 0)
    sensitivity: FloatArray  # curve y
    thresholds: FloatArray  # score threshold of each curve point (first one is +inf)
    n_images: int
    n_gt: int


class CalibrationResult(TypedDict):
    """The output of `calibration_curve`: a reliability diagram of box scores."""

    bin_edges: FloatArray  # (n_bins + 1,) on [0, 1]
    mean_score: FloatArray  # (n_bins,), nan for empty bins
    fraction_tp: FloatArray  # (n_bins,), nan for empty bins
    count: NDArray[np.int64]  # (n_bins,)
    ece: float  # expected calibration error: count-weighted mean |mean_score - fraction_tp|
    iou_threshold: float


# --------------------------------------------------------------------------------------------------
# Input checking


def _as_boxes(array: ArrayLike, n_cols: int, what: str) -> FloatArray:
    boxes = np.asarray(array, dtype=np.float64)
    if boxes.size == 0:
        return np.empty((0, n_cols), dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != n_cols:
        raise ValueError(f"{what} must have shape (n, {n_cols}), got {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{what} contains nan or inf")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"{what} has a box with x_max < x_min or y_max < y_min")
    return boxes


def _check_inputs(
    preds: Sequence[ArrayLike], gts: Sequence[ArrayLike]
) -> tuple[list[FloatArray], list[FloatArray]]:
    if len(preds) != len(gts):
        raise ValueError(
            f"preds and gts must be aligned by image, got {len(preds)} and {len(gts)} images"
        )
    checked_preds = [_as_boxes(p, 5, f"preds[{i}]") for i, p in enumerate(preds)]
    checked_gts = [_as_boxes(g, 4, f"gts[{i}]") for i, g in enumerate(gts)]
    return checked_preds, checked_gts


def _check_iou_threshold(iou_threshold: float) -> None:
    # A threshold of 0 would let disjoint boxes match, which no metric here intends.
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")


def _sort_by_score(preds: FloatArray) -> FloatArray:
    # Stable, so that tied scores keep their input order (pycocotools does the same).
    return preds[np.argsort(-preds[:, 4], kind="mergesort")]


# --------------------------------------------------------------------------------------------------
# IoU and matching


def box_iou(a: ArrayLike, b: ArrayLike) -> FloatArray:
    """Pairwise IoU of ``(n, 4)`` and ``(m, 4)`` corner boxes, as an ``(n, m)`` array.

    Two zero-area boxes have IoU 0 (not nan).
    """
    a = _as_boxes(a, 4, "a")
    b = _as_boxes(b, 4, "b")
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(width, 0.0, None) * np.clip(height, 0.0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match_greedy(ious: FloatArray, iou_threshold: float, strict: bool = False) -> BoolArray:
    """True-positive flags for score-sorted predictions (rows) against ground truth (columns).

    Each prediction, best score first, takes the still-unmatched ground truth with the highest IoU,
    if that IoU reaches the threshold (``>=``, or ``>`` when ``strict``). Among equal IoUs the last
    ground truth wins, which is what pycocotools' loop does.
    """
    n_pred, n_gt = ious.shape
    is_tp = np.zeros(n_pred, dtype=bool)
    if n_gt == 0:
        return is_tp
    taken = np.zeros(n_gt, dtype=bool)
    for i in range(n_pred):
        candidates = np.where(taken, -1.0, ious[i])
        j = n_gt - 1 - int(np.argmax(candidates[::-1]))
        best = candidates[j]
        if best > iou_threshold or (not strict and best == iou_threshold):
            taken[j] = True
            is_tp[i] = True
    return is_tp


def _sorted_with_ious(
    preds: Sequence[FloatArray], gts: Sequence[FloatArray]
) -> list[tuple[FloatArray, FloatArray]]:
    """Per image: predictions sorted by score, and their IoU with the ground truth."""
    out = []
    for p, g in zip(preds, gts, strict=True):
        ps = _sort_by_score(p)
        out.append((ps, box_iou(ps[:, :4], g)))
    return out


# --------------------------------------------------------------------------------------------------
# COCO-style average precision


def _pr_curve(
    images: Sequence[tuple[FloatArray, FloatArray]], iou_threshold: float
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Recall, precision and score after each prediction, over all images, best score first."""
    n_gt = sum(ious.shape[1] for _, ious in images)
    scores = [ps[:, 4] for ps, _ in images]
    flags = [_match_greedy(ious, iou_threshold) for _, ious in images]
    all_scores = np.concatenate(scores) if scores else np.empty(0)
    all_flags = np.concatenate(flags) if flags else np.empty(0, dtype=bool)
    # Stable over the image-ordered concatenation, as pycocotools' accumulate() does.
    order = np.argsort(-all_scores, kind="mergesort")
    tp = np.cumsum(all_flags[order])
    fp = np.cumsum(~all_flags[order])
    recall = tp / n_gt if n_gt else np.full(tp.shape, np.nan)
    precision = tp / np.maximum(tp + fp, 1)
    return recall, precision, all_scores[order]


def _interpolated_ap(recall: FloatArray, precision: FloatArray) -> float:
    """COCO's 101-point interpolated AP: mean, over recall r in 0:0.01:1, of the best precision
    at any recall >= r (0 where recall r is never reached)."""
    if recall.size == 0:
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, COCO_RECALL_THRESHOLDS, side="left")
    reached = idx < recall.size
    sampled = np.zeros(COCO_RECALL_THRESHOLDS.size)
    sampled[reached] = envelope[idx[reached]]
    return float(sampled.mean())


def _ap_at(images: Sequence[tuple[FloatArray, FloatArray]], iou_threshold: float) -> float:
    if sum(ious.shape[1] for _, ious in images) == 0:
        return float("nan")
    recall, precision, _ = _pr_curve(images, iou_threshold)
    return _interpolated_ap(recall, precision)


def average_precision(
    preds: Sequence[ArrayLike], gts: Sequence[ArrayLike], iou_threshold: float = 0.5
) -> float:
    """Single-class COCO-style AP at one IoU threshold.

    Within each image, predictions are matched greedily by descending score to the unmatched
    ground truth of highest IoU, if IoU >= ``iou_threshold``; unmatched and duplicate predictions
    are false positives. Predictions of all images are then ranked by score and precision is
    interpolated at 101 recall points, as pycocotools does. Unlike COCO there is no per-image cap
    on detections (COCO keeps the best 100) and no area ranges or crowd regions.

    Returns nan when there is no ground truth at all, and 0.0 when there is ground truth but no
    prediction.
    """
    _check_iou_threshold(iou_threshold)
    p, g = _check_inputs(preds, gts)
    return _ap_at(_sorted_with_ious(p, g), iou_threshold)


def coco_map(preds: Sequence[ArrayLike], gts: Sequence[ArrayLike]) -> dict[str, float]:
    """COCO headline APs: ``ap50``, ``ap75`` and ``map`` (mean AP over IoU 0.50:0.05:0.95).

    Same matching and interpolation as `average_precision`; all values are nan without ground truth.
    """
    p, g = _check_inputs(preds, gts)
    images = _sorted_with_ious(p, g)
    aps = np.array([_ap_at(images, float(t)) for t in COCO_IOU_THRESHOLDS])
    return {"ap50": float(aps[0]), "ap75": float(aps[5]), "map": float(aps.mean())}


# --------------------------------------------------------------------------------------------------
# RSNA Pneumonia Detection metric


def rsna_score(preds: Sequence[ArrayLike], gts: Sequence[ArrayLike]) -> float:
    """The RSNA Pneumonia Detection Challenge metric.

    Per image and per IoU threshold t in 0.40:0.05:0.75, predictions are matched by descending
    score to the unmatched ground truth of highest IoU, counting a match only when IoU > t
    (strictly, as the competition's "IoU above the threshold"); the image scores the mean over t
    of TP / (TP + FP + FN). Images with neither ground truth nor predictions are skipped; an image
    with only one of the two scores 0. The result is the mean over the remaining images, or nan if
    none remain.
    """
    p, g = _check_inputs(preds, gts)
    per_image = []
    for _, ious in _sorted_with_ious(p, g):
        n_pred, n_gt = ious.shape
        if n_pred == 0 and n_gt == 0:
            continue
        values = []
        for t in RSNA_IOU_THRESHOLDS:
            tp = int(_match_greedy(ious, float(t), strict=True).sum())
            # tp + fp + fn == n_pred + n_gt - tp, which is > 0 here.
            values.append(tp / (n_pred + n_gt - tp))
        per_image.append(float(np.mean(values)))
    return float(np.mean(per_image)) if per_image else float("nan")


# --------------------------------------------------------------------------------------------------
# FROC


def _hits(preds: FloatArray, gts: FloatArray, hit: str, iou_threshold: float) -> BoolArray:
    """``(k, m)`` flags: does prediction i hit ground truth j."""
    cx = (preds[:, 0] + preds[:, 2]) / 2
    cy = (preds[:, 1] + preds[:, 3]) / 2
    center_in = (
        (cx[:, None] >= gts[None, :, 0])
        & (cx[:, None] <= gts[None, :, 2])
        & (cy[:, None] >= gts[None, :, 1])
        & (cy[:, None] <= gts[None, :, 3])
    )
    iou_hit = box_iou(preds[:, :4], gts) >= iou_threshold
    if hit == "center":
        return center_in
    if hit == "iou":
        return iou_hit
    return center_in | iou_hit


def froc(
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    fp_rates: Sequence[float] = FROC_FP_RATES,
    hit: str = "center_or_iou",
    iou_threshold: float = 0.3,
) -> FrocResult:
    """Free-response ROC: lesion sensitivity against false positives per image.

    A prediction hits a ground-truth box when (``hit="center_or_iou"``) its centre lies inside the
    box, borders included, or their IoU is >= ``iou_threshold``; ``"center"`` and ``"iou"`` use one
    rule alone. At a score threshold s:

    - a ground-truth box is found if any prediction with score >= s hits it, so each box counts
      once, at its highest-scoring hit;
    - a prediction that hits no box is a false positive;
    - a prediction that hits only boxes already found by a higher-scoring prediction is neither a
      true nor a false positive (a second mark on a found lesion is not penalised). There is no
      one-to-one assignment: FROC asks whether each lesion was found, so one prediction covering
      two touching lesions finds both.

    The curve has one point per distinct score (tied predictions enter together), starting at
    (0, 0) for s = +inf. The sensitivity at a rate r is that of the lowest threshold whose FP/image
    is <= r (the best operating point that keeps within the rate; no interpolation), so it is the
    final sensitivity once the predictions run out. ``cpm`` is the mean over ``fp_rates``.

    Sensitivities and cpm are nan without ground truth; with no images at all the curve is empty.
    """
    if hit not in FROC_HIT_RULES:
        raise ValueError(f"hit must be one of {FROC_HIT_RULES}, got {hit!r}")
    _check_iou_threshold(iou_threshold)
    rates = np.asarray(fp_rates, dtype=np.float64)
    if rates.ndim != 1 or rates.size == 0 or (rates <= 0).any():
        raise ValueError(f"fp_rates must be a non-empty list of positive rates, got {fp_rates}")
    p, g = _check_inputs(preds, gts)
    n_images = len(p)
    n_gt = sum(len(x) for x in g)

    fp_scores: list[FloatArray] = []
    found_scores: list[FloatArray] = []  # per ground truth: best hitting score, -inf if never hit
    for pi, gi in zip(p, g, strict=True):
        hits = _hits(pi, gi, hit, iou_threshold)
        fp_scores.append(pi[~hits.any(axis=1), 4])
        found_scores.append(np.where(hits, pi[:, 4:5], -np.inf).max(axis=0, initial=-np.inf))
    all_scores = np.concatenate([x[:, 4] for x in p]) if p else np.empty(0)
    fp_sorted = np.sort(np.concatenate(fp_scores)) if fp_scores else np.empty(0)
    found_sorted = np.sort(np.concatenate(found_scores)) if found_scores else np.empty(0)

    thresholds = np.concatenate([[np.inf], np.unique(all_scores)[::-1]])
    # Counts of values >= each threshold, via the sorted arrays.
    n_fp = fp_sorted.size - np.searchsorted(fp_sorted, thresholds, side="left")
    n_found = found_sorted.size - np.searchsorted(found_sorted, thresholds, side="left")
    if n_images == 0:
        empty = np.empty(0)
        return FrocResult(
            fp_rates=rates,
            sensitivity_at_rates=np.full(rates.shape, np.nan),
            cpm=float("nan"),
            fps_per_image=empty,
            sensitivity=empty,
            thresholds=empty,
            n_images=0,
            n_gt=0,
        )
    fps_per_image = n_fp / n_images
    sensitivity = n_found / n_gt if n_gt else np.full(thresholds.shape, np.nan)
    # Both grow as the threshold falls, so the best point within a rate is the last one within it.
    last_within = np.searchsorted(fps_per_image, rates, side="right") - 1
    sens_at_rates = sensitivity[last_within]
    return FrocResult(
        fp_rates=rates,
        sensitivity_at_rates=sens_at_rates,
        cpm=float(sens_at_rates.mean()),
        fps_per_image=fps_per_image,
        sensitivity=sensitivity,
        thresholds=thresholds,
        n_images=n_images,
        n_gt=n_gt,
    )


# --------------------------------------------------------------------------------------------------
# Image-level AUROC


def _auroc(scores: FloatArray, labels: BoolArray) -> float:
    """Mann-Whitney AUROC with ties counted one half; nan if only one class is present."""
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # 1-based average rank of each group of tied scores.
    avg_rank = np.cumsum(counts) - (counts - 1) / 2
    ranks = avg_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def image_auroc(preds: Sequence[ArrayLike], gts: Sequence[ArrayLike]) -> float:
    """AUROC of image-level classification: the image score is its highest box score (0 without
    boxes), the label is whether it has any ground truth. nan if all images share one label."""
    p, g = _check_inputs(preds, gts)
    scores = np.array([x[:, 4].max() if len(x) else 0.0 for x in p])
    labels = np.array([len(x) > 0 for x in g], dtype=bool)
    return _auroc(scores, labels)


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
    p, g = _check_inputs(preds, gts)
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
    pa, g = _check_inputs(preds_a, gts)
    pb, _ = _check_inputs(preds_b, gts)
    members = _patient_groups(len(g), patient_ids)
    if not g:
        return float("nan"), float("nan")
    values = []
    for idx in _resamples(members, n_boot, seed):
        bg = [g[i] for i in idx]
        values.append(metric_fn([pa[i] for i in idx], bg) - metric_fn([pb[i] for i in idx], bg))
    return _percentile_interval(values, alpha)


# --------------------------------------------------------------------------------------------------
# Calibration


def calibration_curve(
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    n_bins: int = 10,
    iou_threshold: float = 0.3,
) -> CalibrationResult:
    """Reliability of box scores: per equal-width score bin on [0, 1], the mean score against the
    fraction of predictions that are true positives.

    A prediction is a true positive when the greedy matching of `average_precision` pairs it with
    a ground truth at IoU >= ``iou_threshold``. Scores must be probabilities in [0, 1]. Bins are
    half-open, ``[lo, hi)``, except the last, which also holds a score of exactly 1. ``ece`` is
    nan when there are no predictions.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    _check_iou_threshold(iou_threshold)
    p, g = _check_inputs(preds, gts)
    images = _sorted_with_ious(p, g)
    scores = np.concatenate([ps[:, 4] for ps, _ in images]) if images else np.empty(0)
    is_tp = (
        np.concatenate([_match_greedy(ious, iou_threshold) for _, ious in images])
        if images
        else np.empty(0, dtype=bool)
    )
    if ((scores < 0) | (scores > 1)).any():
        raise ValueError("calibration needs scores in [0, 1]; apply the model's sigmoid first")

    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.int64)
    score_sum = np.bincount(bins, weights=scores, minlength=n_bins)
    tp_sum = np.bincount(bins, weights=is_tp.astype(np.float64), minlength=n_bins)
    nonempty = count > 0
    mean_score = np.full(n_bins, np.nan)
    fraction_tp = np.full(n_bins, np.nan)
    mean_score[nonempty] = score_sum[nonempty] / count[nonempty]
    fraction_tp[nonempty] = tp_sum[nonempty] / count[nonempty]
    ece = (
        float((count[nonempty] * np.abs(mean_score - fraction_tp)[nonempty]).sum() / count.sum())
        if count.sum()
        else float("nan")
    )
    return CalibrationResult(
        bin_edges=edges,
        mean_score=mean_score,
        fraction_tp=fraction_tp,
        count=count,
        ece=ece,
        iou_threshold=iou_threshold,
    )


# --------------------------------------------------------------------------------------------------
# Headline metrics


def _rate_key(rate: float) -> str:
    return f"froc_{rate:g}"


def evaluate_detections(
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    patient_ids: Sequence[Hashable] | None = None,
    n_boot: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """All headline metrics as one flat dict of floats, ready to log.

    Keys: ``ap50``, ``ap75``, ``map``, ``rsna``, ``froc_0.125`` ... ``froc_8``, ``cpm``,
    ``sens_at_1fp``, ``auroc``, ``n_images``, ``n_gt``, ``n_pred``; with ``n_boot > 0`` also
    ``<name>_ci_low`` and ``<name>_ci_high`` for each of CI_METRICS (ap50, cpm, sens_at_1fp,
    auroc): 95 % percentile bootstrap over patients, or over images without ``patient_ids``, all
    from the same replicates. Undefined metrics are nan, see the functions above.
    """
    p, g = _check_inputs(preds, gts)
    aps = coco_map(p, g)
    fr = froc(p, g, fp_rates=FROC_FP_RATES)
    sens = dict(zip(FROC_FP_RATES, fr["sensitivity_at_rates"].tolist(), strict=True))
    out: dict[str, float] = {
        "ap50": aps["ap50"],
        "ap75": aps["ap75"],
        "map": aps["map"],
        "rsna": rsna_score(p, g),
        **{_rate_key(r): s for r, s in sens.items()},
        "cpm": fr["cpm"],
        "sens_at_1fp": sens[1.0],
        "auroc": image_auroc(p, g),
        "n_images": float(len(p)),
        "n_gt": float(sum(len(x) for x in g)),
        "n_pred": float(sum(len(x) for x in p)),
    }
    if n_boot > 0:
        intervals = bootstrap_cis(CI_METRICS, p, g, patient_ids, n_boot=n_boot, seed=seed)
        for name, (low, high) in intervals.items():
            out[f"{name}_ci_low"] = low
            out[f"{name}_ci_high"] = high
    return out


def _ap50(preds: Sequence[FloatArray], gts: Sequence[FloatArray]) -> float:
    return average_precision(preds, gts, 0.5)


def _cpm(preds: Sequence[FloatArray], gts: Sequence[FloatArray]) -> float:
    return froc(preds, gts)["cpm"]


def _sens_at_1fp(preds: Sequence[FloatArray], gts: Sequence[FloatArray]) -> float:
    return float(froc(preds, gts, fp_rates=(1.0,))["sensitivity_at_rates"][0])


# The metrics that get bootstrap intervals, by their key in `evaluate_detections`.
CI_METRICS: dict[str, MetricFn] = {
    "ap50": _ap50,
    "cpm": _cpm,
    "sens_at_1fp": _sens_at_1fp,
    "auroc": image_auroc,
}


# --------------------------------------------------------------------------------------------------
# Subgroups and lesion strata

SUBGROUP_METRICS = ("ap50", "sens_at_1fp", "cpm", "auroc")


def age_band(age: float | None) -> str:
    """Age band for subgroup reporting: "<50", "50-64", "65+", or "unknown"."""
    if age is None or not np.isfinite(age):
        return "unknown"
    if age < 50:
        return "<50"
    return "50-64" if age < 65 else "65+"


def _group_order(value: str) -> tuple[bool, float, str]:
    """Groups in a readable order: by their first number ("<50" just before "50-64", "65+" after),
    then by name; "unknown" last."""
    found = re.search(r"\d+(\.\d+)?", value)
    number = float(found.group(0)) if found else math.inf
    if found and value.lstrip().startswith("<"):
        number -= 0.5
    return value == "unknown", number, value


def subgroup_metrics(
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    groups: Mapping[str, Sequence[str]],
    patient_ids: Sequence[Hashable] | None = None,
    n_boot: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics within each subgroup: ``{attribute: {value: metrics}}``.

    ``groups`` maps an attribute (e.g. ``"sex"``) to one value per image. Within a subgroup the
    metrics are computed as if it were the whole test set (FROC counts false positives per image
    of that subgroup). Each entry has ``n_images``, ``n_gt``, the SUBGROUP_METRICS and, with
    ``n_boot > 0``, patient-level bootstrap intervals of ap50 and sens_at_1fp.
    """
    p, g = _check_inputs(preds, gts)
    ids = list(range(len(p))) if patient_ids is None else list(patient_ids)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for attribute, values in groups.items():
        if len(values) != len(p):
            raise ValueError(f"groups[{attribute!r}] has {len(values)} values for {len(p)} images")
        out[attribute] = {}
        for value in sorted(set(values), key=_group_order):
            idx = [i for i, v in enumerate(values) if v == value]
            sp, sg = [p[i] for i in idx], [g[i] for i in idx]
            full = evaluate_detections(sp, sg)
            entry = {"n_images": full["n_images"], "n_gt": full["n_gt"]}
            entry.update({k: full[k] for k in SUBGROUP_METRICS})
            if n_boot > 0:
                fns = {k: CI_METRICS[k] for k in ("ap50", "sens_at_1fp")}
                cis = bootstrap_cis(fns, sp, sg, [ids[i] for i in idx], n_boot=n_boot, seed=seed)
                for name, (low, high) in cis.items():
                    entry[f"{name}_ci_low"], entry[f"{name}_ci_high"] = low, high
            out[attribute][value] = entry
    return out


def metric_key_part(value: str) -> str:
    """A group value as part of a metric name (MLflow allows letters, digits, ``_-./`` and space):
    lower case, other characters as ``_``; "<50" becomes "lt50" and "65+" becomes "65plus"."""
    text = str(value).strip().lower().replace("<", "lt").replace(">", "gt").replace("+", "plus")
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")
    return slug or "unknown"


def flatten_subgroups(table: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """``subgroup_metrics`` output as flat ``subgroup.<attribute>.<value>.<metric>`` keys."""
    return {
        f"subgroup.{attribute}.{metric_key_part(value)}.{metric}": float(number)
        for attribute, by_value in table.items()
        for value, entry in by_value.items()
        for metric, number in entry.items()
    }


def operating_threshold(
    preds: Sequence[ArrayLike], gts: Sequence[ArrayLike], fp_rate: float
) -> float:
    """The lowest score threshold whose false positives per image stay within ``fp_rate`` (the
    FROC operating point), +inf when even the best prediction is a false positive too many."""
    curve = froc(preds, gts, fp_rates=(fp_rate,))
    if curve["fps_per_image"].size == 0:
        return float("inf")
    last = int(np.searchsorted(curve["fps_per_image"], fp_rate, side="right")) - 1
    return float(curve["thresholds"][last])


def lesion_sensitivity(
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    lesion_groups: Sequence[Sequence[str]],
    threshold: float,
    hit: str = "center_or_iou",
    iou_threshold: float = 0.3,
) -> dict[str, tuple[int, int]]:
    """Lesions found at a score ``threshold``, per lesion group: ``{group: (found, total)}``.

    ``lesion_groups[i][j]`` names the group of ground-truth box j of image i (e.g. a size band);
    a lesion is found when a prediction scoring at least ``threshold`` hits it (the FROC rule).
    """
    p, g = _check_inputs(preds, gts)
    counts: dict[str, list[int]] = {}
    for pi, gi, names in zip(p, g, lesion_groups, strict=True):
        if len(names) != len(gi):
            raise ValueError(f"lesion_groups has {len(names)} names for {len(gi)} boxes")
        kept = pi[pi[:, 4] >= threshold]
        found: BoolArray = np.asarray(_hits(kept, gi, hit, iou_threshold).any(axis=0))
        for name, is_found in zip(names, found.tolist(), strict=True):
            tally = counts.setdefault(name, [0, 0])
            tally[0] += int(is_found)
            tally[1] += 1
    return {name: (found, total) for name, (found, total) in counts.items()}


# --------------------------------------------------------------------------------------------------
# Plots (the only edge that touches files). Figures are built with matplotlib's object API on the
# Agg canvas, so no pyplot global state and no display are involved.


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _new_figure() -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")


def plot_froc(
    curve: FrocResult,
    path: str | Path,
    others: Mapping[str, FrocResult] | None = None,
    label: str = "FROC",
) -> Path:
    """Draw a `froc` result (log-2 FP/image axis, marked operating rates) to a PNG at ``path``.

    ``others`` adds more detectors' curves on the same axes (e.g. the classical baseline).
    """
    fig, ax = _new_figure()
    rates = curve["fp_rates"]
    left, right = float(rates.min()) / 2, float(rates.max()) * 2
    drawn = False
    for (name, result), colour in zip(
        {label: curve, **(others or {})}.items(), _COLOURS, strict=False
    ):
        fps = result["fps_per_image"]
        sens = result["sensitivity"]
        if not (fps.size and np.isfinite(sens).all()):
            continue
        # Log axis: draw the (0, 0) start at the left edge; extend the last point to the right
        # edge, since sensitivity stays put once the predictions run out.
        x = np.concatenate([np.clip(fps, left, None), [max(right, float(fps[-1]))]])
        y = np.concatenate([sens, [sens[-1]]])
        ax.plot(
            x, y, drawstyle="steps-post", color=colour, label=f"{name} (CPM {result['cpm']:.3f})"
        )
        ax.plot(result["fp_rates"], result["sensitivity_at_rates"], "o", color=colour)
        drawn = True
    if drawn:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no ground truth", ha="center", transform=ax.transAxes)
    ax.set_xscale("log", base=2)
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set(
        xlim=(left, right),
        ylim=(0, 1.02),
        xlabel="False positives per image",
        ylabel="Lesion sensitivity",
        title=f"FROC ({curve['n_gt']} lesions, {curve['n_images']} images)",
    )
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_pr(
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    path: str | Path,
    iou: float = 0.5,
    others: Mapping[str, Sequence[ArrayLike]] | None = None,
    label: str = "model",
) -> Path:
    """Draw the precision-recall curve at IoU ``iou`` and its COCO envelope to a PNG at ``path``.

    ``others`` maps more detectors' names to their predictions on the same images; their
    interpolated curves are drawn too.
    """
    _check_iou_threshold(iou)
    p, g = _check_inputs(preds, gts)
    images = _sorted_with_ious(p, g)
    recall, precision, _ = _pr_curve(images, iou)
    ap = _ap_at(images, iou)
    fig, ax = _new_figure()
    if recall.size and np.isfinite(recall).all():
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        ax.plot(recall, precision, color="tab:gray", alpha=0.6, label=f"{label} precision")
        ax.plot(
            recall,
            envelope,
            drawstyle="steps-pre",
            color=_COLOURS[0],
            label=f"{label} interpolated (AP {ap:.3f})",
        )
        for (name, extra), colour in zip((others or {}).items(), _COLOURS[1:], strict=False):
            other_images = _sorted_with_ious(_check_inputs(extra, g)[0], g)
            r, prec, _ = _pr_curve(other_images, iou)
            if r.size:
                ax.plot(
                    r,
                    np.maximum.accumulate(prec[::-1])[::-1],
                    drawstyle="steps-pre",
                    color=colour,
                    label=f"{name} interpolated (AP {_ap_at(other_images, iou):.3f})",
                )
        ax.legend(loc="upper right")
    else:
        why = "no ground truth" if not np.isfinite(ap) else "no predictions"
        ax.text(0.5, 0.5, why, ha="center", transform=ax.transAxes)
    ax.set(
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        xlabel="Recall",
        ylabel="Precision",
        title=f"Precision-recall at IoU {iou:.2f} (AP = {ap:.3f})",
    )
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_detection_grid(
    images: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    detections: Mapping[str, Sequence[ArrayLike]],
    path: str | Path,
    titles: Sequence[str] | None = None,
    columns: int = 4,
) -> Path:
    """A grid of images with their ground truth (green) and each detector's boxes (in the order
    of ``detections``: red solid, then blue dashed, ...) with scores, to a PNG at ``path``.

    Boxes are in the images' pixels; the caller chooses which boxes to show (e.g. those above
    an operating threshold).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    n = len(images)
    if n == 0:
        raise ValueError("plot_detection_grid needs at least one image")
    styles = [("red", "-"), ("deepskyblue", "--"), ("orange", ":")]
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(3.2 * columns, 3.4 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        ax.imshow(np.asarray(images[k]), cmap="gray", vmin=0.0, vmax=1.0)
        for x0, y0, x1, y1 in _as_boxes(gts[k], 4, f"gts[{k}]"):
            pad = 2.0  # drawn just outside the lesion, so the lesion itself stays visible
            ax.add_patch(
                Rectangle(
                    (x0 - pad, y0 - pad), x1 - x0 + 2 * pad, y1 - y0 + 2 * pad,
                    fill=False, ec="lime", lw=1.2,
                )
            )  # fmt: skip
        for (_, boxes), (colour, style) in zip(detections.items(), styles, strict=False):
            for x0, y0, x1, y1, score in _as_boxes(boxes[k], 5, f"detections[{k}]"):
                ax.add_patch(
                    Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, ls=style, lw=1.0)
                )
                ax.text(x0, y0 - 2, f"{score:.2f}", color=colour, fontsize=6)
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
    handles = [Line2D([], [], color="lime", label="ground truth")] + [
        Line2D([], [], color=colour, ls=style, label=name)
        for name, (colour, style) in zip(detections, styles, strict=False)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def plot_calibration(cal: CalibrationResult, path: str | Path) -> Path:
    """Draw a `calibration_curve` result as a reliability diagram to a PNG at ``path``."""
    fig, ax = _new_figure()
    edges = cal["bin_edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    counts = ax.twinx()
    counts.bar(centers, cal["count"], width=np.diff(edges), color="tab:gray", alpha=0.25)
    counts.set_ylabel("Predictions per bin")
    counts.set_ylim(0, max(1.0, 1.1 * float(cal["count"].max())))
    # Keep the reliability line on top of the count bars drawn on the twin axis.
    ax.set_zorder(counts.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot([0, 1], [0, 1], "--", color="black", lw=1, label="perfect calibration")
    ok = cal["count"] > 0
    if not ok.any():
        ax.text(0.5, 0.5, "no predictions", ha="center", transform=ax.transAxes)
    ax.plot(
        cal["mean_score"][ok], cal["fraction_tp"][ok], "o-", color="tab:blue", label="box scores"
    )
    ax.legend(loc="upper left")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="Mean box score",
        ylabel=f"Fraction true positive (IoU >= {cal['iou_threshold']:g})",
        title=f"Box-score calibration (ECE = {cal['ece']:.3f})",
    )
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


# --- Stage `test` edge: the held-out split through the trained model and the classical baseline,
# scored in original DICOM pixels. ---

# Lesion diameter bands for the size breakdown (mm), smallest first.
SIZE_BANDS_MM: tuple[tuple[str, float], ...] = (("<8mm", 8.0), ("8-12mm", 12.0), ("12-20mm", 20.0))
SIZE_BAND_LARGEST = ">=20mm"
# Subgroup attributes: metadata column -> how a value becomes a group name.
SUBGROUP_COLUMNS = ("sex", "age_band", "view_position", "manufacturer")
# Test images drawn in the report's grid: this many with lesions and without, in image-id order
# (ids are content hashes, so this is an arbitrary but reproducible pick, not a flattering one).
GRID_POSITIVES, GRID_NEGATIVES = 8, 4


def size_band(diameter_mm: float) -> str:
    for name, upper in SIZE_BANDS_MM:
        if diameter_mm < upper:
            return name
    return SIZE_BAND_LARGEST


def details_path(layout: Layout) -> Path:
    """Tables behind the report that do not fit metrics.json's flat floats."""
    return layout.reports / "test_details.json"


def baseline_predictions_path(layout: Layout) -> Path:
    return layout.reports / "baseline_predictions.parquet"


def grid_path(layout: Layout) -> Path:
    return layout.plots / "test_grid.png"


def _finite_or_none(value: object) -> object:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _to_original(boxes: np.ndarray, geometry: Geometry) -> FloatArray:
    """(k, 5) boxes in model input pixels -> original DICOM pixels, scores kept."""
    if len(boxes) == 0:
        return np.zeros((0, 5))
    return np.column_stack([geometry.inverse(boxes[:, :4]), boxes[:, 4]])


def _prediction_rows(
    image_ids: Sequence[str], preds: Sequence[FloatArray]
) -> list[dict[str, object]]:
    return [
        {
            "image_id": image_id,
            "x_min": box[0],
            "y_min": box[1],
            "x_max": box[2],
            "y_max": box[3],
            "score": box[4],
        }
        for image_id, boxes in zip(image_ids, preds, strict=True)
        for box in boxes
    ]


def _score_detector(
    name: str,
    preds: Sequence[FloatArray],
    gts: Sequence[FloatArray],
    patients: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    lesion_bands: Sequence[Sequence[str]],
    n_boot: int,
    with_subgroup_keys: bool = True,
) -> tuple[dict[str, float], dict[str, object]]:
    """Headline metrics (flat) and the detailed tables (subgroups, lesion sizes, operating point)."""
    metrics = evaluate_detections(preds, gts, patient_ids=patients, n_boot=n_boot, seed=0)
    subgroups = subgroup_metrics(preds, gts, groups, patients, n_boot=n_boot, seed=0)
    threshold = operating_threshold(preds, gts, 1.0)
    sizes = lesion_sensitivity(preds, gts, lesion_bands, threshold)
    order = [band for band, _ in SIZE_BANDS_MM] + [SIZE_BAND_LARGEST]
    size_table = {band: list(sizes[band]) for band in order if band in sizes}
    if with_subgroup_keys:
        metrics.update(flatten_subgroups(subgroups))
    for band, (found, total) in sizes.items():
        metrics[f"lesion_size.{metric_key_part(band)}.sens_at_1fp"] = found / total
    metrics["threshold_at_1fp"] = threshold
    details = {
        "name": name,
        "subgroups": subgroups,
        "lesion_size_at_1fp": size_table,
        "threshold_at_1fp": threshold,
    }
    return metrics, details


def _write_froc_csv(curve: FrocResult, path: Path) -> None:
    """The curve as data for `dvc plots` (one row per operating point)."""
    rows = ["fps_per_image,sensitivity,threshold"]
    for x, y, t in zip(
        curve["fps_per_image"], curve["sensitivity"], curve["thresholds"], strict=True
    ):
        rows.append(f"{x:.6g},{y:.6g},{t:.6g}")
    path.write_text("\n".join(rows) + "\n")


def run(
    layout: Layout,
    params: TestParams,
    input_size: int,
    spacing_mm: float = 1.4,
    n_boot: int = 200,
) -> dict[str, float]:
    """Stage edge: model + test split -> metrics.json, predictions, plots and the report's tables.

    The deep model is scored in original DICOM pixels (boxes mapped back through the inverse
    letterbox geometry). With `params.baseline.enabled`, the classical detector is fitted on the
    train split and scored on the same test images by the same code; its metrics are the
    `baseline_*` keys, and `ap50_minus_baseline` comes with a paired patient-level bootstrap
    interval. Subgroup and lesion-size metrics are flat keys (`subgroup.<attribute>.<value>.*`,
    `lesion_size.<band>.*`) and, with display names, `reports/test_details.json`.
    """
    import keras
    import pandas as pd

    from pipeline_steps.core.baseline import finalize, fit_baseline
    from pipeline_steps.core.detector import predict_boxes
    from pipeline_steps.preprocess import geometry_of, load_split

    if not layout.model.exists():
        raise DataError(f"{layout.model}: missing. Run the `train` stage first.")
    split = load_split(layout.processed, "test")
    if len(split) == 0:
        raise DataError(
            f"{layout.manifest}: the test split is empty; ingest more labelled studies."
        )
    model = keras.models.load_model(layout.model, compile=False)
    curve_params = params.model_copy(update={"score_threshold": params.metrics_score_floor})
    labels = pd.read_parquet(layout.labels).dropna(subset=["x_min"])
    truth = {
        str(k): g[["x_min", "y_min", "x_max", "y_max"]].to_numpy(float)
        for k, g in labels.groupby("image_id")
    }
    records = split.manifest.to_dict("records")
    image_ids = [str(r["image_id"]) for r in records]
    geometries = [geometry_of(r, input_size) for r in records]
    gts = [truth.get(i, np.zeros((0, 4))) for i in image_ids]
    patients = [str(r["patient_pseudonym"]) for r in records]

    positives = sorted((i for i, g in zip(image_ids, gts, strict=True) if len(g)))[:GRID_POSITIVES]
    negatives = sorted((i for i, g in zip(image_ids, gts, strict=True) if not len(g)))
    grid_ids = positives + negatives[:GRID_NEGATIVES]
    grid_images: dict[str, np.ndarray] = {}

    deep_input: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for k, (image, _) in enumerate(split.examples()):
        batch.append(image)
        if image_ids[k] in grid_ids:
            grid_images[image_ids[k]] = image
        if len(batch) == 32 or k == len(records) - 1:
            deep_input.extend(predict_boxes(model, np.stack(batch), curve_params))
            batch.clear()
    deep = [_to_original(b, g) for b, g in zip(deep_input, geometries, strict=True)]

    metadata = pd.read_parquet(layout.metadata).set_index("image_id")
    meta = metadata.reindex(image_ids)
    groups = {
        "sex": [str(v) if isinstance(v, str) and v else "unknown" for v in meta["sex"]],
        "age_band": [age_band(float(v)) if pd.notna(v) else "unknown" for v in meta["age_years"]],
        "view_position": [
            str(v) if isinstance(v, str) and v else "unknown" for v in meta["view_position"]
        ],
        "manufacturer": [
            str(v) if isinstance(v, str) and v else "unknown" for v in meta["manufacturer"]
        ],
    }
    spacing_x = meta["spacing_col_mm"].astype(float).to_numpy()
    spacing_y = meta["spacing_row_mm"].astype(float).to_numpy()
    lesion_bands = [
        [size_band(((b[2] - b[0]) * spacing_x[i] + (b[3] - b[1]) * spacing_y[i]) / 2) for b in g]
        for i, g in enumerate(gts)
    ]

    metrics, deep_details = _score_detector(
        "deep", deep, gts, patients, groups, lesion_bands, n_boot
    )
    details: dict[str, object] = {
        "deep": deep_details,
        "n_patients": len(set(patients)),
        "grid_ids": grid_ids,
        "operating_threshold": params.score_threshold,
    }
    baseline: list[FloatArray] | None = None
    baseline_input: list[FloatArray] = []
    if params.baseline.enabled:
        detector = fit_baseline(
            load_split(layout.processed, "train").examples(), params.baseline, spacing_mm
        )
        baseline_input = [
            finalize(
                detector(image), params.metrics_score_floor, params.nms_iou, params.max_detections
            )
            for image, _ in split.examples()
        ]
        baseline = [_to_original(b, g) for b, g in zip(baseline_input, geometries, strict=True)]
        # The baseline's subgroups stay in test_details.json: in metrics.json they would double
        # the keys for a comparison the report already shows.
        base_metrics, base_details = _score_detector(
            "classical", baseline, gts, patients, groups, lesion_bands, 0, with_subgroup_keys=False
        )
        base_ci = bootstrap_cis(CI_METRICS, baseline, gts, patients, n_boot=n_boot, seed=0)
        for name, (low, high) in base_ci.items():
            base_metrics[f"{name}_ci_low"], base_metrics[f"{name}_ci_high"] = low, high
        metrics.update({f"baseline_{k}": v for k, v in base_metrics.items()})
        metrics["ap50_minus_baseline"] = metrics["ap50"] - metrics["baseline_ap50"]
        low, high = paired_bootstrap_ci(_ap50, deep, baseline, gts, patients, n_boot=n_boot)
        metrics["ap50_minus_baseline_ci_low"], metrics["ap50_minus_baseline_ci_high"] = low, high
        details["baseline"] = base_details
        details["baseline_radius_per_sigma"] = detector.radius_per_sigma

    layout.reports.mkdir(parents=True, exist_ok=True)
    layout.plots.mkdir(parents=True, exist_ok=True)
    columns = ["image_id", "x_min", "y_min", "x_max", "y_max", "score"]
    pd.DataFrame(_prediction_rows(image_ids, deep), columns=columns).to_parquet(
        layout.predictions, index=False
    )
    if baseline is not None:
        pd.DataFrame(_prediction_rows(image_ids, baseline), columns=columns).to_parquet(
            baseline_predictions_path(layout), index=False
        )
    layout.metrics.write_text(json.dumps(_finite_or_none(metrics), indent=2, sort_keys=True))
    details_path(layout).write_text(json.dumps(_finite_or_none(details), indent=2))

    others = {"classical baseline": baseline} if baseline is not None else {}
    deep_curve = froc(deep, gts)
    other_curves = {k: froc(v, gts) for k, v in others.items()}
    _write_froc_csv(deep_curve, layout.plots / "froc_deep.csv")
    for curve in other_curves.values():
        _write_froc_csv(curve, layout.plots / "froc_baseline.csv")
    plot_froc(deep_curve, layout.plots / "froc.png", others=other_curves, label="deep model")
    plot_pr(deep, gts, layout.plots / "pr.png", others=others, label="deep model")
    plot_calibration(calibration_curve(deep, gts), layout.plots / "calibration.png")

    # The grid shows each detector at its own 1 FP/image operating point on this test split.
    position = {image_id: k for k, image_id in enumerate(image_ids)}
    shown = [position[i] for i in grid_ids]
    cut = {"deep model": (deep_input, float(metrics["threshold_at_1fp"]))}
    if baseline is not None:
        cut["classical baseline"] = (baseline_input, float(metrics["baseline_threshold_at_1fp"]))
    plot_detection_grid(
        [grid_images[i] for i in grid_ids],
        [geometries[k].forward(gts[k]) if len(gts[k]) else np.zeros((0, 4)) for k in shown],
        {
            name: [boxes[k][boxes[k][:, 4] >= threshold] for k in shown]
            for name, (boxes, threshold) in cut.items()
        },
        grid_path(layout),
        titles=[f"{i[:10]} ({len(gts[position[i]])} lesions)" for i in grid_ids],
    )
    return metrics
