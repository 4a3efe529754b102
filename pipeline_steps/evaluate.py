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
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pipeline_steps.config import TestParams
from pipeline_steps.errors import DataError
from pipeline_steps.layout import Layout

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    p, g = _check_inputs(preds, gts)
    ids: Sequence[Hashable] = list(range(len(p))) if patient_ids is None else patient_ids
    if len(ids) != len(p):
        raise ValueError(f"patient_ids has {len(ids)} entries for {len(p)} images")
    if not p:
        return float("nan"), float("nan")
    groups: dict[Hashable, list[int]] = {}
    for i, pid in enumerate(ids):
        groups.setdefault(pid, []).append(i)
    members = list(groups.values())

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(members), size=len(members))
        idx = [i for k in drawn for i in members[k]]
        value = metric_fn([p[i] for i in idx], [g[i] for i in idx])
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


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
    ``ap50_ci_low``, ``ap50_ci_high``, ``cpm_ci_low``, ``cpm_ci_high`` (95 % percentile bootstrap
    over patients, or over images without ``patient_ids``). Undefined metrics are nan, see the
    functions above.
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

        def ap50(bp: Sequence[FloatArray], bg: Sequence[FloatArray]) -> float:
            return average_precision(bp, bg, 0.5)

        def cpm(bp: Sequence[FloatArray], bg: Sequence[FloatArray]) -> float:
            return froc(bp, bg)["cpm"]

        for name, fn in (("ap50", ap50), ("cpm", cpm)):
            low, high = bootstrap_ci(fn, p, g, patient_ids, n_boot=n_boot, seed=seed)
            out[f"{name}_ci_low"] = low
            out[f"{name}_ci_high"] = high
    return out


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


def plot_froc(curve: FrocResult, path: str | Path) -> Path:
    """Draw a `froc` result (log-2 FP/image axis, marked operating rates) to a PNG at ``path``."""
    fig, ax = _new_figure()
    rates = curve["fp_rates"]
    left, right = float(rates.min()) / 2, float(rates.max()) * 2
    fps = curve["fps_per_image"]
    sens = curve["sensitivity"]
    if fps.size and np.isfinite(sens).all():
        # Log axis: draw the (0, 0) start at the left edge; extend the last point to the right
        # edge, since sensitivity stays put once the predictions run out.
        x = np.concatenate([np.clip(fps, left, None), [max(right, float(fps[-1]))]])
        y = np.concatenate([sens, [sens[-1]]])
        ax.plot(x, y, drawstyle="steps-post", color="tab:blue", label="FROC")
        ax.plot(
            rates,
            curve["sensitivity_at_rates"],
            "o",
            color="tab:red",
            label=f"operating rates (CPM = {curve['cpm']:.3f})",
        )
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
    preds: Sequence[ArrayLike], gts: Sequence[ArrayLike], path: str | Path, iou: float = 0.5
) -> Path:
    """Draw the precision-recall curve at IoU ``iou`` and its COCO envelope to a PNG at ``path``."""
    _check_iou_threshold(iou)
    p, g = _check_inputs(preds, gts)
    images = _sorted_with_ious(p, g)
    recall, precision, _ = _pr_curve(images, iou)
    ap = _ap_at(images, iou)
    fig, ax = _new_figure()
    if recall.size and np.isfinite(recall).all():
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        ax.plot(recall, precision, color="tab:gray", alpha=0.6, label="precision")
        ax.plot(
            recall, envelope, drawstyle="steps-pre", color="tab:blue", label="interpolated (COCO)"
        )
        ax.legend(loc="lower left")
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


# --- Stage `test` edge: the held-out split through the trained model, scored in original DICOM pixels. ---


def run(layout: Layout, params: TestParams, input_size: int, n_boot: int = 200) -> dict[str, float]:
    """Stage edge: model + test split -> metrics.json, reports/test_predictions.parquet and plots."""
    import keras
    import pandas as pd

    from pipeline_steps.model import predict_boxes
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
        k: g[["x_min", "y_min", "x_max", "y_max"]].to_numpy(float)
        for k, g in labels.groupby("image_id")
    }

    preds: list[np.ndarray] = []
    gts: list[np.ndarray] = []
    rows: list[dict[str, object]] = []
    batch: list[np.ndarray] = []
    order = split.manifest.to_dict("records")

    def flush(start: int) -> None:
        for offset, boxes in enumerate(predict_boxes(model, np.stack(batch), curve_params)):
            record = order[start + offset]
            original = (
                geometry_of(record, input_size).inverse(boxes[:, :4])
                if len(boxes)
                else np.zeros((0, 4))
            )
            scored = np.column_stack([original, boxes[:, 4]]) if len(boxes) else np.zeros((0, 5))
            preds.append(scored)
            gts.append(truth.get(str(record["image_id"]), np.zeros((0, 4))))
            for box in scored:
                rows.append(
                    {
                        "image_id": record["image_id"],
                        "x_min": box[0],
                        "y_min": box[1],
                        "x_max": box[2],
                        "y_max": box[3],
                        "score": box[4],
                    }
                )
        batch.clear()

    start = 0
    for image, _ in split.examples():
        batch.append(image)
        if len(batch) == 32:
            flush(start)
            start += 32
    if batch:
        flush(start)

    patients = [str(r["patient_pseudonym"]) for r in order]
    metrics = evaluate_detections(preds, gts, patient_ids=patients, n_boot=n_boot, seed=0)
    layout.reports.mkdir(parents=True, exist_ok=True)
    layout.plots.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        rows, columns=["image_id", "x_min", "y_min", "x_max", "y_max", "score"]
    ).to_parquet(layout.predictions, index=False)
    clean = {
        k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()
    }
    layout.metrics.write_text(json.dumps(clean, indent=2, sort_keys=True))
    curve = froc(preds, gts)
    plot_froc(curve, layout.plots / "froc.png")
    plot_pr(preds, gts, layout.plots / "pr.png")
    plot_calibration(calibration_curve(preds, gts), layout.plots / "calibration.png")
    return metrics
