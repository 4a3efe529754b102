"""The registry edges of the report and of drift, against a real MLflow store (SQLite): the default
drift reference resolved from the version in production, the run decision seeing drift once there is
one, and the registered version and run named in the report logged to that run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows import drift_reference, stages
from flows.decision import current_drift, read_drift
from flows.tracking import MANIFEST_ARTIFACT, Registered, mlflow_client
from pipeline_steps.core import drift, report
from pipeline_steps.core.config import Params
from pipeline_steps.core.drift import MIN_REFERENCE_IMAGES
from pipeline_steps.core.layout import Layout

MODEL = "radflow-detector"
N = 2 * MIN_REFERENCE_IMAGES


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Layout:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workspace's own SQLite store
    return Layout(tmp_path)


def _register(layout: Layout, hashes: list[str], splits: list[str], alias: str | None) -> str:
    """A version whose run holds the training manifest, tagged as tracking.log_and_register does."""
    client = mlflow_client(f"sqlite:///{layout.mlflow_db}")
    experiment = client.create_experiment("radflow", artifact_location=str(layout.mlflow_artifacts))
    run = client.create_run(experiment)
    blob = (
        "content_hash,split\n" + "".join(f"{h},{s}\n" for h, s in zip(hashes, splits, strict=True))
    ).encode()
    manifest = layout.root / "train_manifest.csv"
    manifest.write_bytes(blob)
    client.log_artifact(run.info.run_id, str(manifest), str(Path(MANIFEST_ARTIFACT).parent))
    client.set_terminated(run.info.run_id)
    client.create_registered_model(MODEL)
    mv = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_model_version_tag(MODEL, mv.version, "data_version", "d41d8cd9.dir")
    client.set_model_version_tag(
        MODEL, mv.version, "train_manifest", hashlib.sha256(blob).hexdigest()
    )
    if alias:
        client.set_registered_model_alias(MODEL, alias, mv.version)
    return run.info.run_id


def _features(layout: Layout, hashes: list[str], shift: float) -> None:
    """The stage's outputs as the last run left them: the first N images are the training ones."""
    rng = np.random.default_rng(1)
    ids = [f"img{i:03d}" for i in range(len(hashes))]
    layout.manifest.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_id": ids, "content_hash": hashes}).to_parquet(layout.manifest)
    layout.features.parent.mkdir(parents=True, exist_ok=True)
    mean = np.concatenate([rng.normal(0.4, 0.02, N), rng.normal(0.4 + shift, 0.02, N)])
    pd.DataFrame({"image_id": ids, "split": ["train"] * N + ["test"] * N, "mean": mean}).to_parquet(
        layout.features
    )


HASHES = [f"{i:064x}" for i in range(2 * N)]
SPLITS = ["train"] * N + ["test"] * N


def test_production_training_images_are_resolved_from_the_registry(layout: Layout) -> None:
    assert drift_reference.production_training(layout, MODEL)[0] is None  # no store yet
    assert not layout.mlflow_db.exists()  # and looking did not create one
    run_id = _register(layout, HASHES, SPLITS, alias="production")
    training, why = drift_reference.production_training(layout, MODEL)
    assert training is not None, why
    assert training.model_version == f"{MODEL}/1" and training.run_id == run_id
    assert training.data_version == "d41d8cd9.dir"
    assert training.content_hashes == frozenset(HASHES[:N])  # the train split only


def test_a_version_not_in_production_is_no_reference(layout: Layout) -> None:
    _register(layout, HASHES, SPLITS, alias="staging")
    training, why = drift_reference.production_training(layout, MODEL)
    assert training is None and "no version of radflow-detector holds the alias 'production'" in why


def test_a_manifest_that_does_not_match_its_tag_is_refused(layout: Layout) -> None:
    _register(layout, HASHES, SPLITS, alias="production")
    client = mlflow_client(f"sqlite:///{layout.mlflow_db}")
    client.set_model_version_tag(MODEL, "1", "train_manifest", "0" * 64)
    training, why = drift_reference.production_training(layout, MODEL)
    assert training is None and "does not match its train_manifest tag" in why


def test_the_decision_sees_drift_once_a_model_is_in_production(layout: Layout) -> None:
    params = Params()
    _features(layout, HASHES, shift=0.2)
    # The stage ran before any version was in production: no reference then.
    drift.run(layout, params.extract_features.drift, pd.read_parquet(layout.features))
    assert read_drift(layout).status == "no_reference"
    assert current_drift(layout, params).status == "no_reference"  # still none in production
    _register(layout, HASHES, SPLITS, alias="production")
    seen = current_drift(layout, params)
    assert seen.status == "compared" and seen.drift and seen.flagged == ("mean",)
    assert seen.reference_model_version == f"{MODEL}/1"
    # The stage run with the resolved reference agrees, and the decision then reads its report.
    training, _ = drift_reference.production_training(layout, MODEL)
    drift.run(
        layout, params.extract_features.drift, pd.read_parquet(layout.features), None, training
    )
    assert read_drift(layout) == seen


def test_the_registered_report_names_the_version_and_the_run(layout: Layout) -> None:
    page = report.render_report(report.ReportInputs({"ap50": 0.6}, {}, model_sha256="ab" * 32))
    layout.report_page.parent.mkdir(parents=True)
    layout.report_page.write_text(page)
    run_id = _register(layout, HASHES, SPLITS, alias=None)
    stages._name_version_in_report(layout, Registered(run_id, MODEL, "1"))
    client = mlflow_client(f"sqlite:///{layout.mlflow_db}")
    downloaded = layout.root / "downloaded"
    downloaded.mkdir()
    logged = Path(client.download_artifacts(run_id, "reports/latest/index.html", str(downloaded)))
    text = logged.read_text()
    assert f"{MODEL} version 1" in text and run_id in text and "ab" * 32 in text
    # The workspace copy stays the test stage's (a DVC out of that stage).
    assert "not yet registered" in layout.report_page.read_text()
