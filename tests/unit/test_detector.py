"""Detector pieces on hand-made arrays: target encoding, decoding, losses, shapes, augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline_steps.core.augment import (
    LesionPaste,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScaleShift,
    build_lesion_bank,
    lesion_residual,
)
from pipeline_steps.core.config import DetectionParams, TrainParams
from pipeline_steps.core.detector import (
    HEATMAP_PRIOR,
    STRIDE,
    build_detector,
    decode_detections,
    encode_targets,
    focal_heatmap_loss,
    fuse_flipped,
    gaussian_derivative_kernels,
    masked_l1_loss,
    pack_targets,
    predict_outputs,
)
from pipeline_steps.core.train_input import make_train_dataset, samples_per_epoch, shuffled

S = 64
N_CELLS = S // STRIDE


def _reconstruct(targets: dict[str, np.ndarray]) -> np.ndarray:
    """Boxes back from dense targets, the way the decoder reads them."""
    iy, ix = np.nonzero(targets["mask"])
    w, h = targets["size"][iy, ix].T * STRIDE
    cx = (ix + targets["offset"][iy, ix, 0]) * STRIDE
    cy = (iy + targets["offset"][iy, ix, 1]) * STRIDE
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


# -- encode_targets ---------------------------------------------------------------------------


def test_encode_puts_unit_peak_at_centre_cell_and_reconstructs_box() -> None:
    box = np.array([[21.0, 30.0, 35.0, 41.0]], np.float32)  # centre (28, 35.5) -> cell (7, 8)
    targets = encode_targets(box, S)

    heat = targets["heatmap"]
    assert heat.shape == (N_CELLS, N_CELLS)
    assert heat[8, 7] == 1.0
    assert np.unravel_index(np.argmax(heat), heat.shape) == (8, 7)
    assert np.count_nonzero(heat == 1.0) == 1
    # A gaussian bump, not a lone spike: neighbours are positive but lower.
    assert 0 < heat[8, 8] < 1 and 0 < heat[7, 7] < 1
    assert targets["mask"].sum() == 1 and targets["mask"][8, 7] == 1
    np.testing.assert_allclose(targets["size"][8, 7], [14 / STRIDE, 11 / STRIDE])
    np.testing.assert_allclose(targets["offset"][8, 7], [0.0, 0.875])
    np.testing.assert_allclose(_reconstruct(targets), box, atol=1e-5)


def test_encode_several_boxes_and_none() -> None:
    boxes = np.array([[4, 4, 12, 14], [40, 44, 60, 60], [30, 5, 34, 9]], np.float32)
    targets = encode_targets(boxes, S)
    assert targets["mask"].sum() == 3
    rebuilt = _reconstruct(targets)
    # Reconstruction comes back in raster order; compare as sets of rows.
    order = lambda b: b[np.lexsort((b[:, 0], b[:, 1]))]  # noqa: E731
    np.testing.assert_allclose(order(rebuilt), order(boxes), atol=1e-5)

    empty = encode_targets(np.zeros((0, 4), np.float32), S)
    assert not empty["heatmap"].any() and not empty["mask"].any()
    assert pack_targets(empty).shape == (N_CELLS, N_CELLS, 6)


# -- decode_detections ------------------------------------------------------------------------


def _outputs_with(peaks: list[tuple[int, int, float, float, float]]) -> np.ndarray:
    """(1, H, W, 5) output with given (row, col, score, width_px, height_px) peaks, offset 0.5."""
    out = np.zeros((1, N_CELLS, N_CELLS, 5), np.float32)
    for row, col, score, w, h in peaks:
        out[0, row, col] = (score, w / STRIDE, h / STRIDE, 0.5, 0.5)
    return out


def _box(row: int, col: int, w: float, h: float) -> list[float]:
    cx, cy = (col + 0.5) * STRIDE, (row + 0.5) * STRIDE
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def test_decode_returns_boxes_above_threshold_sorted_by_score() -> None:
    out = _outputs_with([(3, 4, 0.6, 8, 10), (10, 12, 0.9, 12, 6), (12, 2, 0.2, 8, 8)])
    params = DetectionParams(score_threshold=0.3, nms_iou=0.3, max_detections=5)
    (dets,) = decode_detections(out, params, S)
    expected = np.array([_box(10, 12, 12, 6) + [0.9], _box(3, 4, 8, 10) + [0.6]], np.float32)
    np.testing.assert_allclose(dets, expected, atol=1e-5)

    (low,) = decode_detections(out, params.model_copy(update={"score_threshold": 0.1}), S)
    assert len(low) == 3 and low[-1, 4] == pytest.approx(0.2)


def test_decode_keeps_only_local_maxima() -> None:
    # A peak and its weaker 8-neighbour: the 3x3 max-pool keeps the peak alone.
    out = _outputs_with([(5, 5, 0.9, 8, 8), (5, 6, 0.8, 8, 8), (6, 6, 0.7, 8, 8)])
    (dets,) = decode_detections(out, DetectionParams(score_threshold=0.3, nms_iou=1.0), S)
    assert len(dets) == 1 and dets[0, 4] == pytest.approx(0.9)


def test_decode_applies_nms_and_max_detections() -> None:
    # Two peaks two cells apart (not neighbours) with big overlapping boxes: IoU 0.5.
    peaks = [(6, 6, 0.9, 24, 24), (6, 8, 0.8, 24, 24), (13, 13, 0.5, 8, 8)]
    out = _outputs_with(peaks)
    (dets,) = decode_detections(out, DetectionParams(score_threshold=0.3, nms_iou=0.3), S)
    np.testing.assert_allclose(dets[:, 4], [0.9, 0.5])
    (loose,) = decode_detections(out, DetectionParams(score_threshold=0.3, nms_iou=0.9), S)
    np.testing.assert_allclose(loose[:, 4], [0.9, 0.8, 0.5])
    (top,) = decode_detections(
        out, DetectionParams(score_threshold=0.3, nms_iou=0.9, max_detections=1), S
    )
    np.testing.assert_allclose(top[:, 4], [0.9])


def test_decode_clips_to_image_and_handles_empty_batch_items() -> None:
    out = np.concatenate([_outputs_with([(0, 0, 0.9, 20, 20)]), _outputs_with([])])
    dets = decode_detections(out, DetectionParams(), S)
    assert len(dets) == 2 and dets[1].shape == (0, 5)
    np.testing.assert_allclose(dets[0][0, :4], [0, 0, 12, 12])


def test_encode_then_decode_round_trip() -> None:
    boxes = np.array([[10, 12, 22, 20], [40, 40, 52, 56]], np.float32)
    packed = pack_targets(encode_targets(boxes, S))[None, ..., :5]
    (dets,) = decode_detections(packed, DetectionParams(score_threshold=0.5), S)
    order = np.argsort(dets[:, 0])
    np.testing.assert_allclose(dets[order, :4], boxes, atol=1e-4)


# -- losses -----------------------------------------------------------------------------------


def test_focal_loss_prefers_the_right_heatmap() -> None:
    targets = encode_targets(np.array([[20, 20, 32, 32]], np.float32), S)
    gt, mask = targets["heatmap"], targets["mask"]
    right = np.clip(gt, 0.001, 0.999)
    wrong = np.roll(right, 6, axis=1)  # the peak in the wrong place
    flat = np.full_like(gt, HEATMAP_PRIOR)
    loss_right = float(focal_heatmap_loss(gt, right, mask))
    loss_wrong = float(focal_heatmap_loss(gt, wrong, mask))
    loss_flat = float(focal_heatmap_loss(gt, flat, mask))
    assert loss_right < 0.1 < loss_flat < loss_wrong
    # Near-centre negatives are penalty-reduced: with the centre prediction held equal, a blob
    # around the true centre costs less than the same blob on far-away background.
    blob_near = 0.5 * gt
    blob_far = np.roll(0.5 * gt, 8, axis=0)
    blob_near[6, 6] = blob_far[6, 6] = 0.9  # the centre cell of box (20, 20, 32, 32)
    assert float(focal_heatmap_loss(gt, blob_near, mask)) < float(
        focal_heatmap_loss(gt, blob_far, mask)
    )


def test_l1_loss_only_counts_masked_cells() -> None:
    true = np.zeros((4, 4, 2), np.float32)
    pred = np.full((4, 4, 2), 5.0, np.float32)
    mask = np.zeros((4, 4), np.float32)
    mask[1, 2] = 1
    pred[1, 2] = (1.0, -1.0)
    assert float(masked_l1_loss(true, pred, mask)) == pytest.approx(2.0)
    assert float(masked_l1_loss(true, pred, np.zeros_like(mask))) == 0.0


# -- architecture -----------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "width", "depth"), [(64, 4, 2), (128, 8, 4)])
def test_build_detector_output_shape_and_prior(size: int, width: int, depth: int) -> None:
    model = build_detector(size, TrainParams(width=width, depth=depth))
    out = np.asarray(model(np.random.default_rng(0).random((2, size, size, 1), np.float32)))
    assert out.shape == (2, size // STRIDE, size // STRIDE, 5)
    heat = out[..., 0]
    assert ((heat > 0) & (heat < 1)).all()
    # The bias init makes an untrained heatmap start near the prior, not at 0.5.
    assert 0.001 < float(np.median(heat)) < 0.1


def test_build_detector_rejects_size_not_divisible_by_deepest_stride() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        build_detector(80, TrainParams(width=4, depth=4))


def test_gaussian_derivative_kernels_are_normalised() -> None:
    g, d1, d2 = gaussian_derivative_kernels(2.0)
    assert len(g) == 13 and g.sum() == pytest.approx(1.0)
    t = np.arange(-6, 7)
    # d1 is odd and gives a unit ramp's slope (times sigma); d2 is even, blind to a constant,
    # and gives a unit parabola's curvature (times sigma^2), up to the 3-sigma truncation.
    np.testing.assert_allclose(d1, -d1[::-1], atol=1e-7)
    np.testing.assert_allclose(d2, d2[::-1], atol=1e-7)
    assert float(np.sum(d1 * t)) == pytest.approx(-2.0, rel=0.02)
    assert float(np.sum(d2)) == pytest.approx(0.0, abs=1e-6)
    assert float(np.sum(d2 * t**2 / 2)) == pytest.approx(4.0, rel=0.1)


def test_hessian_channels_tell_blobs_from_lines() -> None:
    import keras

    model = build_detector(S, TrainParams(width=4, depth=2, hessian_sigmas=(2.0,)))
    hessian = keras.Model(model.inputs, model.get_layer("hessian_0_y").output)
    yy, xx = np.mgrid[:S, :S] + 0.5
    blob = np.exp(-((xx - 32) ** 2 + (yy - 32) ** 2) / (2 * 2.0**2))
    line = np.exp(-((xx - 32) ** 2) / (2 * 2.0**2)) * np.ones_like(yy)  # a vertical vessel
    out = np.asarray(hessian(np.stack([blob, line])[..., None].astype(np.float32)))
    lxx, lyy, lxy = out[0, 32, 32]
    assert lxx < -0.1 and lyy < -0.1 and abs(lxy) < 0.02  # both curvatures: a blob
    lxx, lyy, lxy = out[1, 32, 32]
    assert lxx < -0.1 and abs(lyy) < 0.01  # one curvature: a line
    # Fixed filters: nothing there is trained.
    assert not model.get_layer("hessian_0_x").trainable_weights


def test_wider_deeper_detector_has_more_parameters() -> None:
    small = build_detector(64, TrainParams(width=4, depth=2)).count_params()
    wide = build_detector(64, TrainParams(width=8, depth=2)).count_params()
    deep = build_detector(64, TrainParams(width=4, depth=3)).count_params()
    assert small < wide and small < deep


# -- augmentation and input pipeline ----------------------------------------------------------


def _disc_image(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:S, :S] + 0.5
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).astype(np.float32)


def _box_mean(image: np.ndarray, box: np.ndarray) -> float:
    x0, y0, x1, y1 = np.round(box).astype(int)
    return float(image[y0:y1, x0:x1].mean())


def test_flip_moves_boxes_with_the_image() -> None:
    image = _disc_image(14.0, 30.0, 5.0)
    boxes = np.array([[9, 25, 19, 35]], np.float32)
    flipped, fboxes = RandomHorizontalFlip(p=1.0)(image, boxes, np.random.default_rng(0))
    np.testing.assert_allclose(fboxes, [[45, 25, 55, 35]])
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    assert _box_mean(flipped, fboxes[0]) > 0.7


def test_scale_shift_keeps_boxes_on_the_object() -> None:
    image = _disc_image(30.0, 34.0, 6.0)
    boxes = np.array([[24, 28, 36, 40]], np.float32)
    transform = RandomScaleShift(scale=(0.8, 1.2), shift=0.1, p=1.0)
    for seed in range(10):
        out, moved = transform(image, boxes, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.float32
        assert len(moved) == 1
        # The disc fills ~pi/4 of its box wherever it went.
        assert _box_mean(out, moved[0]) > 0.6
        assert _box_mean(out, moved[0]) > 5 * float(out.mean())


def test_scale_shift_drops_boxes_pushed_out_of_the_image() -> None:
    boxes = np.array([[0, 20, 6, 26]], np.float32)
    transform = RandomScaleShift(scale=(1.0, 1.0), shift=0.2, p=1.0)
    kept = [
        len(transform(np.zeros((S, S), np.float32), boxes, np.random.default_rng(s))[1])
        for s in range(20)
    ]
    assert 0 in kept and 1 in kept


def test_shuffled_is_a_seeded_permutation() -> None:
    items = list(range(50))
    a = list(shuffled(items, 8, np.random.default_rng(1)))
    b = list(shuffled(items, 8, np.random.default_rng(1)))
    c = list(shuffled(items, 8, np.random.default_rng(2)))
    assert sorted(a) == items and a == b and a != c and a != items


def test_train_dataset_varies_by_epoch_and_replays_from_any_epoch() -> None:
    rng = np.random.default_rng(0)
    examples = [
        (rng.random((S, S), dtype=np.float32), np.array([[8, 8, 16, 20]], np.float32) + i)
        for i in range(10)
    ]
    params = TrainParams(batch_size=4, seed=3, paste_fraction=0.0)  # counts lesion centres

    def epochs(first_epoch: int, n: int) -> list[list[np.ndarray]]:
        dataset = make_train_dataset(lambda: iter(examples), len(examples), S, params, first_epoch)
        return [[np.asarray(x) for x, _ in dataset] for _ in range(n)]

    first, second = epochs(0, 2)
    (resumed,) = epochs(1, 1)
    assert [b.shape for b in first] == [(4, S, S, 1), (4, S, S, 1), (2, S, S, 1)]
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    np.testing.assert_array_equal(np.concatenate(second), np.concatenate(resumed))
    (_, targets), *_ = make_train_dataset(lambda: iter(examples), 10, S, params)
    assert targets.shape == (4, N_CELLS, N_CELLS, 6) and float(np.sum(targets[..., 5])) == 4


def test_decode_drops_non_finite_boxes() -> None:
    out = _outputs_with([(3, 3, 0.9, 8, 8), (10, 10, 0.8, 8, 8)])
    out[0, 3, 3, 1] = np.nan  # a diverged size head at the first peak
    (dets,) = decode_detections(out, DetectionParams(), S)
    assert np.isfinite(dets).all() and len(dets) == 1 and dets[0, 4] == pytest.approx(0.8)


# -- crops --------------------------------------------------------------------------------------


def test_lesion_crop_holds_the_lesion_and_its_box_follows() -> None:
    image = _disc_image(50.0, 12.0, 4.0)
    boxes = np.array([[46, 8, 54, 16]], np.float32)
    crop = RandomCrop(32, lesion_p=1.0)
    for seed in range(20):
        out, moved = crop(image, boxes, np.random.default_rng(seed))
        assert out.shape == (32, 32) and len(moved) == 1
        assert (moved >= 0).all() and (moved <= 32).all()
        np.testing.assert_allclose(moved[0, 2] - moved[0, 0], 8)  # whole, not clipped
        assert _box_mean(out, moved[0]) > 0.6


def test_random_crops_cover_the_image_and_drop_boxes_cut_in_half() -> None:
    image = np.zeros((S, S), np.float32)
    boxes = np.array([[0, 0, 10, 10]], np.float32)
    crop = RandomCrop(32, lesion_p=0.0)
    kept = []
    for seed in range(40):
        out, moved = crop(image, boxes, np.random.default_rng(seed))
        assert out.shape == (32, 32)
        kept.append(len(moved))
    assert 0 in kept and 1 in kept  # the corner lesion is in some crops and not in others
    # A crop as large as the image is the image itself.
    same, same_boxes = RandomCrop(S)(image, boxes, np.random.default_rng(0))
    assert same is image and same_boxes is boxes


def test_crop_dataset_yields_crops_per_image_and_lesion_rich_batches() -> None:
    rng = np.random.default_rng(1)
    examples = []
    for i in range(6):
        image = rng.random((S, S), dtype=np.float32) * 0.2
        examples.append(
            (
                image,
                np.array([[40, 40, 48, 48]], np.float32) if i % 2 else np.zeros((0, 4), np.float32),
            )
        )
    params = TrainParams(
        batch_size=6,
        crop_size=32,
        crops_per_image=3,
        lesion_crop_fraction=1.0,
        augment=False,
        paste_fraction=0.0,
    )
    assert samples_per_epoch(params, len(examples), S) == 18
    dataset = make_train_dataset(lambda: iter(examples), len(examples), S, params)
    batches = list(dataset)
    assert [int(x.shape[0]) for x, _ in batches] == [6, 6, 6]
    assert all(x.shape[1:] == (32, 32, 1) for x, _ in batches)
    # Every crop of a positive image holds its lesion: 3 positives x 3 crops = 9 centres.
    assert sum(float(np.sum(t[..., 5])) for _, t in batches) == 9


# -- flip test-time augmentation ----------------------------------------------------------------


def test_fuse_flipped_aligns_cells_and_mirrors_offsets() -> None:
    out = np.zeros((1, N_CELLS, N_CELLS, 5), np.float32)
    mirrored = np.zeros_like(out)
    # A peak at column 3 in the image is at column N_CELLS-1-3 in the mirror, with offset 1-o.
    out[0, 5, 3] = (0.8, 2.0, 3.0, 0.25, 0.6)
    mirrored[0, 5, N_CELLS - 1 - 3] = (0.6, 4.0, 3.0, 0.75, 0.4)
    fused = fuse_flipped(out, mirrored)
    np.testing.assert_allclose(fused[0, 5, 3], [0.7, 3.0, 3.0, 0.25, 0.5])
    # Both views place the centre at x = (3 + 0.25) cells, so the fused box centre does too.
    (dets,) = decode_detections(fused, DetectionParams(score_threshold=0.5), S)
    assert (dets[0, 0] + dets[0, 2]) / 2 == pytest.approx(3.25 * STRIDE)


def test_flip_tta_predictions_are_mirror_symmetric() -> None:
    # Whatever the weights, TTA output for a mirrored image is the mirrored TTA output.
    model = build_detector(S, TrainParams(width=4, depth=2))
    image = np.random.default_rng(3).random((1, S, S), dtype=np.float32)
    plain = predict_outputs(model, image, flip_tta=True)
    mirror = predict_outputs(model, image[:, :, ::-1].copy(), flip_tta=True)
    np.testing.assert_allclose(mirror[:, :, ::-1, :3], plain[:, :, :, :3], atol=1e-5)
    np.testing.assert_allclose(1 - mirror[:, :, ::-1, 3], plain[:, :, :, 3], atol=1e-5)
    # Without TTA a random network is not symmetric: the property comes from the fusion.
    raw = predict_outputs(model, image)
    raw_mirror = predict_outputs(model, image[:, :, ::-1].copy())
    assert not np.allclose(raw_mirror[:, :, ::-1, 0], raw[:, :, :, 0], atol=1e-5)


def test_fully_convolutional_detector_predicts_other_sizes() -> None:
    model = build_detector(S, TrainParams(width=4, depth=2))
    out = predict_outputs(model, np.zeros((2, 2 * S, 2 * S), np.float32))
    assert out.shape == (2, 2 * N_CELLS, 2 * N_CELLS, 5)


def test_crop_size_must_suit_the_network_depth(tmp_path: Path) -> None:
    from pipeline_steps.core.errors import ConfigError
    from pipeline_steps.train import train_detector

    examples = [(np.zeros((S, S), np.float32), np.zeros((0, 4), np.float32))]
    params = TrainParams(width=4, depth=2, crop_size=36)  # not a multiple of 8
    with pytest.raises(ConfigError, match="train.crop_size"):
        train_detector(
            lambda: iter(examples), 1, lambda: iter([]), 0, params, DetectionParams(), S, tmp_path
        )


# -- lesion paste -------------------------------------------------------------------------------


def _disc_on_ramp(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:S, :S] + 0.5
    return (0.2 + 0.004 * xx + 0.002 * yy + 0.3 * _disc_image(cx, cy, r)).astype(np.float32)


def test_lesion_residual_removes_the_background_plane() -> None:
    image = _disc_on_ramp(30.0, 30.0, 8.0)
    residual = lesion_residual(image, np.array([22, 22, 38, 38], np.float32))
    assert residual is not None and residual.shape == (16, 16)
    assert residual[8, 8] == pytest.approx(0.3, abs=1e-3)  # the disc, without the ramp
    assert abs(float(residual[0, 0])) < 1e-3  # the box corner is outside the ellipse
    # A lesion whose surrounding ring leaves the image is not cut out.
    assert lesion_residual(image, np.array([0, 0, 10, 10], np.float32)) is None


def test_lesion_paste_adds_small_boxed_lesions_and_leaves_the_source_alone() -> None:
    source = _disc_on_ramp(30.0, 30.0, 8.0)
    bank = build_lesion_bank([(source, np.array([[22, 22, 38, 38]], np.float32))])
    assert len(bank.patches) == 1 and bank.centres.tolist() == [[30.0, 30.0]]
    image = _disc_on_ramp(0.0, 0.0, 0.0)  # no disc
    before = image.copy()
    paste = LesionPaste(bank, p=1.0, diameter_px=(4.0, 8.0))
    pasted = 0
    for seed in range(10):
        out, boxes = paste(image, np.zeros((0, 4), np.float32), np.random.default_rng(seed))
        np.testing.assert_array_equal(image, before)
        pasted += len(boxes)
        for x0, y0, x1, y1 in boxes:
            assert 4.0 - 1 <= x1 - x0 <= 8.0 + 1
            inside = (
                out[int(y0) : int(y1), int(x0) : int(x1)]
                - before[int(y0) : int(y1), int(x0) : int(x1)]
            )
            # Shrunk by s, the lesion is fainter by s too: brighter than before, but below 0.3.
            assert 0 < float(inside.max()) < 0.3
        changed = np.abs(out - before) > 1e-6
        covered = np.zeros_like(changed)
        for x0, y0, x1, y1 in boxes.astype(int):
            covered[y0:y1, x0:x1] = True
        assert not (changed & ~covered).any()
    assert pasted >= 10
    assert (
        paste.__class__(bank, p=0.0)(image, np.zeros((0, 4), np.float32), np.random.default_rng(0))[
            0
        ]
        is image
    )
