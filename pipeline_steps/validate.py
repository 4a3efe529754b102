"""Stage `validate`: de-identified metadata and label tables from data/raw, checked by Great Expectations."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset

from pipeline_steps.config import IngestParams, ValidateParams
from pipeline_steps.deid import age_in_years, pseudonym
from pipeline_steps.dicom_io import GRAYSCALE, read_header, resolve_spacing, window_of
from pipeline_steps.errors import DataError, ValidationFailed
from pipeline_steps.ingest import LABEL_COLUMNS, NO_FINDING
from pipeline_steps.layout import Layout

log = logging.getLogger(__name__)

# The only columns that may leave ingestion (PS3.15 Annex E: identifiers pseudonymized, the rest removed).
METADATA_COLUMNS = [
    "image_id",
    "file",
    "content_hash",
    "patient_pseudonym",
    "study_pseudonym",
    "modality",
    "body_part",
    "view_position",
    "sex",
    "age_years",
    "manufacturer",
    "model_name",
    "rows",
    "columns",
    "bits_stored",
    "photometric",
    "transfer_syntax",
    "spacing_row_mm",
    "spacing_col_mm",
    "spacing_source",
    "spacing_flagged",
    "window_center",
    "window_width",
]
QUARANTINE_COLUMNS = ["image_id", "file", "reason", "message"]
NON_IMAGE_MODALITIES = {"RTPLAN", "RTDOSE", "RTSTRUCT", "RTRECORD", "SR", "ECG", "PR", "KO", "DOC"}


@dataclass(frozen=True)
class Expectation:
    table: str
    name: str
    severity: str  # critical | warning
    success: bool
    unexpected: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    n_images: int
    n_quarantined: int
    n_label_rows: int
    positive_fraction: float
    expectations: list[Expectation]

    @property
    def failures(self) -> list[Expectation]:
        return [e for e in self.expectations if not e.success and e.severity == "critical"]

    @property
    def warnings(self) -> list[Expectation]:
        return [e for e in self.expectations if not e.success and e.severity == "warning"]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def reject_reason(ds: Dataset, params: IngestParams) -> tuple[str, str] | None:
    """Why a header cannot be a training image, as (reason code, message), or None when it can."""
    modality = _text(ds, "Modality").upper()
    if modality in NON_IMAGE_MODALITIES or "Rows" not in ds:
        return "not_image", f"modality {modality or '?'} carries no image"
    if "BitsAllocated" not in ds:
        # The header is read with stop_before_pixels, so an image description without
        # BitsAllocated is the reliable sign of an object that has no pixel data.
        return "no_pixel_data", "no pixel data description (BitsAllocated missing)"
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in GRAYSCALE:
        return "colour", f"photometric interpretation {photometric or '?'} is not grayscale"
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return "multiframe", f"{ds.get('NumberOfFrames')} frames; only single-frame images are used"
    if modality not in params.allowed_modalities:
        return (
            "modality_not_allowed",
            f"modality {modality or '?'} not in {list(params.allowed_modalities)}",
        )
    body_part = _text(ds, "BodyPartExamined").upper()
    if body_part and body_part not in params.allowed_body_parts:
        return (
            "body_part_not_allowed",
            f"body part {body_part} not in {list(params.allowed_body_parts)}",
        )
    if _text(ds, "BurnedInAnnotation").upper() == "YES":
        return (
            "burned_in_annotation",
            "BurnedInAnnotation=YES: header de-identification cannot remove it",
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, cols) < params.min_size_px:
        return "too_small", f"{rows}x{cols} is below the minimum {params.min_size_px} px"
    return None


def describe_header(ds: Dataset, image_id: str, params: IngestParams, key: str) -> dict[str, Any]:
    """One de-identified metadata row. Raw identifiers never leave this function."""
    spacing = resolve_spacing(ds, params.default_spacing_mm)
    window = window_of(ds)
    sex = _text(ds, "PatientSex").upper()
    return {
        "image_id": image_id,
        "patient_pseudonym": pseudonym(_text(ds, "PatientID") or image_id, key, "patient"),
        "study_pseudonym": pseudonym(_text(ds, "StudyInstanceUID") or image_id, key, "study"),
        "modality": _text(ds, "Modality").upper(),
        "body_part": _text(ds, "BodyPartExamined").upper(),
        "view_position": _text(ds, "ViewPosition").upper(),
        "sex": sex if sex in {"M", "F", "O"} else "",
        "age_years": age_in_years(
            _text(ds, "PatientAge"), _text(ds, "PatientBirthDate"), _text(ds, "StudyDate")
        ),
        "manufacturer": _text(ds, "Manufacturer"),
        "model_name": _text(ds, "ManufacturerModelName"),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "photometric": _text(ds, "PhotometricInterpretation").upper(),
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID)
        if "TransferSyntaxUID" in ds.get("file_meta", {})
        else "",
        "spacing_row_mm": spacing.row_mm,
        "spacing_col_mm": spacing.col_mm,
        "spacing_source": spacing.source,
        "spacing_flagged": spacing.flagged,
        "window_center": np.nan if window.center is None else window.center,
        "window_width": np.nan if window.width is None else window.width,
    }


def build_metadata(
    images_dir: Path, params: IngestParams, key: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every header once (no pixels); return (accepted metadata, quarantine). Nothing is dropped silently."""
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    for path in sorted(images_dir.glob("*.dcm")):
        image_id, rel = path.stem, f"images/{path.name}"
        try:
            ds = read_header(path)
        except DataError as exc:
            rejected.append(
                {"image_id": image_id, "file": rel, "reason": "corrupt", "message": str(exc)}
            )
            continue
        verdict = reject_reason(ds, params)
        if verdict is not None:
            rejected.append(
                {"image_id": image_id, "file": rel, "reason": verdict[0], "message": verdict[1]}
            )
            continue
        row = describe_header(ds, image_id, params, key)
        row["file"] = rel
        row["content_hash"] = path.stem  # ingest names raw files by their content hash
        rows.append(row)
    metadata = pd.DataFrame(rows, columns=METADATA_COLUMNS)
    return metadata, pd.DataFrame(rejected, columns=QUARANTINE_COLUMNS)


def build_labels(raw_labels: pd.DataFrame, metadata: pd.DataFrame) -> pd.DataFrame:
    """Canonical boxes of accepted images; images without any label row are treated as unlabelled."""
    labels = raw_labels[LABEL_COLUMNS].copy()
    labels = labels[labels["image_id"].isin(set(metadata["image_id"]))]
    return labels.reset_index(drop=True)


def _gx_results(
    metadata: pd.DataFrame, boxes: pd.DataFrame, params: ValidateParams, allowed: IngestParams
) -> list[Expectation]:
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}  # type: ignore[assignment]
    lo_sp, hi_sp = params.pixel_spacing_mm
    lo_px, hi_px = params.size_px
    E = gx.expectations
    suites: dict[str, tuple[pd.DataFrame, list[Any]]] = {
        "metadata": (
            metadata,
            [
                E.ExpectTableColumnsToMatchSet(column_set=METADATA_COLUMNS, exact_match=True),
                E.ExpectColumnValuesToBeUnique(column="image_id"),
                E.ExpectColumnValuesToNotBeNull(column="patient_pseudonym"),
                E.ExpectColumnValuesToBeInSet(
                    column="modality", value_set=list(allowed.allowed_modalities)
                ),
                E.ExpectColumnValuesToBeInSet(column="photometric", value_set=list(GRAYSCALE)),
                E.ExpectColumnValuesToBeBetween(column="rows", min_value=lo_px, max_value=hi_px),
                E.ExpectColumnValuesToBeBetween(column="columns", min_value=lo_px, max_value=hi_px),
                E.ExpectColumnValuesToBeBetween(
                    column="spacing_row_mm", min_value=lo_sp, max_value=hi_sp
                ),
                E.ExpectColumnValuesToBeBetween(
                    column="spacing_col_mm", min_value=lo_sp, max_value=hi_sp
                ),
                E.ExpectTableRowCountToBeBetween(min_value=params.min_images),
                E.ExpectColumnValuesToBeInSet(
                    column="spacing_flagged", value_set=[False], meta={"severity": "warning"}
                ),
            ],
        ),
        "labels": (
            boxes,
            [
                E.ExpectColumnValuesToBeBetween(column="x_min", min_value=0),
                E.ExpectColumnValuesToBeBetween(column="y_min", min_value=0),
                E.ExpectColumnValuesToBeBetween(column="x_over", max_value=0),
                E.ExpectColumnValuesToBeBetween(column="y_over", max_value=0),
                E.ExpectColumnValuesToBeBetween(column="width", min_value=1e-6),
                E.ExpectColumnValuesToBeBetween(column="height", min_value=1e-6),
            ],
        ),
    }
    results: list[Expectation] = []
    for name, (frame, expectations) in suites.items():
        source = context.data_sources.add_pandas(f"{name}_source")
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{name}_check", data=batch, suite=suite)
        )
        outcome = definition.run(batch_parameters={"dataframe": frame})
        for res in outcome.results:
            config = res.expectation_config
            kwargs = {k: v for k, v in config.kwargs.items() if k in ("column", "value_set")}
            label = config.type + (f"({kwargs['column']})" if "column" in kwargs else "")
            sample = (res.result or {}).get("partial_unexpected_list") or []
            results.append(
                Expectation(
                    table=name,
                    name=label,
                    severity=(config.meta or {}).get("severity", "critical"),
                    success=bool(res.success),
                    unexpected=[
                        x if isinstance(x, str | int | float | bool) else str(x) for x in sample[:5]
                    ],
                )
            )
    return results


def validate_tables(
    metadata: pd.DataFrame, labels: pd.DataFrame, params: ValidateParams, allowed: IngestParams
) -> ValidationReport:
    """Run the metadata and label expectations; critical failures make `success` false."""
    joined = labels.dropna(subset=["x_min"]).merge(
        metadata[["image_id", "rows", "columns"]], on="image_id"
    )
    boxes = pd.DataFrame(
        {
            "image_id": joined["image_id"],
            "x_min": joined["x_min"],
            "y_min": joined["y_min"],
            "x_over": joined["x_max"] - joined["columns"],
            "y_over": joined["y_max"] - joined["rows"],
            "width": joined["x_max"] - joined["x_min"],
            "height": joined["y_max"] - joined["y_min"],
        }
    )
    results = _gx_results(metadata, boxes, params, allowed)
    labelled = labels["image_id"].nunique()
    positives = labels.loc[labels["label"] != NO_FINDING, "image_id"].nunique()
    fraction = positives / labelled if labelled else float("nan")
    lo, hi = params.positive_fraction
    results.append(
        Expectation(
            "labels",
            "positive_fraction_in_range",
            "critical",
            bool(lo <= fraction <= hi),
            [fraction],
        )
    )
    ok = all(r.success for r in results if r.severity == "critical")
    return ValidationReport(ok, len(metadata), 0, len(labels), float(fraction), results)


def pseudonym_key() -> str:
    """The pseudonymization key from the environment; the development default is announced loudly."""
    from pipeline_steps.deid import DEV_PSEUDONYM_KEY

    key = os.environ.get("RADFLOW_PSEUDONYM_KEY", "")
    if not key:
        log.warning(
            "RADFLOW_PSEUDONYM_KEY is not set: using the PUBLIC development key. "
            "Pseudonyms are NOT protected; set the variable for any real data."
        )
        return DEV_PSEUDONYM_KEY
    return key


def run(layout: Layout, ingest: IngestParams, params: ValidateParams) -> ValidationReport:
    """Stage edge: data/raw -> data/interim/{metadata,labels}.parquet + reports; raises on critical failures."""
    if not layout.raw_images.is_dir():
        raise DataError(
            f"{layout.raw_images}: no raw data. Run `radflow ingest` or `radflow run` first."
        )
    metadata, quarantine = build_metadata(layout.raw_images, ingest, pseudonym_key())
    raw_labels = (
        pd.read_csv(layout.raw_labels)
        if layout.raw_labels.exists()
        else pd.DataFrame(columns=LABEL_COLUMNS)
    )
    labels = build_labels(raw_labels, metadata)
    report = validate_tables(metadata, labels, params, ingest)
    report = ValidationReport(
        report.success,
        report.n_images,
        len(quarantine),
        report.n_label_rows,
        report.positive_fraction,
        report.expectations,
    )
    layout.interim.mkdir(parents=True, exist_ok=True)
    layout.reports.mkdir(parents=True, exist_ok=True)
    metadata.to_parquet(layout.metadata, index=False)
    labels.to_parquet(layout.labels, index=False)
    quarantine.to_csv(layout.quarantine, index=False)
    summary = asdict(report) | {
        "quarantined_by_reason": quarantine["reason"].value_counts().to_dict()
    }
    layout.validation_report.write_text(json.dumps(summary, indent=2, default=str))
    for warning in report.warnings:
        log.warning(
            "data validation warning: %s.%s (e.g. %s)",
            warning.table,
            warning.name,
            warning.unexpected,
        )
    if not report.success:
        lines = [f"  {f.table}: {f.name}, e.g. {f.unexpected}" for f in report.failures]
        raise ValidationFailed(
            "data validation failed; training will not start:\n"
            + "\n".join(lines)
            + f"\nSee {layout.validation_report} and fix the data (or params.yaml `validate`)."
        )
    return report
