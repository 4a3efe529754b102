"""Stage `validate`: de-identified metadata and label tables from data/raw, checked by Great Expectations."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline_steps.core import data_docs
from pipeline_steps.core.config import IngestParams, ValidateParams
from pipeline_steps.core.deid import pseudonym_key
from pipeline_steps.core.dicom_tags import GRAYSCALE
from pipeline_steps.core.errors import DataError, ValidationFailed
from pipeline_steps.core.files import atomic_path
from pipeline_steps.core.labels import LABEL_COLUMNS, NO_FINDING
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.screening import METADATA_COLUMNS, build_metadata

log = logging.getLogger(__name__)


SEVERITIES = ("critical", "warning")
# A few offending rows are named in messages and reports: by these ids, never by header values.
OFFENDING_SAMPLE = 5
ROW_IDS = ["image_id"]


@dataclass(frozen=True)
class Expectation:
    """One expectation's outcome, as the pipeline reports it (the GX result holds the full detail)."""

    table: str
    name: str
    severity: str  # critical | warning
    success: bool
    unexpected: list[Any] = field(
        default_factory=list
    )  # a few offending values (or the observed one)
    unexpected_count: int = 0
    element_count: int = 0
    offending: list[dict[str, Any]] = field(default_factory=list)  # image ids + the checked values
    detail: str = ""  # what an aggregate or table-level check observed, or why it could not run

    def describe(self) -> str:
        """One line naming the expectation and a few offending rows (image ids only identify them)."""
        head = f"{self.table}: {self.name} [{self.severity}]"
        if self.detail:
            head += f" {self.detail}"
        if self.unexpected_count:
            head += f"; {self.unexpected_count} of {self.element_count} rows unexpected"
        if self.offending:
            head += ", e.g. " + "; ".join(_describe_row(row) for row in self.offending)
        elif self.unexpected and not self.detail:
            head += f", e.g. {self.unexpected}"
        return head


def _describe_row(row: dict[str, Any]) -> str:
    ids = ", ".join(f"{k}={v}" for k, v in row.items() if k in ROW_IDS)
    values = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ROW_IDS)
    return f"{ids} ({values})" if values else ids


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    n_images: int
    n_quarantined: int
    n_label_rows: int
    positive_fraction: float
    expectations: list[Expectation]
    data_version: str = "unversioned"
    result_id: str = (
        ""  # the GX run (<data version>/<run time>) every suite's result is stored under
    )
    gx_results: dict[str, str] = field(default_factory=dict)  # suite -> GX validation result id
    n_unlabelled: int = 0  # accepted images without any label row
    n_labels_without_image: int = 0  # label rows whose image is missing or quarantined
    pseudonym_key: str = ""  # configured | development: the key's mode, never the key

    @property
    def failures(self) -> list[Expectation]:
        return [e for e in self.expectations if not e.success and e.severity == "critical"]

    @property
    def warnings(self) -> list[Expectation]:
        return [e for e in self.expectations if not e.success and e.severity == "warning"]


def build_labels(raw_labels: pd.DataFrame, metadata: pd.DataFrame) -> pd.DataFrame:
    """Canonical boxes of accepted images; images without any label row are treated as unlabelled."""
    labels = raw_labels[LABEL_COLUMNS].copy()
    labels = labels[labels["image_id"].isin(set(metadata["image_id"]))]
    return labels.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Great Expectations: suites per table, run through Checkpoints in a file-backed context


@dataclass(frozen=True)
class GxStore:
    """The file-backed GX context (`<project>/gx`: suites, checkpoints, results) and its Data Docs."""

    project: Path
    data_docs: Path

    @property
    def root(self) -> Path:
        return self.project / "gx"


DATA_DOCS_SITE = "radflow"


def _expect(kind: Any, severity: str, **kwargs: Any) -> Any:
    assert severity in SEVERITIES
    # `meta` is what the pipeline reads; `notes` shows the severity in Data Docs.
    return kind(**kwargs, meta={"severity": severity}, notes=f"severity: {severity}")


def build_suites(params: ValidateParams, allowed: IngestParams) -> dict[str, list[Any]]:
    """The expectations of each table (metadata, labels, label_summary), each with a severity."""
    E = _gx().expectations
    lo_sp, hi_sp = params.pixel_spacing_mm
    lo_px, hi_px = params.size_px
    lo_mm2, hi_mm2 = params.box_area_mm2
    lo_pos, hi_pos = params.positive_fraction
    crit, warn = "critical", "warning"
    pairs = {"ignore_row_if": "either_value_is_missing"}  # no_finding rows have no box
    return {
        "metadata": [
            # The allow-list: a PHI column that slipped in fails here, whatever its name.
            _expect(
                E.ExpectTableColumnsToMatchSet, crit, column_set=METADATA_COLUMNS, exact_match=True
            ),
            _expect(E.ExpectTableRowCountToBeBetween, crit, min_value=params.min_images),
            _expect(E.ExpectColumnValuesToBeUnique, crit, column="image_id"),
            _expect(E.ExpectColumnValuesToNotBeNull, crit, column="patient_pseudonym"),
            _expect(E.ExpectColumnValuesToNotBeNull, crit, column="study_pseudonym"),
            _expect(
                E.ExpectColumnValuesToBeInSet,
                crit,
                column="modality",
                value_set=list(allowed.allowed_modalities),
            ),
            _expect(
                E.ExpectColumnValuesToBeInSet,
                crit,
                column="body_part",
                value_set=[*allowed.allowed_body_parts, ""],
            ),
            _expect(
                E.ExpectColumnValuesToBeInSet, crit, column="photometric", value_set=list(GRAYSCALE)
            ),
            _expect(
                E.ExpectColumnValuesToBeBetween,
                crit,
                column="rows",
                min_value=lo_px,
                max_value=hi_px,
            ),
            _expect(
                E.ExpectColumnValuesToBeBetween,
                crit,
                column="columns",
                min_value=lo_px,
                max_value=hi_px,
            ),
            _expect(
                E.ExpectColumnValuesToBeBetween,
                crit,
                column="spacing_row_mm",
                min_value=lo_sp,
                max_value=hi_sp,
            ),
            _expect(
                E.ExpectColumnValuesToBeBetween,
                crit,
                column="spacing_col_mm",
                min_value=lo_sp,
                max_value=hi_sp,
            ),
            # Accepted, but a reader should know: spacing fell back, body part unknown, several
            # windows (the first is used), transfer syntax guessed from the encoding.
            _expect(
                E.ExpectColumnValuesToBeInSet, warn, column="spacing_flagged", value_set=[False]
            ),
            _expect(
                E.ExpectColumnValuesToBeInSet, warn, column="body_part_missing", value_set=[False]
            ),
            _expect(E.ExpectColumnValuesToBeBetween, warn, column="window_count", max_value=1),
            _expect(
                E.ExpectColumnValuesToBeInSet,
                warn,
                column="transfer_syntax_inferred",
                value_set=[False],
            ),
        ],
        "labels": [
            _expect(
                E.ExpectColumnValuesToBeInSet,
                crit,
                column="label",
                value_set=[*params.allowed_labels, NO_FINDING],
            ),
            # A finding has a box and a no_finding row has none.
            _expect(
                E.ExpectColumnPairValuesToBeEqual, crit, column_A="has_box", column_B="is_finding"
            ),
            _expect(E.ExpectColumnValuesToBeBetween, crit, column="x_min", min_value=0),
            _expect(E.ExpectColumnValuesToBeBetween, crit, column="y_min", min_value=0),
            _expect(
                E.ExpectColumnPairValuesAToBeGreaterThanB,
                crit,
                column_A="columns",
                column_B="x_max",
                or_equal=True,
                **pairs,
            ),
            _expect(
                E.ExpectColumnPairValuesAToBeGreaterThanB,
                crit,
                column_A="rows",
                column_B="y_max",
                or_equal=True,
                **pairs,
            ),
            _expect(
                E.ExpectColumnPairValuesAToBeGreaterThanB,
                crit,
                column_A="x_max",
                column_B="x_min",
                **pairs,
            ),
            _expect(
                E.ExpectColumnPairValuesAToBeGreaterThanB,
                crit,
                column_A="y_max",
                column_B="y_min",
                **pairs,
            ),
            _expect(
                E.ExpectColumnValuesToBeBetween,
                crit,
                column="area_mm2",
                min_value=lo_mm2,
                max_value=hi_mm2,
            ),
        ],
        "label_summary": [
            # Among labelled images; unlabelled ones are NaN, which the mean skips.
            _expect(
                E.ExpectColumnMeanToBeBetween,
                crit if params.require_labels else warn,
                column="positive",
                min_value=lo_pos,
                max_value=hi_pos,
            ),
            _expect(E.ExpectColumnValuesToBeInSet, warn, column="labelled", value_set=[True]),
        ],
    }


def label_tables(metadata: pd.DataFrame, labels: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tables the label suites check: label rows joined with their image, and one row per image.

    The first adds each box's image size, physical area and whether the row is a finding and has a
    box; the second says per accepted image whether it is labelled and, if so, positive (NaN if not).
    """
    joined = labels.merge(
        metadata[["image_id", "rows", "columns", "spacing_row_mm", "spacing_col_mm"]], on="image_id"
    )
    width = joined["x_max"].astype(float) - joined["x_min"].astype(float)
    height = joined["y_max"].astype(float) - joined["y_min"].astype(float)
    boxes = pd.DataFrame(
        {
            "image_id": joined["image_id"].astype(str),
            "label": joined["label"].astype(str),
            **{c: joined[c].astype(float) for c in ("x_min", "y_min", "x_max", "y_max")},
            "rows": joined["rows"].astype(int),
            "columns": joined["columns"].astype(int),
            "area_mm2": width * joined["spacing_col_mm"] * height * joined["spacing_row_mm"],
            "is_finding": joined["label"] != NO_FINDING,
            "has_box": joined[["x_min", "y_min", "x_max", "y_max"]].notna().all(axis=1),
        }
    )
    labelled = metadata["image_id"].isin(set(boxes["image_id"]))
    positive_ids = set(boxes.loc[boxes["is_finding"], "image_id"])
    summary = pd.DataFrame(
        {
            "image_id": metadata["image_id"].astype(str),
            "labelled": labelled.astype(bool),
            "positive": np.where(
                labelled, metadata["image_id"].isin(positive_ids).astype(float), np.nan
            ),
        }
    )
    return boxes.reset_index(drop=True), summary.reset_index(drop=True)


def _gx() -> Any:
    """Import GX quietly. It logs at INFO while importing and on each store write and docs build, some
    modules forcing their own level; the pipeline reports the outcome itself."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # before the import logs
    import great_expectations

    for name, logger in logging.root.manager.loggerDict.items():
        if not isinstance(logger, logging.Logger) or logger.level == logging.NOTSET:
            continue
        if name.startswith("great_expectations."):
            logger.setLevel(logging.WARNING)
    return great_expectations


def _context(store: GxStore | None) -> Any:
    """A file-backed context at `store.root` (created on first use) with one Data Docs site, or an
    ephemeral one when `store` is None (unit tests: nothing is written)."""
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    no_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    context: Any
    if store is None:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = no_bars
        context.variables.analytics_enabled = False
        return context
    context = gx.get_context(mode="file", project_root_dir=str(store.project))
    bars = context.variables.progress_bars
    if (
        bars.get("globally") if isinstance(bars, dict) else getattr(bars, "globally", None)
    ) is not False:
        context.variables.progress_bars = no_bars
        context.variables.save()
    # Off in the workspace's own config (hospital networks are offline); a `true` there opts in.
    if context.variables.analytics_enabled is None:
        context.variables.analytics_enabled = False
        context.variables.save()
    # Relative to the context root, so the workspace can move.
    docs_dir = os.path.relpath(store.data_docs, store.root) + os.sep
    site: Any = {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir},
    }
    sites = dict(context.list_data_docs_sites())
    for name in sites:  # the default site under gx/uncommitted would be a second copy
        if name != DATA_DOCS_SITE:
            context.delete_data_docs_site(name)
    if DATA_DOCS_SITE not in sites:
        context.add_data_docs_site(DATA_DOCS_SITE, site)
    elif sites[DATA_DOCS_SITE]["store_backend"].get("base_directory") != docs_dir:
        context.update_data_docs_site(DATA_DOCS_SITE, site)
    return context


def _batch_definition(context: Any, table: str) -> Any:
    """The whole-dataframe batch of `table`, created once and then reused (so its id stays put)."""
    try:
        source = context.data_sources.get("radflow")
    except (KeyError, ValueError):
        source = context.data_sources.add_pandas("radflow")
    names = {asset.name for asset in source.assets}
    asset = source.get_asset(table) if table in names else source.add_dataframe_asset(table)
    try:
        return asset.get_batch_definition("all")
    except (KeyError, ValueError):
        return asset.add_batch_definition_whole_dataframe("all")


def _expectation_name(config: Any) -> str:
    kwargs = config.kwargs
    if "column" in kwargs:
        return f"{config.type}({kwargs['column']})"
    if "column_A" in kwargs:
        return f"{config.type}({kwargs['column_A']},{kwargs['column_B']})"
    return str(config.type)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return str(value)


def _to_expectation(table: str, result: Any) -> Expectation:
    config = result.expectation_config
    assert config is not None  # GX sets it on every result of a suite run
    detail = ""
    outcome = result.result or {}
    if result.exception_info and result.exception_info.get("raised_exception"):
        # e.g. the column is missing; the message names columns, never values.
        detail = f"could not run: {str(result.exception_info.get('exception_message'))[:200]}"
    elif "observed_value" in outcome and not result.success:
        mismatch = (outcome.get("details") or {}).get("mismatched")
        detail = (
            f"column mismatch {_plain(mismatch)}"
            if mismatch
            else f"observed {_plain(outcome['observed_value'])}"
        )
    checked = {config.kwargs.get(k) for k in ("column", "column_A", "column_B")} - {None}
    offending = [
        {k: _plain(v) for k, v in row.items() if k in ROW_IDS or k in checked}
        for row in (outcome.get("partial_unexpected_index_list") or [])[:OFFENDING_SAMPLE]
    ]
    return Expectation(
        table=table,
        name=_expectation_name(config),
        severity=(config.meta or {}).get("severity", "critical"),
        success=bool(result.success),
        unexpected=[
            _plain(x) for x in (outcome.get("partial_unexpected_list") or [])[:OFFENDING_SAMPLE]
        ],
        unexpected_count=int(outcome.get("unexpected_count") or 0),
        element_count=int(outcome.get("element_count") or 0),
        offending=offending,
        detail=detail,
    )


def _gx_results(
    tables: dict[str, pd.DataFrame],
    params: ValidateParams,
    allowed: IngestParams,
    store: GxStore | None = None,
    data_version: str = "unversioned",
) -> tuple[list[Expectation], str, dict[str, str]]:
    """Run each table's suite through its Checkpoint: (outcomes in suite order, run id, result ids).

    One Checkpoint per table because a Checkpoint passes the same batch parameters (here: the
    dataframe) to all its validation definitions. All share one run id named by the data version,
    so their results sit together in the store and in Data Docs.
    """
    import datetime as dt

    gx = _gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier

    context = _context(store)
    run_id = RunIdentifier(run_name=data_version, run_time=dt.datetime.now(dt.UTC))
    result_format = {
        "result_format": "SUMMARY",
        "unexpected_index_column_names": ROW_IDS,
        "partial_unexpected_count": OFFENDING_SAMPLE,
    }
    outcomes: list[Expectation] = []
    result_ids: dict[str, str] = {}
    for table, expectations in build_suites(params, allowed).items():
        suite = context.suites.add_or_update(
            gx.ExpectationSuite(name=table, expectations=expectations)
        )
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=table, data=_batch_definition(context, table), suite=suite)
        )
        actions: list[Any] = (
            [UpdateDataDocsAction(name="data_docs", site_names=[DATA_DOCS_SITE])] if store else []
        )
        checkpoint = context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=table,
                validation_definitions=[definition],
                actions=actions,
                result_format=result_format,
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": tables[table]}, run_id=run_id)
        order = {e.id: n for n, e in enumerate(suite.expectations)}
        for key, validation in run.run_results.items():
            result_ids[table] = "/".join(str(part) for part in key.to_tuple())
            ranked = sorted(validation.results, key=lambda r: order.get(r.expectation_config.id, 0))
            outcomes.extend(_to_expectation(table, r) for r in ranked)
    return outcomes, "/".join(str(part) for part in run_id.to_tuple()), result_ids


def validate_tables(
    metadata: pd.DataFrame,
    labels: pd.DataFrame,
    params: ValidateParams,
    allowed: IngestParams,
    *,
    store: GxStore | None = None,
    data_version: str = "unversioned",
) -> ValidationReport:
    """Run the metadata and label suites; critical failures make `success` false.

    With `store`, results go to the file-backed GX context under the data version and Data Docs are
    updated (self-contained: see core/data_docs); without it, an in-memory context leaves nothing behind.
    """
    boxes, summary = label_tables(metadata, labels)
    results, result_id, result_ids = _gx_results(
        {"metadata": metadata, "labels": boxes, "label_summary": summary},
        params,
        allowed,
        store,
        data_version,
    )
    if store:  # GX's pages load their styles and tables from CDNs; hospitals run them offline
        data_docs.make_offline(store.data_docs)
    labelled = summary["positive"].notna()
    fraction = float(summary.loc[labelled, "positive"].mean()) if labelled.any() else float("nan")
    return ValidationReport(
        success=all(r.success for r in results if r.severity == "critical"),
        n_images=len(metadata),
        n_quarantined=0,
        n_label_rows=len(labels),
        positive_fraction=fraction,
        expectations=results,
        data_version=data_version,
        result_id=result_id,
        gx_results=result_ids,
        n_unlabelled=int((~labelled).sum()),
    )


def gx_store(layout: Layout) -> GxStore:
    """The workspace's GX context (`<workspace>/gx`, beside, not under, the DVC-tracked data) and
    Data Docs (`reports/data_docs`)."""
    return GxStore(project=layout.root, data_docs=layout.data_docs)


def run(
    layout: Layout,
    ingest: IngestParams,
    params: ValidateParams,
    data_version: str = "unversioned",
) -> ValidationReport:
    """Stage edge: data/raw -> data/interim/{metadata,labels}.parquet + reports; raises on critical failures.

    `data_version` (the DVC md5 of data/raw) keys the GX results, so each data version's validation
    can be found in the GX store and in Data Docs.
    """
    key = pseudonym_key()  # first: without a usable key the stage writes nothing
    if not layout.raw_images.is_dir():
        raise DataError(
            f"{layout.raw_images}: no raw data. Run `radflow ingest` or `radflow run` first."
        )
    metadata, quarantine = build_metadata(layout.raw_images, ingest, key.secret)
    raw_labels = (
        pd.read_csv(layout.raw_labels)
        if layout.raw_labels.exists()
        else pd.DataFrame(columns=LABEL_COLUMNS)
    )
    labels = build_labels(raw_labels, metadata)
    layout.reports.mkdir(parents=True, exist_ok=True)
    store = gx_store(layout)
    report = validate_tables(
        metadata, labels, params, ingest, store=store, data_version=data_version
    )
    report = replace(
        report,
        n_quarantined=len(quarantine),
        n_labels_without_image=len(raw_labels) - len(labels),
        pseudonym_key=key.mode,
    )
    layout.interim.mkdir(parents=True, exist_ok=True)
    # data/interim is a DVC-cached out: with link-type caches the old files may be hardlinks into
    # the cache, so they are replaced, never rewritten in place.
    with atomic_path(layout.metadata) as tmp:
        metadata.to_parquet(tmp, index=False)
    with atomic_path(layout.labels) as tmp:
        labels.to_parquet(tmp, index=False)
    with atomic_path(layout.quarantine) as tmp:
        quarantine.to_csv(tmp, index=False)
    summary = asdict(report) | {
        "quarantined_by_reason": quarantine["reason"].value_counts().to_dict(),
        "warnings": [asdict(w) for w in report.warnings],
        "failures": [asdict(f) for f in report.failures],
        "data_docs": os.path.relpath(store.data_docs / "index.html", layout.root),
    }
    layout.validation_report.write_text(json.dumps(summary, indent=2, default=str))
    if report.n_labels_without_image:
        log.warning(
            "%d label row(s) belong to no accepted image (missing or quarantined); not used",
            report.n_labels_without_image,
        )
    for warning in report.warnings:
        log.warning("data validation warning: %s", warning.describe())
    if not report.success:
        lines = [f"  {f.describe()}" for f in report.failures]
        raise ValidationFailed(
            f"data validation failed for data version {data_version}; training will not start:\n"
            + "\n".join(lines)
            + f"\nSee {layout.validation_report} and {store.data_docs / 'index.html'}, "
            "then fix the data (or params.yaml `validate`)."
        )
    return report
