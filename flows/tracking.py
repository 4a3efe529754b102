"""MLflow edge: the tracking store of a workspace, and logging + registering a trained model."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline_steps.errors import TrackingError
from pipeline_steps.layout import Layout
from pipeline_steps.register import Registration


@dataclass(frozen=True)
class Registered:
    run_id: str
    model_name: str
    model_version: str


def tracking_uri(layout: Layout) -> str:
    """MLFLOW_TRACKING_URI when set, else the workspace's embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layout.mlflow_db}"


def _experiment_id(client: object, name: str, layout: Layout) -> str:
    from mlflow.tracking import MlflowClient

    assert isinstance(client, MlflowClient)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    # Compare URIs rather than test the variable: mlflow.set_tracking_uri() exports it itself.
    if tracking_uri(layout) == f"sqlite:///{layout.mlflow_db}":
        # The embedded store keeps artifacts inside the workspace, next to mlflow.db.
        layout.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
        location = layout.mlflow_artifacts.as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def log_and_register(layout: Layout, registration: Registration, model_path: Path) -> Registered:
    """One MLflow run with params, per-epoch and test metrics, reports and the model; register a version."""
    import keras
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(layout)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        experiment_id = _experiment_id(client, registration.experiment, layout)
    except Exception as exc:
        raise TrackingError(f"MLflow at {uri} is not usable: {exc}") from exc

    model = keras.models.load_model(model_path, compile=False)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tags(registration.tags)
        mlflow.log_params(registration.params)
        for name, values in registration.history.items():
            for epoch, value in enumerate(values):
                if value is not None and math.isfinite(value):
                    mlflow.log_metric(f"train.{name}", float(value), step=epoch)
        mlflow.log_metrics({k: v for k, v in registration.metrics.items() if math.isfinite(v)})
        for report in (layout.metrics, layout.validation_report, layout.train_history):
            if report.exists():
                mlflow.log_artifact(str(report), artifact_path="reports")
        if layout.plots.exists():
            mlflow.log_artifacts(str(layout.plots), artifact_path="reports/plots")
        info = mlflow.keras.log_model(
            model, name="model", registered_model_name=registration.model_name
        )
        version = str(info.registered_model_version)
        for key, value in registration.tags.items():
            client.set_model_version_tag(registration.model_name, version, key, value)
        for key in ("ap50", "cpm", "sens_at_1fp"):
            if key in registration.metrics:
                client.set_model_version_tag(
                    registration.model_name,
                    version,
                    f"metric.{key}",
                    f"{registration.metrics[key]:.4f}",
                )
        result = Registered(run.info.run_id, registration.model_name, version)
    layout.registration.write_text(
        json.dumps(result.__dict__ | {"tags": registration.tags}, indent=2)
    )
    return result
