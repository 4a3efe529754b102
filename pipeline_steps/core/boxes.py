"""Boxes: the one IoU and the one non-maximum suppression used by training, testing, serving,
label fusion and the classical baseline. Boxes are ``(n, 4)`` corner arrays ``x_min, y_min, x_max, y_max``
(a fifth column, the score, is ignored where present); areas are continuous, as in pycocotools."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


# --------------------------------------------------------------------------------------------------
# Input checking


def as_boxes(array: ArrayLike, n_cols: int, what: str) -> FloatArray:
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


# --------------------------------------------------------------------------------------------------
# IoU and suppression


def check_inputs(
    preds: Sequence[ArrayLike], gts: Sequence[ArrayLike]
) -> tuple[list[FloatArray], list[FloatArray]]:
    if len(preds) != len(gts):
        raise ValueError(
            f"preds and gts must be aligned by image, got {len(preds)} and {len(gts)} images"
        )
    checked_preds = [as_boxes(p, 5, f"preds[{i}]") for i, p in enumerate(preds)]
    checked_gts = [as_boxes(g, 4, f"gts[{i}]") for i, g in enumerate(gts)]
    return checked_preds, checked_gts


def box_iou(a: ArrayLike, b: ArrayLike) -> FloatArray:
    """Pairwise IoU of ``(n, 4)`` and ``(m, 4)`` corner boxes, as an ``(n, m)`` array.

    Two zero-area boxes have IoU 0 (not nan).
    """
    return _pairwise_iou(as_boxes(a, 4, "a"), as_boxes(b, 4, "b"))


def _pairwise_iou(a: FloatArray, b: FloatArray) -> FloatArray:
    """`box_iou` on arrays already checked."""
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(width, 0.0, None) * np.clip(height, 0.0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def non_max_suppression(boxes: ArrayLike, iou_threshold: float, limit: int) -> np.ndarray:
    """Greedy NMS over ``(n, 5)`` boxes sorted by descending score; keeps at most ``limit``.

    A box is dropped when its IoU with a kept, higher-scoring box exceeds ``iou_threshold``."""
    given = np.asarray(boxes)
    checked = as_boxes(given, 5, "boxes")
    # One IoU matrix up front: n is small (the decoder's top-k, the baseline's candidates).
    ious = _pairwise_iou(checked[:, :4], checked[:, :4])
    kept: list[int] = []
    suppressed = np.zeros(len(checked), bool)
    for i in range(len(checked)):
        if suppressed[i]:
            continue
        kept.append(i)
        if len(kept) == limit:
            break
        suppressed[i + 1 :] |= ious[i, i + 1 :] > iou_threshold
    return given[kept]  # in the caller's dtype
