"""What a model version is registered with: the pseudonym key's mode among its tags."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from pipeline_steps.core.layout import Layout
from pipeline_steps.register import read_lineage, version_tags


@pytest.mark.parametrize(
    ("recorded", "tag"),
    [("development", "development"), ("configured", "configured"), (None, "unknown")],
)
def test_the_version_is_tagged_with_the_pseudonym_key_mode_of_its_validation(
    tmp_path, recorded, tag
):
    layout = Layout(tmp_path)
    layout.reports.mkdir()
    layout.processed.mkdir(parents=True)
    pd.DataFrame({"content_hash": ["a"], "split": ["train"]}).to_parquet(layout.manifest)
    report = {"success": True, "data_version": "d.dir", "result_id": "d.dir/t"}
    if recorded is not None:  # a report written before the mode was recorded says nothing
        report["pseudonym_key"] = recorded
    layout.validation_report.write_text(json.dumps(report))
    lineage = read_lineage(layout, "d.dir", "uncommitted")
    tags = version_tags(lineage, "abc123", "0123456789abcdef", {"ap50": 0.5})
    assert tags["pseudonym_key"] == tag
    assert tags["validation_passed"] == "true" and tags["metric.ap50"] == "0.5000"


def test_the_version_names_its_streamed_studies_and_training_profile(tmp_path) -> None:
    layout = Layout(tmp_path)
    layout.reports.mkdir()
    layout.processed.mkdir(parents=True)
    pd.DataFrame({"content_hash": ["a"], "split": ["train"]}).to_parquet(layout.manifest)
    layout.validation_report.write_text(json.dumps({"success": True, "data_version": "d.dir"}))
    layout.train_history.write_text(json.dumps({"history": {}, "profile": {"profile": "cpu"}}))
    # Without a stream (mixing off, or a model trained before streaming) the tag says none.
    tags = version_tags(read_lineage(layout, "d.dir", "r"), "abc", "0" * 16, {})
    assert tags["training_stream"] == "none" and "training_stream_sha256" not in tags
    assert tags["training_profile"] == "cpu"
    stream = {
        "enabled": True,
        "generator": "radflow-synth/1",
        "seed": 7,
        "n_studies": 12,
        "studies_sha256": "f" * 64,
    }
    layout.training_stream.write_text(json.dumps(stream))
    tags = version_tags(read_lineage(layout, "d.dir", "r"), "abc", "0" * 16, {})
    assert tags["training_stream"] == "radflow-synth/1 seed=7 studies=12 sha256=ffffffffffffffff"
    # The tag pins the artifact: any edit to the logged JSON changes its digest.
    assert (
        tags["training_stream_sha256"]
        == hashlib.sha256(layout.training_stream.read_bytes()).hexdigest()
    )
