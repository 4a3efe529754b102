"""Bringing a DICOM folder and its labels into the workspace's raw dataset, by content hash."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline_steps.core.config import IngestParams
from pipeline_steps.core.deid import DEV_PSEUDONYM_KEY, image_id_for
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import atomic_path, copy_atomic, file_sha256
from pipeline_steps.core.labels import (
    ALREADY_LABELLED,
    BOX_COLUMNS,
    ISSUE_COLUMNS,
    LABEL_COLUMNS,
    ORPHAN,
    READER_COLUMNS,
    LabelImport,
    import_labels,
    resolve_format,
)
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.screening import build_metadata


@dataclass(frozen=True)
class IngestSummary:
    seen: int  # files in the folder
    added: int  # new to the archive
    skipped_existing: int  # already archived (same content)
    accepted: int  # files whose header passes the scan (screening.build_metadata)
    quarantined: dict[str, int]  # reason code -> files; accepted + quarantined = seen
    label_format: str = ""  # rsna | vindr | canonical; empty without a label file
    labels_imported: int = 0  # canonical rows this ingest added to labels.csv
    label_rows: int = 0  # rows in labels.csv afterwards
    reader_rows: int = 0  # per-reader rows this ingest added (VinDr)
    label_issues: dict[str, int] = field(default_factory=dict)  # kind -> label rows not imported
    labels_for_quarantined: int = 0  # imported rows whose image was quarantined
    unlabelled: tuple[str, ...] = ()  # accepted images of this ingest without any label row
    issues_file: Path | None = None  # where label_issues are listed, when there are any

    @property
    def labels_without_image(self) -> int:
        return self.label_issues.get(ORPHAN, 0)


def _write_csv_atomic(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.2f")


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=columns)


def _rounded_rows(table: pd.DataFrame) -> dict[str, list[tuple[object, ...]]]:
    """Each image's rows as sorted tuples, at the precision labels.csv stores."""
    out: dict[str, list[tuple[object, ...]]] = {}
    for image_id, group in table.groupby("image_id"):
        rows = [
            (str(label), *(None if pd.isna(c) else round(float(c), 2) for c in coords))
            for label, *coords in group[LABEL_COLUMNS[1:]].itertuples(index=False)
        ]
        out[str(image_id)] = sorted(rows, key=repr)
    return out


def merge_labels(
    existing: pd.DataFrame, new: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(merged table, the new rows taken, issues): images already labelled keep their labels.

    Appending must not rewrite history; new rows that disagree with an image's existing labels are
    reported (`already_labelled`), identical ones (a repeated ingest) are not.
    """
    known = set(existing["image_id"].astype(str))
    clash = new["image_id"].isin(known)
    before = _rounded_rows(existing[existing["image_id"].isin(set(new["image_id"]))])
    after = _rounded_rows(new[clash])
    differing = [i for i, rows in after.items() if before.get(i) != rows]
    issues = pd.DataFrame(
        {
            "source_row": pd.Series([pd.NA] * len(differing), dtype="Int64"),
            "kind": ALREADY_LABELLED,
            "image_id": differing,
            "label": "",
            "message": "the image has different labels from an earlier ingest; those were kept",
        }
    )
    fresh = new[~clash]
    merged = pd.concat([existing, fresh], ignore_index=True) if len(existing) else fresh
    merged = merged.astype({c: float for c in BOX_COLUMNS})
    merged = merged.sort_values(["image_id", "label", *BOX_COLUMNS], na_position="first")
    return merged.reset_index(drop=True), fresh, issues


def _read_labels_file(labels_file: Path) -> pd.DataFrame:
    if not labels_file.is_file():
        raise DataError(f"{labels_file}: labels file not found")
    try:
        # Everything as text: keys like 0012 must not become numbers; importers parse coordinates.
        return pd.read_csv(labels_file, dtype=str, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{labels_file}: not a readable CSV ({type(exc).__name__}); check the file"
        ) from None


def ingest_directory(
    dicom_dir: Path,
    labels_file: Path | None,
    layout: Layout,
    replace: bool = False,
    progress: Callable[[int, int], None] | None = None,
    *,
    params: IngestParams | None = None,
    label_format: str = "auto",
) -> IngestSummary:
    """Copy every file into `data/raw/images/<content id>.dcm`, scan the headers, and merge the labels.

    Every file is archived, whatever the scan says: rejected files are kept, never modified, and
    counted by reason. Labels are converted to the canonical table (`labels.csv`; VinDr-CXR's
    per-reader rows go to `labels_readers.csv`), and label rows that could not be used are appended
    to `label_issues.csv`.
    """
    params = params or IngestParams()
    if not dicom_dir.is_dir():
        raise DataError(f"{dicom_dir}: not a directory of DICOM files")
    sources = sorted(p for p in dicom_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not sources:
        raise DataError(f"{dicom_dir}: no files found")
    table = _read_labels_file(labels_file) if labels_file is not None else None
    if table is not None:  # a wrong label file fails before anything is copied
        label_format = resolve_format(list(table.columns), label_format)
    images_dir = layout.raw_images
    if replace and layout.raw.exists():
        shutil.rmtree(layout.raw)
    images_dir.mkdir(parents=True, exist_ok=True)

    stem_ids: dict[str, set[str]] = {}
    batch: list[str] = []
    added = skipped = 0
    for done, src in enumerate(sources, 1):
        image_id = image_id_for(file_sha256(src))
        stem_ids.setdefault(src.stem, set()).add(image_id)
        batch.append(image_id)
        dst = layout.raw_image(image_id)
        if dst.exists():
            skipped += 1
        else:
            copy_atomic(src, dst)
            added += 1
        if progress:
            progress(done, len(sources))

    # Only the verdicts (image_id, reason) are used here; the pseudonyms computed on the way are
    # discarded and never leave this function, so the public development key is fine and ingest
    # needs no RADFLOW_PSEUDONYM_KEY. Validate pseudonymizes with the configured key (deid.pseudonym_key).
    metadata, quarantine = build_metadata(
        images_dir, params, DEV_PSEUDONYM_KEY, files=[layout.raw_image(i) for i in set(batch)]
    )
    accepted_ids = set(metadata["image_id"])
    reason_of = dict(zip(quarantine["image_id"], quarantine["reason"], strict=True))
    quarantined: dict[str, int] = {}
    for image_id in batch:  # per file: two files with the same content are two files seen
        if image_id in reason_of:
            quarantined[reason_of[image_id]] = quarantined.get(reason_of[image_id], 0) + 1

    labels_path = layout.raw_labels
    existing = _read_csv(labels_path, LABEL_COLUMNS)
    imported = LabelImport(
        "",
        pd.DataFrame(columns=LABEL_COLUMNS),
        pd.DataFrame(columns=READER_COLUMNS),
        pd.DataFrame(columns=ISSUE_COLUMNS[1:]),
    )
    if table is not None:
        imported = import_labels(table, stem_ids, label_format, params.wbf_iou)
    merged, fresh, clashes = merge_labels(existing, imported.labels)
    _write_csv_atomic(merged, labels_path)

    reader_rows = 0
    if len(imported.readers):
        readers_path = layout.raw_readers
        old_readers = _read_csv(readers_path, READER_COLUMNS)
        new_readers = imported.readers[
            ~imported.readers["image_id"].isin(set(existing["image_id"]))
        ]
        reader_rows = len(new_readers)
        all_readers = pd.concat([old_readers, new_readers], ignore_index=True)
        _write_csv_atomic(
            all_readers.sort_values(["image_id", "rad_id", "label"], kind="stable"), readers_path
        )

    issues = pd.concat(
        [i for i in (imported.issues, clashes) if len(i)] or [imported.issues], ignore_index=True
    )
    issues_file = None
    if len(issues):
        assert labels_file is not None
        issues_file = layout.raw_label_issues
        issues.insert(0, "labels_sha256", file_sha256(labels_file)[:16])
        previous = _read_csv(issues_file, ISSUE_COLUMNS).astype({"source_row": "Int64"})
        all_issues = pd.concat(
            [previous, issues.astype({"source_row": "Int64"})], ignore_index=True
        )
        _write_csv_atomic(all_issues.drop_duplicates(), issues_file)

    labelled = set(merged["image_id"].astype(str))
    return IngestSummary(
        seen=len(sources),
        added=added,
        skipped_existing=skipped,
        accepted=sum(1 for i in batch if i in accepted_ids),
        quarantined=dict(sorted(quarantined.items())),
        label_format=imported.format,
        labels_imported=len(fresh),
        label_rows=len(merged),
        reader_rows=reader_rows,
        label_issues=issues["kind"].value_counts().sort_index().to_dict() if len(issues) else {},
        labels_for_quarantined=int(fresh["image_id"].isin(set(reason_of)).sum()),
        unlabelled=tuple(sorted(accepted_ids - labelled)),
        issues_file=issues_file,
    )
