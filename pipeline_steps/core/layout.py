"""Where each stage reads and writes inside a workspace: one place for every path, shared by DVC and Prefect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    # data (DVC-tracked)
    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def raw_images(self) -> Path:
        return self.raw / "images"

    @property
    def raw_labels(self) -> Path:
        return self.raw / "labels.csv"

    @property
    def raw_dvc(self) -> Path:
        return self.root / "data" / "raw.dvc"

    @property
    def interim(self) -> Path:
        return self.root / "data" / "interim"

    @property
    def metadata(self) -> Path:
        return self.interim / "metadata.parquet"

    @property
    def labels(self) -> Path:
        return self.interim / "labels.parquet"

    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def manifest(self) -> Path:
        return self.processed / "manifest.parquet"

    @property
    def boxes(self) -> Path:
        return self.processed / "boxes.parquet"

    @property
    def features(self) -> Path:
        return self.root / "data" / "features" / "features.parquet"

    # model and evaluation
    @property
    def model(self) -> Path:
        return self.root / "models" / "detector.keras"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def validation_report(self) -> Path:
        return self.reports / "validation.json"

    @property
    def quarantine(self) -> Path:
        return self.reports / "quarantine.csv"

    @property
    def train_history(self) -> Path:
        return self.reports / "train_history.json"

    @property
    def predictions(self) -> Path:
        return self.reports / "test_predictions.parquet"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def registration(self) -> Path:
        return self.reports / "registration.json"

    # local state that is not data: checkpoints, embedded MLflow store
    @property
    def state(self) -> Path:
        return self.root / ".radflow"

    @property
    def checkpoints(self) -> Path:
        return self.state / "checkpoints"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"
