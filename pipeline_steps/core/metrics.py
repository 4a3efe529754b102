"""Detection metrics (COCO AP, RSNA score, FROC, AUROC, calibration) on per-image box arrays.

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

from collections.abc import Hashable, Sequence
from typing import TypedDict

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pipeline_steps.core.bootstrap import MetricFn, bootstrap_cis
from pipeline_steps.core.boxes import box_iou, check_inputs

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

# Built exactly as pycocotools builds them, so that recall/IoU comparisons agree to the last bit.
COCO_IOU_THRESHOLDS: FloatArray = np.linspace(0.5, 0.95, 10)
COCO_RECALL_THRESHOLDS: FloatArray = np.linspace(0.0, 1.0, 101)
# Rounded so that the thresholds equal the decimal literals 0.40, 0.45, ..., 0.75.
RSNA_IOU_THRESHOLDS: FloatArray = np.round(np.linspace(0.4, 0.75, 8), 2)
FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
FROC_HIT_RULES = ("center_or_iou", "center", "iou")


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


def check_iou_threshold(iou_threshold: float) -> None:
    # A threshold of 0 would let disjoint boxes match, which no metric here intends.
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")


def _sort_by_score(preds: FloatArray) -> FloatArray:
    # Stable, so that tied scores keep their input order (pycocotools does the same).
    return preds[np.argsort(-preds[:, 4], kind="mergesort")]


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


def sorted_with_ious(
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


def pr_curve(
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


def ap_at(images: Sequence[tuple[FloatArray, FloatArray]], iou_threshold: float) -> float:
    if sum(ious.shape[1] for _, ious in images) == 0:
        return float("nan")
    recall, precision, _ = pr_curve(images, iou_threshold)
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
    check_iou_threshold(iou_threshold)
    p, g = check_inputs(preds, gts)
    return ap_at(sorted_with_ious(p, g), iou_threshold)


def coco_map(preds: Sequence[ArrayLike], gts: Sequence[ArrayLike]) -> dict[str, float]:
    """COCO headline APs: ``ap50``, ``ap75`` and ``map`` (mean AP over IoU 0.50:0.05:0.95).

    Same matching and interpolation as `average_precision`; all values are nan without ground truth.
    """
    p, g = check_inputs(preds, gts)
    images = sorted_with_ious(p, g)
    aps = np.array([ap_at(images, float(t)) for t in COCO_IOU_THRESHOLDS])
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
    p, g = check_inputs(preds, gts)
    per_image = []
    for _, ious in sorted_with_ious(p, g):
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


def hit_matrix(preds: FloatArray, gts: FloatArray, hit: str, iou_threshold: float) -> BoolArray:
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
    check_iou_threshold(iou_threshold)
    rates = np.asarray(fp_rates, dtype=np.float64)
    if rates.ndim != 1 or rates.size == 0 or (rates <= 0).any():
        raise ValueError(f"fp_rates must be a non-empty list of positive rates, got {fp_rates}")
    p, g = check_inputs(preds, gts)
    n_images = len(p)
    n_gt = sum(len(x) for x in g)

    fp_scores: list[FloatArray] = []
    found_scores: list[FloatArray] = []  # per ground truth: best hitting score, -inf if never hit
    for pi, gi in zip(p, g, strict=True):
        hits = hit_matrix(pi, gi, hit, iou_threshold)
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
    p, g = check_inputs(preds, gts)
    scores = np.array([x[:, 4].max() if len(x) else 0.0 for x in p])
    labels = np.array([len(x) > 0 for x in g], dtype=bool)
    return _auroc(scores, labels)


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
    check_iou_threshold(iou_threshold)
    p, g = check_inputs(preds, gts)
    images = sorted_with_ious(p, g)
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
    p, g = check_inputs(preds, gts)
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


def ap50(preds: Sequence[FloatArray], gts: Sequence[FloatArray]) -> float:
    return average_precision(preds, gts, 0.5)


def _cpm(preds: Sequence[FloatArray], gts: Sequence[FloatArray]) -> float:
    return froc(preds, gts)["cpm"]


def _sens_at_1fp(preds: Sequence[FloatArray], gts: Sequence[FloatArray]) -> float:
    return float(froc(preds, gts, fp_rates=(1.0,))["sensitivity_at_rates"][0])


# The metrics that get bootstrap intervals, by their key in `evaluate_detections`.
CI_METRICS: dict[str, MetricFn] = {
    "ap50": ap50,
    "cpm": _cpm,
    "sens_at_1fp": _sens_at_1fp,
    "auroc": image_auroc,
}
