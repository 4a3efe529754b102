"""The default drift reference: the production model's training images, found by content hash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_steps.core import drift
from pipeline_steps.core.config import DriftParams
from pipeline_steps.core.drift import MIN_REFERENCE_IMAGES, TrainingReference
from pipeline_steps.core.layout import Layout

N = 2 * MIN_REFERENCE_IMAGES


def _workspace(tmp_path: Path, shift: float) -> tuple[Layout, pd.DataFrame, TrainingReference]:
    """N images the production model was trained on, and N new ones whose `mean` is `shift` off."""
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}" for i in range(2 * N)]
    hashes = [f"{i:064x}" for i in range(2 * N)]
    layout = Layout(tmp_path)
    layout.manifest.parent.mkdir(parents=True)
    pd.DataFrame({"image_id": ids, "content_hash": hashes}).to_parquet(layout.manifest)
    mean = np.concatenate([rng.normal(0.4, 0.02, N), rng.normal(0.4 + shift, 0.02, N)])
    features = pd.DataFrame(
        {
            "image_id": ids,
            "split": ["train"] * N + ["test"] * N,
            "mean": mean,
            "std": rng.normal(0.2, 0.01, 2 * N),
        }
    )
    training = TrainingReference("radflow-detector", "3", "run-3", "abc.dir", frozenset(hashes[:N]))
    return layout, features, training


def test_production_training_images_are_the_reference_and_named(tmp_path: Path) -> None:
    layout, features, training = _workspace(tmp_path, shift=0.2)
    report = drift.run(layout, DriftParams(), features, training=training)
    assert report is not None and report.drift and report.flagged == ["mean"]
    assert report.n_reference == N and report.n_current == 2 * N
    saved = json.loads(layout.drift_report.read_text())
    assert (
        saved["status"] == "compared" and saved["reference_model_version"] == "radflow-detector/3"
    )
    assert "train split of production radflow-detector/3 (run run-3" in saved["reference"]
    assert "radflow-detector/3" in layout.drift_page.read_text()


def test_same_distribution_is_no_drift(tmp_path: Path) -> None:
    layout, features, training = _workspace(tmp_path, shift=0.0)
    report = drift.run(layout, DriftParams(), features, training=training)
    assert report is not None and not report.drift


def test_a_configured_reference_wins_over_production(tmp_path: Path) -> None:
    layout, features, training = _workspace(tmp_path, shift=0.2)
    features.to_parquet(tmp_path / "reference.parquet")  # all images: the current table itself
    params = DriftParams(reference="reference.parquet")
    report = drift.run(layout, params, features, training=training)
    assert report is not None and not report.drift and report.n_reference == 2 * N
    saved = json.loads(layout.drift_report.read_text())
    assert saved["reference"] == "reference.parquet" and saved["reference_model_version"] == ""


def test_too_few_training_images_here_is_no_reference_with_the_reason(tmp_path: Path) -> None:
    layout, features, training = _workspace(tmp_path, shift=0.2)
    few = TrainingReference(
        "radflow-detector", "3", "run-3", "", frozenset([f"{0:064x}", "f" * 64])
    )
    assert drift.run(layout, DriftParams(), features, training=few) is None
    saved = json.loads(layout.drift_report.read_text())
    assert saved["status"] == "no_reference" and not saved["drift"]
    assert "only 1 of the 2 training images of production radflow-detector/3" in saved["note"]
    assert drift.run(layout, DriftParams(), features) is None
    assert "no production model" in json.loads(layout.drift_report.read_text())["note"]
