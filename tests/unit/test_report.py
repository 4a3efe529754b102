"""The HTML test report: what it says about targets, baseline and subgroups, and that it is one file."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline_steps.core.layout import Layout
from pipeline_steps.core.report import (
    QUALITY_TARGETS,
    ReportInputs,
    render_report,
    run,
    training_minutes,
)

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


def test_targets_are_judged_against_the_issue_thresholds() -> None:
    page = render_report(ReportInputs(metrics=_metrics(), details=_details()))
    labels = {t.metric: t.label for t in QUALITY_TARGETS}
    assert _status_of(page, labels["sens_at_1fp"]) == "met"  # 0.93 >= 0.90
    assert _status_of(page, labels["ap50"]) == "not met"  # 0.55 < 0.80
    assert _status_of(page, labels["ap50_minus_baseline"]) == "met"  # 0.25 >= 0.15
    low = render_report(ReportInputs(metrics=_metrics(ap50_minus_baseline=0.1), details=_details()))
    assert _status_of(low, labels["ap50_minus_baseline"]) == "not met"


def test_missing_metric_is_not_met_and_shown_as_na() -> None:
    metrics = _metrics()
    del metrics["sens_at_1fp"]
    page = render_report(ReportInputs(metrics=metrics, details=_details()))
    assert _status_of(page, "FROC sensitivity at 1 FP/image") == "not met"
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


def test_training_time_is_summed_over_epochs_and_judged() -> None:
    history = {"history": {"epoch_seconds": [100.0, 130.0, 20.0]}}
    assert training_minutes(history) == pytest.approx(250 / 60)
    assert training_minutes({"history": {}}) is None
    fast = render_report(ReportInputs(_metrics(), _details(), history=history))
    assert _status_of(fast, "Training time (epochs, this machine)") == "met"
    slow = {"history": {"epoch_seconds": [200.0] * 2}}
    slow_page = render_report(ReportInputs(_metrics(), _details(), history=slow))
    assert _status_of(slow_page, "Training time (epochs, this machine)") == "not met"


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
    out = run(layout)
    assert out == tmp_path / "reports" / "latest" / "index.html"
    page = out.read_text()
    # The four PNGs given plus the training curves drawn from the history, all embedded.
    assert page.count("data:image/png;base64,") == 5
    assert (layout.plots / "training.png").is_file()
    assert not re.search(r'src="(?!data:)', page)  # nothing refers to a file beside the page
    assert "reports/validation.json not found" in page
    assert np.isclose(float(re.search(r"0\.550", page).group(0)), 0.55)  # type: ignore[union-attr]
