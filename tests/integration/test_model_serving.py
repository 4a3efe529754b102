"""`mlflow models serve -m models:/radflow-detector@production --env-manager local` on loopback answers a
real HTTP request with boxes in original DICOM pixels, computed by the training code's own path."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import build_dicom
from tests.integration.test_registry import build_workspace, free_port, stop, wait_http

pytestmark = pytest.mark.integration


def test_serving_prepares_pixels_exactly_as_the_preprocess_stage(tmp_path):
    from pipeline_steps.core.config import PreprocessParams
    from pipeline_steps.core.dicom_io import read_image
    from pipeline_steps.core.shards import QUANT
    from pipeline_steps.preprocess import PixelJob, process_file
    from pipeline_steps.serving.serving import prepare

    rng = np.random.default_rng(1)
    params = PreprocessParams(input_size=64, target_spacing_mm=2.0)
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        path = build_dicom(
            tmp_path / f"{photometric}.dcm",
            rng.integers(0, 4096, size=(300, 280), dtype=np.uint16),
            photometric=photometric,
        )
        image = read_image(path, 0.35)
        served, geometry = prepare(image, params)
        job = PixelJob("k", str(path), image.spacing.row_mm, image.spacing.col_mm, 300, 280)
        stored = process_file(job, params).pixels  # what training reads from its shard
        assert stored is not None
        assert np.array_equal(served, stored.astype(np.float32) / np.float32(QUANT))
        assert (geometry.orig_rows, geometry.orig_cols) == (300, 280)


def test_a_stored_serving_config_outlives_changes_to_the_params_models():
    from pipeline_steps.core.config import DetectionParams, IngestParams, PreprocessParams
    from pipeline_steps.serving.serving import ServingConfig

    config = ServingConfig.from_params(
        PreprocessParams(input_size=64, target_spacing_mm=2.0, workers=3),
        DetectionParams(score_threshold=0.4, max_detections=3),
        IngestParams(default_spacing_mm=0.2),
    )
    stored = json.loads(config.to_json())
    assert set(stored["preprocess"]) == {"input_size", "target_spacing_mm", "window", "percentiles"}
    # A later radflow dropped an option and reshaped a nested section: the model still loads.
    stored["test"]["retired_option"] = 1
    stored["test"]["baseline"] = {"retired_too": 1.0}
    assert ServingConfig.from_json(json.dumps(stored)) == ServingConfig(
        PreprocessParams(input_size=64, target_spacing_mm=2.0),
        DetectionParams(score_threshold=0.4, max_detections=3),
        0.2,
    )


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    """One registered version of a small detector (random weights), promoted to production."""
    from flows import registry, stages

    root = tmp_path_factory.mktemp("serve-ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workspace's own SQLite store
        mp.delenv("RADFLOW_LEDGER_URL", raising=False)
        layout, params = build_workspace(root, n_images=2)
        version = stages.register(layout, params).model_version
        with registry.governance(layout, params) as (reg, ledger):
            registry.promote(
                reg, ledger, version, "production", actor="test", reason="serve", force=True
            )
    return layout, params


@pytest.fixture(scope="module")
def server(production):
    layout, _ = production
    port = free_port()
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"sqlite:///{layout.mlflow_db}",
        # the server execs `uvicorn` from PATH: the running environment's scripts must be found
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("RADFLOW_LEDGER_URL", None)
    log = (layout.root / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/radflow-detector@production",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        cwd=layout.root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the server runs uvicorn in a child: stop the whole group
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, 240, "mlflow models serve")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
        log.close()


def _invoke(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert reply.status == 200
        return json.loads(reply.read())["predictions"]


def test_the_production_alias_serves_boxes_over_http(server, production, tmp_path):
    import keras

    from pipeline_steps.core.detector import predict_boxes
    from pipeline_steps.core.dicom_io import read_image
    from pipeline_steps.serving.serving import BOX_KEYS, prepare

    layout, params = production
    path = build_dicom(
        tmp_path / "query.dcm",
        np.random.default_rng(7).integers(0, 4096, size=(300, 280), dtype=np.uint16),
    )
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    rows = _invoke(
        server,
        {
            "dataframe_split": {
                "columns": ["dicom"],
                "data": [[encoded], [str(path)], ["not a DICOM at all"]],
            },
            "params": {"score_threshold": 0.0},
        },
    )
    assert len(rows) == 3
    as_bytes, as_path, bad = rows
    assert as_bytes == as_path  # the same image, whichever way it was sent

    image = read_image(path, params.ingest.default_spacing_mm)
    assert as_bytes["image_sha256"] == image.pixel_sha256 and as_bytes["error"] == ""
    assert (as_bytes["rows"], as_bytes["columns"]) == (300, 280)
    boxes = as_bytes["boxes"]
    # threshold 0: every kept peak, less those wholly in the letterbox padding
    assert 1 <= len(boxes) <= params.test.max_detections
    for box in boxes:
        assert set(box) == {*BOX_KEYS, "label"} and box["label"] == "opacity"
        assert 0 <= box["x_min"] <= box["x_max"] <= 280 and 0 <= box["y_min"] <= box["y_max"] <= 300

    # The server's boxes are the training code's: preprocess, predict, map back to original pixels.
    model = keras.models.load_model(layout.model, compile=False)
    pixels, geometry = prepare(image, params.preprocess)
    found = predict_boxes(
        model, pixels[None], params.test.model_copy(update={"score_threshold": 0.0})
    )[0]
    expected = geometry.inverse(found[:, :4])
    expected[:, [0, 2]] = expected[:, [0, 2]].clip(0, 280)
    expected[:, [1, 3]] = expected[:, [1, 3]].clip(0, 300)
    # boxes wholly in the letterbox padding have no area left in the image: not served
    inside = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
    served = np.array([[b[k] for k in BOX_KEYS] for b in boxes])
    np.testing.assert_allclose(served[:, :4], expected[inside], atol=1e-3)
    np.testing.assert_allclose(served[:, 4], found[inside, 4], atol=1e-5)

    assert bad["boxes"] == [] and "neither an existing DICOM file path nor base64" in bad["error"]

    # Without params the model's own operating point applies (0.3): an untrained net finds nothing.
    (default,) = _invoke(server, {"dataframe_split": {"columns": ["dicom"], "data": [[encoded]]}})
    assert default["boxes"] == [] and default["image_sha256"] == image.pixel_sha256
