"""Unit tests of the detection metrics: hand-computed cases and a cross-check against pycocotools."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline_steps.core.bootstrap import bootstrap_ci, bootstrap_cis, paired_bootstrap_ci
from pipeline_steps.core.boxes import box_iou
from pipeline_steps.core.metrics import (
    average_precision,
    calibration_curve,
    coco_map,
    evaluate_detections,
    froc,
    image_auroc,
    rsna_score,
)
from pipeline_steps.core.plots import plot_detection_grid, plot_froc, plot_pr
from pipeline_steps.core.subgroups import (
    age_band,
    flatten_subgroups,
    lesion_sensitivity,
    metric_key_part,
    operating_threshold,
    size_band,
    subgroup_metrics,
)

NO_PREDS = np.empty((0, 5))
NO_GT = np.empty((0, 4))


def pred(x0: float, y0: float, x1: float, y1: float, score: float) -> list[float]:
    return [x0, y0, x1, y1, score]


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="aligned by image"):
        average_precision([NO_PREDS], [], 0.5)
    with pytest.raises(ValueError, match=r"preds\[0\] must have shape"):
        average_precision([np.zeros((2, 4))], [NO_GT], 0.5)
    with pytest.raises(ValueError, match="x_max < x_min"):
        box_iou([[5, 0, 1, 1]], NO_GT)


# --------------------------------------------------------------------------------------------------
# Average precision (hand cases)


def test_average_precision_hand_case_two_images() -> None:
    # Ranked: .9 TP (A, g1) | .8 FP (B, nothing) | .7 TP (B, g3) | .6 FP (A, duplicate on g1).
    # GT = 3 (g2 never found). tp = 1,1,2,2; fp = 0,1,1,2 -> recall 1/3,1/3,2/3,2/3,
    # precision 1, 1/2, 2/3, 1/2. Of the 101 recall points, 0.00..0.33 (34) get 1,
    # 0.34..0.66 (33) get 2/3, 0.67..1.00 (34) get 0: AP = (34 + 22) / 101.
    gts = [
        np.array([[0, 0, 10, 10], [50, 50, 60, 60]], dtype=float),
        np.array([[100, 100, 120, 120]], dtype=float),
    ]
    preds = [
        np.array([pred(0, 0, 10, 9, 0.9), pred(1, 0, 10, 10, 0.6)]),
        np.array([pred(200, 200, 210, 210, 0.8), pred(101, 100, 120, 120, 0.7)]),
    ]
    assert average_precision(preds, gts, 0.5) == pytest.approx(56 / 101, abs=1e-12)
    # Order of the images must not matter.
    assert average_precision(preds[::-1], gts[::-1], 0.5) == pytest.approx(56 / 101, abs=1e-12)


def test_average_precision_uses_precision_envelope() -> None:
    # Ranked FP, TP, TP with 2 GT: precision 0, 1/2, 2/3 at recall 0, 1/2, 1. The envelope
    # raises every recall point to 2/3, so AP = 2/3 exactly (without it, it would be lower).
    gts = [np.array([[0, 0, 10, 10], [20, 0, 30, 10]], dtype=float)]
    preds = [
        np.array([pred(50, 50, 60, 60, 0.9), pred(0, 0, 10, 10, 0.8), pred(20, 0, 30, 10, 0.7)])
    ]
    assert average_precision(preds, gts, 0.5) == pytest.approx(2 / 3, abs=1e-12)


def test_average_precision_threshold_is_inclusive_and_matching_is_one_to_one() -> None:
    gts = [np.array([[0, 0, 10, 10]], dtype=float)]
    # IoU exactly 0.5 counts at threshold 0.5; not at 0.55.
    half = [np.array([pred(0, 0, 5, 10, 0.9)])]
    assert average_precision(half, gts, 0.5) == 1.0
    assert average_precision(half, gts, 0.55) == 0.0
    # Two perfect boxes for one GT: the second is a false positive, but AP stays 1 because the
    # TP ranks first; ranked the other way (FP first) every recall point gets precision 1/2.
    twice = [np.array([pred(0, 0, 10, 10, 0.9), pred(0, 0, 10, 10, 0.8)])]
    assert average_precision(twice, gts, 0.5) == 1.0
    far_first = [np.array([pred(40, 40, 50, 50, 0.9), pred(0, 0, 10, 10, 0.8)])]
    assert average_precision(far_first, gts, 0.5) == pytest.approx(0.5, abs=1e-12)


def test_matching_takes_best_iou_gt_and_last_on_ties() -> None:
    # p1 overlaps g1 (IoU 4/7) and g2 (IoU 5/6); p2 fits only g1 (IoU 0.6). Taking the best
    # IoU gives p1 -> g2 and p2 -> g1: two TPs. Taking the first GT above 0.5 would leave p2 an FP.
    gts = [np.array([[0, 0, 10, 10], [4, 0, 14, 10]], dtype=float)]
    p1 = pred(2, 0, 14, 10, 0.9)
    p2 = pred(0, 0, 6, 10, 0.8)
    ious = box_iou(np.array([p1, p2])[:, :4], gts[0])
    assert ious[0, 1] > ious[0, 0] >= 0.5 and ious[1, 0] >= 0.5 > ious[1, 1]
    assert average_precision([np.array([p1, p2])], gts, 0.5) == 1.0
    # p3 sits symmetrically between g1 and g2 (IoU 80/120 with both); p4 fits g1 only (0.9).
    # pycocotools gives a tie to the last GT, so p3 -> g2 and p4 -> g1: again two TPs.
    p3 = pred(2, 0, 12, 10, 0.9)
    p4 = pred(0, 0, 9, 10, 0.8)
    ious = box_iou(np.array([p3, p4])[:, :4], gts[0])
    assert ious[0, 0] == ious[0, 1] >= 0.5 and ious[1, 0] >= 0.5 > ious[1, 1]
    tie_case = [np.array([p3, p4])]
    assert average_precision(tie_case, gts, 0.5) == 1.0
    assert pycocotools_aps(tie_case, gts)[0] == pytest.approx(1.0)


def test_average_precision_edge_cases() -> None:
    gt = [np.array([[0, 0, 10, 10]], dtype=float)]
    assert average_precision([NO_PREDS], gt, 0.5) == 0.0
    assert math.isnan(average_precision([np.array([pred(0, 0, 1, 1, 0.5)])], [NO_GT], 0.5))
    assert math.isnan(average_precision([], [], 0.5))
    assert math.isnan(average_precision([NO_PREDS, []], [NO_GT, []], 0.5))
    assert all(math.isnan(v) for v in coco_map([NO_PREDS], [NO_GT]).values())
    with pytest.raises(ValueError, match="iou_threshold"):
        average_precision([NO_PREDS], gt, 0.0)


# --------------------------------------------------------------------------------------------------
# COCO cross-check


def random_case(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A few images with 0-4 GT boxes, jittered copies of them (a spread of IoUs) and clutter."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(int(rng.integers(1, 8))):
        n_gt = int(rng.integers(0, 5))
        xy = rng.uniform(0, 200, size=(n_gt, 2))
        wh = rng.uniform(8, 60, size=(n_gt, 2))
        # Some lesions overlap their neighbour, so that a prediction can compete for two GTs.
        for k in range(1, n_gt):
            if rng.uniform() < 0.4:
                xy[k] = xy[k - 1] + rng.uniform(-10, 10, size=2)
                wh[k] = wh[k - 1] + rng.uniform(-5, 5, size=2)
        g = np.hstack([xy, xy + wh])
        boxes = []
        for box in g:
            for _ in range(int(rng.integers(0, 3))):
                w, h = box[2] - box[0], box[3] - box[1]
                shift = rng.normal(0, 0.25, size=4) * np.array([w, h, w, h])
                b = box + shift
                boxes.append([min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])])
        for _ in range(int(rng.integers(0, 4))):
            xy0 = rng.uniform(0, 200, size=2)
            boxes.append([*xy0, *(xy0 + rng.uniform(5, 60, size=2))])
        p = np.array(boxes).reshape(-1, 4)
        p = np.hstack([p, rng.uniform(0, 1, size=(len(p), 1))])
        preds.append(p)
        gts.append(g)
    return preds, gts


def pycocotools_aps(preds: list[np.ndarray], gts: list[np.ndarray]) -> np.ndarray:
    """AP at each COCO IoU threshold from pycocotools, made comparable: one category, one area
    range covering everything, no cap on detections per image."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b: np.ndarray) -> list[float]:
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    images = [{"id": i + 1} for i in range(len(gts))]
    annotations: list[dict[str, Any]] = []
    for i, g in enumerate(gts):
        for b in g:
            # ids start at 1: pycocotools treats a match to id 0 as no match.
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "bbox": xywh(b),
                    "area": float((b[2] - b[0]) * (b[3] - b[1])),
                    "iscrowd": 0,
                }
            )
    results = [
        {"image_id": i + 1, "category_id": 1, "bbox": xywh(b), "score": float(b[4])}
        for i, p in enumerate(preds)
        for b in p
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "lesion"}],
        }
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.areaRng = [[0.0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.params.maxDets = [10_000]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, 0, 0, 0]  # (iou thresholds, recall points)
    return precision.mean(axis=1)


@pytest.mark.parametrize("seed", range(25))
def test_coco_map_agrees_with_pycocotools(seed: int) -> None:
    preds, gts = random_case(seed)
    if sum(len(g) for g in gts) == 0 or sum(len(p) for p in preds) == 0:
        # pycocotools cannot load empty results, and AP without GT is nan here vs -1 there.
        preds, gts = random_case(seed + 1000)
        assert sum(len(g) for g in gts) and sum(len(p) for p in preds)
    reference = pycocotools_aps(preds, gts)
    ours = coco_map(preds, gts)
    assert ours["ap50"] == pytest.approx(reference[0], abs=1e-6)
    assert ours["ap75"] == pytest.approx(reference[5], abs=1e-6)
    assert ours["map"] == pytest.approx(reference.mean(), abs=1e-6)


def test_random_cases_are_not_trivial() -> None:
    # Guards the cross-check: the random cases must span easy and hard IoU thresholds.
    maps = [coco_map(*random_case(seed)) for seed in range(25)]
    ap50 = np.array([m["ap50"] for m in maps])
    ap75 = np.array([m["ap75"] for m in maps])
    finite = np.isfinite(ap50)
    assert finite.sum() >= 20
    assert (ap50[finite] > ap75[finite]).sum() >= 10
    assert ((ap50[finite] > 0) & (ap50[finite] < 1)).sum() >= 10


# --------------------------------------------------------------------------------------------------
# RSNA score


def test_rsna_score_hand_case() -> None:
    box = np.array([[0, 0, 10, 10]], dtype=float)
    gts = [box, box, NO_GT, NO_GT, box]
    preds = [
        # IoU 0.8 beats every threshold, plus one FP: 1 / (1 + 1 + 0) = 1/2 at each threshold.
        np.array([pred(0, 0, 10, 8, 0.9), pred(50, 50, 60, 60, 0.5)]),
        # IoU 0.62 is above 0.40..0.60 (5 of 8 thresholds), below 0.65..0.75: image score 5/8.
        np.array([pred(0, 0, 10, 6.2, 0.8)]),
        NO_PREDS,  # neither GT nor preds: skipped
        np.array([pred(0, 0, 5, 5, 0.3)]),  # FP only: 0
        NO_PREDS,  # FN only: 0
    ]
    assert rsna_score(preds, gts) == pytest.approx((0.5 + 5 / 8 + 0 + 0) / 4, abs=1e-12)


def test_rsna_score_threshold_is_strict() -> None:
    # IoU exactly 0.6 (60 / 100) does not count at t = 0.60: 4 of 8 thresholds, not 5.
    box = np.array([[0, 0, 10, 10]], dtype=float)
    assert rsna_score([np.array([pred(0, 0, 10, 6, 0.8)])], [box]) == pytest.approx(0.5)


def test_rsna_score_edge_cases() -> None:
    assert math.isnan(rsna_score([NO_PREDS, NO_PREDS], [NO_GT, NO_GT]))
    box = np.array([[0, 0, 10, 10]], dtype=float)
    assert rsna_score([np.array([pred(0, 0, 10, 10, 0.9)]), NO_PREDS], [box, NO_GT]) == 1.0


# --------------------------------------------------------------------------------------------------
# FROC


def froc_hand_case() -> tuple[list[np.ndarray], list[np.ndarray]]:
    gts = [
        np.array([[0, 0, 10, 10], [50, 50, 60, 60]], dtype=float),  # a1, a2
        np.array([[0, 0, 20, 20]], dtype=float),  # b1
    ]
    preds = [
        np.array(
            [
                pred(1, 1, 9, 9, 0.9),  # hits a1
                pred(100, 100, 110, 110, 0.8),  # FP
                pred(0, 0, 10, 10, 0.7),  # hits a1 again: neither TP nor FP
                # Centre (48, 55) outside a2, but IoU = 60 / 200 = 0.3 exactly: a hit.
                pred(40, 50, 56, 60, 0.4),
            ]
        ),
        np.array(
            [
                pred(60, 60, 70, 70, 0.85),  # FP
                pred(8, 8, 12, 12, 0.5),  # IoU 0.04, but centre inside b1: a hit
            ]
        ),
    ]
    return preds, gts


def test_froc_hand_case() -> None:
    # Curve, by falling threshold: .9 (0 FP/img, 1/3) .85 (0.5, 1/3) .8 (1, 1/3) .7 (1, 1/3)
    # .5 (1, 2/3) .4 (1, 1). Had the duplicate at .7 counted as FP, 1 FP/img would give 1/3.
    preds, gts = froc_hand_case()
    result = froc(preds, gts)
    expected = [1 / 3, 1 / 3, 1 / 3, 1, 1, 1, 1]
    np.testing.assert_allclose(result["sensitivity_at_rates"], expected)
    assert result["cpm"] == pytest.approx(5 / 7)
    np.testing.assert_allclose(result["fps_per_image"], [0, 0, 0.5, 1, 1, 1, 1])
    np.testing.assert_allclose(result["sensitivity"], [0, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    assert result["thresholds"][0] == np.inf
    assert (result["n_images"], result["n_gt"]) == (2, 3)


def test_froc_hit_rules() -> None:
    preds, gts = froc_hand_case()
    # Without the IoU rule the last A prediction (centre outside a2) is an FP: 1.5 FP/img at the end.
    center = froc(preds, gts, hit="center")
    assert center["sensitivity_at_rates"][-1] == pytest.approx(2 / 3)
    assert center["fps_per_image"][-1] == pytest.approx(1.5)
    # Without the centre rule the small box in b1 (IoU 0.04) is an FP and b1 is missed.
    iou = froc(preds, gts, hit="iou")
    assert iou["sensitivity_at_rates"][-1] == pytest.approx(2 / 3)
    # The centre may lie on the GT border: the right edge (x = 10) or the top-left corner (0, 0),
    # with IoU far below 0.3 in both cases.
    box = np.array([[0, 0, 10, 10]], dtype=float)
    on_border = [np.array([pred(8, 4, 12, 6, 0.9)]), np.array([pred(-2, -1, 2, 1, 0.9)])]
    assert froc(on_border, [box, box], hit="center")["cpm"] == 1.0
    with pytest.raises(ValueError, match="hit must be one of"):
        froc(preds, gts, hit="centre")


def test_froc_edge_cases() -> None:
    box = np.array([[0, 0, 10, 10]], dtype=float)
    no_preds = froc([NO_PREDS, NO_PREDS], [box, NO_GT])
    assert no_preds["cpm"] == 0.0
    np.testing.assert_array_equal(no_preds["sensitivity"], [0.0])
    no_gt = froc([np.array([pred(0, 0, 1, 1, 0.5)])], [NO_GT])
    assert math.isnan(no_gt["cpm"])
    np.testing.assert_array_equal(no_gt["fps_per_image"], [0.0, 1.0])
    assert math.isnan(froc([], [])["cpm"])


def test_froc_tied_scores_enter_together() -> None:
    box = np.array([[0, 0, 10, 10]], dtype=float)
    # A hit and an FP at the same score: there is no operating point with the hit but not the FP.
    preds = [np.array([pred(0, 0, 10, 10, 0.5), pred(50, 50, 60, 60, 0.5)])]
    result = froc(preds, [box], fp_rates=(0.5, 1.0))
    np.testing.assert_allclose(result["sensitivity_at_rates"], [0.0, 1.0])


# --------------------------------------------------------------------------------------------------
# Image AUROC


def test_image_auroc_hand_case() -> None:
    box = np.array([[0, 0, 10, 10]], dtype=float)
    far = [50, 50, 60, 60]
    preds = [
        np.array([[*far, 0.2], [*far, 0.9]]),  # positive, image score = max = 0.9
        np.array([[*far, 0.4]]),  # positive, 0.4
        NO_PREDS,  # positive, 0
        np.array([[*far, 0.5]]),  # negative, 0.5
        NO_PREDS,  # negative, 0
    ]
    gts = [box, box, box, NO_GT, NO_GT]
    # Pairs (pos, neg): 0.9 beats both (2); 0.4 loses to 0.5, beats 0 (1); 0 loses, ties (0.5).
    assert image_auroc(preds, gts) == pytest.approx(3.5 / 6)


def test_image_auroc_single_class_is_nan() -> None:
    box = np.array([[0, 0, 10, 10]], dtype=float)
    assert math.isnan(image_auroc([NO_PREDS, NO_PREDS], [box, box]))
    assert math.isnan(image_auroc([NO_PREDS], [NO_GT]))


# --------------------------------------------------------------------------------------------------
# Bootstrap


def synthetic_detections(n_images: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Half the images hold one lesion; a noisy detector finds most of them and adds clutter."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for i in range(n_images):
        g = np.empty((0, 4))
        boxes = []
        if i % 2 == 0:
            xy = rng.uniform(0, 200, size=2)
            g = np.array([[*xy, *(xy + 30)]])
            if rng.uniform() < 0.8:
                boxes.append([*(g[0] + rng.normal(0, 3, size=4)), rng.uniform(0.3, 1.0)])
        if rng.uniform() < 0.5:
            xy = rng.uniform(300, 400, size=2)
            boxes.append([*xy, *(xy + 30), rng.uniform(0.0, 0.7)])
        preds.append(np.array(boxes).reshape(-1, 5))
        gts.append(g)
    return preds, gts


def ap50(p: Sequence[np.ndarray], g: Sequence[np.ndarray]) -> float:
    return average_precision(p, g, 0.5)


def test_bootstrap_ci_contains_estimate_and_narrows() -> None:
    small = synthetic_detections(20, seed=1)
    large = synthetic_detections(200, seed=1)
    widths = []
    for preds, gts in (small, large):
        low, high = bootstrap_ci(ap50, preds, gts, None, n_boot=100, seed=0)
        assert low <= ap50(preds, gts) <= high
        assert low < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_bootstrap_ci_matches_normal_theory_for_a_mean() -> None:
    # For the mean of 200 iid values, a 95 % interval is about mean +- 1.96 standard errors
    # (a 90 % one would be 16 % narrower).
    rng = np.random.default_rng(5)
    scores = rng.uniform(0, 1, size=200)
    preds = [np.array([pred(0, 0, 1, 1, s)]) for s in scores]
    gts = [NO_GT] * len(preds)

    def mean_score(p: Sequence[np.ndarray], g: Sequence[np.ndarray]) -> float:
        return float(np.mean([x[0, 4] for x in p]))

    low, high = bootstrap_ci(mean_score, preds, gts, None, n_boot=2000, alpha=0.05)
    standard_error = scores.std() / np.sqrt(scores.size)
    assert (high - low) / (2 * 1.96 * standard_error) == pytest.approx(1.0, abs=0.07)
    assert (low + high) / 2 == pytest.approx(scores.mean(), abs=0.2 * standard_error)


def test_bootstrap_ci_resamples_patients_not_images() -> None:
    preds, gts = synthetic_detections(12, seed=2)
    # One patient: every resample is the whole set, so the interval collapses to the estimate.
    low, high = bootstrap_ci(ap50, preds, gts, ["p"] * 12, n_boot=20)
    assert low == high == pytest.approx(ap50(preds, gts))
    # Per-image resampling of the same data does vary.
    low, high = bootstrap_ci(ap50, preds, gts, None, n_boot=20)
    assert low < high
    # Same seed, same interval.
    assert bootstrap_ci(ap50, preds, gts, None, n_boot=20) == (low, high)
    with pytest.raises(ValueError, match="patient_ids has 3 entries"):
        bootstrap_ci(ap50, preds, gts, ["a", "b", "c"])


# --------------------------------------------------------------------------------------------------
# Calibration


def test_calibration_curve_hand_case() -> None:
    box = np.array([[0, 0, 10, 10]], dtype=float)
    preds = [
        np.array(
            [
                pred(0, 0, 10, 10, 0.95),  # TP, bin 9
                pred(0, 0, 10, 10, 0.85),  # duplicate: not TP, bin 8
                pred(50, 50, 60, 60, 0.15),  # FP, bin 1
            ]
        ),
        np.array([pred(0, 0, 10, 8, 1.0)]),  # TP, score 1 falls in the last bin
        np.array([pred(0, 0, 10, 10, 0.5)]),  # TP, an edge score goes to the bin above: 5
    ]
    cal = calibration_curve(preds, [box, box, box], n_bins=10)
    np.testing.assert_array_equal(cal["count"], [0, 1, 0, 0, 0, 1, 0, 0, 1, 2])
    np.testing.assert_allclose(cal["mean_score"][[1, 5, 8, 9]], [0.15, 0.5, 0.85, 0.975])
    np.testing.assert_allclose(cal["fraction_tp"][[1, 5, 8, 9]], [0.0, 1.0, 0.0, 1.0])
    assert np.isnan(cal["mean_score"][0])
    assert cal["ece"] == pytest.approx((0.15 + 0.5 + 0.85 + 2 * 0.025) / 5)
    with pytest.raises(ValueError, match="scores in"):
        calibration_curve([np.array([pred(0, 0, 1, 1, 1.5)])], [NO_GT])
    assert math.isnan(calibration_curve([NO_PREDS], [box])["ece"])


# --------------------------------------------------------------------------------------------------
# Headline dict


def test_evaluate_detections_keys_and_values() -> None:
    preds, gts = froc_hand_case()
    metrics = evaluate_detections(preds, gts)
    expected_froc = {
        "froc_0.125": 1 / 3,
        "froc_0.25": 1 / 3,
        "froc_0.5": 1 / 3,
        "froc_1": 1.0,
        "froc_2": 1.0,
        "froc_4": 1.0,
        "froc_8": 1.0,
    }
    for key, value in expected_froc.items():
        assert metrics[key] == pytest.approx(value)
    assert metrics["cpm"] == pytest.approx(5 / 7)
    assert metrics["sens_at_1fp"] == metrics["froc_1"]
    assert metrics["ap50"] == pytest.approx(average_precision(preds, gts, 0.5))
    assert metrics["map"] == pytest.approx(coco_map(preds, gts)["map"])
    assert metrics["rsna"] == pytest.approx(rsna_score(preds, gts))
    assert (metrics["n_images"], metrics["n_gt"], metrics["n_pred"]) == (2, 3, 6)
    assert math.isnan(metrics["auroc"])  # both images are positive
    assert not any(k.endswith("_ci_low") for k in metrics)
    assert all(isinstance(v, float) for v in metrics.values())


def test_evaluate_detections_bootstrap_and_empty_predictions() -> None:
    preds, gts = synthetic_detections(30, seed=3)
    metrics = evaluate_detections(preds, gts, patient_ids=[i // 3 for i in range(30)], n_boot=30)
    for name in ("ap50", "cpm", "sens_at_1fp", "auroc"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
    # A detector that predicts nothing: zeros where defined, chance-level AUROC.
    blank = evaluate_detections([NO_PREDS] * len(gts), gts)
    assert blank["ap50"] == blank["map"] == blank["cpm"] == blank["rsna"] == 0.0
    assert blank["auroc"] == 0.5
    assert blank["n_pred"] == 0.0


# --------------------------------------------------------------------------------------------------
# Several metrics and paired differences from one bootstrap


def test_bootstrap_cis_equal_separate_runs_with_the_same_seed() -> None:
    preds, gts = synthetic_detections(24, seed=5)
    patients = [i // 2 for i in range(24)]
    both = bootstrap_cis(
        {"ap50": ap50, "auroc": image_auroc}, preds, gts, patients, n_boot=40, seed=9
    )
    assert both["ap50"] == bootstrap_ci(ap50, preds, gts, patients, n_boot=40, seed=9)
    assert both["auroc"] == bootstrap_ci(image_auroc, preds, gts, patients, n_boot=40, seed=9)


def test_paired_bootstrap_of_a_detector_against_itself_is_zero() -> None:
    preds, gts = synthetic_detections(20, seed=6)
    assert paired_bootstrap_ci(ap50, preds, preds, gts, n_boot=30) == (0.0, 0.0)


def test_paired_bootstrap_sees_a_difference_that_separate_intervals_blur() -> None:
    # Detector B is A with one found lesion in four lost: always a little worse, patient by
    # patient. Its interval overlaps A's, but the paired difference stays above zero.
    preds, gts = synthetic_detections(80, seed=7)
    worse = []
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        hits = (
            box_iou(p[:, :4], g).max(axis=1) >= 0.5 if len(g) and len(p) else np.zeros(len(p), bool)
        )
        worse.append(p[~hits] if i % 8 == 0 else p)
    a = bootstrap_ci(ap50, preds, gts, n_boot=100)
    b = bootstrap_ci(ap50, worse, gts, n_boot=100)
    low, high = paired_bootstrap_ci(ap50, preds, worse, gts, n_boot=100)
    assert b[1] > a[0]  # the separate intervals overlap
    assert 0.0 < low <= high
    assert low <= ap50(preds, gts) - ap50(worse, gts) <= high


# --------------------------------------------------------------------------------------------------
# Subgroups, operating point and lesion strata


def test_subgroup_metrics_score_each_group_as_its_own_test_set() -> None:
    preds, gts = froc_hand_case()
    groups = {"site": ["A", "B"]}
    table = subgroup_metrics(preds, gts, groups)
    assert list(table["site"]) == ["A", "B"]
    for k, site in enumerate("AB"):
        alone = evaluate_detections([preds[k]], [gts[k]])
        for metric in ("ap50", "sens_at_1fp", "cpm"):
            assert table["site"][site][metric] == pytest.approx(alone[metric])
        assert table["site"][site]["n_gt"] == len(gts[k])
    # Image A has one FP at 0.8 before its second lesion is hit: within A alone, 1 FP/image
    # reaches both a1 and a2 (the hit at 0.4), where the pooled curve only got a1 by then.
    assert table["site"]["A"]["sens_at_1fp"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="groups"):
        subgroup_metrics(preds, gts, {"site": ["A"]})


def test_subgroups_are_listed_in_a_readable_order() -> None:
    preds, gts = synthetic_detections(5, seed=1)
    ages = ["65+", "unknown", "<50", "50-64", "<50"]
    assert list(subgroup_metrics(preds, gts, {"age": ages})["age"]) == [
        "<50", "50-64", "65+", "unknown",
    ]  # fmt: skip
    sexes = ["M", "F", "unknown", "F", "M"]
    assert list(subgroup_metrics(preds, gts, {"sex": sexes})["sex"]) == ["F", "M", "unknown"]


def test_subgroup_intervals_come_with_a_bootstrap() -> None:
    preds, gts = synthetic_detections(24, seed=8)
    table = subgroup_metrics(preds, gts, {"half": ["x"] * 12 + ["y"] * 12}, n_boot=30)
    for entry in table["half"].values():
        assert entry["ap50_ci_low"] <= entry["ap50"] <= entry["ap50_ci_high"]
        assert entry["sens_at_1fp_ci_low"] <= entry["sens_at_1fp"] <= entry["sens_at_1fp_ci_high"]


def test_flat_subgroup_keys_are_valid_metric_names() -> None:
    table = {"manufacturer": {"Aurora Imaging": {"ap50": 0.5}}, "age_band": {"<50": {"n_gt": 3}}}
    flat = flatten_subgroups(table)
    assert flat == {
        "subgroup.manufacturer.aurora_imaging.ap50": 0.5,
        "subgroup.age_band.lt50.n_gt": 3.0,
    }
    assert (
        metric_key_part("65+") == "65plus" and metric_key_part("Meridian X-Ray") == "meridian_x-ray"
    )
    assert metric_key_part("") == "unknown"


@pytest.mark.parametrize(
    ("age", "band"), [(18.0, "<50"), (49.9, "<50"), (50.0, "50-64"), (64.9, "50-64"), (65.0, "65+")]
)
def test_age_bands(age: float, band: str) -> None:
    assert age_band(age) == band
    assert age_band(float("nan")) == "unknown"


def test_size_bands_at_their_edges() -> None:
    assert [size_band(d) for d in (5.9, 8.0, 11.99, 12.0, 19.9, 20.0, 31.0)] == [
        "<8mm", "8-12mm", "8-12mm", "12-20mm", "12-20mm", ">=20mm", ">=20mm",
    ]  # fmt: skip


def test_operating_threshold_and_lesion_sensitivity_hand_case() -> None:
    # The hand case's curve reaches 1 FP/image at threshold 0.8 and keeps it down to 0.4.
    preds, gts = froc_hand_case()
    threshold = operating_threshold(preds, gts, 1.0)
    assert threshold == pytest.approx(0.4)
    assert operating_threshold(preds, gts, 0.5) == pytest.approx(0.85)
    bands = [["small", "big"], ["big"]]
    assert lesion_sensitivity(preds, gts, bands, threshold) == {"small": (1, 1), "big": (2, 2)}
    # At 0.85 only a1 (score 0.9) is found.
    assert lesion_sensitivity(preds, gts, bands, 0.85) == {"small": (1, 1), "big": (0, 2)}
    with pytest.raises(ValueError, match="names"):
        lesion_sensitivity(preds, gts, [["small"], ["big"]], threshold)


# --------------------------------------------------------------------------------------------------
# Plots with more than one detector


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _has_colour(rgb: np.ndarray, colour: tuple[int, int, int], tol: int = 40) -> bool:
    return bool((np.abs(rgb - np.array(colour)).sum(axis=-1) < tol).any())


def test_froc_and_pr_plots_draw_every_detector(tmp_path: Path) -> None:
    preds, gts = synthetic_detections(20, seed=2)
    other = [p[:1] for p in preds]
    orange = (255, 127, 14)  # matplotlib tab:orange, the second detector's colour
    plot_froc(froc(preds, gts), tmp_path / "alone.png")
    plot_froc(froc(preds, gts), tmp_path / "both.png", others={"baseline": froc(other, gts)})
    assert not _has_colour(_pixels(tmp_path / "alone.png"), orange)
    assert _has_colour(_pixels(tmp_path / "both.png"), orange)
    plot_pr(preds, gts, tmp_path / "pr.png", others={"baseline": other})
    assert _has_colour(_pixels(tmp_path / "pr.png"), orange)


def test_detection_grid_draws_truth_and_each_detector(tmp_path: Path) -> None:
    images = [np.zeros((64, 64)), np.zeros((64, 64))]
    gts = [np.array([[10.0, 10.0, 30.0, 30.0]]), np.zeros((0, 4))]
    deep = [np.array([[12.0, 12.0, 28.0, 28.0, 0.9]]), np.zeros((0, 5))]
    none = [np.zeros((0, 5)), np.zeros((0, 5))]
    path = plot_detection_grid(images, gts, {"deep": deep, "other": none}, tmp_path / "g.png")
    rgb = _pixels(path)
    assert _has_colour(rgb, (0, 255, 0)) and _has_colour(rgb, (255, 0, 0))
    with pytest.raises(ValueError, match="at least one"):
        plot_detection_grid([], [], {}, tmp_path / "empty.png")
