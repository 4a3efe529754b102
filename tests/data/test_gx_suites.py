"""The GX suites in a file-backed context: good, broken and warning-only batches, Data Docs (offline
in a browser too), and PHI."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline_steps import validate
from pipeline_steps.core.config import IngestParams, SynthParams, ValidateParams
from pipeline_steps.core.data_docs import remote_references
from pipeline_steps.core.errors import ValidationFailed
from pipeline_steps.core.labels import LABEL_COLUMNS, NO_FINDING
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.screening import build_metadata
from pipeline_steps.ingest import ingest_directory
from pipeline_steps.synthetic import collect_phi, generate_dataset
from tests import chromium
from tests.conftest import build_dicom

INGEST = IngestParams()
PARAMS = ValidateParams()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Six synthetic radiographs with fake PHI and RSNA labels, plus a CT file (quarantined)."""
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(SynthParams(native_size=(512, 512)), out, n_images=6, seed=1)
    build_dicom(out / "images" / "Testperson_Ada_CT.dcm", modality="CT")
    return out


@pytest.fixture
def layout(tmp_path, synthetic) -> Layout:
    layout = Layout(tmp_path / "ws")
    ingest_directory(synthetic / "images", synthetic / "labels.csv", layout)
    return layout


def _stored_results(layout: Layout) -> list[Path]:
    return sorted((layout.root / "gx" / "uncommitted" / "validations").rglob("*.json"))


def test_a_good_batch_is_stored_under_its_data_version_with_data_docs(layout, capfd, caplog):
    caplog.set_level(logging.INFO)
    report = validate.run(layout, INGEST, PARAMS, data_version="1a2b.dir")
    assert report.success
    assert (report.n_images, report.n_quarantined) == (6, 1)

    saved = json.loads(layout.validation_report.read_text())
    assert saved["data_version"] == "1a2b.dir"
    assert saved["result_id"].startswith("1a2b.dir/")
    assert saved["data_docs"] == "reports/data_docs/index.html"
    # Each suite's result is in the GX store and in Data Docs under the data version.
    stored = _stored_results(layout)
    assert {p.relative_to(p.parents[3]).parts[:2] for p in stored} == {
        ("metadata", "1a2b.dir"),
        ("labels", "1a2b.dir"),
        ("label_summary", "1a2b.dir"),
    }
    for suite, result_id in saved["gx_results"].items():
        assert result_id.startswith(f"{suite}/1a2b.dir/")
        page = layout.reports / "data_docs" / "validations" / f"{result_id}.html"
        assert page.is_file(), page
    index = layout.reports / "data_docs" / "index.html"
    assert "1a2b.dir" in index.read_text()
    # One docs site only (no second copy under gx/uncommitted), progress bars off, GX quiet.
    config = yaml.safe_load((layout.root / "gx" / "great_expectations.yml").read_text())
    assert list(config["data_docs_sites"]) == ["radflow"]
    assert config["progress_bars"]["globally"] is False
    assert not [p for p in (layout.root / "gx").rglob("*.html")]
    assert "Calculating Metrics" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name.startswith("great_expectations")]

    # A second data version adds results beside the first; the suites are reused, not duplicated.
    validate.run(layout, INGEST, PARAMS, data_version="3c4d.dir")
    assert len(_stored_results(layout)) == 2 * len(stored)
    assert len(list((layout.root / "gx" / "expectations").glob("*.json"))) == 3


def test_a_broken_batch_is_stopped_naming_the_expectation_and_rows(layout, synthetic):
    labels = pd.read_csv(layout.raw_labels)
    positive = labels.index[labels["label"] != NO_FINDING][0]
    labels.loc[positive, "x_max"] = 5000.0
    labels.to_csv(layout.raw_labels, index=False)
    bad_id = labels.loc[positive, "image_id"]

    with pytest.raises(ValidationFailed) as failed:
        validate.run(layout, INGEST, PARAMS, data_version="bad0.dir")
    message = str(failed.value)
    assert "expect_column_pair_values_a_to_be_greater_than_b(columns,x_max)" in message
    assert f"image_id={bad_id}" in message
    assert "bad0.dir" in message
    assert not [v for v in collect_phi(synthetic / "images") if v in message]

    saved = json.loads(layout.validation_report.read_text())
    assert saved["success"] is False
    assert [f["name"] for f in saved["failures"]] == [
        "expect_column_pair_values_a_to_be_greater_than_b(columns,x_max)"
    ]
    assert saved["failures"][0]["offending"][0]["image_id"] == bad_id
    page = layout.reports / "data_docs" / "validations" / f"{saved['gx_results']['labels']}.html"
    assert page.is_file()


SUCCESS_GREEN, FAILURE_RED = (
    "rgb(40, 167, 69)",
    "rgb(220, 53, 69)",
)  # Bootstrap's text-success/-danger


def _marks(icons: list[dict]) -> list[tuple[str, str]]:
    """(shape, colour) of the pass/fail marks the browser can draw: a box of their own and a shape
    from radflow's local CSS (without it they are empty <i> elements, 0 px wide)."""
    return [
        (shape, icon["color"])
        for icon in icons
        for shape in icon["classes"].split()
        if shape in ("fa-check-circle", "fa-times")
        and icon["width"] not in ("auto", "0px")
        and icon["mask"].startswith('url("data:image/svg')
    ]


def test_data_docs_render_offline_with_results_and_pass_fail_marks(layout):
    """With every host unreachable, the index lists each suite's result with its mark and a failed
    validation page shows the failed expectation with a red cross; nothing is fetched remotely."""
    chromium.chromium()  # fail first, with how to install it, where there is no browser
    validate.run(layout, INGEST, PARAMS, data_version="good.dir")
    labels = pd.read_csv(layout.raw_labels)
    labels.loc[labels.index[labels["label"] != NO_FINDING][0], "x_max"] = 5000.0
    labels.to_csv(layout.raw_labels, index=False)
    with pytest.raises(ValidationFailed):
        validate.run(layout, INGEST, PARAMS, data_version="bad0.dir")

    site = layout.data_docs
    pages = sorted(site.rglob("*.html"))
    assert len(pages) == 1 + 3 + 2 * 3  # the index, a page per suite, a page per result
    assert {p: remote_references(p.read_text()) for p in pages} == {p: [] for p in pages}

    index = chromium.probe_page(site / "index.html")
    assert len(index["stylesheets"]) == 2
    assert all(s.startswith("file://") for s in index["stylesheets"])
    assert all(r.startswith(("file://", "data:")) for r in index["resources"]), index["resources"]
    assert index["containerPadding"] == "48px"  # Bootstrap's pl-5: the vendored CSS applied
    results = [r for r in index["rows"] if ".dir" in r]
    assert len(results) == 6
    assert {w for r in results for w in r.split() if w.endswith(".dir")} == {"good.dir", "bad0.dir"}
    assert sorted(_marks(index["icons"])) == sorted(
        [("fa-check-circle", SUCCESS_GREEN)] * 5 + [("fa-times", FAILURE_RED)]
    ), index["icons"]

    saved = json.loads(layout.validation_report.read_text())
    failed = chromium.probe_page(site / "validations" / f"{saved['gx_results']['labels']}.html")
    assert all(r.startswith(("file://", "data:")) for r in failed["resources"])
    assert "Unsuccessful Expectations\n\t\n1" in failed["rows"]
    (row,) = [r for r in failed["rows"] if r.startswith("Values in columns must always be greater")]
    assert "x_max" in row and "1 unexpected values found" in row
    assert {("fa-times", FAILURE_RED), ("fa-check-circle", SUCCESS_GREEN)} <= set(
        _marks(failed["icons"])
    )
    config = yaml.safe_load((layout.root / "gx" / "great_expectations.yml").read_text())
    assert config["analytics_enabled"] is False


def test_an_extra_phi_column_is_stopped_and_its_values_stored_nowhere(layout):
    metadata, _ = build_metadata(layout.raw_images, INGEST, "k")
    metadata["PatientName"] = "Testperson^Ada"
    labels = validate.build_labels(pd.read_csv(layout.raw_labels), metadata)
    store = validate.gx_store(layout)
    report = validate.validate_tables(
        metadata, labels, PARAMS, INGEST, store=store, data_version="phi0.dir"
    )
    assert [f.name for f in report.failures] == ["expect_table_columns_to_match_set"]
    written = [
        p for d in (layout.root / "gx", store.data_docs) for p in d.rglob("*") if p.is_file()
    ]
    assert any("phi0.dir" in str(p) for p in written)
    assert not [p for p in written if b"Testperson" in p.read_bytes()]


def test_a_warning_only_batch_passes_with_the_warning_recorded(tmp_path, caplog, monkeypatch):
    key = (
        "9b1e4c7a2f6d3e8b5a0c1d7f4e2b9a6c"  # a configured key: its mode is recorded, never the key
    )
    monkeypatch.setenv("RADFLOW_PSEUDONYM_KEY", key)
    monkeypatch.delenv("RADFLOW_PSEUDONYM_DEV_MODE")
    layout = Layout(tmp_path / "ws")
    for i in range(4):
        build_dicom(
            layout.raw_images / f"img{i}.dcm",
            patient_id=f"P{i}",
            spacing=None if i == 0 else (0.35, 0.35),
        )
    pd.DataFrame(
        [["img1", "opacity", 10, 10, 50, 50]]
        + [[f"img{i}", NO_FINDING, None, None, None, None] for i in (0, 2, 3)],
        columns=LABEL_COLUMNS,
    ).to_csv(layout.raw_labels, index=False)

    report = validate.run(layout, INGEST, PARAMS, data_version="warn.dir")
    assert report.success
    saved = json.loads(layout.validation_report.read_text())
    assert saved["success"] is True and saved["failures"] == []
    assert [(w["name"], w["severity"], w["offending"]) for w in saved["warnings"]] == [
        (
            "expect_column_values_to_be_in_set(spacing_flagged)",
            "warning",
            [{"image_id": "img0", "spacing_flagged": True}],
        )
    ]
    assert saved["result_id"].startswith("warn.dir/")
    assert saved["pseudonym_key"] == "configured"
    written = [p for p in layout.root.rglob("*") if p.is_file()]
    assert layout.metadata in written and not [p for p in written if key.encode() in p.read_bytes()]
    assert any(
        "spacing_flagged" in r.getMessage() for r in caplog.records if r.levelname == "WARNING"
    )


def _radflow(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("RADFLOW_PSEUDONYM_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(workspace), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_no_phi_leaves_ingest_and_validation(tmp_path, synthetic):
    ws = tmp_path / "ws"
    assert _radflow(ws, "init").returncode == 0
    images = tmp_path / "incoming"
    shutil.copytree(synthetic / "images", images)
    labels = tmp_path / "labels.csv"
    # One label row names the quarantined file: its source name must not surface anywhere.
    labels.write_text(
        (synthetic / "labels.csv").read_text() + "Testperson_Ada_CT,1,1,20,20,1\nGhost_Bob,,,,,0\n"
    )
    ingest = _radflow(ws, "ingest", "--dicom-dir", str(images), "--labels", str(labels), "--json")
    assert ingest.returncode == 0, ingest.stderr
    (summary,) = [json.loads(line) for line in ingest.stdout.splitlines()]
    assert {k: summary[k] for k in ("seen", "accepted", "quarantined", "labels")} == {
        "seen": 7,
        "accepted": 6,
        "quarantined": {"modality_not_allowed": 1},
        "labels": 8,
    }
    assert summary["data_version"].endswith(".dir")
    assert summary["labels_for_quarantined"] == 1 and summary["labels_without_image"] == 1
    step = _radflow(ws, "step", "validate")
    assert step.returncode == 0, step.stderr[-3000:]

    phi = {v for v in collect_phi(images) if len(v) >= 6} | {"Testperson_Ada_CT", "Ghost_Bob"}
    assert any(
        v.startswith("19") for v in phi
    )  # birth dates, names, UIDs: the check means something
    places = [ws / "data" / "interim", ws / "reports", ws / "gx", ws / "data" / "raw"]
    files = [p for place in places for p in place.rglob("*") if p.is_file()]
    files = [p for p in files if "images" not in p.relative_to(ws).parts]  # the archive itself
    assert {p.name for p in files} >= {
        "metadata.parquet",
        "labels.parquet",
        "labels.csv",
        "label_issues.csv",
        "validation.json",
        "quarantine.csv",
        "index.html",
        "great_expectations.yml",
    }
    blobs = {str(p): p.read_bytes() for p in files}
    blobs["ingest output"] = (ingest.stdout + ingest.stderr).encode()
    blobs["validate output"] = (step.stdout + step.stderr).encode()
    leaks = [(v, where) for v in phi for where, blob in blobs.items() if v.encode() in blob]
    assert not leaks, leaks[:5]
