"""Stage `train`: the detector trained on the train split, mixed with freshly synthesised studies
(synthetic/stream), through streaming tf.data input with paired augmentation and hard-negative crops
(core/augment); per-epoch validation (loss and AP), early stopping, and checkpoints that a re-run
resumes from. The device profile (cpu/gpu) sizes the model and the batches."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline_steps.core.config import (
    DetectionParams,
    PreprocessParams,
    SynthParams,
    TrainParams,
)
from pipeline_steps.core.detector import build_detector, keras_losses
from pipeline_steps.core.detector_eval import evaluate_detector, mine_hard_negatives
from pipeline_steps.core.device_profile import DeviceProfile, resolve_profile, visible_gpus
from pipeline_steps.core.errors import ConfigError, DataError
from pipeline_steps.core.files import atomic_path, write_text_atomic
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.train_input import (
    ExampleSource,
    Stream,
    StreamLog,
    check_source,
    make_train_dataset,
    sample_size,
    samples_per_epoch,
    stream_manifest,
    streamed_per_epoch,
)
from pipeline_steps.synthetic.stream import (
    GENERATOR_VERSION,
    StudyProducer,
    params_digest,
    stream_synth_params,
)

if TYPE_CHECKING:
    import keras


log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]

STATE_FILE = "state.json"


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
    # Epoch -> {index: [pixel SHA-256, lesion diameters]} of the streamed studies trained on.
    streamed: dict[int, dict[str, list[Any]]] = field(default_factory=dict)


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
    # Example position -> false-positive centres, as mined after the last mining epoch.
    hard_negatives: dict[str, list[list[float]]] = field(default_factory=dict)
    # Epoch -> {index: [pixel SHA-256, lesion diameters]} of the streamed studies it trained on.
    streamed: dict[str, dict[str, list[Any]]] = field(default_factory=dict)


def _fingerprint(
    params: TrainParams, input_size: int, n_train: int, synth: dict[str, Any] | None = None
) -> dict[str, Any]:
    # Everything that shapes the training trajectory; patience only decides when to stop.
    return {
        "input_size": input_size,
        "n_train": n_train,
        **params.model_dump(mode="json", exclude={"patience"}),
        **({"stream_synth": synth} if synth is not None else {}),
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
        train_examples: ExampleSource | None = None,
        stream_log: StreamLog | None = None,
    ) -> None:
        self.state = state
        self.checkpoint_dir = checkpoint_dir
        self.train_examples, self.stream_log = train_examples, stream_log
        self.val_examples, self.n_val = val_examples, n_val
        self.params, self.test_params = params, test_params
        self.input_size = input_size
        self.on_epoch_end = on_epoch_end
        self.epochs_run = 0
        self.epoch_started = time.monotonic()

    def begin_epoch(self) -> None:
        self.epoch_started = time.monotonic()

    def hard_negatives(self) -> dict[int, np.ndarray]:
        return {
            int(k): np.asarray(v, np.float32).reshape(-1, 2)
            for k, v in self.state.hard_negatives.items()
        }

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
        state = self.state
        done = epoch + 1
        mining = (
            self.params.hard_negative_fraction > 0
            and self.train_examples is not None
            and done % self.params.hard_negative_every == 0
            and done < self.params.epochs
        )
        if mining:
            assert self.train_examples is not None
            mined = mine_hard_negatives(
                model,
                self.train_examples,
                self.input_size,
                self.test_params,
                self.params.batch_size,
            )
            state.hard_negatives = {str(k): v.tolist() for k, v in mined.items()}
        if self.params.hard_negative_fraction > 0:
            logs["hard_negatives"] = float(sum(len(v) for v in state.hard_negatives.values()))
        if self.stream_log is not None and epoch in self.stream_log.epochs:
            state.streamed[str(epoch)] = {
                str(i): [sha, list(d)] for i, (sha, d) in self.stream_log.epochs[epoch].items()
            }
        # Wall time of the epoch's training and validation (the time budget is in these).
        logs["epoch_seconds"] = time.monotonic() - self.epoch_started
        for key, value in logs.items():
            state.history.setdefault(key, []).append(value)

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


def compile_detector(
    model: keras.Model,
    params: TrainParams,
    steps_per_epoch: int,
    profile: DeviceProfile | None = None,
) -> None:
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
    optimizer: Any = keras.optimizers.Adam(schedule)
    extra: dict[str, Any] = {}
    if profile is not None and profile.mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    if profile is not None and profile.jit_compile:
        extra["jit_compile"] = True
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics, **extra)


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
    stream: Stream | None = None,
    profile: DeviceProfile | None = None,
) -> TrainResult:
    """Train the detector, checkpointing each epoch into `checkpoint_dir` and resuming from it.

    `train_examples()`/`val_examples()` return fresh iterators of (image (S,S), boxes (k,4))
    with S = input_size; n_train/n_val are their lengths. Early stopping watches
    `params.monitor` with `params.patience`, and the returned model carries the best epoch's
    weights. `on_epoch_end(epoch, logs)` is called after each epoch is checkpointed, with the
    0-based epoch (as in Keras) and its metrics: loss and its parts, learning_rate, and
    val_loss, val_ap (AP at params.val_iou), ... when there is validation data. A re-run with
    the same params and data size continues after the last completed epoch; other params
    start over. `stream` mixes synthetic studies into every epoch (`TrainResult.streamed`
    names each one); `profile` (resolved by `resolve_profile`) sets precision and XLA.
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

    synth = None
    if stream is not None:
        synth = {
            "generator": GENERATOR_VERSION,
            "params_sha256": params_digest(stream.params),
            "seed": stream.seed,
            "per_epoch": stream.per_epoch,
        }
    fingerprint = _fingerprint(params, input_size, n_train, synth)
    if profile is not None:
        fingerprint["device_profile"] = profile.name
    state = _read_state(checkpoint_dir, fingerprint)
    needs_training = state is None or (
        not state.stopped_early and state.epochs_completed < params.epochs
    )
    if needs_training:
        check_source(train_examples, n_train, input_size)
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
        compile_detector(model, params, steps_per_epoch, profile)
    resumed_from = state.epochs_completed

    if n_val == 0:
        log.warning("no validation examples: early stopping watches the training loss")
    stream_log = StreamLog() if stream is not None else None
    handler = _EpochHandler(
        state,
        checkpoint_dir,
        val_examples,
        n_val,
        params,
        test_params,
        input_size,
        on_epoch_end,
        train_examples=train_examples,
        stream_log=stream_log,
    )
    if needs_training:

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                handler.begin_epoch()

            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                if handler.end_epoch(self.model, epoch, logs or {}):
                    self.model.stop_training = True

        model.fit(
            make_train_dataset(
                train_examples,
                n_train,
                input_size,
                params,
                state.epochs_completed,
                stream=stream,
                stream_log=stream_log,
                hard_negatives=handler.hard_negatives,
            ),
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
        streamed={int(e): v for e, v in state.streamed.items()},
    )


def checkpoint_key(manifest_path: Path, params: TrainParams, input_size: int) -> str:
    """Checkpoints resume only a run on the same split data and parameters."""
    digest = hashlib.sha256(manifest_path.read_bytes())
    digest.update(params.model_dump_json().encode())
    digest.update(str(input_size).encode())
    return digest.hexdigest()[:16]


def run(
    layout: Layout,
    params: TrainParams,
    test_params: DetectionParams,
    preprocess: PreprocessParams,
    synth: SynthParams,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Stage edge: processed shards (+ streamed studies) -> models/detector.keras,
    reports/train_history.json and reports/training_stream.json."""
    import keras

    from pipeline_steps.core.shards import load_split

    if not layout.manifest.exists():
        raise DataError(f"{layout.manifest}: missing. Run the `preprocess` stage first.")
    input_size = preprocess.input_size
    train_split = load_split(layout.processed, "train")
    val_split = load_split(layout.processed, "val")
    if len(train_split) == 0 or len(val_split) == 0:
        raise DataError(
            f"{layout.manifest}: train has {len(train_split)} and val {len(val_split)} labelled images; "
            "both need at least one. Ingest more labelled studies or adjust preprocess.split."
        )
    effective, profile = resolve_profile(params, visible_gpus(), input_size)
    log.info("training profile: %s", profile.describe(effective))
    checkpoint_dir = layout.checkpoints / checkpoint_key(layout.manifest, params, input_size)
    started = time.monotonic()
    per_epoch = streamed_per_epoch(params, len(train_split))
    stream_params = stream_synth_params(synth, params.synthetic)
    workers = params.synthetic.workers if per_epoch else 0
    policy = keras.mixed_precision.global_policy()
    if profile.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with StudyProducer(stream_params, params.synthetic.seed, preprocess, workers) as producer:
            stream = (
                Stream(producer, stream_params, params.synthetic.seed, per_epoch)
                if per_epoch
                else None
            )
            result = train_detector(
                train_split.examples,
                len(train_split),
                val_split.examples,
                len(val_split),
                effective,
                test_params,
                input_size,
                checkpoint_dir,
                on_epoch_end,
                stream=stream,
                profile=profile,
            )
    finally:
        keras.mixed_precision.set_global_policy(policy)
    layout.model.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.model, keep_suffix=True) as tmp:
        result.model.save(str(tmp))
    layout.reports.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        layout.training_stream,
        json.dumps(
            stream_manifest(
                result.streamed,
                stream_params,
                params,
                per_epoch,
                GENERATOR_VERSION,
                params_digest(stream_params),
            ),
            indent=1,
        ),
    )
    write_text_atomic(
        layout.train_history,
        json.dumps(
            {
                "history": result.history,
                "epochs_run": result.epochs_run,
                "resumed_from_epoch": result.resumed_from_epoch,
                "n_train": len(train_split),
                "n_val": len(val_split),
                "n_streamed": sum(len(v) for v in result.streamed.values()),
                "profile": profile.describe(effective),
                # This call only; history["epoch_seconds"] covers resumed epochs too.
                "train_seconds": round(time.monotonic() - started, 1),
            },
            indent=2,
        ),
    )
    return result
