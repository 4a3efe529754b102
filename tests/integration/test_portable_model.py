"""The registered model serves outside the checkout: `mlflow models serve --env-manager uv` builds the
model's environment from its own requirements.txt and constraints.txt alone (from the package index,
never from this environment), loads radflow's code from the model's `code_paths`, and answers a real
DICOM request over HTTP on loopback in the schema of the model's signature.

Building the environment downloads TensorFlow, MLflow and their dependencies into uv's cache
(`UV_CACHE_DIR`, by default `~/.cache/uv`) on the first run; later runs link from that cache. The
environment itself is built afresh in the test's temporary folder every run (`MLFLOW_ENV_ROOT`)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import build_dicom
from tests.integration.test_registry import build_workspace, free_port, stop, wait_http

pytestmark = pytest.mark.integration

MODEL_URI = "models:/radflow-detector@production"
CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    """One registered version of a small detector (random weights), promoted to production."""
    from flows import registry, stages

    root = tmp_path_factory.mktemp("portable-ws")
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


def _outside_env(tmp: Path, tracking_uri: str) -> dict[str, str]:
    """The environment of a user on another machine: the tracking URI, uv on PATH (alone, from a
    folder of its own), nothing that points at this checkout or its virtual environment."""
    tools = tmp / "tools"
    tools.mkdir()
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is a dev dependency (pyproject.toml): reinstall with `make test`"
    (tools / "uv").symlink_to(uv)
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "RADFLOW_LEDGER_URL"}
    }
    env.update(
        PATH=os.pathsep.join([str(tools), *path]),
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_ENV_ROOT=str(tmp / "envs"),  # built afresh each run; the uv cache makes it quick
        # the served model records each answer: its ledger code and drivers travel with it
        RADFLOW_LEDGER_URL=f"sqlite:///{tmp / 'ledger.db'}",
    )
    return env


@pytest.fixture(scope="module")
def served(production, tmp_path_factory):
    layout, _ = production
    tmp = tmp_path_factory.mktemp("elsewhere")
    assert CHECKOUT not in tmp.parents
    env = _outside_env(tmp, f"sqlite:///{layout.mlflow_db}")
    port = free_port()
    log_path = tmp / "serve.log"
    started = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "models",
                "serve",
                "-m",
                MODEL_URI,
                "--env-manager",
                "uv",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-w",
                "1",
            ],
            cwd=tmp,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the server runs uvicorn in a child: stop the whole group
        )
    try:
        try:
            # The first run downloads the model's environment (about 1 GB) into uv's cache.
            wait_http(f"http://127.0.0.1:{port}/ping", proc, 1200, "mlflow models serve")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{log_path.read_text()[-6000:]}") from None
        print(f"model environment built and served in {time.monotonic() - started:.0f} s")
        (env_dir,) = (tmp / "envs").iterdir()
        yield {"url": f"http://127.0.0.1:{port}", "env_dir": env_dir, "cwd": tmp, "env": env}
    finally:
        stop(proc)


def _invoke(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as reply:
        assert reply.status == 200
        return json.loads(reply.read())["predictions"]


def test_the_model_carries_its_code_pinned_requirements_and_a_signature(production, tmp_path):
    import mlflow

    from pipeline_steps.serving import pyfunc

    layout, _ = production
    mlflow.set_tracking_uri(f"sqlite:///{layout.mlflow_db}")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=MODEL_URI, dst_path=tmp_path))
    carried = sorted(
        p.relative_to(local / "code") for p in (local / "code").rglob("*.py") if p.is_file()
    )
    assert carried == pyfunc.code_files()
    for relative in carried:  # the code the version was registered with, byte for byte
        assert (local / "code" / relative).read_bytes() == (
            pyfunc.CODE_ROOT / relative
        ).read_bytes()

    requirements = (local / "requirements.txt").read_text().split()
    assert "-c" in requirements and "constraints.txt" in requirements
    assert not [r for r in requirements if "radflow" in r.lower()]
    constraints = set((local / "constraints.txt").read_text().split())
    for name in ("mlflow", "tensorflow-cpu", "keras", "numpy", "pydicom", "pandas"):
        assert f"{name}=={metadata.version(name)}" in requirements
    for name in ("fastapi", "protobuf", "scipy", "h5py"):  # dependencies of dependencies
        assert f"{name}=={metadata.version(name)}" in constraints

    signature = mlflow.models.get_model_info(MODEL_URI).signature
    assert signature.inputs.input_names() == ["dicom"]
    assert signature.outputs.input_names() == list(pyfunc.OUTPUT_COLUMNS)


def test_the_served_environment_is_built_from_the_models_requirements_alone(served):
    python = served["env_dir"] / "bin" / "python"
    probe = (
        "import importlib.util, json, sys; from importlib import metadata\n"
        "names = json.loads(sys.argv[1])\n"
        "print(json.dumps({'radflow_importable': importlib.util.find_spec('pipeline_steps') is not None,"
        " 'versions': {n: metadata.version(n) for n in names}}))"
    )
    names = [
        "mlflow",
        "tensorflow-cpu",
        "keras",
        "numpy",
        "pandas",
        "pydicom",
        "fastapi",
        "uvicorn",
    ]
    done = subprocess.run(
        [str(python), "-c", probe, json.dumps(names)],
        cwd=served["cwd"],
        env=served["env"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = json.loads(done.stdout)
    # radflow's code comes only from the model (code_paths), never from an installed package
    assert found["radflow_importable"] is False
    assert found["versions"] == {name: metadata.version(name) for name in names}


def test_a_dicom_request_is_answered_in_the_signatures_schema(served, production, tmp_path):
    import keras
    import mlflow

    from pipeline_steps.core.detector import predict_boxes
    from pipeline_steps.core.dicom_io import read_image
    from pipeline_steps.serving.serving import prepare

    layout, params = production
    path = build_dicom(
        tmp_path / "query.dcm",
        np.random.default_rng(7).integers(0, 4096, size=(300, 280), dtype=np.uint16),
    )
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    rows = _invoke(
        served["url"],
        {
            "dataframe_split": {"columns": ["dicom"], "data": [[encoded], ["not a DICOM at all"]]},
            "params": {"score_threshold": 0.0},
        },
    )

    mlflow.set_tracking_uri(f"sqlite:///{layout.mlflow_db}")
    outputs = mlflow.models.get_model_info(MODEL_URI).signature.outputs.to_dict()
    columns = {c["name"]: c for c in outputs}
    box_keys = set(columns["boxes"]["items"]["properties"])
    assert len(rows) == 2
    for row in rows:
        assert set(row) == set(columns)
        assert isinstance(row["image_sha256"], str) and isinstance(row["error"], str)
        assert all(set(box) == box_keys for box in row["boxes"])
    image_row, bad = rows

    image = read_image(path, params.ingest.default_spacing_mm)
    assert image_row["image_sha256"] == image.pixel_sha256 and image_row["error"] == ""
    assert (image_row["rows"], image_row["columns"]) == (300, 280)
    assert bad["boxes"] == [] and bad["reason"] == "not_base64"
    # recorded by the model's own copy of the ledger code, in the ledger the server was given
    assert {row["audit"] for row in rows} == {"recorded"}
    from pipeline_steps.governance.ledger import Ledger

    with Ledger(served["env"]["RADFLOW_LEDGER_URL"]) as ledger:
        subjects = [e.subject for e in ledger.entries(kind="prediction")]
    assert {row["prediction_id"] for row in rows} <= set(subjects)

    # The boxes are the training code's: preprocess, predict, map back to original pixels.
    model = keras.models.load_model(layout.model, compile=False)
    pixels, geometry = prepare(image, params.preprocess)
    found = predict_boxes(
        model, pixels[None], params.test.model_copy(update={"score_threshold": 0.0})
    )[0]
    expected = geometry.inverse(found[:, :4])
    expected[:, [0, 2]] = expected[:, [0, 2]].clip(0, 280)
    expected[:, [1, 3]] = expected[:, [1, 3]].clip(0, 300)
    inside = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
    assert 1 <= len(image_row["boxes"]) == int(inside.sum())
    served_boxes = np.array(
        [[b[k] for k in ("x_min", "y_min", "x_max", "y_max", "score")] for b in image_row["boxes"]]
    )
    np.testing.assert_allclose(served_boxes[:, :4], expected[inside], atol=1e-3)
    np.testing.assert_allclose(served_boxes[:, 4], found[inside, 4], atol=1e-5)
    assert {b["label"] for b in image_row["boxes"]} == {"opacity"}
