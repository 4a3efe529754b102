"""Signed models in a real workspace (embedded MLflow store): a registered version is signed and
carries its SBOM; `radflow models verify` passes on it; a byte changed in the stored artifact is
refused by `radflow predict`, `radflow serve-api` (at start-up, and on an alias move to it), the
gate and the champion loader; a version without a signature (as registered before signing) is
refused until `radflow models sign`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import pytest
import yaml

from tests.e2e.test_smoke import _embedded_env
from tests.integration.test_registry import (
    MODEL,
    build_workspace,
    free_port,
    stop,
    wait_http,
    with_seed,
)

pytestmark = pytest.mark.integration


def radflow(
    ws: Path, *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), *args],
        capture_output=True,
        text=True,
        env={**_embedded_env(), **(env or {})},
        timeout=timeout,
    )


def _client(layout):
    from flows import tracking

    return tracking.mlflow_client(tracking.tracking_uri(layout))


def _local(uri: str) -> Path:
    return Path(unquote(urlsplit(uri).path))


def stored_model(layout, version: str, flavor: str) -> Path:
    """The stored folder of one logged model of `version` in the workspace's artifact store: the
    pyfunc (`python_function` by radflow's PythonModel) or the Keras copy (`keras`)."""
    run_id = _client(layout).get_model_version(MODEL, version).run_id
    for mlmodel in layout.mlflow_artifacts.rglob("MLmodel"):
        spec = yaml.safe_load(mlmodel.read_text())
        if spec.get("run_id") != run_id:
            continue
        loader = spec["flavors"].get("python_function", {}).get("loader_module")
        if (flavor == "keras") == ("keras" in spec["flavors"]) and (
            flavor == "keras" or loader == "mlflow.pyfunc.model"
        ):
            return mlmodel.parent
    raise AssertionError(f"no stored {flavor} model for version {version}")


def flip_a_byte(folder: Path) -> Path:
    """Change one byte in the middle of the folder's largest file (the detector's weights)."""
    target = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    return target


def ledger_rows(layout) -> list[dict]:
    from pipeline_steps.governance.ledger import open_ledger

    with open_ledger(layout.root) as ledger:
        return [e.as_dict() for e in ledger.entries()]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with two registered versions in its embedded store (as `radflow` uses it)."""
    from flows import stages

    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_URI", "RADFLOW_LEDGER_URL", "PREFECT_API_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        layout, params = build_workspace(tmp_path_factory.mktemp("signing-ws"), n_images=4)
        versions = [
            stages.register(layout, with_seed(params, seed)).model_version for seed in (0, 1)
        ]
        assert versions == ["1", "2"]
        yield layout, params


def test_a_registered_version_is_signed_tagged_and_carries_its_sbom(ws, tmp_path):
    from flows import tracking
    from flows.sbom import components, normal_name

    layout, _ = ws
    client = _client(layout)
    mv = client.get_model_version(MODEL, "1")
    keys = json.loads(radflow(layout.root, "models", "verify", "1", "--json").stdout)
    assert keys["ok"] and keys["development"]
    assert mv.tags["signature_key_id"] == keys["key_id"] and len(keys["key_id"]) == 16
    assert mv.tags["signature"] == "workspace-development"
    assert [c["model"] for c in keys["checks"]] == ["model", "keras_model"]

    done = radflow(layout.root, "models", "verify", "1")
    assert done.returncode == 0, done.stderr
    assert "version 1: OK" in done.stdout and "workspace-development" in done.stdout

    # A deployment that trusts only its own key does not trust the workspace's development key.
    from tests.unit.test_signing import make_pair

    private, public = make_pair(tmp_path / "keys", "deployment")
    done = radflow(
        layout.root, "models", "verify", "1", env={"RADFLOW_SIGNING_PUBLIC_KEYS": str(public)}
    )
    assert done.returncode == 1 and "Unknown key" in done.stdout
    done = radflow(
        layout.root,
        "models",
        "verify",
        "1",
        env={"RADFLOW_SIGNING_KEY": str(tmp_path / "gone.pem")},
    )
    assert done.returncode == 1 and "RADFLOW_SIGNING_KEY" in done.stderr

    sbom = Path(client.download_artifacts(mv.run_id, tracking.SBOM_ARTIFACT, str(tmp_path)))
    document = json.loads(sbom.read_text())
    assert document["bomFormat"] == "CycloneDX" and document["specVersion"]
    listed = components(sbom)
    # The distributions that provide these imports here (tensorflow comes as tensorflow-cpu).
    providers = metadata.packages_distributions()
    for module in ("tensorflow", "mlflow", "pydicom", "keras", "model_signing"):
        for dist in providers[module]:
            assert listed.get(normal_name(dist)) == metadata.version(dist), dist


def test_a_changed_byte_is_refused_by_verify_predict_serve_api_gate_and_champion(ws, tmp_path):
    from flows import tracking
    from flows.gate import run_gate
    from pipeline_steps.governance.signing import SignatureError

    layout, params = ws
    client = _client(layout)
    pyfunc_folder = stored_model(layout, "1", "pyfunc")
    keras_folder = stored_model(layout, "1", "keras")
    originals = {
        p: p.read_bytes()
        for f in (pyfunc_folder, keras_folder)
        for p in f.rglob("*")
        if p.is_file()
    }
    changed = flip_a_byte(pyfunc_folder)
    flip_a_byte(keras_folder)
    rows = ledger_rows(layout)
    try:
        done = radflow(layout.root, "models", "verify", "1")
        assert done.returncode == 1
        assert "FAILED" in done.stdout and changed.name in done.stdout

        dicom = next(layout.raw_images.glob("*.dcm"))
        out = tmp_path / "preds.jsonl"
        done = radflow(
            layout.root, "predict", "--input", str(dicom), "--out", str(out), "--version", "1"
        )
        assert done.returncode == 1
        assert "refusing to load radflow-detector version 1" in done.stderr
        assert changed.name in done.stderr
        assert "Retry 1/2" not in done.stdout + done.stderr  # refused once, not retried
        assert not out.exists()

        client.set_registered_model_alias(MODEL, "production", "1")
        api = radflow(
            layout.root, "serve-api", "--port", str(free_port()), "--insecure-no-auth", timeout=300
        )
        assert api.returncode == 1
        assert "refusing to load radflow-detector version 1" in api.stderr

        # Serving version 2, the alias moves to the tampered version 1: it is not swapped in.
        client.set_registered_model_alias(MODEL, "production", "2")
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "--workspace", str(layout.root), "serve-api"]
            + ["--port", str(port), "--insecure-no-auth", "--poll-seconds", "1"],
            env=_embedded_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}/healthz"
            wait_http(url, server, 300, "radflow serve-api")
            client.set_registered_model_alias(MODEL, "production", "1")
            deadline = time.monotonic() + 120
            health = httpx.get(url, timeout=10).json()
            while not health["last_error"] and time.monotonic() < deadline:
                time.sleep(1)
                health = httpx.get(url, timeout=10).json()
            assert "refusing to load radflow-detector version 1" in health["last_error"]
            assert health["model"]["version"] == "2"  # still serving the version it had
        finally:
            stop(server)

        champion, why = tracking.load_champion(layout, MODEL)
        assert champion is None and "version 1" in why and "files differ" in why

        with pytest.raises(SignatureError, match="refusing to load radflow-detector version 1"):
            run_gate(layout, params, "1")
        assert ledger_rows(layout) == rows  # nothing predicted, decided or moved
    finally:
        client.delete_registered_model_alias(MODEL, "production")
        for path, data in originals.items():
            path.write_bytes(data)
    assert radflow(layout.root, "models", "verify", "1").returncode == 0


def test_an_unsigned_version_is_refused_until_signed_deliberately(ws, tmp_path):
    from flows import tracking
    from pipeline_steps.governance.signing import SignatureError

    layout, _ = ws
    client = _client(layout)
    mv = client.get_model_version(MODEL, "2")
    # What a version registered before signing looks like: no signatures, no signature tags.
    shutil.rmtree(_local(client.get_run(mv.run_id).info.artifact_uri) / tracking.SIGNATURE_FOLDER)
    for tag in (tracking.SIGNATURE_KEY_TAG, tracking.SIGNATURE_TAG):
        client.delete_model_version_tag(MODEL, "2", tag)

    with pytest.raises(SignatureError, match=r"radflow models sign 2 --reason"):
        tracking.load_pyfunc(layout, MODEL, "2")
    done = radflow(layout.root, "models", "verify", "2", "--json")
    assert done.returncode == 1
    assert {c["problem"] for c in json.loads(done.stdout)["checks"]} == {"it is not signed"}

    missing = radflow(layout.root, "models", "sign", "2")
    assert missing.returncode == 1 and "--reason" in missing.stderr

    done = radflow(
        layout.root,
        "models",
        "sign",
        "2",
        "--reason",
        "checked against the release archive",
        "--actor",
        "qa-lead",
    )
    assert done.returncode == 0, done.stderr
    signed = [r for r in ledger_rows(layout) if r["kind"] == "signature"]
    assert len(signed) == 1
    payload = signed[-1]["payload"]
    assert payload["actor"] == "qa-lead" and payload["before"] == "unsigned"
    assert payload["reason"] == "checked against the release archive"
    assert payload["version"] == "2" and payload["key"] == "workspace-development"
    assert client.get_model_version(MODEL, "2").tags["signature_key_id"] == payload["key_id"]

    assert radflow(layout.root, "models", "verify", "2").returncode == 0
    model = tracking.load_pyfunc(layout, MODEL, "2")
    assert model.metadata.get_input_schema().input_names() == ["dicom"]

    # A signature that fails is not overwritten without --force.
    flip_a_byte(stored_model(layout, "2", "keras"))
    done = radflow(layout.root, "models", "sign", "2", "--reason", "again")
    assert done.returncode == 1 and "--force" in done.stderr
