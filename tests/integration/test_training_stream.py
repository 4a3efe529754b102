"""Streamed synthetic training studies end to end: a `radflow run` that streams them registers a
version naming them, `radflow trace` verifies their record, and `--regenerate` renders any one of
them again bit for bit (and refuses when the record was altered)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from pipeline_steps.core.dicom_io import read_image
from tests.integration.conftest import set_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY_STREAMING = {
    "synth": {"n_images": 24, "native_size": [512, 512], "images_per_patient": [1, 2]},
    "validate": {"min_images": 4},
    "preprocess": {"input_size": 128, "target_spacing_mm": 2.8, "shard_size": 8},
    "train": {
        "epochs": 2,
        "batch_size": 4,
        "width": 8,
        "depth": 3,
        "hard_negative_fraction": 0.2,
        "hard_negative_every": 1,
        "synthetic": {"fraction": 0.3, "native_size": 256},
    },
    "gate": {"thresholds": {}},
}


def _radflow(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, RADFLOW_PSEUDONYM_DEV_MODE="1", PREFECT_SERVER_API_STARTUP_TIMEOUT="120")
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RADFLOW_LEDGER_URL"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_streamed_studies_are_registered_traced_and_regenerated(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    assert _radflow(tmp_path, "init", str(ws)).returncode == 0
    set_params(ws, TINY_STREAMING)
    run = _radflow(ws, "run", "--json")
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    stream = json.loads((ws / "reports" / "training_stream.json").read_text())
    # ~30% of each epoch's images: 8 train images -> 3 or 4 studies per epoch, 2 epochs.
    assert stream["enabled"] and stream["n_studies"] == 2 * stream["per_epoch"] > 0
    assert [e["epoch"] for e in stream["epochs"]] == [0, 1]

    image = sorted((ws / "data" / "raw" / "images").glob("*.dcm"))[0]
    out = tmp_path / "preds.jsonl"
    predicted = _radflow(
        ws,
        "predict",
        "--input",
        str(image),
        "--out",
        str(out),
        "--version",
        summary["model_version"],
    )
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    prediction_id = json.loads(out.read_text().splitlines()[0])["prediction_id"]

    traced = _radflow(ws, "trace", prediction_id, "--json")
    assert traced.returncode == 0, traced.stderr[-4000:]
    t = json.loads(traced.stdout)
    assert t["checks"]["training_stream_unaltered"] is True
    assert t["training_stream"]["studies"] == stream["n_studies"]
    assert t["training_stream"]["seed"] == 1 and t["training_stream"]["profile"] == "cpu"

    index = stream["epochs"][1]["first"]
    dcm = tmp_path / "study.dcm"
    regen = _radflow(
        ws, "trace", prediction_id, "--regenerate", str(index), "--out", str(dcm), "--json"
    )
    assert regen.returncode == 0, regen.stderr[-4000:]
    found = json.loads(regen.stdout)
    assert found["identical"] and found["regenerated_sha256"] == stream["studies"][str(index)][0]
    # The written file holds exactly those pixels, and radflow's reader opens it.
    stored = pydicom.dcmread(dcm).pixel_array
    assert hashlib.sha256(stored.tobytes()).hexdigest() == found["regenerated_sha256"]
    assert read_image(dcm, 0.35).pixels.shape == stored.shape
    assert found["lesion_diameters_mm"] == stream["studies"][str(index)][1]

    missing = _radflow(ws, "trace", prediction_id, "--regenerate", "100000")
    assert missing.returncode == 1 and "is not among" in missing.stderr

    # An altered record is caught by the trace and refused by --regenerate.
    (artifact,) = [
        p for p in ws.rglob("lineage/training_stream.json") if summary["run_id"] in p.parts
    ]
    record = json.loads(artifact.read_text())
    record["studies"][str(index)][0] = "0" * 64
    artifact.write_text(json.dumps(record))
    traced = _radflow(ws, "trace", prediction_id, "--json")
    assert traced.returncode == 1
    assert json.loads(traced.stdout)["checks"]["training_stream_unaltered"] is False
    refused = _radflow(ws, "trace", prediction_id, "--regenerate", str(index))
    assert refused.returncode == 1 and "does not match its version's tag" in refused.stderr
