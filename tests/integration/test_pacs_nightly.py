"""The nightly flow with the PACS as its source (`nightly.pacs: true`): the first night pulls the studies
with their annotation SRs, versions, trains and gates; a night with nothing new in the PACS pulls
nothing, keeps the data version and skips retraining. Runs against a real Orthanc and Prefect's test
harness."""

from __future__ import annotations

import io

import pandas as pd
import pydicom
import pytest

from flows import decision, nightly, workspace
from pipeline_steps.core.config import LesionParams, SynthParams
from pipeline_steps.serving.sr import build_sr
from pipeline_steps.synthetic import generate_dataset
from tests.integration.conftest import TINY_NIGHTLY, merge, set_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_IMAGES = 12


def annotated_studies(out, n: int) -> list[bytes]:
    """`n` synthetic radiographs, every one with findings, and for each a TID 1500 SR of its
    reference boxes as an annotation tool would store it: what the PACS holds."""
    summary = generate_dataset(
        SynthParams(
            native_size=(512, 512),
            images_per_patient=(1, 1),
            lesions=LesionParams(positive_fraction=1.0),
        ),
        out,
        n_images=n,
        seed=17,
    )
    labels = pd.read_csv(summary.labels_path)
    blobs = []
    for path in sorted(summary.images_dir.glob("*.dcm")):
        source = pydicom.dcmread(path)
        rows = labels[(labels["patientId"] == path.stem) & (labels["Target"] == 1)]
        boxes = [
            {
                "x_min": r.x,
                "y_min": r.y,
                "x_max": r.x + r.width,
                "y_max": r.y + r.height,
                "score": 1.0,
                "label": "opacity",
            }
            for r in rows.itertuples()
        ]
        sr = build_sr(
            source,
            boxes,
            prediction_id=f"annotation-{path.stem}",
            model_name="Annotate",
            model_version="1",
            manufacturer="Acme Imaging",
        )
        sr.SeriesDescription = "Reference annotations"
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        blobs += [path.read_bytes(), buf.getvalue()]
    return blobs


def test_a_pacs_night_pulls_and_trains_then_a_night_with_nothing_new_skips(
    orthanc, tmp_path, monkeypatch
):
    from prefect.testing.utilities import prefect_test_harness

    for name, value in orthanc.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RADFLOW_PSEUDONYM_DEV_MODE", "1")
    monkeypatch.setenv(decision.CODE_VERSION_ENV, "pacs-nightly-test-code")
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", nightly.WEBHOOK_ENV):
        monkeypatch.delenv(key, raising=False)
    orthanc.upload(annotated_studies(tmp_path / "synth", N_IMAGES))
    layout = workspace.init(tmp_path / "ws")
    set_params(
        layout.root,
        merge(
            TINY_NIGHTLY,
            {
                "nightly": {"pacs": True},
                "pacs": {"attempts": 2, "backoff_s": 0.05},
                # Every image has findings (an annotation SR holds boxes, not "no finding").
                "validate": {"positive_fraction": [0.0, 1.0]},
            },
        ),
    )
    with prefect_test_harness(server_startup_timeout=120):
        first = nightly.nightly_retraining(str(layout.root))
        assert first["status"] == "trained", first
        assert first["pacs"]["new_images"] == N_IMAGES and first["pacs"]["archived"] == N_IMAGES
        assert first["pacs"]["sr_label_sources"] == N_IMAGES
        assert first["pacs"]["labels_imported"] == first["pacs"]["sr_labels"] > 0
        assert first["landing"] == {}  # no S3 landing location configured

        second = nightly.nightly_retraining(str(layout.root))
    assert second["status"] == "skipped" and second["model_version"] == first["model_version"]
    assert second["pacs"]["new_images"] == 0 and second["pacs"]["unchanged"] == 2 * N_IMAGES
    assert second["data_version"] == first["data_version"]
    for summary in (first, second):
        assert orthanc.password not in str(summary)
