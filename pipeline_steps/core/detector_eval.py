"""The detector scored during training: validation loss and AP each epoch, and the strongest false
positives on the training images (hard negatives for the next epochs' crops)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline_steps.core.config import DetectionParams
from pipeline_steps.core.detector import (
    decode_detections,
    encode_targets,
    loss_components,
    pack_targets,
)
from pipeline_steps.core.metrics import average_precision, hit_matrix
from pipeline_steps.core.train_input import ExampleSource, batches, check_example

if TYPE_CHECKING:
    import keras

# Scores below this are not worth ranking when computing the validation AP.
VAL_SCORE_FLOOR = 0.05


def evaluate_detector(
    model: keras.Model,
    examples: ExampleSource,
    input_size: int,
    test_params: DetectionParams,
    batch_size: int,
    iou_threshold: float,
) -> dict[str, float]:
    """Loss components and AP at `iou_threshold` (the test stage's definition) over `examples`.

    Detections are ranked down to VAL_SCORE_FLOOR rather than cut at the test threshold,
    so that AP sees the whole precision-recall curve.
    """
    ranking = test_params.model_copy(
        update={"score_threshold": min(test_params.score_threshold, VAL_SCORE_FLOOR)}
    )
    totals = {"loss": 0.0, "heatmap_loss": 0.0, "size_loss": 0.0, "offset_loss": 0.0}
    n = 0
    detections: list[np.ndarray] = []
    truths: list[np.ndarray] = []
    for batch in batches(examples(), batch_size):
        pairs = [check_example(image, boxes, input_size) for image, boxes in batch]
        images = np.stack([image for image, _ in pairs])[..., None]
        outputs = np.asarray(model.predict_on_batch(images))
        stride = input_size // outputs.shape[1]
        targets = np.stack([pack_targets(encode_targets(b, input_size, stride)) for _, b in pairs])
        parts = {k: float(v) for k, v in loss_components(targets, outputs).items()}
        for key in totals:
            totals[key] += parts[key] * len(pairs)
        n += len(pairs)
        detections.extend(decode_detections(outputs, ranking, input_size))
        truths.extend(boxes for _, boxes in pairs)
    if n == 0:
        return {}
    metrics = {key: value / n for key, value in totals.items()}
    metrics["ap"] = average_precision(detections, truths, iou_threshold)
    return metrics


# Hard negatives: false positives scoring at least this, at most this many per image.
HARD_NEGATIVE_MIN_SCORE = 0.1
HARD_NEGATIVES_PER_IMAGE = 3


def mine_hard_negatives(
    model: keras.Model,
    examples: ExampleSource,
    input_size: int,
    test_params: DetectionParams,
    batch_size: int,
) -> dict[int, np.ndarray]:
    """The model's strongest false positives on `examples`: position -> (k, 2) centres (x, y).

    A detection scoring at least HARD_NEGATIVE_MIN_SCORE that hits no lesion (the FROC hit rule)
    is a false positive; up to HARD_NEGATIVES_PER_IMAGE per image, strongest first.
    """
    ranking = test_params.model_copy(update={"score_threshold": HARD_NEGATIVE_MIN_SCORE})
    found: dict[int, np.ndarray] = {}
    position = 0
    for batch in batches(examples(), batch_size):
        pairs = [check_example(image, boxes, input_size) for image, boxes in batch]
        images = np.stack([image for image, _ in pairs])[..., None]
        detections = decode_detections(model.predict_on_batch(images), ranking, input_size)
        for (_, truth), dets in zip(pairs, detections, strict=True):
            if len(dets):
                false = ~hit_matrix(dets, truth, "center_or_iou", 0.3).any(axis=1)
                fps = dets[false][:HARD_NEGATIVES_PER_IMAGE]  # decode sorts by score
                if len(fps):
                    centres = (fps[:, :2] + fps[:, 2:4]) / 2
                    found[position] = centres.astype(np.float32)
            position += 1
    return found
