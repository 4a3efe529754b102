"""The HTML test report: what it says about targets, baseline and subgroups, and that it is one file."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline_steps.core.config import load_params
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import file_sha256
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.report import (
    Registration,
    ReportInputs,
    render_report,
    run,
    training_minutes,
    with_registration,
)

REPO = Path(__file__).resolve().parents[2]
FLOORS = {"ap50": 0.5, "sens_at_1fp": 0.6}

# A 1x1 PNG: enough to check embedding without matplotlib.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)


def _metrics(**overrides: float) -> dict[str, float]:
    metrics = {
        "ap50": 0.55,
        "ap50_ci_low": 0.45,
        "ap50_ci_high": 0.65,
        "sens_at_1fp": 0.93,
        "cpm": 0.7,
        "auroc": 0.8,
        "n_images": 12.0,
        "n_gt": 7.0,
        "baseline_ap50": 0.30,
        "baseline_sens_at_1fp": 0.4,
        "ap50_minus_baseline": 0.25,
        "ap50_minus_baseline_ci_low": 0.1,
        "ap50_minus_baseline_ci_high": 0.4,
        "threshold_at_1fp": 0.21,
        "baseline_threshold_at_1fp": 0.05,
    }
    metrics.update(overrides)
    return metrics


def _details() -> dict[str, object]:
    entry = {"n_images": 6.0, "n_gt": 3.0, "ap50": 0.5, "sens_at_1fp": 0.6, "cpm": 0.55}
    return {
        "n_patients": 5,
        "operating_threshold": 0.3,
        "deep": {
            "subgroups": {"manufacturer": {"<b>Acme</b> & Co": entry}, "sex": {"F": entry}},
            "lesion_size_at_1fp": {"<8mm": [1, 4], ">=20mm": [3, 3]},
        },
        "baseline": {
            "subgroups": {"manufacturer": {"<b>Acme</b> & Co": {**entry, "ap50": 0.123}}},
            "lesion_size_at_1fp": {"<8mm": [0, 4], ">=20mm": [2, 3]},
        },
    }


def _status_of(page: str, label: str) -> str:
    row = re.search(rf"<tr><td class=\"l\">{re.escape(label)}</td>.*?</tr>", page)
    assert row, f"no row for {label}"
    return "not met" if "not met" in row.group(0) else "met"


def test_floors_are_the_gates_and_judged_as_the_gate_does() -> None:
    page = render_report(ReportInputs(metrics=_metrics(), details=_details(), floors=FLOORS))
    assert _status_of(page, "AP@0.5") == "met"  # 0.55 >= 0.5
    assert _status_of(page, "Sensitivity at 1 FP/image") == "met"  # 0.93 >= 0.6
    assert "&ge; 0.5<" in page and "&ge; 0.6<" in page
    # No target of its own: the hard-coded 0.80 / 0.90 / 0.15 are gone.
    assert "&ge; 0.80" not in page and "&ge; 0.90" not in page and "&ge; 0.15" not in page
    strict = render_report(ReportInputs(_metrics(), _details(), floors={"ap50": 0.56}))
    assert _status_of(strict, "AP@0.5") == "not met"
    # The value itself against the floor, as the gate compares it (not the rounded display).
    edge = render_report(ReportInputs(_metrics(ap50=0.49996), _details(), floors={"ap50": 0.5}))
    assert _status_of(edge, "AP@0.5") == "not met"
    none = render_report(ReportInputs(_metrics(), _details()))
    assert "gate.thresholds is empty" in none


def test_missing_metric_is_not_met_and_shown_as_na() -> None:
    metrics = _metrics()
    del metrics["sens_at_1fp"]
    page = render_report(ReportInputs(metrics=metrics, details=_details(), floors=FLOORS))
    assert _status_of(page, "Sensitivity at 1 FP/image") == "not met"
    assert "n/a" in page


def test_deep_and_classical_side_by_side_with_intervals() -> None:
    page = render_report(ReportInputs(metrics=_metrics(), details=_details()))
    table = page[page.index("Deep model against the classical baseline") :]
    row = re.search(r"<tr><td class=\"l\">AP@0.5</td>.*?</tr>", table).group(0)  # type: ignore[union-attr]
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[0].startswith("0.550") and "[0.450, 0.650]" in cells[0]
    assert cells[1].startswith("0.300")
    assert cells[2].startswith("0.250") and "[0.100, 0.400]" in cells[2]  # paired CI


def test_group_names_are_escaped_and_lesion_sizes_compared() -> None:
    page = render_report(ReportInputs(metrics=_metrics(), details=_details()))
    assert "<b>Acme</b>" not in page and "&lt;b&gt;Acme&lt;/b&gt; &amp; Co" in page
    assert "0.123" in page  # the baseline's AP in the same subgroup row
    assert "1/4 (25%)" in page and "0/4 (0%)" in page and "3/3 (100%)" in page


def test_validation_failures_are_visible() -> None:
    validation = {
        "success": False,
        "n_images": 10,
        "expectations": [
            {"table": "metadata", "name": "expect_ok", "severity": "critical", "success": True},
            {"table": "labels", "name": "expect_boxes", "severity": "critical", "success": False},
        ],
    }
    page = render_report(ReportInputs(_metrics(), _details(), validation=validation))
    assert "FAILED" in page and "1 of 2 expectations passed" in page
    row = re.search(r"<tr><td class=\"l\">labels</td>.*?</tr>", page).group(0)  # type: ignore[union-attr]
    assert 'class="fail"' in row


def test_the_pseudonym_key_mode_is_shown_and_the_public_key_stands_out() -> None:
    def page(mode: str | None) -> str:
        validation = {"success": True, "n_images": 4, "expectations": []}
        if mode is not None:
            validation["pseudonym_key"] = mode
        return render_report(ReportInputs(_metrics(), _details(), validation=validation))

    development = page("development")
    assert '<td class="l">Pseudonym key</td><td>development</td>' in development
    assert "PUBLIC development key (RADFLOW_PSEUDONYM_DEV_MODE=1)" in development
    configured = page("configured")
    assert '<td class="l">Pseudonym key</td><td>configured</td>' in configured
    assert "PUBLIC development key" not in configured
    assert '<td class="l">Pseudonym key</td><td>not recorded</td>' in page(None)


def test_training_time_is_summed_over_epochs_and_shown() -> None:
    history = {"history": {"epoch_seconds": [100.0, 130.0, 20.0]}}
    assert training_minutes(history) == pytest.approx(250 / 60)
    assert training_minutes({"history": {}}) is None
    page = render_report(ReportInputs(_metrics(), _details(), history=history))
    assert '<td class="l">Training time (epochs)</td><td class="l">4.2 min</td>' in page


def test_grid_caption_names_the_served_threshold_not_the_1fp_point() -> None:
    details = _details() | {"grid_thresholds": {"deep": 0.3, "baseline": 0.05}}
    page = render_report(ReportInputs(_metrics(threshold_at_1fp=0.21), details))
    grid = page[page.index("<h2>Test images</h2>") : page.index("<h2>Data validation</h2>")]
    assert "deep model at score &ge; 0.30, the served threshold" in grid
    assert "test.score_threshold" in grid and "0.21" not in grid
    assert "classical baseline at score &ge; 0.05" in grid


def test_registration_is_pending_then_named_with_version_and_run() -> None:
    page = render_report(ReportInputs(_metrics(), _details(), model_sha256="ab" * 32))
    assert "ab" * 32 in page and "not yet registered" in page
    named = with_registration(page, Registration("radflow-detector", "7", "0f3c9a1b2c"))
    assert "not yet registered" not in named
    assert "radflow-detector version 7" in named and "0f3c9a1b2c" in named
    assert "ab" * 32 in named  # the candidate's identity stays, to check against the version
    again = with_registration(named, Registration("radflow-detector", "8", "77"))
    assert "version 8" in again and "version 7" not in again
    with pytest.raises(DataError, match="re-run the `test` stage"):
        with_registration("<html></html>", Registration("m", "1", "r"))


def test_run_writes_one_self_contained_page(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.plots.mkdir(parents=True)
    for name in ("froc.png", "pr.png", "calibration.png", "test_grid.png"):
        (layout.plots / name).write_bytes(PNG)
    layout.metrics.write_text(json.dumps(_metrics()))
    layout.test_details.write_text(json.dumps(_details()))
    layout.train_history.write_text(
        json.dumps({"history": {"loss": [3.0, 2.0], "val_loss": [3.2, 2.5], "val_ap": [0.1, 0.3]}})
    )
    layout.model.parent.mkdir(parents=True)
    layout.model.write_bytes(b"not really a keras file")
    floors = load_params(REPO / "params.yaml").gate.thresholds
    out = run(layout, floors)
    assert out == tmp_path / "reports" / "latest" / "index.html"
    page = out.read_text()
    # The four PNGs given plus the training curves drawn from the history, all embedded.
    assert page.count("data:image/png;base64,") == 5
    assert (layout.plots / "training.png").is_file()
    assert not re.search(r'src="(?!data:)', page)  # nothing refers to a file beside the page
    assert "reports/validation.json not found" in page
    assert np.isclose(float(re.search(r"0\.550", page).group(0)), 0.55)  # type: ignore[union-attr]
    # The candidate by its model file, and the floors of the repository's params.yaml.
    assert file_sha256(layout.model) in page
    assert floors and all(f"&ge; {floor:g}<" in page for floor in floors.values())
