"""Benchmark of prediction: batch throughput and single-image latency against the model-only figures.

    python benchmarks/bench_predict.py                          # a default-architecture detector
    python benchmarks/bench_predict.py --workspace /tmp/ws      # that workspace's production model

Prints, in one run, at the default input size:
1. model-only: images/s of the detector on already-preprocessed batches (flip TTA and decoding
   included, as served), and its single-image latency p50/p95;
2. end to end, batch: images/s of the batch path from DICOM files on disk to ledgered JSON lines
   (ingestion screening, decode, de-identified hashes, preprocessing, model, ledger transaction per
   chunk, JSONL) -- the body of the `batch_prediction` flow -- and with `--workspace`, the whole
   `batch_prediction` Prefect flow as `radflow predict` runs it, without and with loading the model
   from MLflow (after a warm-up run that starts Prefect's temporary server);
3. end to end, single image: latency p50/p95 of one DICOM through the same path plus its own ledger
   transaction (what `POST /predict` does besides HTTP), after warm-up; with `--workspace`, also
   through HTTP against a real `radflow serve-api` on loopback.
Each end-to-end figure is printed against the model-only one. Targets: at least 20 images/s batch
and a p95 of at most 150 ms single-image, on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"batch_images_per_s": 20.0, "single_p95_ms": 150.0}


def _data(root: Path, n: int) -> list[Path]:
    """n synthetic DICOMs at the default native size, generated once and reused."""
    from pipeline_steps.core.config import Params
    from pipeline_steps.synthetic import generate_dataset

    images = root / "images"
    found = sorted(images.glob("*.dcm")) if images.exists() else []
    if len(found) < n:
        generate_dataset(Params().synth, root, n_images=n, seed=4242, workers=os.cpu_count() or 1)
        found = sorted(images.glob("*.dcm"))
    return found[:n]


def _model(workspace: Path | None):  # type: ignore[no-untyped-def]
    from pipeline_steps.core.config import Params
    from pipeline_steps.serving.prediction import ModelRef, Provenance
    from pipeline_steps.serving.serving import ServingConfig

    if workspace is not None:
        from flows.predict import load_model
        from flows.workspace import open_workspace

        layout, params = open_workspace(workspace)
        loaded = load_model(layout, params)
        return loaded.detector, loaded.config, Provenance(loaded.ref, loaded.data_version, "bench")
    from pipeline_steps.core.detector import build_detector

    params = Params()
    detector = build_detector(params.preprocess.input_size, params.train)
    config = ServingConfig.from_params(params.preprocess, params.test, params.ingest)
    return detector, config, Provenance(ModelRef("bench", "0", None, ""), "", "bench")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _http_latency(workspace: Path, files: list[Path], n: int) -> list[float]:
    """Milliseconds per `POST /predict` against a real `radflow serve-api` on loopback."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--workspace", str(workspace), "serve-api"]
        + ["--port", str(port), "--poll-seconds", "0", "--insecure-no-auth"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("radflow serve-api did not come up")
            time.sleep(0.5)
        bodies = [p.read_bytes() for p in files[: min(len(files), 32)]]
        timings = []
        with httpx.Client(timeout=60) as client:
            for i in range(n + 5):
                t = time.perf_counter()
                reply = client.post(
                    f"{url}/predict",
                    content=bodies[i % len(bodies)],
                    headers={"content-type": "application/dicom"},
                )
                reply.raise_for_status()
                if i >= 5:  # after warm-up
                    timings.append((time.perf_counter() - t) * 1000)
        return timings
    finally:
        server.terminate()
        server.wait(30)


def compare_strides(n_images: int, repeats: int = 6) -> int:
    """Model-only throughput (flip TTA and decoding, as served) of the default detector at output
    stride 4 and 2, interleaved in one process so that load affects both alike; prints the ratio."""
    import numpy as np

    from pipeline_steps.core.config import Params
    from pipeline_steps.core.detector import build_detector, predict_boxes

    params = Params()
    size = params.preprocess.input_size
    images = np.random.default_rng(0).random((n_images, size, size), dtype=np.float32)
    models = {
        stride: build_detector(size, params.train.model_copy(update={"output_stride": stride}))
        for stride in (4, 2)
    }
    rates: dict[int, list[float]] = {4: [], 2: []}
    for model in models.values():
        predict_boxes(model, images[:16], params.test)  # warm-up: tracing
    for _ in range(repeats):
        for stride, model in models.items():
            started = time.perf_counter()
            predict_boxes(model, images, params.test)
            rates[stride].append(n_images / (time.perf_counter() - started))
    medians = {stride: statistics.median(r) for stride, r in rates.items()}
    for stride, model in models.items():
        print(
            f"output stride {stride}: {model.count_params()} parameters, model only "
            f"{medians[stride]:.1f} img/s (median of {repeats})"
        )
    print(
        f"stride 2 / stride 4: {medians[2] / medians[4]:.3f}x; load average {os.getloadavg()[0]:.1f}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workspace", type=Path, help="predict with this workspace's production model"
    )
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--single", type=int, default=100, help="single-image requests timed")
    parser.add_argument("--root", type=Path, default=Path("/tmp/radflow-bench/predict"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--compare-strides",
        action="store_true",
        help="only compare the model-only throughput of output stride 4 and 2",
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.compare_strides:
        return compare_strides(min(args.n_images, 64))
    os.environ.setdefault("RADFLOW_PSEUDONYM_KEY", "bench-key")

    from flows.predict import CHUNK, record_predictions
    from flows.review_store import keep_predicted
    from pipeline_steps.core.config import Params
    from pipeline_steps.core.detector import predict_boxes
    from pipeline_steps.core.dicom_io import read_image
    from pipeline_steps.core.layout import Layout
    from pipeline_steps.governance.ledger import Ledger
    from pipeline_steps.serving.prediction import predict_batch
    from pipeline_steps.serving.serving import prepare

    files = _data(args.root, args.n_images)
    detector, config, provenance = _model(args.workspace)
    ingest = Params().ingest
    review_params = Params().review
    key = os.environ["RADFLOW_PSEUDONYM_KEY"]
    threshold = config.detection.score_threshold
    load = os.getloadavg()[0]
    print(
        f"{len(files)} images, input {config.preprocess.input_size}, flip TTA "
        f"{config.detection.flip_tta}; load average {load:.1f}",
        flush=True,
    )

    # 1. model only
    prepared = np.stack(
        [prepare(read_image(p, ingest.default_spacing_mm), config.preprocess)[0] for p in files]
    )
    predict_boxes(detector, prepared[:CHUNK], config.detection)  # warm-up (graph tracing)
    start = time.perf_counter()
    for i in range(0, len(prepared), CHUNK):
        predict_boxes(detector, prepared[i : i + CHUNK], config.detection)
    model_rate = len(prepared) / (time.perf_counter() - start)
    model_single = []
    for i in range(args.single):
        t = time.perf_counter()
        predict_boxes(detector, prepared[i % len(prepared)][None], config.detection)
        model_single.append((time.perf_counter() - t) * 1000)

    with tempfile.TemporaryDirectory(prefix="radflow-bench-predict-") as tmp:
        ledger = Ledger(f"sqlite:///{Path(tmp) / 'ledger.db'}")
        # 2. batch, end to end (the flow's body)
        out = Path(tmp) / "preds.jsonl"
        inputs = [(str(p), p) for p in files]
        start = time.perf_counter()
        with out.open("w") as fh:
            for i in range(0, len(inputs), CHUNK):
                records = predict_batch(
                    detector,
                    inputs[i : i + CHUNK],
                    config,
                    ingest,
                    provenance,
                    threshold=threshold,
                    key=key,
                )
                record_predictions(ledger, records)
                fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
        batch_rate = len(inputs) / (time.perf_counter() - start)
        failed = sum("error" in json.loads(line) for line in out.read_text().splitlines())

        # 2b. the same, keeping each predicted input for review as the flow does
        # (review.keep_inputs, the default): a copy of every file into a fresh review store.
        kept_layout = Layout(Path(tmp) / "kept")
        start = time.perf_counter()
        with out.open("w") as fh:
            for i in range(0, len(inputs), CHUNK):
                records = predict_batch(
                    detector,
                    inputs[i : i + CHUNK],
                    config,
                    ingest,
                    provenance,
                    threshold=threshold,
                    key=key,
                )
                record_predictions(ledger, records)
                keep_predicted(kept_layout, review_params, records, files[i : i + CHUNK])
                fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
        batch_keep_rate = len(inputs) / (time.perf_counter() - start)
        kept_files = len(list(kept_layout.review_images.glob("*.dcm")))

        # 3. single image, end to end (the API's path without HTTP)
        single = []
        for i in range(args.single + 5):
            t = time.perf_counter()
            records = predict_batch(
                detector,
                [inputs[i % len(inputs)]],
                config,
                ingest,
                provenance,
                threshold=threshold,
                key=key,
            )
            record_predictions(ledger, records)
            if i >= 5:  # after warm-up
                single.append((time.perf_counter() - t) * 1000)
        ledger.close()

        flow_rate = flow_total_rate = None
        if args.workspace is not None:
            from flows.predict import batch_prediction

            folder = files[0].parent  # every image there (at least --n-images)
            batch_prediction(  # warm-up: Prefect's temporary server starts on the first flow run
                str(args.workspace), str(files[0]), str(Path(tmp) / "warm.jsonl")
            )
            t = time.perf_counter()
            summary = batch_prediction(
                str(args.workspace), str(folder), str(Path(tmp) / "flow.jsonl")
            )
            flow_seconds = time.perf_counter() - t
            flow_rate = summary["images"] / summary["seconds"]  # without loading the model
            flow_total_rate = summary["images"] / flow_seconds

    http = _http_latency(args.workspace, files, args.single) if args.workspace else None
    figures = {
        "images": len(files),
        "failed": failed,
        "load_average_start": load,
        "load_average_end": os.getloadavg()[0],
        "model_only_images_per_s": model_rate,
        "model_only_single_p50_ms": statistics.median(model_single),
        "model_only_single_p95_ms": _pct(model_single, 0.95),
        "batch_images_per_s": batch_rate,
        "batch_vs_model_only": batch_rate / model_rate,
        "batch_keeping_inputs_images_per_s": batch_keep_rate,
        "batch_keeping_inputs_vs_not": batch_keep_rate / batch_rate,
        "inputs_kept": kept_files,
        "flow_images_per_s": flow_rate,
        "flow_images_per_s_with_model_load": flow_total_rate,
        "single_p50_ms": statistics.median(single),
        "single_p95_ms": _pct(single, 0.95),
        "single_p95_vs_model_only": _pct(single, 0.95) / _pct(model_single, 0.95),
        "http_p50_ms": statistics.median(http) if http else None,
        "http_p95_ms": _pct(http, 0.95) if http else None,
    }
    rows = [
        ("model only, batch", f"{model_rate:.1f} img/s", "", ""),
        (
            "model only, single image",
            f"p50 {figures['model_only_single_p50_ms']:.1f} ms, "
            f"p95 {figures['model_only_single_p95_ms']:.1f} ms",
            "",
            "",
        ),
        (
            "end to end, batch",
            f"{batch_rate:.1f} img/s",
            f"{batch_rate / model_rate:.2f}x model only",
            f">= {TARGETS['batch_images_per_s']:.0f} img/s: "
            + ("met" if batch_rate >= TARGETS["batch_images_per_s"] else "MISSED"),
        ),
        (
            "  ... keeping each input for review",
            f"{batch_keep_rate:.1f} img/s",
            f"{batch_keep_rate / batch_rate:.2f}x not keeping",
            f"{kept_files} files kept",
        ),
    ]
    if flow_rate is not None:
        rows.append(
            (
                "`batch_prediction` flow (Prefect)",
                f"{flow_rate:.1f} img/s",
                f"{flow_rate / model_rate:.2f}x model only",
                "met" if flow_rate >= TARGETS["batch_images_per_s"] else "MISSED",
            )
        )
        rows.append(("  ... including loading the model", f"{flow_total_rate:.1f} img/s", "", ""))
    rows.append(
        (
            "end to end, single image",
            f"p50 {figures['single_p50_ms']:.1f} ms, p95 {figures['single_p95_ms']:.1f} ms",
            f"p95 {figures['single_p95_vs_model_only']:.2f}x model only",
            f"p95 <= {TARGETS['single_p95_ms']:.0f} ms: "
            + ("met" if figures["single_p95_ms"] <= TARGETS["single_p95_ms"] else "MISSED"),
        )
    )
    if http:
        p95 = figures["http_p95_ms"]
        rows.append(
            (
                "POST /predict (serve-api, HTTP)",
                f"p50 {figures['http_p50_ms']:.1f} ms, p95 {p95:.1f} ms",
                f"p95 {p95 / figures['model_only_single_p95_ms']:.2f}x model only",
                f"p95 <= {TARGETS['single_p95_ms']:.0f} ms: "
                + ("met" if p95 <= TARGETS["single_p95_ms"] else "MISSED"),
            )
        )
    width = max(len(r[0]) for r in rows)
    for name, value, ratio, target in rows:
        print(f"{name:<{width}}  {value:<28}  {ratio:<22}  {target}")
    print(f"load average at the end: {figures['load_average_end']:.1f}; failed inputs: {failed}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
