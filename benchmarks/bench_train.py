"""Benchmark of detector training and inference at the default parameters.

    python benchmarks/bench_train.py                          # synthetic examples in memory
    python benchmarks/bench_train.py --workspace /tmp/exp     # a prepared workspace's shards

Prints, in one run:
1. the training step time through the real input pipeline (`train.make_train_dataset`: streaming
   shuffle, crop, augmentation, target encoding, tf.data prefetch) against the step time on the
   same batches already in memory as tensors, and their ratio (target: at most 1.1x, so that the
   input pipeline is not the bottleneck);
2. training throughput: samples (crops, or images) per second, and images per second in the sense
   of an epoch (an image's crops count once);
3. model-only inference images/s at the input size (no decoding), with and without flip TTA, and
   the decoding cost per image.
Both training modes run `model.fit` on the same compiled model, after a warm-up, alternating
`--repeat` times; the best of each is kept (the machine is shared: the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"pipeline_vs_memory": 1.1}


def synthetic_examples(n: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Smooth textured images with one or no bright disc: the shape and dtype of real examples."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] + 0.5
    out = []
    for i in range(n):
        image = ndimage.gaussian_filter(rng.random((size, size)), 3) * 0.6 + 0.2
        boxes = np.zeros((0, 4), np.float32)
        if i % 2 == 0:
            r = rng.uniform(2, 10)
            cx, cy = rng.uniform(r + 8, size - r - 8, 2)
            image = image + 0.2 * (np.hypot(xx - cx, yy - cy) <= r)
            boxes = np.array([[cx - r, cy - r, cx + r, cy + r]], np.float32)
        out.append((np.clip(image, 0, 1).astype(np.float32), boxes))
    return out


def workspace_examples(workspace: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    from pipeline_steps.core.shards import load_split

    split = load_split(workspace / "data" / "processed", "train")
    examples = list(split.examples())
    return examples, examples[0][0].shape[0]


def _fit_seconds(model: object, dataset: object, steps: int) -> float:
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)  # type: ignore[attr-defined]
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", type=Path, help="use this workspace's train shards")
    parser.add_argument(
        "--n-images", type=int, default=256, help="synthetic examples (no workspace)"
    )
    parser.add_argument("--size", type=int, default=256, help="input size (synthetic examples)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per measurement")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args, _ = parser.parse_known_args()

    import keras
    import tensorflow as tf

    from pipeline_steps.core.config import DetectionParams, TrainParams
    from pipeline_steps.core.detector import build_detector, decode_detections, predict_outputs
    from pipeline_steps.core.train_input import make_train_dataset, sample_size, samples_per_epoch
    from pipeline_steps.train import compile_detector

    load_before = os.getloadavg()
    if args.workspace:
        examples, size = workspace_examples(args.workspace)
        source = f"{args.workspace} train shards ({len(examples)} images)"
    else:
        size = args.size
        examples = synthetic_examples(args.n_images, size, seed=0)
        source = f"{len(examples)} synthetic images in memory"
    params = TrainParams()
    keras.utils.set_random_seed(params.seed)
    n = len(examples)
    per_epoch = samples_per_epoch(params, n, size)
    steps_per_epoch = -(-per_epoch // params.batch_size)
    steps = min(args.steps, steps_per_epoch)

    def stream() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return iter(examples)

    model = build_detector(size, params)
    compile_detector(model, params, steps_per_epoch)
    pipeline = make_train_dataset(stream, n, size, params).repeat()
    # The same kind of batches, produced once and held as tensors.
    held = list(make_train_dataset(stream, n, size, params).take(steps))
    x = tf.concat([b[0] for b in held], 0)
    y = tf.concat([b[1] for b in held], 0)
    memory = tf.data.Dataset.from_tensor_slices((x, y)).batch(params.batch_size).cache().repeat()
    _fit_seconds(model, memory, 3)  # compile the train step
    _fit_seconds(model, pipeline, 3)  # start the generator and its prefetch

    times: dict[str, list[float]] = {"memory": [], "pipeline": []}
    cpu_start = time.process_time()
    for _ in range(args.repeat):
        times["memory"].append(_fit_seconds(model, memory, steps) / steps)
        times["pipeline"].append(_fit_seconds(model, pipeline, steps) / steps)
    cpu = time.process_time() - cpu_start
    step_memory, step_pipeline = min(times["memory"]), min(times["pipeline"])
    batch = params.batch_size
    crops_per_image = per_epoch / n

    images = np.stack([image for image, _ in examples[:64]])
    model_only: dict[str, float] = {}
    for tta in (False, True):
        predict_outputs(model, images[:16], flip_tta=tta)  # warm-up
        best = min(
            _timed(lambda t=tta: predict_outputs(model, images, flip_tta=t))
            for _ in range(args.repeat)
        )
        model_only["tta" if tta else "plain"] = len(images) / best
    outputs = predict_outputs(model, images)
    decode = min(
        _timed(lambda: decode_detections(outputs, DetectionParams(score_threshold=0.01), size))
        for _ in range(args.repeat)
    )
    load_after = os.getloadavg()

    figures = {
        "source": source,
        "input_size": size,
        "sample_size": sample_size(params, size),
        "batch_size": batch,
        "steps": steps,
        "step_s_memory": step_memory,
        "step_s_pipeline": step_pipeline,
        "pipeline_vs_memory": step_pipeline / step_memory,
        "train_samples_per_s": batch / step_pipeline,
        "train_images_per_s": batch / step_pipeline / crops_per_image,
        "epoch_s": steps_per_epoch * step_pipeline,
        "infer_images_per_s": model_only["plain"],
        "infer_images_per_s_tta": model_only["tta"],
        "decode_ms_per_image": 1000 * decode / len(images),
        "cpu_s_per_step": cpu / (args.repeat * 2 * steps),
        "load_before": load_before,
        "load_after": load_after,
    }
    print(f"data: {source}; input {size}, samples {figures['sample_size']}, batch {batch}")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    print(
        f"train step: in memory {1000 * step_memory:.0f} ms, through tf.data "
        f"{1000 * step_pipeline:.0f} ms: {figures['pipeline_vs_memory']:.2f}x "
        f"(target <= {TARGETS['pipeline_vs_memory']}x) "
        + ("met" if figures["pipeline_vs_memory"] <= TARGETS["pipeline_vs_memory"] else "MISSED")
    )
    print(
        f"training: {figures['train_samples_per_s']:.1f} samples/s = "
        f"{figures['train_images_per_s']:.1f} images/s ({crops_per_image:g} samples per image "
        f"per epoch); one epoch of {n} images ~ {figures['epoch_s']:.0f} s"
    )
    print(
        f"inference (model only, {size}x{size}): {model_only['plain']:.1f} images/s, "
        f"{model_only['tta']:.1f} with flip TTA; decoding {figures['decode_ms_per_image']:.2f} "
        "ms/image"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
