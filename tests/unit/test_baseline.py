"""The classical detector on tiny synthetic thoraxes: lung mask, LoG blobs, features, fitting."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_steps.core.baseline import (
    FEATURES,
    blob_features,
    blob_sigmas,
    downsample,
    feature_names,
    finalize,
    find_blobs,
    fit_baseline,
    hits_lesion,
    lung_mask,
    otsu_threshold,
    scale_space,
    working_factor,
)
from pipeline_steps.core.config import BaselineParams
from pipeline_steps.core.metrics import average_precision, froc

S = 96
SPACING = 1.4  # mm per pixel, as preprocessing gives by default
LUNG_CENTRES = (28.0, 68.0)  # 14 px half-width: a 12 px mediastinum between them
PARAMS = BaselineParams(max_candidates=40, lung_margin_mm=4.0, trees=60)


def _thorax(rng: np.random.Generator) -> np.ndarray:
    """Black surround, a bright body, two dark noisy lungs and a bright mediastinum between."""
    yy, xx = np.mgrid[:S, :S] + 0.5
    image = np.zeros((S, S))
    image[8:88, 8:88] = 0.75
    for cx in LUNG_CENTRES:
        lung = ((xx - cx) / 14) ** 2 + ((yy - 48) / 32) ** 2 <= 1
        image[lung] = 0.3
    image += 0.02 * rng.standard_normal((S, S))
    image[:8], image[88:], image[:, :8], image[:, 88:] = 0, 0, 0, 0
    return image


def _disc(image: np.ndarray, cx: float, cy: float, r: float, contrast: float) -> np.ndarray:
    yy, xx = np.mgrid[:S, :S] + 0.5
    soft = np.clip(r + 0.5 - np.hypot(xx - cx, yy - cy), 0, 1)  # anti-aliased edge
    return image + contrast * soft


def _examples(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Half the thoraxes hold one nodule (radius 3-6 px) in a lung, half none."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = _thorax(rng)
        boxes = np.zeros((0, 4))
        if i % 2 == 0:
            r = rng.uniform(3, 6)
            cx = rng.choice(LUNG_CENTRES) + rng.uniform(-4, 4)
            cy = 48 + rng.uniform(-18, 18)
            image = _disc(image, cx, cy, r, rng.uniform(0.15, 0.25))
            boxes = np.array([[cx - r, cy - r, cx + r, cy + r]])
        out.append((np.clip(image, 0, 1).astype(np.float32), boxes))
    return out


def test_otsu_threshold_splits_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.03, 500), rng.normal(0.8, 0.03, 500)])
    assert 0.3 < otsu_threshold(values) < 0.7
    assert otsu_threshold(np.full(10, 0.4)) == pytest.approx(0.4)


def test_lung_mask_covers_the_lungs_not_the_body_or_the_surround() -> None:
    image = _thorax(np.random.default_rng(1))
    mask = lung_mask(image, margin_px=3)
    yy, xx = np.mgrid[:S, :S] + 0.5
    lungs = np.zeros((S, S), bool)
    for cx in LUNG_CENTRES:
        lungs |= ((xx - cx) / 14) ** 2 + ((yy - 48) / 32) ** 2 <= 1
    overlap = (mask & lungs).sum() / (mask | lungs).sum()
    assert overlap > 0.85
    assert not mask[:8].any() and not mask[48, 45:51].any()  # surround, mediastinum


def test_lung_mask_keeps_a_dense_nodule_inside() -> None:
    image = _disc(_thorax(np.random.default_rng(2)), 28.0, 48.0, 5.0, 0.5)
    assert lung_mask(image, margin_px=3)[48, 28]


def test_find_blobs_locates_a_blob_at_its_scale() -> None:
    image = _disc(np.full((S, S), 0.3), 40.5, 52.5, 5.0, 0.3)
    sigmas = blob_sigmas(PARAMS, SPACING)
    blobs, _ = find_blobs(scale_space(image, sigmas), np.ones((S, S), bool), 5)
    assert (blobs.x[0], blobs.y[0]) == pytest.approx((40.5, 52.5), abs=1.0)
    # A disc of radius r peaks near sigma = r / sqrt(2).
    assert blobs.sigma[0] == pytest.approx(5 / np.sqrt(2), rel=0.3)
    assert blobs.response[0] > 0 and np.all(np.diff(blobs.response) <= 0)


def test_find_blobs_ignores_dark_blobs_and_respects_the_mask() -> None:
    sigmas = blob_sigmas(PARAMS, SPACING)
    dark = _disc(np.full((S, S), 0.5), 40.5, 40.5, 5.0, -0.3)
    blobs, _ = find_blobs(scale_space(dark, sigmas), np.ones((S, S), bool), 5)
    assert not np.any(np.hypot(blobs.x - 40.5, blobs.y - 40.5) < 3)
    bright = _disc(np.full((S, S), 0.3), 40.5, 40.5, 5.0, 0.3)
    outside = np.ones((S, S), bool)
    outside[30:52, 30:52] = False
    blobs, _ = find_blobs(scale_space(bright, sigmas), outside, 5)
    assert not np.any(np.hypot(blobs.x - 40.5, blobs.y - 40.5) < 3)


def test_features_tell_a_round_blob_from_a_ridge() -> None:
    image = np.full((S, S), 0.3)
    image = _disc(image, 30.5, 48.5, 4.0, 0.3)
    image[:, 70:73] += 0.3  # a vertical rib-like ridge
    sigmas = blob_sigmas(PARAMS, SPACING)
    space = scale_space(image, sigmas)
    mask = np.ones((S, S), bool)
    blobs, index = find_blobs(space, mask, 200)
    features = blob_features(mask, space, blobs, index)
    assert features.shape == (len(blobs), len(feature_names(len(sigmas))))
    isotropy = features[:, FEATURES.index("hessian_isotropy")]
    on_blob = np.hypot(blobs.x - 30.5, blobs.y - 48.5) < 2
    on_ridge = np.abs(blobs.x - 71.5) < 2
    assert on_blob.any() and on_ridge.any()
    assert isotropy[on_blob].max() > 0.7 > 0.3 > isotropy[on_ridge].max()


def test_hits_lesion_uses_the_centre_rule() -> None:
    truth = np.array([[10.0, 10.0, 20.0, 20.0]])
    boxes = np.array([[12, 12, 18, 18], [18, 18, 30, 30], [21, 10, 25, 20]], float)
    np.testing.assert_array_equal(hits_lesion(boxes, truth), [True, False, False])
    assert hits_lesion(boxes, np.zeros((0, 4))).tolist() == [False] * 3


def test_working_factor_and_downsample_keep_the_cost_constant() -> None:
    assert working_factor(1.4, PARAMS) == 1
    assert working_factor(0.7, PARAMS) == 2
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(downsample(image, 2), [[2.5, 4.5], [10.5, 12.5]])


def test_finalize_applies_floor_nms_and_cap() -> None:
    dets = np.array(
        [
            [0, 0, 10, 10, 0.9],
            [1, 1, 11, 11, 0.8],  # overlaps the first: suppressed
            [30, 30, 40, 40, 0.5],
            [50, 50, 60, 60, 0.05],  # below the floor
            [70, 70, 80, 80, 0.4],
        ]
    )
    out = finalize(dets, score_floor=0.1, nms_iou=0.3, max_detections=2)
    np.testing.assert_allclose(out[:, 4], [0.9, 0.5])


@pytest.fixture(scope="module")
def fitted() -> object:
    return fit_baseline(_examples(40, seed=3), PARAMS, SPACING)


def test_fitted_baseline_ranks_nodules_above_the_background(fitted: object) -> None:
    held_out = _examples(20, seed=4)
    preds = [
        finalize(fitted(image), 0.01, 0.3, 5)  # type: ignore[operator]
        for image, _ in held_out
    ]
    gts = [boxes for _, boxes in held_out]
    assert fitted.radius_per_sigma == pytest.approx(np.sqrt(2), rel=0.35)  # type: ignore[attr-defined]
    # Clear nodules on a smooth lung: the classical detector must find nearly all of them.
    assert froc(preds, gts)["sensitivity_at_rates"][3] >= 0.8  # at 1 FP/image
    assert average_precision(preds, gts, 0.5) > 0.6
    assert all(((p[:, 4] >= 0) & (p[:, 4] <= 1)).all() for p in preds)


def test_fitted_baseline_boxes_scale_back_from_the_working_resolution(fitted: object) -> None:
    # The same thorax at twice the resolution (0.7 mm): worked on at 1.4 mm, boxes come back x2.
    image, boxes = _examples(1, seed=5)[0]
    fine = fit_baseline(
        [(np.kron(im, np.ones((2, 2), np.float32)), b * 2) for im, b in _examples(40, seed=3)],
        PARAMS,
        SPACING / 2,
    )
    big = np.kron(image, np.ones((2, 2), np.float32))
    top = finalize(fine(big), 0.01, 0.3, 1)[0]
    np.testing.assert_allclose(top[:4], boxes[0] * 2, atol=5.0)


def test_a_baseline_without_lesions_to_learn_from_finds_nothing() -> None:
    negatives = [(image, boxes) for image, boxes in _examples(6, seed=6) if len(boxes) == 0]
    detector = fit_baseline(negatives, PARAMS, SPACING)
    assert detector.classifier is None
    assert detector(negatives[0][0]).shape == (0, 5)
    assert fit_baseline([], PARAMS, SPACING).classifier is None
