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

    def raw_image(self, image_id: str) -> Path:
        """Where ingestion archives a file: named by its content id, never by its source name."""
        return self.raw_images / f"{image_id}.dcm"

    @property
    def raw_labels(self) -> Path:
        return self.raw / "labels.csv"

    @property
    def raw_readers(self) -> Path:
        """VinDr-CXR's per-reader boxes, before fusion."""
        return self.raw / "labels_readers.csv"

    @property
    def raw_label_issues(self) -> Path:
        """Label rows that could not be used, with the reason."""
        return self.raw / "label_issues.csv"

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
    def shards(self) -> Path:
        return self.processed / "shards"

    @property
    def preprocess_report(self) -> Path:
        return self.processed / "report.json"

    @property
    def preprocess_failures(self) -> Path:
        return self.processed / "failures.json"

    @property
    def features(self) -> Path:
        return self.root / "data" / "features" / "features.parquet"

    # Follows the registry's champion, which DVC cannot see: written beside features, not tracked.
    @property
    def embeddings(self) -> Path:
        return self.features.parent / "embeddings.parquet"

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
    def training_stream(self) -> Path:
        """The synthetic studies streamed into training, by identity (train stage)."""
        return self.reports / "training_stream.json"

    @property
    def predictions(self) -> Path:
        return self.reports / "test_predictions.parquet"

    @property
    def baseline_predictions(self) -> Path:
        return self.reports / "baseline_predictions.parquet"

    @property
    def test_details(self) -> Path:
        """Tables behind the report that do not fit metrics.json's flat floats."""
        return self.reports / "test_details.json"

    @property
    def report_dir(self) -> Path:
        return self.reports / "latest"

    @property
    def report_page(self) -> Path:
        return self.report_dir / "index.html"

    @property
    def data_docs(self) -> Path:
        return self.reports / "data_docs"

    @property
    def drift_dir(self) -> Path:
        return self.reports / "drift"

    @property
    def drift_report(self) -> Path:
        return self.drift_dir / "drift.json"

    @property
    def drift_page(self) -> Path:
        return self.drift_dir / "drift.html"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    # The plots (names also listed under `plots:` in dvc.yaml).
    @property
    def froc_plot(self) -> Path:
        return self.plots / "froc.png"

    @property
    def pr_plot(self) -> Path:
        return self.plots / "pr.png"

    @property
    def calibration_plot(self) -> Path:
        return self.plots / "calibration.png"

    @property
    def training_plot(self) -> Path:
        return self.plots / "training.png"

    @property
    def test_grid(self) -> Path:
        return self.plots / "test_grid.png"

    @property
    def froc_deep_csv(self) -> Path:
        return self.plots / "froc_deep.csv"

    @property
    def froc_baseline_csv(self) -> Path:
        return self.plots / "froc_baseline.csv"

    @property
    def registration(self) -> Path:
        return self.reports / "registration.json"

    @property
    def model_card(self) -> Path:
        """The model card of the version last gated here (model_card.json, model_card.html)."""
        return self.reports / "model_card"

    # local state that is not data: checkpoints, embedded MLflow store
    @property
    def state(self) -> Path:
        return self.root / ".radflow"

    @property
    def review_images(self) -> Path:
        """Copies of predicted inputs, kept (0600, by content id) so reviewers can read them."""
        return self.state / "review" / "images"

    def review_image(self, image_id: str) -> Path:
        return self.review_images / f"{image_id}.dcm"

    @property
    def checkpoints(self) -> Path:
        return self.state / "checkpoints"

    @property
    def preprocess_cache(self) -> Path:
        return self.state / "cache" / "preprocess"

    @property
    def features_cache(self) -> Path:
        return self.state / "cache" / "features"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    # orchestration state (flows/)
    # the checkout itself: what makes a folder a workspace (git, DVC, params.yaml, dvc.yaml)
    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def dvc_yaml(self) -> Path:
        return self.root / "dvc.yaml"

    @property
    def dvc_dir(self) -> Path:
        return self.root / ".dvc"

    @property
    def dvc_cache(self) -> Path:
        return self.dvc_dir / "cache"

    @property
    def git_dir(self) -> Path:
        return self.root / ".git"

    @property
    def gitignore(self) -> Path:
        return self.root / ".gitignore"

    @property
    def raw_gitignore(self) -> Path:
        """What `dvc add data/raw` writes next to data/raw.dvc; committed with it."""
        return self.raw_dvc.parent / ".gitignore"

    # what the orchestration decided and recorded
    @property
    def gate_report(self) -> Path:
        return self.reports / "gate.json"

    @property
    def last_run(self) -> Path:
        return self.state / "last_run.json"

    @property
    def dvc_lock(self) -> Path:
        """radflow's own queue for DVC commands (not DVC's lock, not dvc.lock at the root)."""
        return self.state / "dvc.lock"

    @property
    def synth_staging(self) -> Path:
        return self.state / "synth"

    # runs of the workspace (flows/retraining.py): one at a time, and what a killed one left
    @property
    def run_lock(self) -> Path:
        return self.state / "run.lock"

    @property
    def pending_run(self) -> Path:
        return self.state / "pending_run.json"

    @property
    def previous_outputs(self) -> Path:
        return self.state / "previous_outputs"

    # the nightly flow

    @property
    def nightly_state(self) -> Path:
        return self.state / "nightly_state.json"

    @property
    def nightly_log(self) -> Path:
        return self.reports / "nightly.jsonl"

    # the landing location's local side: index, staging folder, kept quarantined objects
    @property
    def landing_state(self) -> Path:
        return self.state / "landing"

    @property
    def landing_seen(self) -> Path:
        return self.landing_state / "seen.json"

    @property
    def landing_incoming(self) -> Path:
        return self.landing_state / "incoming"

    @property
    def landing_images(self) -> Path:
        return self.landing_incoming / "images"

    @property
    def landing_labels(self) -> Path:
        return self.landing_incoming / "labels"

    @property
    def landing_held(self) -> Path:
        return self.landing_incoming / "held"

    @property
    def landing_quarantine(self) -> Path:
        return self.landing_state / "quarantine"

    @property
    def landing_quarantine_report(self) -> Path:
        return self.reports / "landing_quarantine.csv"

    # the PACS watcher (`radflow pacs watch`): the keyed hashes of what it handled, no UID
    @property
    def pacs_watch_state(self) -> Path:
        return self.state / "pacs_watch"

    @property
    def pacs_watch_handled(self) -> Path:
        return self.pacs_watch_state / "handled.json"

    @property
    def pacs_watch_lock(self) -> Path:
        """One poll at a time per workspace (the service and the deployment may both run)."""
        return self.pacs_watch_state / "poll.lock"

    # the PACS source's local side (flows/pacs_pull.py): the index of pulled instances (keyed by a
    # hash of the SOP Instance UID) and the staging folder of a pull
    @property
    def pacs_state(self) -> Path:
        return self.state / "pacs"

    @property
    def pacs_pulled(self) -> Path:
        return self.pacs_state / "pulled.json"

    @property
    def pacs_incoming(self) -> Path:
        return self.pacs_state / "incoming"

    @property
    def pacs_images(self) -> Path:
        return self.pacs_incoming / "images"

    @property
    def pacs_labels(self) -> Path:
        return self.pacs_incoming / "labels"

    # stage outputs that flows/ reads (the run decision, MLflow logging, audit traces)
    @property
    def gx_dir(self) -> Path:
        """The Great Expectations project (its stores) of the validate stage."""
        return self.root / "gx"
