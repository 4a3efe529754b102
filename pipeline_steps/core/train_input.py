"""The detector's training input: ingested examples interleaved with streamed synthetic studies,
shuffled through a bounded buffer, cropped (lesion or hard-negative crops) and augmented, as a
tf.data pipeline whose epochs replay exactly from (seed, epoch); and the record of what was
streamed."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from pipeline_steps.core.augment import TrainingTransform, build_lesion_bank
from pipeline_steps.core.config import SynthParams, TrainParams
from pipeline_steps.core.detector import encode_targets, pack_targets
from pipeline_steps.core.errors import DataError

if TYPE_CHECKING:
    import tensorflow as tf

Example = tuple[np.ndarray, np.ndarray]
ExampleSource = Callable[[], Iterator[Example]]
T = TypeVar("T")


def sample_size(params: TrainParams, input_size: int) -> int:
    """Side of the training samples: the crop size, or the whole image."""
    return min(params.crop_size, input_size) if params.crop_size else input_size


def samples_per_epoch(params: TrainParams, n_examples: int, input_size: int) -> int:
    """Crops are drawn `crops_per_image` times per image and epoch; whole images once. Counts
    the streamed studies too (`streamed_per_epoch`)."""
    images = n_examples + streamed_per_epoch(params, n_examples)
    return images * (params.crops_per_image if sample_size(params, input_size) < input_size else 1)


def streamed_per_epoch(params: TrainParams, n_examples: int) -> int:
    """Fresh synthetic studies per epoch: `synthetic.fraction` of the epoch's images."""
    f = params.synthetic.fraction
    return round(n_examples * f / (1.0 - f)) if f > 0 else 0


class StudySource(Protocol):
    """Renders streamed studies by index, in the order asked (synthetic.stream.StudyProducer)."""

    def studies(self, indices: Sequence[int]) -> Iterator[Any]: ...


@dataclass(frozen=True)
class Stream:
    """The synthetic studies of a training run: identity (generator, params, seed) and producer."""

    producer: StudySource
    params: SynthParams
    seed: int
    per_epoch: int

    def indices(self, epoch: int) -> range:
        return range(epoch * self.per_epoch, (epoch + 1) * self.per_epoch)


class StreamLog:
    """What each epoch's streamed studies were: index -> (pixel SHA-256, lesion diameters)."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[int, tuple[str, tuple[float, ...]]]] = {}

    def record(self, epoch: int, index: int, sha256: str, diameters: tuple[float, ...]) -> None:
        self.epochs.setdefault(epoch, {})[index] = (sha256, diameters)


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


def check_source(examples: ExampleSource, n_examples: int, input_size: int) -> None:
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


def interleaved(a: Iterable[T], n_a: int, b: Iterable[T], n_b: int) -> Iterator[T]:
    """All of `a` (n_a items) and `b` (n_b items), spread evenly into one sequence."""
    ia, ib = iter(a), iter(b)
    taken_a = taken_b = 0
    while taken_a < n_a or taken_b < n_b:
        # Take from whichever sequence is behind its share of the output so far.
        if taken_b >= n_b or (taken_a < n_a and taken_a * n_b <= taken_b * n_a):
            yield next(ia)
            taken_a += 1
        else:
            yield next(ib)
            taken_b += 1


def make_train_dataset(
    examples: ExampleSource,
    n_examples: int,
    input_size: int,
    params: TrainParams,
    first_epoch: int = 0,
    stream: Stream | None = None,
    stream_log: StreamLog | None = None,
    hard_negatives: Callable[[], dict[int, np.ndarray]] | None = None,
) -> tf.data.Dataset:
    """Batches of (image (B,C,C,1), packed targets (B,C/r,C/r,6)), r = `params.output_stride`,
    streamed from `examples`, and from `stream`'s synthetic studies when given.

    C is `params.crop_size` when training on crops (each image then yields
    `params.crops_per_image` crops per epoch, see `TrainingTransform`), else the input size.
    `hard_negatives()`, read at the start of each epoch, maps a training example's position
    to (k, 2) false-positive centres: `params.hard_negative_fraction` of its crops go there.

    Each pass over the dataset is one epoch; its shuffle and augmentation are seeded from
    (params.seed, epoch), counting from `first_epoch`, and it holds streamed studies
    `stream.indices(epoch)`. Keras opens the next pass as soon as one ends, so passes are
    counted rather than read from callbacks.
    """
    import tensorflow as tf

    epochs = itertools.count(first_epoch)
    bank = build_lesion_bank(examples()) if params.paste_fraction > 0 else None
    transform = TrainingTransform(params, input_size, bank)
    size = sample_size(params, input_size)
    repeats = params.crops_per_image if size < input_size else 1
    n_stream = stream.per_epoch if stream is not None else 0
    stride = params.output_stride
    n_cells = size // stride
    NO_POINTS = np.zeros((0, 2), np.float32)

    def streamed(epoch: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        if stream is None:
            return
        for study in stream.producer.studies(stream.indices(epoch)):
            if stream_log is not None:
                stream_log.record(epoch, study.index, study.pixel_sha256, study.diameters_mm)
            yield -1, study.image, study.boxes

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        epoch = next(epochs)
        rng = np.random.default_rng([params.seed, epoch])
        hard = hard_negatives() if hard_negatives is not None else {}
        # Each image enters the shuffle `repeats` times (the same array, not copies), so its
        # crops land in different batches.
        ingested = ((i, *raw) for i, raw in enumerate(examples()))
        mixed = interleaved(ingested, n_examples, streamed(epoch), n_stream)
        repeated = (item for item in mixed for _ in range(repeats))
        for position, raw_image, raw_boxes in shuffled(repeated, params.shuffle_buffer, rng):
            image, boxes = check_example(raw_image, raw_boxes, input_size)
            points = hard.get(position, NO_POINTS)
            focus = None
            if len(points) and rng.random() < params.hard_negative_fraction:
                focus = points[int(rng.integers(len(points)))]
            image, boxes = transform(image, boxes, rng, focus)
            yield image[..., None], pack_targets(encode_targets(boxes, size, stride))

    dataset = tf.data.Dataset.from_generator(
        generate,
        output_signature=(
            tf.TensorSpec((size, size, 1), tf.float32),
            tf.TensorSpec((n_cells, n_cells, 6), tf.float32),
        ),
    )
    # A known length lets Keras size epochs and the schedule; a source that yields a different
    # count fails loudly instead of silently shortening epochs.
    dataset = dataset.apply(
        tf.data.experimental.assert_cardinality((n_examples + n_stream) * repeats)
    )
    return dataset.batch(params.batch_size).prefetch(2)


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def stream_manifest(
    streamed: dict[int, dict[str, list[Any]]],
    stream_params: SynthParams,
    params: TrainParams,
    per_epoch: int,
    generator: str,
    synth_params_sha256: str,
) -> dict[str, Any]:
    """The streamed studies the model trained on, each by identity and pixel SHA-256.

    A study is (generator, synth_params, seed, index); `radflow trace --regenerate INDEX` renders
    it again and checks its pixels against `studies[INDEX]`. Epochs list the index ranges they
    drew (an epoch is `per_epoch` consecutive indices), best-epoch weights included or not.
    """
    studies: dict[str, list[Any]] = {}
    epochs = []
    for epoch in sorted(streamed):
        drawn = streamed[epoch]
        studies.update(drawn)
        indices = sorted(int(i) for i in drawn)
        if indices:
            epochs.append({"epoch": epoch, "first": indices[0], "last": indices[-1]})
    digest = hashlib.sha256(
        "\n".join(f"{i}:{studies[i][0]}" for i in sorted(studies, key=int)).encode()
    ).hexdigest()
    return {
        "enabled": per_epoch > 0,
        "generator": generator,
        "seed": params.synthetic.seed,
        "fraction": params.synthetic.fraction,
        "per_epoch": per_epoch,
        "synth_params": stream_params.model_dump(mode="json"),
        "synth_params_sha256": synth_params_sha256,
        "n_studies": len(studies),
        "studies_sha256": digest,
        "epochs": epochs,
        # index -> [pixel SHA-256 of the stored pixels, lesion diameters in mm]
        "studies": {i: studies[i] for i in sorted(studies, key=int)},
    }
