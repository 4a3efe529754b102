"""Behaviour of the training loop and of a briefly trained detector, on synthetic bright discs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline_steps.core.config import DetectionParams, TrainParams
from pipeline_steps.core.detector import predict_boxes
from pipeline_steps.core.detector_eval import evaluate_detector
from pipeline_steps.core.errors import DataError
from pipeline_steps.train import TrainResult, train_detector

pytestmark = pytest.mark.slow

S = 64
THRESHOLD = DetectionParams(score_threshold=0.3)


def _background(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:S, :S] / S
    tilt = rng.uniform(-0.1, 0.1, 2)
    image = 0.3 + tilt[0] * xx + tilt[1] * yy + 0.04 * rng.standard_normal((S, S))
    return image.astype(np.float32)


def _add_disc(image: np.ndarray, cx: float, cy: float, r: float, contrast: float) -> np.ndarray:
    yy, xx = np.mgrid[:S, :S] + 0.5
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r
    return np.clip(image + contrast * disc, 0, 1).astype(np.float32)


def make_discs(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Half the images hold one bright disc (radius 3-7 px), half are background only."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        image = _background(rng)
        boxes = np.zeros((0, 4), np.float32)
        if i % 2 == 0:
            r = rng.uniform(3, 7)
            cx, cy = rng.uniform(r + 2, S - r - 2, 2)
            image = _add_disc(image, cx, cy, r, rng.uniform(0.3, 0.6))
            boxes = np.array([[cx - r, cy - r, cx + r, cy + r]], np.float32)
        examples.append((image, boxes))
    return examples


def _train(
    checkpoint_dir: Path,
    params: TrainParams,
    n_train: int = 16,
    on_epoch_end: object = None,
) -> TrainResult:
    train, val = make_discs(n_train, seed=1), make_discs(8, seed=2)

    def source(examples: list[tuple[np.ndarray, np.ndarray]]) -> Iterator:
        return iter(examples)

    return train_detector(
        lambda: source(train),
        len(train),
        lambda: source(val),
        len(val),
        params,
        THRESHOLD,
        S,
        checkpoint_dir,
        on_epoch_end=on_epoch_end,  # type: ignore[arg-type]
    )


# -- the training loop ------------------------------------------------------------------------

# Without lesion paste (it has unit tests of its own): on these toy discs it would label tiny
# full-contrast discs as lesions, against the premise of the size test below, and its extra
# lesions would blur the validation-loss trajectory the early-stopping test constructs.
TINY = TrainParams(width=4, depth=2, epochs=3, batch_size=8, patience=5, paste_fraction=0.0)


class _Interrupted(Exception):
    pass


def test_training_checkpoints_and_resumes_after_interruption(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    seen: list[int] = []

    def stop_after_two(epoch: int, logs: dict[str, float]) -> None:
        seen.append(epoch)
        assert {"loss", "val_loss", "val_ap"} <= logs.keys()
        if epoch == 1:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        _train(ckpt, TINY, on_epoch_end=stop_after_two)
    assert seen == [0, 1]  # 0-based, as in Keras
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epochs_completed"] == 2 and len(state["history"]["loss"]) == 2
    assert (ckpt / state["model_file"]).is_file()
    first_losses = state["history"]["loss"]

    seen.clear()
    resumed = _train(ckpt, TINY, on_epoch_end=lambda epoch, logs: seen.append(epoch))
    assert resumed.resumed_from_epoch == 2
    assert resumed.epochs_run == 1 and seen == [2]
    assert resumed.history["loss"][:2] == first_losses and len(resumed.history["loss"]) == 3
    # Optimizer state came back too: its step count covers all three epochs (2 steps each).
    assert int(resumed.model.optimizer.iterations) == 6

    # A finished run is not trained again; it returns the best epoch's weights.
    again = _train(ckpt, TINY, on_epoch_end=lambda epoch, logs: seen.append(epoch))
    assert again.epochs_run == 0 and again.resumed_from_epoch == 3 and seen == [2]
    for a, b in zip(again.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    # The resumed run reproduces an uninterrupted one (seeded data order and augmentation).
    straight = _train(tmp_path / "straight", TINY)
    np.testing.assert_allclose(straight.history["loss"], resumed.history["loss"], rtol=1e-4)
    np.testing.assert_allclose(straight.history["val_loss"], resumed.history["val_loss"], rtol=1e-4)


def test_changed_params_start_over(tmp_path: Path) -> None:
    one_epoch = TINY.model_copy(update={"epochs": 1})
    _train(tmp_path, one_epoch)
    other = _train(tmp_path, one_epoch.model_copy(update={"learning_rate": 1e-3}))
    assert other.resumed_from_epoch == 0 and other.epochs_run == 1
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == ["epoch-001.keras"]


def test_early_stopping_restores_the_best_epoch(tmp_path: Path) -> None:
    # From the third epoch on, the validation boxes sit where the discs are not (x and y
    # swapped) and the discs go unlabelled: the better the model, the worse that loss, so the
    # validation loss must rise there whatever the optimiser does; patience 1 then stops.
    train, good = make_discs(16, seed=1), make_discs(8, seed=2)
    bad = [(image, boxes[:, [1, 0, 3, 2]]) for image, boxes in good]
    calls = []

    def val() -> Iterator:
        calls.append(1)
        return iter(good if len(calls) <= 2 else bad)

    params = TINY.model_copy(update={"epochs": 8, "patience": 1, "monitor": "val_loss"})
    result = train_detector(lambda: iter(train), 16, val, 8, params, THRESHOLD, S, tmp_path)
    val_loss = result.history["val_loss"]
    assert result.stopped_early and result.epochs_run == 3 == len(val_loss)
    assert result.best_epoch == int(np.argmin(val_loss)) == 1
    # The returned model carries the best epoch's weights, not the last epoch's.
    again = evaluate_detector(result.model, lambda: iter(good), S, THRESHOLD, 8, 0.3)
    assert again["loss"] == pytest.approx(val_loss[1], rel=1e-4)


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ([], "empty"),
        ([(np.zeros((S + 1, S), np.float32), np.zeros((0, 4), np.float32))], "image shape"),
        ([(np.zeros((S, S), np.float32), np.zeros((2, 3), np.float32))], "boxes of shape"),
    ],
)
def test_broken_input_contract_fails_with_a_data_error(
    tmp_path: Path, examples: list[tuple[np.ndarray, np.ndarray]], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        train_detector(lambda: iter(examples), 4, lambda: iter([]), 0, TINY, THRESHOLD, S, tmp_path)
    assert not list(tmp_path.glob("*.keras"))


# -- a briefly trained detector ---------------------------------------------------------------


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    params = TrainParams(
        width=8,
        depth=3,
        epochs=16,
        batch_size=16,
        learning_rate=6e-3,
        patience=16,
        paste_fraction=0.0,
    )
    result = _train(tmp_path_factory.mktemp("detector"), params, n_train=256)
    # The behaviour tests below mean little unless the detector actually learned discs.
    assert result.history["val_ap"][result.best_epoch] > 0.8, result.history
    return result


def test_flipped_image_gives_flipped_boxes(detector: TrainResult) -> None:
    # Centres on and off stride-4 cell borders; the top box is compared, whatever its score.
    top = DetectionParams(score_threshold=0.05, max_detections=1)
    rng = np.random.default_rng(11)
    images, truths = [], []
    for cx, cy, r in [(16.0, 20.0, 5.0), (22.0, 44.0, 6.5), (45.0, 30.0, 4.0), (33.5, 9.0, 6.0)]:
        images.append(_add_disc(_background(rng), cx, cy, r, 0.45))
        truths.append([cx - r, cy - r, cx + r, cy + r])
    images_np = np.stack(images)
    plain = predict_boxes(detector.model, images_np, top)
    mirrored = predict_boxes(detector.model, images_np[:, :, ::-1].copy(), top)
    for truth, dets, flipped in zip(truths, plain, mirrored, strict=True):
        assert len(dets) == 1 and len(flipped) == 1
        np.testing.assert_allclose(dets[0, :4], truth, atol=3.0)
        x0, y0, x1, y1 = flipped[0, :4]
        np.testing.assert_allclose([S - x1, y0, S - x0, y1], dets[0, :4], atol=2.5)
        assert abs(flipped[0, 4] - dets[0, 4]) < 0.25


def test_blank_images_give_no_boxes(detector: TrainResult) -> None:
    rng = np.random.default_rng(12)
    blanks = np.stack(
        [_background(rng) for _ in range(6)]
        + [np.zeros((S, S), np.float32), np.full((S, S), 0.3, np.float32)]
    )
    assert all(len(d) == 0 for d in predict_boxes(detector.model, blanks, THRESHOLD))


def _score_near(model: object, images: np.ndarray, cx: float, cy: float) -> list[float]:
    """Best score of a box centred within 6 px of (cx, cy) per image (0 if none)."""
    anything = DetectionParams(score_threshold=0.01)
    scores = []
    for dets in predict_boxes(model, images, anything):  # type: ignore[arg-type]
        centres = np.stack([(dets[:, 0] + dets[:, 2]) / 2, (dets[:, 1] + dets[:, 3]) / 2], axis=1)
        near = dets[np.hypot(centres[:, 0] - cx, centres[:, 1] - cy) < 6]
        scores.append(float(near[:, 4].max()) if len(near) else 0.0)
    return scores


def test_bigger_lesion_scores_higher(detector: TrainResult) -> None:
    # Same contrast, growing radius: from barely visible to plainly there. The score must not
    # fall as the lesion grows (small tolerance), and the biggest must clear the threshold.
    background = _background(np.random.default_rng(13))
    radii = (2.0, 3.0, 4.5, 6.5)
    images = np.stack([_add_disc(background, 32.0, 32.0, r, 0.3) for r in radii])
    scores = _score_near(detector.model, images, 32.0, 32.0)
    assert all(b >= a - 0.05 for a, b in zip(scores, scores[1:], strict=False)), scores
    assert scores[-1] > THRESHOLD.score_threshold and scores[-1] > scores[0] + 0.2, scores


def test_fainter_lesion_scores_lower(detector: TrainResult) -> None:
    background = _background(np.random.default_rng(14))
    contrasts = (0.5, 0.3, 0.15, 0.05)
    images = np.stack([_add_disc(background, 30.0, 34.0, 5.0, c) for c in contrasts])
    scores = _score_near(detector.model, images, 30.0, 34.0)
    assert all(b <= a + 0.05 for a, b in zip(scores, scores[1:], strict=False)), scores
    assert scores[0] > THRESHOLD.score_threshold and scores[0] > scores[-1] + 0.2, scores


def test_most_negative_images_give_no_box_above_the_operating_threshold(
    detector: TrainResult,
) -> None:
    negatives = np.stack([image for image, boxes in make_discs(40, seed=21) if len(boxes) == 0])
    with_boxes = sum(len(d) > 0 for d in predict_boxes(detector.model, negatives, THRESHOLD))
    assert with_boxes <= 0.1 * len(negatives)


def test_flip_tta_makes_flipped_boxes_exact_mirrors(detector: TrainResult) -> None:
    top = DetectionParams(score_threshold=0.05, max_detections=1, flip_tta=True)
    rng = np.random.default_rng(15)
    images = np.stack(
        [_add_disc(_background(rng), cx, 30.0, 5.0, 0.45) for cx in (14.0, 27.5, 41.0)]
    )
    plain = predict_boxes(detector.model, images, top)
    mirrored = predict_boxes(detector.model, images[:, :, ::-1].copy(), top)
    for dets, flipped in zip(plain, mirrored, strict=True):
        x0, y0, x1, y1 = flipped[0, :4]
        np.testing.assert_allclose([S - x1, y0, S - x0, y1], dets[0, :4], atol=1e-3)
        assert flipped[0, 4] == pytest.approx(dets[0, 4], abs=1e-5)


# -- the real reader and preprocessing --------------------------------------------------------


def _stored(display: np.ndarray) -> np.ndarray:
    """12-bit stored values whose display (window centre 2047.5, width 4096) is `display`."""
    return np.clip(np.rint(display * 4095), 0, 4095).astype(np.uint16)


def test_monochrome1_and_monochrome2_files_give_identical_predictions(
    detector: TrainResult, tmp_path: Path, make_dicom: Callable[..., Path]
) -> None:
    """The same picture stored both ways goes through validate and preprocess, the real DICOM
    path, and must reach the model as the same tensor: the same boxes, to the bit."""
    import pandas as pd

    from pipeline_steps import preprocess, validate
    from pipeline_steps.core.config import IngestParams, PreprocessParams, ValidateParams
    from pipeline_steps.core.labels import NO_FINDING
    from pipeline_steps.core.layout import Layout
    from pipeline_steps.core.shards import load_split

    # 256 px at 0.35 mm is 64 px at the 1.4 mm working spacing: the detector's size.
    native = 4
    rng = np.random.default_rng(16)
    blank = np.kron(_background(rng), np.ones((native, native), np.float32))
    yy, xx = np.mgrid[: S * native, : S * native] + 0.5
    lesion = blank + 0.45 * (np.hypot(xx - 40 * native, yy - 24 * native) <= 5 * native)
    layout = Layout(tmp_path)
    rows = []
    window = (2047.5, 4096.0)
    for name, picture, box in (("pos", lesion, [140, 76, 180, 116]), ("neg", blank, None)):
        stored = _stored(np.clip(picture, 0, 1))
        for photometric, pixels in (("MONOCHROME2", stored), ("MONOCHROME1", 4095 - stored)):
            image_id = f"{name}-{photometric.lower()}"
            make_dicom(
                layout.raw_images / f"{image_id}.dcm",
                pixels,
                photometric=photometric,
                window=window,
                patient_id="P1",
            )
            rows.append([image_id, "opacity", *box] if box else [image_id, NO_FINDING, *[None] * 4])
    pd.DataFrame(rows, columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max"]).to_csv(
        layout.raw_labels, index=False
    )
    validate.run(layout, IngestParams(), ValidateParams(min_images=2))
    preprocess.run(layout, PreprocessParams(input_size=S, target_spacing_mm=1.4, workers=1))
    tensors: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        part = load_split(layout.processed, split)
        for record, (image, _) in zip(
            part.manifest.to_dict("records"), part.examples(), strict=True
        ):
            tensors[str(record["image_id"])] = image
    assert len(tensors) == 4

    anything = DetectionParams(score_threshold=0.01)
    for name in ("pos", "neg"):
        m2, m1 = tensors[f"{name}-monochrome2"], tensors[f"{name}-monochrome1"]
        np.testing.assert_array_equal(m1, m2)
        # One image per call: within one batch, oneDNN may round two identical images differently
        # by their position (seen at 2e-7 relative), which says nothing about the DICOM path.
        (boxes_m2,) = predict_boxes(detector.model, m2[None], anything)
        (boxes_m1,) = predict_boxes(detector.model, m1[None], anything)
        np.testing.assert_array_equal(boxes_m1, boxes_m2)
    # The lesion was found where it was drawn (so the equality above is about real boxes).
    (found,) = predict_boxes(detector.model, tensors["pos-monochrome2"][None], THRESHOLD)
    assert len(found) >= 1
    np.testing.assert_allclose(found[0, :4], [35, 19, 45, 29], atol=3.0)
