"""The `extract_features` edge finds the champion in a real MLflow registry (SQLite, temp workspace)
and embeds with its Keras-native copy; without a champion, or without MLflow, it goes on without."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.integration.test_registry import build_workspace

pytestmark = pytest.mark.integration


def _shards(layout, size: int, n: int = 3) -> np.ndarray:
    """A shard and a keyed manifest for the workspace's images (what `preprocess` leaves)."""
    from pipeline_steps.core.shards import QUANT

    manifest = pd.read_parquet(layout.manifest).head(n).reset_index(drop=True)
    rng = np.random.default_rng(4)
    images = rng.integers(0, int(QUANT), (len(manifest), size, size), dtype=np.uint16)
    (layout.processed / "shards").mkdir(parents=True, exist_ok=True)
    np.save(layout.processed / "shards" / "train-0000.npy", images)
    geometry = {"orig_rows": size, "orig_cols": size, "scale_x": 1.0, "scale_y": 1.0}
    manifest = manifest.assign(
        split="train",
        shard="train-0000.npy",
        index=range(len(manifest)),
        cache_key=[f"k{i}" for i in range(len(manifest))],
        pad_x=0,
        pad_y=0,
        **geometry,
    )
    manifest.to_parquet(layout.manifest)
    return images.astype(np.float32) / QUANT


def test_embeddings_come_from_the_version_in_production_and_only_from_it(tmp_path, monkeypatch):
    import keras

    from flows import registry, stages, tracking
    from pipeline_steps import extract_features as features

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RADFLOW_LEDGER_URL", raising=False)
    layout, params = build_workspace(tmp_path / "ws", n_images=4)
    images = _shards(layout, params.preprocess.input_size)
    name = params.register_.model_name

    champion, why = tracking.load_champion(layout, name)
    assert champion is None and (
        "no model is registered yet" in why or f"no model named {name} is registered" in why
    )

    version = stages.register(layout, params).model_version
    champion, why = tracking.load_champion(layout, name)
    assert champion is None and "'production'" in why  # registered, not promoted

    stages.extract_features(layout, params)  # no champion: no embeddings, no failure
    assert layout.features.is_file() and not layout.embeddings.exists()

    with registry.governance(layout, params) as (reg, ledger):
        registry.promote(reg, ledger, version, "production", actor="t", reason="t", force=True)
    champion, why = tracking.load_champion(layout, name)
    assert champion is not None and why == "" and champion.version == version

    stages.extract_features(layout, params)
    stored = pd.read_parquet(layout.embeddings)
    assert set(stored["model_version"]) == {f"{name}/{version}"}
    # the vectors are the registered model's: the detector file the version was made from
    local = keras.models.load_model(layout.model, compile=False)
    expected = features.build_embedder(local, params.preprocess.input_size)(images)
    got = stored.filter(like=features.EMBEDDING_PREFIX).to_numpy(np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_an_unreachable_tracking_server_costs_only_the_embeddings(tmp_path, monkeypatch, caplog):
    from flows import stages

    monkeypatch.delenv("RADFLOW_LEDGER_URL", raising=False)
    layout, params = build_workspace(tmp_path / "ws", n_images=2)
    _shards(layout, params.preprocess.input_size, n=2)
    layout.embeddings.parent.mkdir(parents=True, exist_ok=True)
    layout.embeddings.write_text("stale")
    # a closed port on loopback: connection refused, with the retries bounded
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with caplog.at_level("INFO"):
        table = stages.extract_features(layout, params)
    assert len(table) == 2 and layout.features.is_file()
    assert not layout.embeddings.exists()
    assert (
        "no CNN embeddings: the champion could not be loaded from MLflow at http://127.0.0.1:9"
        in caplog.text
    )
