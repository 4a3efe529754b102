"""Feature drift: PSI and the two-sample KS statistic per feature, new data against a reference table.

The reference is the table configured in `extract_features.drift.reference` when one is; otherwise
the features of the production model's training images (`TrainingReference`, resolved from the
registry by the flows' edge), so drift is assessed by default once a production model exists."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_steps.core.config import DriftParams
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.layout import Layout

log = logging.getLogger(__name__)

ID_COLUMNS = ("image_id", "split")
# A bin empty on one side would make PSI infinite; this floor (0.01 %) is the usual convention.
PSI_FLOOR = 1e-4
# Fewer of the production model's training images than this in the workspace make no reference:
# PSI at 10 reference-quantile bins means nothing on a handful of rows.
MIN_REFERENCE_IMAGES = 20


@dataclass(frozen=True)
class TrainingReference:
    """The production model's training images, by content hash: the default drift reference."""

    model_name: str
    version: str
    run_id: str
    data_version: str  # the version's `data_version` tag (DVC md5 of data/raw)
    content_hashes: frozenset[str]  # the train split of the manifest it was trained on

    @property
    def model_version(self) -> str:
        return f"{self.model_name}/{self.version}"

    @property
    def label(self) -> str:
        return (
            f"train split of production {self.model_version} (run {self.run_id}, data version "
            f"{self.data_version or 'unknown'})"
        )


def training_rows(
    table: pd.DataFrame, manifest: pd.DataFrame, reference: TrainingReference
) -> pd.DataFrame:
    """The rows of a per-image table (features, embeddings) for the reference's training images.

    Images are matched by content hash through the preprocess manifest (image_id -> content_hash),
    so the reference carries the current feature params, the same as the table it is compared with."""
    hashes = manifest.set_index("image_id")["content_hash"].astype(str)
    keep = table["image_id"].map(hashes).isin(reference.content_hashes)
    return table[keep.to_numpy()].reset_index(drop=True)


def bin_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Interior edges at the reference's quantiles, so each bin holds ~1/bins of the reference.

    Ties collapse edges; a constant reference gets edges just around its value, so a shift either
    way still lands in another bin."""
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    if len(edges) <= 1:
        c = float(reference[0]) if len(edges) == 0 else float(edges[0])
        edges = np.array([c, np.nextafter(c, np.inf)])
    return edges


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index: sum over bins of (cur% - ref%) * ln(cur% / ref%)."""
    edges = bin_edges(reference, bins)
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    cur = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1)
    p = np.maximum(ref / ref.sum(), PSI_FLOOR)
    q = np.maximum(cur / cur.sum(), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_statistic(reference: np.ndarray, current: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the two empirical CDFs."""
    a, b = np.sort(reference), np.sort(current)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    psi: float
    ks: float
    ks_pvalue: float
    n_reference: int
    n_current: int
    flagged_by: tuple[str, ...]  # "psi", "ks"

    @property
    def flagged(self) -> bool:
        return bool(self.flagged_by)


@dataclass(frozen=True)
class DriftReport:
    drift: bool
    features: tuple[FeatureDrift, ...]
    thresholds: dict[str, float]
    n_reference: int
    n_current: int
    reference: str = ""
    skipped: tuple[str, ...] = field(default=())  # features absent or empty on one side
    # "<name>/<version>" when the reference is the production model's training data
    reference_model_version: str = ""

    @property
    def flagged(self) -> list[str]:
        return [f.name for f in self.features if f.flagged]

    def metrics(self) -> dict[str, float]:
        """Scalars for a tracking server (MLflow): the decision and the worst feature."""
        return {
            "drift": float(self.drift),
            "drift_features_flagged": float(len(self.flagged)),
            "drift_max_psi": max((f.psi for f in self.features), default=0.0),
            "drift_max_ks": max((f.ks for f in self.features), default=0.0),
        }

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["features"] = [asdict(f) | {"flagged": f.flagged} for f in self.features]
        return {"status": "compared", **out, "flagged": self.flagged}


def _numeric(table: pd.DataFrame) -> list[str]:
    return [
        c
        for c in table.columns
        if c not in ID_COLUMNS
        and pd.api.types.is_numeric_dtype(table[c])
        and not pd.api.types.is_bool_dtype(table[c])
    ]


def compare(reference: pd.DataFrame, current: pd.DataFrame, params: DriftParams) -> DriftReport:
    """PSI and KS per numeric feature present in both tables; drift when at least
    `min_drifted_features` features exceed a threshold."""
    from scipy import stats

    features: list[FeatureDrift] = []
    skipped: list[str] = []
    ref_cols, cur_cols = set(_numeric(reference)), set(_numeric(current))
    for name in sorted(ref_cols | cur_cols):
        if name not in ref_cols or name not in cur_cols:
            skipped.append(name)
            continue
        ref = reference[name].to_numpy(np.float64)
        cur = current[name].to_numpy(np.float64)
        ref, cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
        if len(ref) == 0 or len(cur) == 0:
            skipped.append(name)
            continue
        value_psi = psi(ref, cur, params.bins)
        value_ks = ks_statistic(ref, cur)
        pvalue = float(stats.ks_2samp(ref, cur).pvalue)
        flagged_by = tuple(
            k for k, over in (("psi", value_psi > params.psi), ("ks", value_ks > params.ks)) if over
        )
        features.append(
            FeatureDrift(name, value_psi, value_ks, pvalue, len(ref), len(cur), flagged_by)
        )
    n_flagged = sum(f.flagged for f in features)
    return DriftReport(
        drift=n_flagged >= params.min_drifted_features,
        features=tuple(features),
        thresholds={
            "psi": params.psi,
            "ks": params.ks,
            "min_drifted_features": float(params.min_drifted_features),
        },
        n_reference=len(reference),
        n_current=len(current),
        skipped=tuple(skipped),
    )


def _histogram_png(reference: np.ndarray, current: np.ndarray) -> bytes:
    """A small overlaid histogram (density) of one feature, reference vs current."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    both = np.concatenate([reference, current])
    lo, hi = float(np.min(both)), float(np.max(both))
    if hi <= lo:
        hi = lo + 1e-9
    edges = np.linspace(lo, hi, 25).tolist()
    fig = Figure(figsize=(2.6, 1.1), dpi=80)
    ax = fig.add_axes((0.02, 0.18, 0.96, 0.8))
    ax.hist(reference, bins=edges, density=True, color="#4c72b0", alpha=0.55, label="reference")
    ax.hist(current, bins=edges, density=True, color="#dd8452", alpha=0.55, label="current")
    ax.set_yticks([])
    ax.tick_params(axis="x", labelsize=6, pad=1)
    ax.locator_params(axis="x", nbins=4)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _fmt(value: float) -> str:
    return (
        "n/a" if not math.isfinite(value) else f"{value:.3f}" if value >= 1e-3 else f"{value:.1e}"
    )


def render_html(report: DriftReport, reference: pd.DataFrame, current: pd.DataFrame) -> str:
    """One self-contained page: the decision, then a row per feature (worst first) with its plot."""
    rows = []
    for f in sorted(report.features, key=lambda f: (-f.flagged, -f.psi, f.name)):
        ref = reference[f.name].to_numpy(np.float64)
        cur = current[f.name].to_numpy(np.float64)
        png = _histogram_png(ref[np.isfinite(ref)], cur[np.isfinite(cur)])
        image = base64.b64encode(png).decode()
        psi_cls = ' class="over"' if "psi" in f.flagged_by else ""
        ks_cls = ' class="over"' if "ks" in f.flagged_by else ""
        rows.append(
            f"<tr{' class=flagged' if f.flagged else ''}><td>{html.escape(f.name)}</td>"
            f"<td{psi_cls}>{_fmt(f.psi)}</td><td{ks_cls}>{_fmt(f.ks)}</td>"
            f"<td>{_fmt(f.ks_pvalue)}</td><td>{'yes' if f.flagged else 'no'}</td>"
            f'<td><img alt="{html.escape(f.name)} histogram" src="data:image/png;base64,{image}"></td></tr>'
        )
    verdict = "YES" if report.drift else "no"
    t = report.thresholds
    skipped = (
        f"<p>Not compared (missing or empty on one side): {html.escape(', '.join(report.skipped))}</p>"
        if report.skipped
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>radflow feature drift</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
.verdict {{ font-size: 18px; padding: 8px 12px; display: inline-block; border-radius: 4px;
  background: {"#f8d7da" if report.drift else "#d1e7dd"}; }}
table {{ border-collapse: collapse; margin-top: 12px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 2px 10px; text-align: right; }}
td:last-child, th:last-child {{ text-align: left; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; font-family: monospace; }}
tr.flagged td:first-child {{ font-weight: bold; }} td.over {{ color: #b02a37; font-weight: bold; }}
.legend span {{ display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }}
</style></head><body>
<h1>Feature drift: current data against the reference</h1>
<p>Reference: {html.escape(report.reference or "(table)")} ({report.n_reference} images);
current: {report.n_current} images.</p>
<div class="verdict">Drift: {verdict} &mdash; {len(report.flagged)} of {len(report.features)} features flagged
(PSI &gt; {t["psi"]:g} or KS &gt; {t["ks"]:g}; drift when &ge; {int(t["min_drifted_features"])})</div>
<p class="legend">Histograms:<span style="background:#4c72b0"></span>reference
<span style="background:#dd8452"></span>current</p>
{skipped}
<table><thead><tr><th>feature</th><th>PSI</th><th>KS D</th><th>KS p</th><th>flagged</th>
<th>distribution</th></tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""


def write_report(
    report: DriftReport,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    layout: Layout,
    embeddings: dict[str, object] | None = None,
) -> None:
    layout.drift_dir.mkdir(parents=True, exist_ok=True)
    document = report.to_json() | ({"embeddings": embeddings} if embeddings else {})
    layout.drift_report.write_text(json.dumps(document, indent=2))
    page = render_html(report, reference, current)
    if embeddings:
        note = html.escape(json.dumps(embeddings))
        page = page.replace("</body>", f"<p>CNN embeddings: <code>{note}</code></p></body>")
    layout.drift_page.write_text(page)


def embedding_drift(
    reference: pd.DataFrame | None,
    reference_version: str,
    current: pd.DataFrame | None,
    current_version: str,
    params: DriftParams,
) -> dict[str, object]:
    """Drift of the champion's embeddings, only when both sides come from the same model version.

    Reported beside the radiomic decision, not counted in it: a new champion changes every
    dimension's meaning, and per-dimension tests on a few hundred dimensions are a crude signal."""
    if current is None:
        return {"status": "no_embeddings", "note": "no champion model embedded the current images"}
    if reference is None:
        return {"status": "no_reference_embeddings", "model_version": current_version}
    if reference_version != current_version:
        return {
            "status": "model_mismatch",
            "model_version": current_version,
            "reference_model_version": reference_version,
            "note": "embeddings from different models are not comparable; re-extract the "
            "reference's features with the current champion",
        }
    report = compare(reference, current, params)
    return {
        "status": "compared",
        "model_version": current_version,
        "dimensions": len(report.features),
        "flagged": report.flagged,
        "max_psi": max((f.psi for f in report.features), default=0.0),
        "max_ks": max((f.ks for f in report.features), default=0.0),
    }


def _write_no_reference(layout: Layout, note: str) -> None:
    layout.drift_dir.mkdir(parents=True, exist_ok=True)
    layout.drift_report.write_text(
        json.dumps({"status": "no_reference", "drift": False, "note": note}, indent=2)
    )
    layout.drift_page.write_text(
        f"<!doctype html><html><body><p>Feature drift: {html.escape(note)}.</p></body></html>\n"
    )
    log.info("extract_features: %s; drift not assessed", note)


def compare_with_training(
    current: pd.DataFrame,
    manifest: pd.DataFrame,
    training: TrainingReference,
    params: DriftParams,
) -> tuple[DriftReport | None, pd.DataFrame, str]:
    """`current` against the rows of the production model's training images found in it: the
    report (None when too few of them are here), the reference rows, and why there is none."""
    reference = training_rows(current, manifest, training)
    if len(reference) < MIN_REFERENCE_IMAGES:
        return (
            None,
            reference,
            f"only {len(reference)} of the {len(training.content_hashes)} training images of "
            f"production {training.model_version} are in this workspace (at least "
            f"{MIN_REFERENCE_IMAGES} make a reference); set extract_features.drift.reference",
        )
    report = compare(reference, current, params)
    named = replace(
        report, reference=training.label, reference_model_version=training.model_version
    )
    return named, reference, ""


def run(
    layout: Layout,
    params: DriftParams,
    current: pd.DataFrame,
    embeddings: pd.DataFrame | None = None,
    training: TrainingReference | None = None,
) -> DriftReport | None:
    """Stage edge: compare `current` with the reference; write reports/drift/.

    The reference is the configured table (`params.reference`, which wins), else the features of
    `training`, the production model's training images (matched through the preprocess manifest).
    Without either the report says so (the stage's outputs always exist). `embeddings` (with its
    `model_version` column) is compared with the embeddings of the same reference images, when
    those were made by the same model version."""
    if params.reference:
        return _run_configured(layout, params, current, embeddings)
    if training is None:
        _write_no_reference(
            layout,
            "no reference configured (extract_features.drift.reference) and no production "
            "model whose training data could serve as one",
        )
        return None
    manifest = pd.read_parquet(layout.manifest, columns=["image_id", "content_hash"])
    report, reference, why = compare_with_training(current, manifest, training, params)
    if report is None:
        _write_no_reference(layout, why)
        return None
    version = _embedding_version(embeddings)
    ref_embeddings = (
        training_rows(embeddings, manifest, training)
        if embeddings is not None and version
        else None
    )
    section = embedding_drift(
        ref_embeddings, version, embeddings if version else None, version, params
    )
    return _finish(layout, report, reference, current, section)


def _embedding_version(embeddings: pd.DataFrame | None) -> str:
    if embeddings is None or not len(embeddings):
        return ""
    return str(embeddings["model_version"].iloc[0])


def _finish(
    layout: Layout,
    report: DriftReport,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    embeddings: dict[str, object],
) -> DriftReport:
    write_report(report, reference, current, layout, embeddings)
    log.log(
        logging.WARNING if report.drift else logging.INFO,
        "extract_features: drift %s against the %s (%d of %d features flagged: %s)",
        "YES" if report.drift else "no",
        report.reference,
        len(report.flagged),
        len(report.features),
        ", ".join(report.flagged) or "none",
    )
    return report


def _run_configured(
    layout: Layout,
    params: DriftParams,
    current: pd.DataFrame,
    embeddings: pd.DataFrame | None,
) -> DriftReport:
    path = layout.root / params.reference
    if not path.is_file():
        raise DataError(
            f"{path}: reference feature table not found (params.yaml extract_features.drift."
            "reference). Point it at the features.parquet of the champion's training data, or "
            "set it to an empty string to use the production model's training data."
        )
    reference = pd.read_parquet(path)
    report = replace(compare(reference, current, params), reference=params.reference)
    ref_embeddings, ref_version = _embeddings_beside(path)
    version = _embedding_version(embeddings)
    section = embedding_drift(
        ref_embeddings, ref_version, embeddings if version else None, version, params
    )
    return _finish(layout, report, reference, current, section)


def _embeddings_beside(reference: Path) -> tuple[pd.DataFrame | None, str]:
    """The embeddings.parquet next to a reference features table, and its model version."""
    path = reference.parent / "embeddings.parquet"
    if not path.is_file():
        return None, ""
    table = pd.read_parquet(path)
    if "model_version" not in table or not len(table):
        return None, ""
    return table, str(table["model_version"].iloc[0])
