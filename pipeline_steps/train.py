"""Stage `train`: the detector trained on the train split with streaming tf.data input and paired
augmentation (core/augment), per-epoch validation (loss and AP), early stopping, and checkpoints that
a re-run resumes from."""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipeline_steps.core.augment import build_lesion_bank, training_transform
from pipeline_steps.core.config import DetectionParams, TrainParams
from pipeline_steps.core.detector import (
    STRIDE,
    build_detector,
    decode_detections,
    encode_targets,
    keras_losses,
    loss_components,
    pack_targets,
)
from pipeline_steps.core.errors import ConfigError, DataError
from pipeline_steps.core.files import atomic_path, write_text_atomic
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.metrics import average_precision

if TYPE_CHECKING:
    import keras
    import tensorflow as tf


log = logging.getLogger(__name__)

Example = tuple[np.ndarray, np.ndarray]
ExampleSource = Callable[[], Iterator[Example]]
EpochCallback = Callable[[int, dict[str, float]], None]
T = TypeVar("T")

STATE_FILE = "state.json"
# Scores below this are not worth ranking when computing the validation AP.
VAL_SCORE_FLOOR = 0.05


@dataclass(frozen=True)
class TrainResult:
    """The trained model (best weights restored) and what happened.

    Epochs are counted as Keras does: `history` lists hold one value per completed epoch
    (including those of a run this one resumed), `best_epoch` is an index into them,
    `resumed_from_epoch` is the number of epochs already done when this call started and
    `epochs_run` the number this call trained.
    """

    model: keras.Model
    history: dict[str, list[float]]
    epochs_run: int
    resumed_from_epoch: int
    best_epoch: int = 0
    stopped_early: bool = False


def sample_size(params: TrainParams, input_size: int) -> int:
    """Side of the training samples: the crop size, or the whole image."""
    return min(params.crop_size, input_size) if params.crop_size else input_size


def samples_per_epoch(params: TrainParams, n_examples: int, input_size: int) -> int:
    """Crops are drawn `crops_per_image` times per image and epoch; whole images once."""
    return n_examples * (
        params.crops_per_image if sample_size(params, input_size) < input_size else 1
    )


# --------------------------------------------------------------------------------------------
# Input pipeline
# --------------------------------------------------------------------------------------------


def check_example(image: Any, boxes: Any, input_size: int) -> Example:
    """The example as float32 arrays; DataError when it breaks the preprocessing contract."""
    image = np.asarray(image, np.float32)
    if image.shape != (input_size, input_size):
        raise DataError(
            f"training example has image shape {image.shape}, expected ({input_size}, "
            f"{input_size}) from preprocess.input_size; re-run the preprocess stage."
        )
    boxes = np.asarray(boxes, np.float32)
    if boxes.size and (boxes.ndim != 2 or boxes.shape[1] != 4):
        raise DataError(f"training example has boxes of shape {boxes.shape}, expected (k, 4).")
    return image, boxes.reshape(-1, 4)


def _check_source(examples: ExampleSource, n_examples: int, input_size: int) -> None:
    """Peek at the first example, so a broken contract fails here, not deep inside tf.data."""
    iterator = examples()
    try:
        first = next(iterator, None)
        if first is None:
            raise DataError(f"the training examples are empty although n_train={n_examples}.")
        check_example(*first, input_size)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def shuffled(items: Iterable[T], buffer_size: int, rng: np.random.Generator) -> Iterator[T]:
    """Stream `items` in a random order using a bounded buffer (exact shuffle when it fits)."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = int(rng.integers(buffer_size))
        yield buffer[j]
        buffer[j] = item
    order = rng.permutation(len(buffer))
    yield from (buffer[i] for i in order)


def make_train_dataset(
    examples: ExampleSource,
    n_examples: int,
    input_size: int,
    params: TrainParams,
    first_epoch: int = 0,
) -> tf.data.Dataset:
    """Batches of (image (B,C,C,1), packed targets (B,C/4,C/4,6)) streamed from `examples`.

    C is `params.crop_size` when training on crops (each image then yields
    `params.crops_per_image` crops per epoch, see `training_transform`), else the input size.

    Each pass over the dataset is one epoch; its shuffle and augmentation are seeded from
    (params.seed, epoch), counting from `first_epoch`. Keras opens the next pass as soon as
    one ends, so passes are counted rather than read from callbacks.
    """
    import tensorflow as tf

    epochs = itertools.count(first_epoch)
    bank = build_lesion_bank(examples()) if params.paste_fraction > 0 else None
    transform = training_transform(params, input_size, bank)
    size = sample_size(params, input_size)
    repeats = samples_per_epoch(params, 1, input_size)
    n_cells = size // STRIDE

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng([params.seed, next(epochs)])
        # Each image enters the shuffle `repeats` times (the same array, not copies), so its
        # crops land in different batches.
        repeated = (raw for raw in examples() for _ in range(repeats))
        for raw in shuffled(repeated, params.shuffle_buffer, rng):
            image, boxes = check_example(*raw, input_size)
            if transform is not None:
                image, boxes = transform(image, boxes, rng)
            yield image[..., None], pack_targets(encode_targets(boxes, size))

    dataset = tf.data.Dataset.from_generator(
        generate,
        output_signature=(
            tf.TensorSpec((size, size, 1), tf.float32),
            tf.TensorSpec((n_cells, n_cells, 6), tf.float32),
        ),
    )
    # A known length lets Keras size epochs and the schedule; a source that yields a different
    # count fails loudly instead of silently shortening epochs.
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(n_examples * repeats))
    return dataset.batch(params.batch_size).prefetch(2)


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


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
    for batch in _batches(examples(), batch_size):
        pairs = [check_example(image, boxes, input_size) for image, boxes in batch]
        images = np.stack([image for image, _ in pairs])[..., None]
        targets = np.stack([pack_targets(encode_targets(b, input_size)) for _, b in pairs])
        outputs = np.asarray(model.predict_on_batch(images))
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


# --------------------------------------------------------------------------------------------
# Checkpoints and early stopping
# --------------------------------------------------------------------------------------------


@dataclass
class _TrainState:
    """What `state.json` records: the commit point of a checkpoint (written last, atomically)."""

    fingerprint: dict[str, Any]
    epochs_completed: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    best_key: list[float] | None = None
    best_epoch: int = 0
    wait: int = 0
    stopped_early: bool = False
    model_file: str | None = None
    best_file: str | None = None


def _fingerprint(params: TrainParams, input_size: int, n_train: int) -> dict[str, Any]:
    # Everything that shapes the training trajectory; patience only decides when to stop.
    return {
        "input_size": input_size,
        "n_train": n_train,
        **params.model_dump(mode="json", exclude={"patience"}),
    }


def _read_state(checkpoint_dir: Path, fingerprint: dict[str, Any]) -> _TrainState | None:
    path = checkpoint_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = _TrainState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        log.warning("%s: unreadable checkpoint state (%s); training from scratch", path, exc)
        return None
    if state.fingerprint != fingerprint:
        log.warning(
            "%s: checkpoint was made with other train params or data size; training from scratch",
            path,
        )
        return None
    if state.model_file is None or not (checkpoint_dir / state.model_file).is_file():
        log.warning("%s: checkpoint model file is missing; training from scratch", path)
        return None
    return state


def _write_state(checkpoint_dir: Path, state: _TrainState) -> None:
    write_text_atomic(
        checkpoint_dir / STATE_FILE, json.dumps(state.__dict__, indent=2, allow_nan=True)
    )
    # Files the committed state no longer points to are stale.
    keep = {state.model_file, state.best_file}
    for path in checkpoint_dir.glob("epoch-*.keras"):
        if path.name not in keep:
            path.unlink()
    for path in checkpoint_dir.glob("best-epoch-*.weights.h5"):
        if path.name not in keep:
            path.unlink()


def _monitor_key(logs: dict[str, float], monitor: str) -> list[float]:
    """Larger is better. For val_ap, ties (to 3 decimals, e.g. AP still 0) go to lower loss.

    A diverged (NaN) loss scores -inf, so it never counts as the best epoch.
    """
    loss = logs.get("val_loss", logs["loss"])
    neg_loss = -loss if math.isfinite(loss) else -math.inf
    ap = logs.get("val_ap", math.nan)
    if monitor == "val_ap" and not math.isnan(ap):
        return [round(ap, 3), neg_loss]
    return [neg_loss]


class _EpochHandler:
    """Validation, history, early stopping and checkpointing at the end of each epoch."""

    def __init__(
        self,
        state: _TrainState,
        checkpoint_dir: Path,
        val_examples: ExampleSource,
        n_val: int,
        params: TrainParams,
        test_params: DetectionParams,
        input_size: int,
        on_epoch_end: EpochCallback | None,
    ) -> None:
        self.state = state
        self.checkpoint_dir = checkpoint_dir
        self.val_examples, self.n_val = val_examples, n_val
        self.params, self.test_params = params, test_params
        self.input_size = input_size
        self.on_epoch_end = on_epoch_end
        self.epochs_run = 0
        self.epoch_started = time.monotonic()

    def begin_epoch(self) -> None:
        self.epoch_started = time.monotonic()

    def end_epoch(self, model: keras.Model, epoch: int, keras_logs: dict[str, Any]) -> bool:
        """Handle the end of 0-based `epoch`; returns True when training should stop."""
        logs = {k: float(v) for k, v in keras_logs.items()}
        logs["learning_rate"] = float(np.asarray(model.optimizer.learning_rate))
        if self.n_val:
            val = evaluate_detector(
                model,
                self.val_examples,
                self.input_size,
                self.test_params,
                self.params.batch_size,
                self.params.val_iou,
            )
            logs.update({f"val_{k}": v for k, v in val.items()})
        # Wall time of the epoch's training and validation (the time budget is in these).
        logs["epoch_seconds"] = time.monotonic() - self.epoch_started
        state = self.state
        for key, value in logs.items():
            state.history.setdefault(key, []).append(value)

        done = epoch + 1
        score = _monitor_key(logs, self.params.monitor)
        improved = state.best_key is None or score > state.best_key
        if improved:
            state.best_key, state.best_epoch, state.wait = score, epoch, 0
            state.best_file = f"best-epoch-{done:03d}.weights.h5"
            with atomic_path(self.checkpoint_dir / state.best_file, keep_suffix=True) as tmp:
                model.save_weights(str(tmp))
        else:
            state.wait += 1
        state.stopped_early = state.wait >= self.params.patience and done < self.params.epochs
        state.epochs_completed = done
        state.model_file = f"epoch-{done:03d}.keras"
        with atomic_path(self.checkpoint_dir / state.model_file, keep_suffix=True) as tmp:
            model.save(str(tmp))  # Keras checks the suffix, so the temporary name keeps it
        _write_state(self.checkpoint_dir, state)
        self.epochs_run += 1

        log.info(
            "epoch %d/%d: %s%s",
            done,
            self.params.epochs,
            ", ".join(f"{k}={v:.4g}" for k, v in logs.items()),
            " (best)" if improved else "",
        )
        if self.on_epoch_end is not None:
            self.on_epoch_end(epoch, logs)
        if state.stopped_early:
            log.info("early stop: no %s improvement in %d epochs", self.params.monitor, state.wait)
        return state.stopped_early


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def compile_detector(model: keras.Model, params: TrainParams, steps_per_epoch: int) -> None:
    """Adam with a one-epoch linear warmup then cosine decay to 5% over the remaining steps."""
    import keras

    total = max(params.epochs * steps_per_epoch, 2)
    warmup = min(steps_per_epoch, total // 2)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=params.learning_rate * 0.1,
        decay_steps=total - warmup,
        alpha=0.05,
        warmup_target=params.learning_rate,
        warmup_steps=warmup,
    )
    loss, metrics = keras_losses()
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=metrics)


def train_detector(
    train_examples: ExampleSource,
    n_train: int,
    val_examples: ExampleSource,
    n_val: int,
    params: TrainParams,
    test_params: DetectionParams,
    input_size: int,
    checkpoint_dir: Path,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Train the detector, checkpointing each epoch into `checkpoint_dir` and resuming from it.

    `train_examples()`/`val_examples()` return fresh iterators of (image (S,S), boxes (k,4))
    with S = input_size; n_train/n_val are their lengths. Early stopping watches
    `params.monitor` with `params.patience`, and the returned model carries the best epoch's
    weights. `on_epoch_end(epoch, logs)` is called after each epoch is checkpointed, with the
    0-based epoch (as in Keras) and its metrics: loss and its parts, learning_rate, and
    val_loss, val_ap (AP at params.val_iou), ... when there is validation data. A re-run with
    the same params and data size continues after the last completed epoch; other params
    start over.
    """
    import keras
    import tensorflow as tf

    if n_train < 1:
        raise DataError("no training examples: the train split is empty; check preprocess.split.")
    keras.utils.set_random_seed(params.seed)
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras_losses()  # registers the loss so compiled checkpoints load
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    multiple = 2 ** (params.depth + 1)
    if sample_size(params, input_size) % multiple:
        raise ConfigError(
            f"train.crop_size {params.crop_size} must be a multiple of {multiple} for "
            f"train.depth={params.depth} (or 0 for whole images)"
        )
    steps_per_epoch = math.ceil(samples_per_epoch(params, n_train, input_size) / params.batch_size)

    fingerprint = _fingerprint(params, input_size, n_train)
    state = _read_state(checkpoint_dir, fingerprint)
    needs_training = state is None or (
        not state.stopped_early and state.epochs_completed < params.epochs
    )
    if needs_training:
        _check_source(train_examples, n_train, input_size)
    if state is not None:
        assert state.model_file is not None
        model = keras.saving.load_model(checkpoint_dir / state.model_file)
        log.info(
            "resuming from %s (%d epochs done)",
            checkpoint_dir / state.model_file,
            state.epochs_completed,
        )
    else:
        state = _TrainState(fingerprint=fingerprint)
        model = build_detector(input_size, params)
        compile_detector(model, params, steps_per_epoch)
    resumed_from = state.epochs_completed

    if n_val == 0:
        log.warning("no validation examples: early stopping watches the training loss")
    handler = _EpochHandler(
        state, checkpoint_dir, val_examples, n_val, params, test_params, input_size, on_epoch_end
    )
    if needs_training:

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                handler.begin_epoch()

            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                if handler.end_epoch(self.model, epoch, logs or {}):
                    self.model.stop_training = True

        model.fit(
            make_train_dataset(train_examples, n_train, input_size, params, state.epochs_completed),
            epochs=params.epochs,
            initial_epoch=state.epochs_completed,
            callbacks=[_Callback()],
            shuffle=False,  # the dataset shuffles itself, seeded per epoch
            verbose=0,
        )
    if state.best_file is not None:
        model.load_weights(checkpoint_dir / state.best_file)
    return TrainResult(
        model=model,
        history={k: list(v) for k, v in state.history.items()},
        epochs_run=handler.epochs_run,
        resumed_from_epoch=resumed_from,
        best_epoch=state.best_epoch,
        stopped_early=state.stopped_early,
    )


def checkpoint_key(manifest_path: Path, params: TrainParams, input_size: int) -> str:
    """Checkpoints resume only a run on the same split data and parameters."""
    import hashlib

    digest = hashlib.sha256(manifest_path.read_bytes())
    digest.update(params.model_dump_json().encode())
    digest.update(str(input_size).encode())
    return digest.hexdigest()[:16]


def run(
    layout: Layout,
    params: TrainParams,
    test_params: DetectionParams,
    input_size: int,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Stage edge: processed shards -> models/detector.keras and reports/train_history.json."""
    from pipeline_steps.core.shards import load_split

    if not layout.manifest.exists():
        raise DataError(f"{layout.manifest}: missing. Run the `preprocess` stage first.")
    train_split = load_split(layout.processed, "train")
    val_split = load_split(layout.processed, "val")
    if len(train_split) == 0 or len(val_split) == 0:
        raise DataError(
            f"{layout.manifest}: train has {len(train_split)} and val {len(val_split)} labelled images; "
            "both need at least one. Ingest more labelled studies or adjust preprocess.split."
        )
    checkpoint_dir = layout.checkpoints / checkpoint_key(layout.manifest, params, input_size)
    started = time.monotonic()
    result = train_detector(
        train_split.examples,
        len(train_split),
        val_split.examples,
        len(val_split),
        params,
        test_params,
        input_size,
        checkpoint_dir,
        on_epoch_end,
    )
    layout.model.parent.mkdir(parents=True, exist_ok=True)
    result.model.save(layout.model)
    layout.reports.mkdir(parents=True, exist_ok=True)
    layout.train_history.write_text(
        json.dumps(
            {
                "history": result.history,
                "epochs_run": result.epochs_run,
                "resumed_from_epoch": result.resumed_from_epoch,
                "n_train": len(train_split),
                "n_val": len(val_split),
                # This call only; history["epoch_seconds"] covers resumed epochs too.
                "train_seconds": round(time.monotonic() - started, 1),
            },
            indent=2,
        )
    )
    return result
