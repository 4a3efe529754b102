"""Header screening shared by ingestion, validation and every prediction path (batch, the API, the
served MLflow model): which files are usable chest radiographs (reason codes for the rest), and the
de-identified metadata row of each. Raw identifiers never leave this module: they become keyed
pseudonyms here. Screening reads headers only: an image that declares more than the reader's limits
(`dicom_limits.MAX_FRAME_PIXELS`, `MAX_FRAME_BYTES`) is refused here, before anything decodes it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pipeline_steps.core.config import IngestParams
from pipeline_steps.core.deid import age_in_years, pseudonym
from pipeline_steps.core.dicom_io import Header, UnreadableDicom, scan_header
from pipeline_steps.core.dicom_limits import pixel_module_problem
from pipeline_steps.core.dicom_tags import (
    GRAYSCALE,
    HeaderValueError,
    int_tag,
    missing_decoder,
    modality_lut_of,
    rescale_problem,
    resolve_spacing,
    text_tag,
    values_unvalidated,
    voi_source,
    window_of,
)

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
    # Added by the real-world reader; appended so earlier positions stay put.
    "body_part_missing",  # accepted with a warning: BodyPartExamined absent or empty
    "window_count",  # number of windows in the header; > 1 means the first was taken
    "voi_source",  # window | voi_lut | window+voi_lut | none
    "modality_lut",  # lut_sequence | rescale | rescale_partial | none
    "pixel_signed",  # PixelRepresentation = 1
    "transfer_syntax_inferred",  # the file meta lacked it; read with the syntax pydicom detected
]
QUARANTINE_COLUMNS = ["image_id", "file", "reason", "message"]
# Stable reason codes of the quarantine report.
REASONS = (
    "not_dicom",
    "corrupt",
    "not_image",
    "no_pixel_data",
    "multiframe",
    "colour",
    "modality_not_allowed",
    "body_part_not_allowed",
    "burned_in_annotation",
    "too_small",
    "no_decoder",
    "too_large",  # more pixels or bytes per frame than the reader's limits (checked before decoding)
)
NON_IMAGE_MODALITIES = {
    "RTPLAN",
    "RTDOSE",  # has pixels, but they are a dose grid, not an image of the patient
    "RTSTRUCT",
    "RTRECORD",
    "SR",
    "ECG",
    "HD",
    "EPS",
    "RESP",
    "AU",
    "PR",
    "KO",
    "DOC",
    "SEG",  # a derived label map, not an acquisition
    "REG",
    "FID",
    "RWV",
    "PLAN",
}
# SOP class names (pydicom's UID dictionary) of objects that are not images even when Modality is absent.
NON_IMAGE_SOP_CLASSES = (
    "SR Storage",
    "Waveform",
    "Presentation State",
    "Key Object",
    "Encapsulated",
    "RT Plan",
    "RT Ion Plan",
    "RT Structure Set",
    "RT Dose",
    "Treatment Record",
    "Directory Storage",
    "Segmentation",
    "Registration",
    "Raw Data",
)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _sop_class_name(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = ds.get("SOPClassUID") or (
        meta.get("MediaStorageSOPClassUID") if meta is not None else None
    )
    if not uid:
        return ""
    if not UID(str(uid)).is_valid:  # an invalid UID's "name" is its raw text, which may be anything
        raise HeaderValueError("SOP Class UID is not a valid UID: the header is damaged")
    return UID(str(uid)).name


def reject_reason(
    ds: Dataset, params: IngestParams, *, header: Header | None = None
) -> tuple[str, str] | None:
    """Why a header cannot be a training image, as (reason code, message), or None when it can.

    `header` (from `scan_header`) adds what a stop_before_pixels read cannot show: whether pixel data
    follows, whether it is truncated, and the transfer syntax when the file meta lacks it. Checks run
    from the most fundamental to the most fixable, so `no_decoder` counts exactly the images that
    installing the named plugin would add.
    """
    pixel = header.pixel if header is not None else None
    if pixel is not None and pixel.problem:
        return "corrupt", pixel.problem
    modality = text_tag(ds, "Modality").upper()
    sop = _sop_class_name(ds)
    if modality in NON_IMAGE_MODALITIES or any(marker in sop for marker in NON_IMAGE_SOP_CLASSES):
        return (
            "not_image",
            f"{sop or 'unknown SOP class'} (modality {modality or '?'}) is not an image",
        )
    if pixel is not None and pixel.keyword in ("FloatPixelData", "DoubleFloatPixelData"):
        return "not_image", f"{pixel.keyword} holds a parametric map, not a radiograph"
    if "Rows" not in ds or "Columns" not in ds:
        if pixel is not None and pixel.keyword:
            return "corrupt", "pixel data without Rows/Columns to describe it"
        if "Image Storage" in sop:
            return "no_pixel_data", f"an {sop} object with neither an image description nor pixels"
        return (
            "not_image",
            f"{sop or 'no SOP class'} (modality {modality or '?'}) carries no image description",
        )
    if pixel is not None and not pixel.keyword:
        return (
            "no_pixel_data",
            "an image description (Rows/Columns) but no Pixel Data element follows it",
        )
    if "BitsAllocated" not in ds:
        if pixel is None:
            # Without `header` nobody looked for the pixels; BitsAllocated is the next-best sign.
            return "no_pixel_data", "no pixel data description (BitsAllocated missing)"
        return "corrupt", "pixel data without BitsAllocated cannot be decoded"
    # Malformed values raise HeaderValueError; build_metadata quarantines the file as corrupt.
    rows, cols = int_tag(ds, "Rows", 0) or 0, int_tag(ds, "Columns", 0) or 0
    frames = int_tag(ds, "NumberOfFrames", 1) or 1
    samples = int_tag(ds, "SamplesPerPixel", 1) or 1
    bits_stored = int_tag(ds, "BitsStored", 0) or 0
    # Impossible pixel-module values (BitsAllocated 0 or 12, say) and frames beyond the limits:
    # refused from the header, so no decoder is ever handed them.
    verdict = pixel_module_problem(ds)
    if verdict is not None:
        return verdict
    problem = rescale_problem(ds)
    if problem:
        return "corrupt", problem
    if frames > 1:
        return "multiframe", f"{frames} frames; only single-frame images are used"
    photometric = text_tag(ds, "PhotometricInterpretation").upper()
    if samples != 1 or photometric not in GRAYSCALE:
        return (
            "colour",
            f"photometric interpretation {photometric or '?'} with {samples} samples is not grayscale",
        )
    if modality not in params.allowed_modalities:
        return (
            "modality_not_allowed",
            f"modality {modality or '?'} not in {list(params.allowed_modalities)}",
        )
    body_part = text_tag(ds, "BodyPartExamined").upper()
    if body_part and body_part not in params.allowed_body_parts:
        return (
            "body_part_not_allowed",
            f"body part {body_part} not in {list(params.allowed_body_parts)}",
        )
    if text_tag(ds, "BurnedInAnnotation").upper() == "YES":
        return (
            "burned_in_annotation",
            "BurnedInAnnotation=YES: header de-identification cannot remove it",
        )
    if min(rows, cols) < params.min_size_px:
        return "too_small", f"{rows}x{cols} is below the minimum {params.min_size_px} px"
    syntax = header.transfer_syntax if header is not None else _declared_syntax(ds)
    gap = missing_decoder(syntax, bits_stored) if syntax else None
    if gap:
        return "no_decoder", gap
    return None


def _declared_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    if value and not UID(str(value)).is_valid:
        raise HeaderValueError("Transfer Syntax UID is not a valid UID: the header is damaged")
    return str(value) if value else ""


def describe_header(
    ds: Dataset, image_id: str, params: IngestParams, key: str, *, header: Header | None = None
) -> dict[str, Any]:
    """One de-identified metadata row. Raw identifiers never leave this function."""
    spacing = resolve_spacing(ds, params.default_spacing_mm)
    window = window_of(ds)
    sex = _text(ds, "PatientSex").upper()
    body_part = text_tag(ds, "BodyPartExamined").upper()
    return {
        "image_id": image_id,
        "patient_pseudonym": pseudonym(_text(ds, "PatientID") or image_id, key, "patient"),
        "study_pseudonym": pseudonym(_text(ds, "StudyInstanceUID") or image_id, key, "study"),
        "modality": text_tag(ds, "Modality").upper(),
        "body_part": body_part,
        "view_position": text_tag(ds, "ViewPosition").upper(),
        "sex": sex if sex in {"M", "F", "O"} else "",
        "age_years": age_in_years(
            _text(ds, "PatientAge"), _text(ds, "PatientBirthDate"), _text(ds, "StudyDate")
        ),
        "manufacturer": text_tag(ds, "Manufacturer"),
        "model_name": text_tag(ds, "ManufacturerModelName"),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "bits_stored": int_tag(ds, "BitsStored", 0) or 0,
        "photometric": text_tag(ds, "PhotometricInterpretation").upper(),
        "transfer_syntax": header.transfer_syntax if header is not None else _declared_syntax(ds),
        "spacing_row_mm": spacing.row_mm,
        "spacing_col_mm": spacing.col_mm,
        "spacing_source": spacing.source,
        "spacing_flagged": spacing.flagged,
        "window_center": np.nan if window.center is None else window.center,
        "window_width": np.nan if window.width is None else window.width,
        "body_part_missing": not body_part,
        "window_count": window.count,
        "voi_source": voi_source(ds),
        "modality_lut": modality_lut_of(ds)[0],
        "pixel_signed": int_tag(ds, "PixelRepresentation", 0) == 1,
        "transfer_syntax_inferred": header.transfer_syntax_inferred
        if header is not None
        else False,
    }


def _input_files(images_dir: Path) -> list[Path]:
    """Every regular file below `images_dir`, except hidden ones (ingest's in-flight temporaries)."""
    return sorted(
        path
        for path in images_dir.rglob("*")
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(images_dir).parts)
    )


def build_metadata(
    images_dir: Path, params: IngestParams, key: str, files: Sequence[Path] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every header once (no pixels); return (accepted metadata, quarantine). Nothing is dropped silently.

    Every file below `images_dir` is an input, whatever its extension: `radflow ingest` names raw files
    `<content id>.dcm`, but archives hold extensionless and misnamed files too. A file's id is its
    path relative to `images_dir` without a `.dcm` suffix, which is the content id for raw data.
    `files` (below `images_dir`) limits the scan to those, e.g. the files of one ingest.
    """
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    seen_ids: set[str] = set()
    # Values are converted lazily, after scan_header returns; pydicom must not log them meanwhile.
    with values_unvalidated():
        for path in _input_files(images_dir) if files is None else sorted(files):
            rel = path.relative_to(images_dir).as_posix()
            image_id = rel[:-4] if rel.lower().endswith(".dcm") else rel
            if image_id in seen_ids:  # `x` beside `x.dcm`: keep both, under distinct ids
                image_id = rel
            seen_ids.add(image_id)
            file = f"{images_dir.name}/{rel}"

            def quarantine(
                reason: str, message: str, image_id: str = image_id, file: str = file
            ) -> None:
                rejected.append(
                    {"image_id": image_id, "file": file, "reason": reason, "message": message}
                )

            try:
                header = scan_header(path)
            except UnreadableDicom as exc:
                quarantine(exc.reason, str(exc))
                continue
            try:
                verdict = reject_reason(header.dataset, params, header=header)
                row = (
                    None
                    if verdict
                    else describe_header(header.dataset, image_id, params, key, header=header)
                )
            except HeaderValueError as exc:  # names the tag, never the value
                quarantine("corrupt", f"{path.name}: {exc}")
                continue
            except Exception as exc:
                # A header value nobody anticipated must cost this file, not the batch. Only the type is
                # reported: exception text can quote header values, and those may be PHI.
                quarantine(
                    "corrupt", f"{path.name}: header cannot be interpreted ({type(exc).__name__})"
                )
                continue
            if verdict is not None:
                quarantine(*verdict)
                continue
            assert row is not None
            row["file"] = file
            row["content_hash"] = path.stem  # ingest names raw files by their content hash
            rows.append(row)
    metadata = pd.DataFrame(rows, columns=METADATA_COLUMNS)
    missing = metadata.loc[metadata["body_part_missing"].astype(bool), "image_id"].tolist()
    if missing:
        log.warning(
            "%d accepted image(s) have no BodyPartExamined, so no body part check applied: %s%s",
            len(missing),
            ", ".join(missing[:5]),
            " ..." if len(missing) > 5 else "",
        )
    return metadata, pd.DataFrame(rejected, columns=QUARANTINE_COLUMNS)
