"""The one IoU and the one NMS (core/boxes), which training, testing, serving, label fusion and the
classical baseline all use."""

import numpy as np
import pytest

from pipeline_steps.core.boxes import box_iou, non_max_suppression

NO_GT = np.empty((0, 4))


def test_box_iou_known_boxes() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    b = np.array(
        [
            [5, 5, 15, 15],  # overlap 25, union 175
            [0, 0, 10, 10],  # identical
            [0, 0, 5, 10],  # contained, half the area
            [10, 0, 20, 10],  # touching edge: no overlap
            [30, 30, 40, 40],  # disjoint
        ],
        dtype=float,
    )
    iou = box_iou(a, b)
    assert iou.shape == (2, 5)
    np.testing.assert_allclose(iou[0], [1 / 7, 1.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(box_iou(b, a), iou.T)


def test_box_iou_empty_and_degenerate() -> None:
    assert box_iou(NO_GT, np.array([[0, 0, 1, 1]])).shape == (0, 1)
    assert box_iou(np.array([[0, 0, 1, 1]]), []).shape == (1, 0)
    # Two zero-area boxes at the same place: 0, not nan.
    assert box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0, 0] == 0.0


def test_box_iou_one_box_against_none_is_empty_not_an_error() -> None:
    # Label fusion starts with no fused boxes: the first box must get an empty row, not nan or a raise.
    iou = box_iou(np.array([[0.0, 0, 4, 4]]), np.zeros((0, 4)))
    assert iou.shape == (1, 0)


def test_box_iou_rejects_inverted_or_non_finite_boxes() -> None:
    with pytest.raises(ValueError, match="x_max < x_min"):
        box_iou([[5, 0, 1, 1]], NO_GT)
    with pytest.raises(ValueError, match="nan or inf"):
        box_iou([[0, 0, np.nan, 1]], NO_GT)


def test_nms_keeps_the_best_of_overlapping_boxes_and_respects_the_limit() -> None:
    boxes = np.array(
        [
            [0, 0, 10, 10, 0.9],
            [1, 0, 11, 10, 0.8],  # IoU 9/11 with the first: suppressed
            [20, 20, 30, 30, 0.7],
            [40, 40, 50, 50, 0.6],
        ],
        dtype=np.float32,
    )
    kept = non_max_suppression(boxes, iou_threshold=0.3, limit=10)
    np.testing.assert_array_equal(kept[:, 4], np.float32([0.9, 0.7, 0.6]))
    assert kept.dtype == np.float32  # the caller's dtype comes back
    assert len(non_max_suppression(boxes, iou_threshold=0.3, limit=2)) == 2


def test_nms_threshold_is_strict() -> None:
    # IoU exactly 0.5: kept at threshold 0.5 (only IoU above it suppresses), dropped below it.
    boxes = np.array([[0, 0, 10, 10, 0.9], [0, 0, 10, 5, 0.8]])
    assert len(non_max_suppression(boxes, iou_threshold=0.5, limit=5)) == 2
    assert len(non_max_suppression(boxes, iou_threshold=0.49, limit=5)) == 1


def test_nms_of_nothing_is_nothing() -> None:
    assert non_max_suppression(np.zeros((0, 5)), 0.3, 5).shape == (0, 5)
