"""Writers of DVC-cached outs replace the file, so an old out hardlinked into the cache survives."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pipeline_steps.test import _write_parquet_atomic


def test_prediction_tables_are_replaced_not_written_into(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "test_predictions.parquet"
    out.parent.mkdir()
    pd.DataFrame({"image_id": ["a"], "score": [0.9]}).to_parquet(out, index=False)
    cached = tmp_path / "cache-entry"
    os.link(out, cached)  # what `dvc commit` leaves with cache.type hardlink
    before = cached.read_bytes()
    _write_parquet_atomic(pd.DataFrame({"image_id": ["b", "c"], "score": [0.1, 0.2]}), out)
    assert cached.read_bytes() == before  # the cache file is untouched
    assert out.stat().st_ino != cached.stat().st_ino and cached.stat().st_nlink == 1
    assert pd.read_parquet(out)["image_id"].tolist() == ["b", "c"]
