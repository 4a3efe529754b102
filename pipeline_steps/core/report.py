"""The test report, `reports/latest/index.html`: one self-contained page naming the model it judges,
with the deep model against the classical baseline (metrics with bootstrap CIs, the gate's floors,
FROC/PR/calibration plots, lesion sizes, subgroups), a grid of test images at the served threshold,
the training curves and the data validation summary.

The `test` stage writes the page before the model is registered, so it names the candidate by the
sha256 of its model file; `with_registration` fills in the registered version and MLflow run
afterwards (the register edge does it in the copy logged to that run). `render_report` is a pure
function from the stage outputs to HTML; `run` is the edge that reads them from the workspace.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline_steps.core.deid import DEV_MODE_VARIABLE, DEVELOPMENT
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import file_sha256, write_text_atomic
from pipeline_steps.core.layout import Layout

# The registration block: written "pending" by the test stage, replaced by `with_registration`.
_REGISTRATION_START, _REGISTRATION_END = "<!-- registration -->", "<!-- /registration -->"

# Rows of the deep-vs-classical table: metrics.json key and label.
HEADLINE = (
    ("ap50", "AP@0.5"),
    ("ap75", "AP@0.75"),
    ("map", "mAP@[.5:.95]"),
    ("rsna", "RSNA pneumonia metric"),
    ("froc_0.125", "Sensitivity at 1/8 FP/image"),
    ("froc_0.25", "Sensitivity at 1/4 FP/image"),
    ("froc_0.5", "Sensitivity at 1/2 FP/image"),
    ("sens_at_1fp", "Sensitivity at 1 FP/image"),
    ("froc_2", "Sensitivity at 2 FP/image"),
    ("froc_4", "Sensitivity at 4 FP/image"),
    ("froc_8", "Sensitivity at 8 FP/image"),
    ("cpm", "CPM (mean of the 7 FROC points)"),
    ("auroc", "Image-level AUROC (max box score)"),
)
ATTRIBUTE_LABELS = {
    "sex": "Sex",
    "age_band": "Age band",
    "view_position": "View position",
    "manufacturer": "Manufacturer",
}
# Plots embedded in the page: file name under reports/plots and caption.
PLOTS = (
    ("froc.png", "FROC: lesion sensitivity against false positives per image."),
    ("pr.png", "Precision-recall at IoU 0.5 (COCO 101-point interpolation)."),
    ("calibration.png", "Reliability of the deep model's box scores (IoU >= 0.3 is a hit)."),
    ("training.png", "Training: loss and validation AP per epoch."),
)
GRID_PLOT = "test_grid.png"

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1240px; color: #1d2329; line-height: 1.4; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 30px;
     border-bottom: 2px solid #e3e7eb; padding-bottom: 4px; }
.meta { color: #5b6670; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #d5dbe0; padding: 4px 9px; text-align: right; }
th { background: #f2f4f6; } td.l, th.l { text-align: left; }
.ci { color: #6b7680; font-size: 11px; }
.pass { background: #dff3e3; color: #17612a; font-weight: 600; }
.fail { background: #fbe3e1; color: #8f1d14; font-weight: 600; }
.plots { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
figure { margin: 0; } figure img { width: 100%; border: 1px solid #e3e7eb; }
figcaption { font-size: 12px; color: #5b6670; }
.note { font-size: 12px; color: #4a545d; max-width: 1000px; }
.grid img { width: 100%; border: 1px solid #e3e7eb; }
"""


@dataclass(frozen=True)
class ReportInputs:
    """Everything the page shows, as read from the workspace by `run`."""

    metrics: Mapping[str, float | None]
    details: Mapping[str, Any]
    validation: Mapping[str, Any] | None = None
    history: Mapping[str, Any] | None = None
    images: Mapping[str, bytes] = field(default_factory=dict)  # plot file name -> PNG bytes
    data_version: str = ""
    generated_at: str = ""
    # The gate's absolute floors (params.yaml gate.thresholds): the one source of the targets.
    floors: Mapping[str, float] = field(default_factory=dict)
    model_sha256: str = ""  # of the model file the test stage scored: the candidate's identity


@dataclass(frozen=True)
class Registration:
    """The registered model version and the MLflow run that holds it and this report."""

    model_name: str
    version: str
    run_id: str


# --------------------------------------------------------------------------------------------
# Formatting helpers


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _with_ci(metrics: Mapping[str, float | None], key: str) -> str:
    text = html.escape(_number(metrics.get(key)))
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is not None and high is not None:
        text += f' <span class="ci">[{_number(low)}, {_number(high)}]</span>'
    return text


def _percent(found: int, total: int) -> str:
    return f"{found}/{total} ({100 * found / total:.0f}%)" if total else "n/a"


def _img(data: bytes | None, alt: str) -> str:
    if not data:
        return f'<p class="meta">({html.escape(alt)}: not available)</p>'
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def training_minutes(history: Mapping[str, Any] | None) -> float | None:
    """Minutes spent in training epochs (over resumed runs too), from train_history.json."""
    if not history:
        return None
    seconds = history.get("history", {}).get("epoch_seconds")
    if not seconds:
        return None
    return float(sum(seconds)) / 60


# --------------------------------------------------------------------------------------------
# Sections


def _floors_section(inputs: ReportInputs) -> str:
    labels = dict(HEADLINE)
    rows = []
    for metric, floor in sorted(inputs.floors.items()):
        value = inputs.metrics.get(metric)
        # As the gate judges it: the value itself against the floor, never a rounded display.
        ok = value is not None and math.isfinite(value) and value >= floor
        rows.append(
            f'<tr><td class="l">{html.escape(labels.get(metric, metric))}</td>'
            f'<td class="l">{html.escape(metric)}</td><td>&ge; {floor:g}</td>'
            f"<td>{_with_ci(inputs.metrics, metric)}</td>"
            f'<td class="{"pass" if ok else "fail"}">{"met" if ok else "not met"}</td></tr>'
        )
    if not rows:
        return (
            "<h2>Gate floors</h2><p class='meta'>No floors are configured "
            "(params.yaml gate.thresholds is empty).</p>"
        )
    return (
        "<h2>Gate floors</h2>"
        '<p class="meta">The absolute floors of params.yaml <code>gate.thresholds</code>, which '
        "the gate stage applies to this model before it compares it with production.</p>"
        '<table><tr><th class="l">Metric</th><th class="l">Key</th><th>Floor</th>'
        "<th>Measured [95% CI]</th><th>Status</th></tr>" + "".join(rows) + "</table>"
    )


def registration_block(registration: Registration | None) -> str:
    """The rows naming the registered version and run, between markers `with_registration` finds."""
    if registration is None:
        rows = (
            '<tr><td class="l">Registered version</td><td class="l">not yet registered: this page '
            "was written by the test stage, before the register stage; the copy logged to the "
            "version's MLflow run names it (also in reports/registration.json)</td></tr>"
        )
    else:
        rows = (
            f'<tr><td class="l">Registered version</td><td class="l">'
            f"{html.escape(registration.model_name)} version {html.escape(registration.version)}"
            f'</td></tr><tr><td class="l">MLflow run</td><td class="l">'
            f"{html.escape(registration.run_id)}</td></tr>"
        )
    return _REGISTRATION_START + rows + _REGISTRATION_END


def _model_section(inputs: ReportInputs) -> str:
    minutes = training_minutes(inputs.history)
    rows = [
        ("Model file (models/detector.keras) sha256", inputs.model_sha256 or "not available"),
        ("Data version (DVC md5 of data/raw)", inputs.data_version or "not available"),
        ("Training time (epochs)", f"{minutes:.1f} min" if minutes is not None else None),
    ]
    cells = "".join(
        f'<tr><td class="l">{html.escape(k)}</td><td class="l">{html.escape(v)}</td></tr>'
        for k, v in rows
        if v is not None
    )
    return (
        "<h2>Model</h2><table>" + cells + registration_block(None) + "</table>"
        '<p class="meta">The model is named by its file\'s sha256 until it is registered; the '
        "registered version's lineage tags and run hold the same data version.</p>"
    )


def with_registration(page: str, registration: Registration) -> str:
    """The page with its registration block naming `registration` (the register edge's copy)."""
    start, end = page.find(_REGISTRATION_START), page.find(_REGISTRATION_END)
    if start < 0 or end < start:
        raise DataError(
            "the test report has no registration block; re-run the `test` stage to rewrite it"
        )
    block = registration_block(registration)
    return page[:start] + block + page[end + len(_REGISTRATION_END) :]


def _headline_section(inputs: ReportInputs) -> str:
    m = inputs.metrics
    has_baseline = "baseline_ap50" in m
    head = '<tr><th class="l">Metric</th><th>Deep model [95% CI]</th>'
    head += (
        "<th>Classical baseline [95% CI]</th><th>Difference</th></tr>" if has_baseline else "</tr>"
    )
    rows = []
    for key, label in HEADLINE:
        row = f'<tr><td class="l">{html.escape(label)}</td><td>{_with_ci(m, key)}</td>'
        if has_baseline:
            deep, base = m.get(key), m.get(f"baseline_{key}")
            diff = (
                deep - base
                if deep is not None and base is not None and math.isfinite(deep - base)
                else None
            )
            cell = _number(diff)
            if key == "ap50":
                cell = _with_ci(m, "ap50_minus_baseline")
            row += f"<td>{_with_ci(m, f'baseline_{key}')}</td><td>{cell}</td>"
        rows.append(row + "</tr>")
    counts = (
        f"{_number(m.get('n_images'), 0)} test images, {_number(m.get('n_gt'), 0)} lesions, "
        f"{inputs.details.get('n_patients', 'n/a')} patients"
    )
    return (
        "<h2>Deep model against the classical baseline</h2>"
        f'<p class="meta">{html.escape(counts)}. Same split, same decoding rules (score floor, '
        "NMS, at most the same number of boxes per image), same metric code; boxes scored in "
        "original DICOM pixels.</p><table>" + head + "".join(rows) + "</table>"
    )


def _size_section(inputs: ReportInputs) -> str:
    deep = inputs.details.get("deep", {}).get("lesion_size_at_1fp", {})
    base = inputs.details.get("baseline", {}).get("lesion_size_at_1fp", {})
    if not deep:
        return ""
    rows = []
    for band, (found, total) in deep.items():
        base_cell = _percent(*base[band]) if band in base else "n/a"
        rows.append(
            f'<tr><td class="l">{html.escape(band)}</td><td>{total}</td>'
            f"<td>{_percent(found, total)}</td><td>{base_cell}</td></tr>"
        )
    return (
        "<h2>Lesions found at 1 false positive per image, by diameter</h2>"
        '<table><tr><th class="l">Diameter</th><th>Lesions</th><th>Deep model</th>'
        "<th>Classical baseline</th></tr>" + "".join(rows) + "</table>"
        '<p class="note">Each detector at its own score threshold giving 1 FP/image on this test '
        "split. Diameter: mean of the box width and height in mm (DICOM pixel spacing).</p>"
    )


def _subgroup_section(inputs: ReportInputs) -> str:
    deep = inputs.details.get("deep", {}).get("subgroups", {})
    base = inputs.details.get("baseline", {}).get("subgroups", {})
    if not deep:
        return ""
    rows = []
    for attribute, by_value in deep.items():
        for value, e in by_value.items():
            b = base.get(attribute, {}).get(value, {})
            rows.append(
                f'<tr><td class="l">{html.escape(ATTRIBUTE_LABELS.get(attribute, attribute))}</td>'
                f'<td class="l">{html.escape(str(value))}</td>'
                f"<td>{_number(e.get('n_images'), 0)}</td><td>{_number(e.get('n_gt'), 0)}</td>"
                f"<td>{_with_ci(e, 'ap50')}</td><td>{_with_ci(e, 'sens_at_1fp')}</td>"
                f"<td>{_number(e.get('cpm'))}</td><td>{_number(e.get('auroc'))}</td>"
                f"<td>{_number(b.get('ap50'))}</td></tr>"
            )
    return (
        "<h2>Subgroups</h2>"
        '<table><tr><th class="l">Attribute</th><th class="l">Group</th><th>Images</th>'
        "<th>Lesions</th><th>Deep AP@0.5 [95% CI]</th><th>Deep sens. at 1 FP/img [95% CI]</th>"
        "<th>Deep CPM</th><th>Deep AUROC</th><th>Classical AP@0.5</th></tr>"
        + "".join(rows)
        + "</table>"
        '<p class="note">Each subgroup is scored as a test set of its own (false positives per '
        "image of that subgroup). Small groups give wide intervals: read the CI before the point "
        "estimate.</p>"
    )


def _plots_section(inputs: ReportInputs) -> str:
    figures = "".join(
        f"<figure>{_img(inputs.images.get(name), name)}<figcaption>{html.escape(caption)}"
        "</figcaption></figure>"
        for name, caption in PLOTS
    )
    return f'<h2>Curves</h2><div class="plots">{figures}</div>'


def _grid_section(inputs: ReportInputs) -> str:
    cuts = inputs.details.get("grid_thresholds", {})
    deep_t = cuts.get("deep", inputs.details.get("operating_threshold"))
    base_t = cuts.get("baseline")
    baseline = (
        f"; blue dashed: classical baseline at score &ge; {_number(base_t, 2)}, its 1 FP/image "
        "operating point on this split (it is not served, and its scores are on another scale)"
        if base_t is not None
        else ""
    )
    return (
        "<h2>Test images</h2>"
        f'<div class="grid">{_img(inputs.images.get(GRID_PLOT), "test image grid")}</div>'
        '<p class="note">The first test images with lesions and without them, in image-id order '
        "(ids are content hashes: an arbitrary, reproducible pick). Green: ground truth (drawn "
        f"just outside the lesion). Red: deep model at score &ge; {_number(deep_t, 2)}, the "
        f"served threshold (params.yaml test.score_threshold){baseline}.</p>"
    )


def _validation_section(validation: Mapping[str, Any] | None) -> str:
    if not validation:
        return "<h2>Data validation</h2><p class='meta'>reports/validation.json not found.</p>"
    summary = [
        ("Result", "passed" if validation.get("success") else "FAILED"),
        ("Images", validation.get("n_images")),
        ("Quarantined", validation.get("n_quarantined")),
        ("Label rows", validation.get("n_label_rows")),
        ("Positive fraction", _number(validation.get("positive_fraction"))),
        ("Pseudonym key", validation.get("pseudonym_key") or "not recorded"),
    ]
    head = "".join(
        f'<tr><td class="l">{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>'
        for k, v in summary
        if v is not None
    )
    rows = []
    for exp in validation.get("expectations", []):
        ok = bool(exp.get("success"))
        rows.append(
            f'<tr><td class="l">{html.escape(str(exp.get("table", "")))}</td>'
            f'<td class="l">{html.escape(str(exp.get("name", "")))}</td>'
            f'<td class="l">{html.escape(str(exp.get("severity", "")))}</td>'
            f"<td>{html.escape(str(exp.get('unexpected_count', '')))}</td>"
            f'<td class="{"pass" if ok else "fail"}">{"pass" if ok else "fail"}</td></tr>'
        )
    n_ok = sum(1 for e in validation.get("expectations", []) if e.get("success"))
    public_key = (
        '<p class="fail">Patient pseudonyms were made with the PUBLIC development key '
        f"({DEV_MODE_VARIABLE}=1), so they do not protect identity: this model is for synthetic "
        "or test data only.</p>"
        if validation.get("pseudonym_key") == DEVELOPMENT
        else ""
    )
    return (
        "<h2>Data validation</h2><table>"
        + head
        + "</table>"
        + public_key
        + f'<p class="meta">{n_ok} of {len(rows)} expectations passed.</p>'
        '<table><tr><th class="l">Table</th><th class="l">Expectation</th>'
        '<th class="l">Severity</th><th>Unexpected</th><th>Result</th></tr>'
        + "".join(rows)
        + "</table>"
    )


def render_report(inputs: ReportInputs) -> str:
    """The whole page as one HTML string (PNGs embedded, no external files)."""
    version = f"data version {inputs.data_version} · " if inputs.data_version else ""
    notes = (
        "<h2>How these numbers are made</h2><p class='note'>A FROC hit is a predicted box whose "
        "centre lies inside the ground-truth box or whose IoU with it is at least 0.3; each "
        "lesion counts once. AP follows COCO (greedy matching by score, 101-point interpolation). "
        "95% intervals are percentile bootstraps that resample patients (all images of a drawn "
        "patient together); the difference to the baseline uses a paired bootstrap (both "
        "detectors on the same resamples). Metrics use every box down to the metrics score floor, "
        "so the curves are complete; served predictions use the operating threshold "
        f"{_number(inputs.details.get('operating_threshold'), 2)}.</p>"
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>radflow test report</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>radflow lesion detector: test report</h1>"
        f'<p class="meta">{html.escape(version)}generated {html.escape(inputs.generated_at)}</p>'
        + _model_section(inputs)
        + _floors_section(inputs)
        + _headline_section(inputs)
        + _plots_section(inputs)
        + _size_section(inputs)
        + _subgroup_section(inputs)
        + _grid_section(inputs)
        + _validation_section(inputs.validation)
        + notes
        + "</body></html>"
    )


# --------------------------------------------------------------------------------------------
# Edge


def plot_training_curves(history: Mapping[str, Sequence[float]], path: Path) -> Path:
    """Loss (train and validation) and validation AP per epoch, to a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = range(1, len(history.get("loss", [])) + 1)
    for key, colour in (("loss", "tab:blue"), ("val_loss", "tab:orange")):
        if history.get(key):
            ax.plot(epochs, history[key], color=colour, label=key)
    ax.set(xlabel="Epoch", ylabel="Loss", title="Training")
    ax.grid(True, alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    if history.get("val_ap"):
        twin = ax.twinx()
        twin.plot(epochs, history["val_ap"], color="tab:green", label="val_ap")
        twin.set(ylabel="Validation AP", ylim=(0, 1))
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    if lines:
        ax.legend(lines, labels, loc="upper right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _data_version(layout: Layout) -> str:
    import yaml

    if not layout.raw_dvc.is_file():
        return ""
    outs = (yaml.safe_load(layout.raw_dvc.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", ""))


def run(layout: Layout, floors: Mapping[str, float]) -> Path:
    """Stage `test` edge (after the metrics): write reports/latest/index.html, judging the metrics
    against `floors` (the gate's `thresholds`)."""
    metrics = _read_json(layout.metrics) or {}
    details = _read_json(layout.test_details) or {}
    history = _read_json(layout.train_history)
    if history and history.get("history"):
        plot_training_curves(history["history"], layout.training_plot)
    plots = (
        layout.froc_plot,
        layout.pr_plot,
        layout.calibration_plot,
        layout.training_plot,
        layout.test_grid,
    )
    images = {path.name: path.read_bytes() for path in plots if path.is_file()}
    page = render_report(
        ReportInputs(
            metrics=metrics,
            details=details,
            validation=_read_json(layout.validation_report),
            history=history,
            images=images,
            data_version=_data_version(layout),
            generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            floors=dict(floors),
            model_sha256=file_sha256(layout.model) if layout.model.is_file() else "",
        )
    )
    write_text_atomic(layout.report_page, page)
    return layout.report_page
