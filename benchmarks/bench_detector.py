"""The detector's quality against what it was trained on: a learning curve (held-out sensitivity,
overall and for lesions under 12 mm, against the number of training images seen) for variants of
the `train` params, on a workspace's splits and a fixed held-out synthetic evaluation set.

The evaluation set is rendered by the embedded generator with the workspace's `synth` params (the
default data's distribution) under its own seed, through the same DICOM reader and transforms as
ingested files; it shares no random stream with the dataset or with any training stream.

    python benchmarks/bench_detector.py --workspace WS \\
        --variant default='{}' --variant streamed='{"synthetic": {"fraction": 0.5}}'

Each variant trains from scratch (checkpoints under a temporary folder), is scored every
`--curve-every` epochs, and prints one JSON line per point and one per variant (`--out` appends
them to a file too).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def build_eval_set(workspace: Path, n: int, seed: int) -> tuple[np.ndarray, list, list]:
    from pipeline_steps.core.config import load_params
    from pipeline_steps.core.subgroups import size_band
    from pipeline_steps.synthetic.stream import StudyProducer

    params = load_params(workspace / "params.yaml")
    with StudyProducer(params.synth, seed, params.preprocess, workers=2) as producer:
        studies = list(producer.studies(range(n)))
    images = np.stack([s.image for s in studies]).astype(np.float32)
    boxes = [np.asarray(s.boxes, np.float32).reshape(-1, 4) for s in studies]
    bands = [[size_band(float(d)) for d in s.diameters_mm] for s in studies]
    return images, boxes, bands


def score(model: Any, images: np.ndarray, boxes: list, bands: list, test_params: Any) -> dict:
    from pipeline_steps.core.detector import predict_boxes
    from pipeline_steps.core.metrics import evaluate_detections
    from pipeline_steps.core.subgroups import lesion_sensitivity, operating_threshold

    preds = predict_boxes(model, images, test_params.model_copy(update={"score_threshold": 0.01}))
    metrics = evaluate_detections(preds, boxes)
    threshold = operating_threshold(preds, boxes, 1.0)
    sizes = lesion_sensitivity(preds, boxes, bands, threshold)
    small = [sizes.get(band, (0, 0)) for band in ("<8mm", "8-12mm")]
    return {
        "ap50": round(metrics["ap50"], 3),
        "sens_at_1fp": round(metrics["sens_at_1fp"], 3),
        "cpm": round(metrics["cpm"], 3),
        "auroc": round(metrics["auroc"], 3),
        "sens_under_12mm": round(sum(f for f, _ in small) / max(1, sum(t for _, t in small)), 3),
        "found_by_size": {band: list(v) for band, v in sorted(sizes.items())},
    }


def run_variant(
    workspace: Path, name: str, overrides: dict, every: int, eval_set: tuple, out: Path | None
) -> dict:
    import keras

    from pipeline_steps import train
    from pipeline_steps.core.config import TrainParams, load_params
    from pipeline_steps.core.detector import keras_losses
    from pipeline_steps.core.device_profile import resolve_profile, visible_gpus
    from pipeline_steps.core.layout import Layout
    from pipeline_steps.core.shards import load_split
    from pipeline_steps.core.train_input import Stream, streamed_per_epoch
    from pipeline_steps.synthetic.stream import StudyProducer, stream_synth_params

    params = load_params(workspace / "params.yaml")
    raw = params.train.model_dump(mode="json")
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    train_params = TrainParams.model_validate(raw)
    layout = Layout(workspace)
    tr, va = load_split(layout.processed, "train"), load_split(layout.processed, "val")
    effective, profile = resolve_profile(train_params, visible_gpus(), params.preprocess.input_size)
    per_epoch = streamed_per_epoch(train_params, len(tr))
    images_per_epoch = len(tr) + per_epoch
    synth = stream_synth_params(params.synth, train_params.synthetic)
    keras_losses()
    curve: list[dict] = []

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)
        if out is not None:
            with out.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-detector-") as tmp:
        checkpoints = Path(tmp)

        def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
            if every and (epoch + 1) % every == 0 and epoch + 1 < effective.epochs:
                state = json.loads((checkpoints / "state.json").read_text())
                model = keras.saving.load_model(checkpoints / state["model_file"])
                point = {
                    "variant": name,
                    "epoch": epoch + 1,
                    "images_seen": (epoch + 1) * images_per_epoch,
                    "streamed_seen": (epoch + 1) * per_epoch,
                    **score(model, *eval_set, params.test),
                }
                curve.append(point)
                emit(point)

        started = time.monotonic()
        workers = train_params.synthetic.workers if per_epoch else 0
        with StudyProducer(synth, train_params.synthetic.seed, params.preprocess, workers) as prod:
            stream = (
                Stream(prod, synth, train_params.synthetic.seed, per_epoch) if per_epoch else None
            )
            result = train.train_detector(
                tr.examples,
                len(tr),
                va.examples,
                len(va),
                effective,
                params.test,
                params.preprocess.input_size,
                checkpoints,
                on_epoch_end,
                stream=stream,
                profile=profile,
            )
        seconds = time.monotonic() - started
    final = {
        "variant": name,
        "overrides": overrides,
        "epoch": len(result.history.get("loss", [])),
        "best_epoch": result.best_epoch + 1,
        "images_seen": len(result.history.get("loss", [])) * images_per_epoch,
        "train_seconds": round(seconds),
        "n_train": len(tr),
        "streamed_per_epoch": per_epoch,
        **score(result.model, *eval_set, params.test),
    }
    emit(final)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, help="a workspace after `radflow run`")
    parser.add_argument(
        "--variant",
        action="append",
        metavar="NAME=JSON",
        help="train-param overrides (repeatable; default: params.yaml as is)",
    )
    parser.add_argument("--eval-images", type=int, default=400, help="held-out evaluation studies")
    parser.add_argument("--eval-seed", type=int, default=777, help="their seed (default: 777)")
    parser.add_argument("--curve-every", type=int, default=2, help="score every N epochs")
    parser.add_argument("--out", type=Path, help="append the JSON lines here too")
    args = parser.parse_args(argv)
    if args.workspace is None:
        print("bench_detector: give --workspace (a workspace after `radflow run`); not run")
        return 0
    eval_set = build_eval_set(args.workspace, args.eval_images, args.eval_seed)
    print(f"evaluation set: {len(eval_set[0])} studies, {sum(map(len, eval_set[1]))} lesions")
    for spec in args.variant or ["params.yaml={}"]:
        name, _, text = spec.partition("=")
        run_variant(
            args.workspace, name, json.loads(text or "{}"), args.curve_every, eval_set, args.out
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
