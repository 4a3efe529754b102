"""Bringing a DICOM folder and its labels into the workspace's raw dataset, by content hash."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_steps.errors import DataError

LABEL_COLUMNS = ["image_id", "label", "x_min", "y_min", "x_max", "y_max"]
NO_FINDING = "no_finding"
RSNA_COLUMNS = ["patientId", "x", "y", "width", "height", "Target"]
RSNA_LABEL = "opacity"


@dataclass(frozen=True)
class IngestSummary:
    seen: int
    added: int
    skipped_existing: int
    label_rows: int
    labels_without_image: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_id_for(sha256: str) -> str:
    """Raw files are renamed to their content hash, so no source file name (which may carry PHI) survives."""
    return sha256[:24]


def rsna_to_canonical(rsna: pd.DataFrame, stem_to_id: dict[str, str]) -> tuple[pd.DataFrame, int]:
    """RSNA Pneumonia rows (x, y, width, height, Target) to canonical boxes; returns (table, rows without image)."""
    missing = [c for c in RSNA_COLUMNS if c not in rsna.columns]
    if missing:
        raise DataError(f"RSNA labels: missing column(s) {missing}; expected {RSNA_COLUMNS}")
    known = rsna["patientId"].astype(str).isin(stem_to_id)
    rows = rsna[known]
    positive = rows["Target"].astype(int) == 1
    x = rows["x"].astype(float)
    y = rows["y"].astype(float)
    out = pd.DataFrame(
        {
            "image_id": rows["patientId"].astype(str).map(stem_to_id),
            "label": np.where(positive, RSNA_LABEL, NO_FINDING),
            "x_min": x.where(positive),
            "y_min": y.where(positive),
            "x_max": (x + rows["width"].astype(float)).where(positive),
            "y_max": (y + rows["height"].astype(float)).where(positive),
        }
    )
    return out.reset_index(drop=True), int((~known).sum())


def canonical_from_csv(table: pd.DataFrame, stem_to_id: dict[str, str]) -> tuple[pd.DataFrame, int]:
    """A label table in RSNA or canonical format, keyed by source file stem, to canonical rows."""
    if set(RSNA_COLUMNS) <= set(table.columns):
        return rsna_to_canonical(table, stem_to_id)
    if set(LABEL_COLUMNS) <= set(table.columns):
        known = table["image_id"].astype(str).isin(stem_to_id)
        rows = table[known].copy()
        rows["image_id"] = rows["image_id"].astype(str).map(stem_to_id)
        return rows[LABEL_COLUMNS].reset_index(drop=True), int((~known).sum())
    raise DataError(
        f"labels: unrecognised columns {list(table.columns)}; expected RSNA {RSNA_COLUMNS} "
        f"or canonical {LABEL_COLUMNS}"
    )


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy through a temporary file in the target folder, so a failure never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".incoming-")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ingest_directory(
    dicom_dir: Path,
    labels_file: Path | None,
    raw_dir: Path,
    replace: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> IngestSummary:
    """Copy new DICOM files into `raw_dir/images/<content id>.dcm` and merge their labels into `labels.csv`."""
    if not dicom_dir.is_dir():
        raise DataError(f"{dicom_dir}: not a directory of DICOM files")
    sources = sorted(p for p in dicom_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not sources:
        raise DataError(f"{dicom_dir}: no files found")
    images_dir = raw_dir / "images"
    labels_path = raw_dir / "labels.csv"
    if replace and raw_dir.exists():
        shutil.rmtree(raw_dir)
    images_dir.mkdir(parents=True, exist_ok=True)

    stem_to_id: dict[str, str] = {}
    added = skipped = 0
    for done, src in enumerate(sources, 1):
        image_id = image_id_for(file_sha256(src))
        stem_to_id[src.stem] = image_id
        dst = images_dir / f"{image_id}.dcm"
        if dst.exists():
            skipped += 1
        else:
            _copy_atomic(src, dst)
            added += 1
        if progress:
            progress(done, len(sources))

    new_rows = pd.DataFrame(columns=LABEL_COLUMNS)
    orphan = 0
    if labels_file is not None:
        if not labels_file.is_file():
            raise DataError(f"{labels_file}: labels file not found")
        new_rows, orphan = canonical_from_csv(pd.read_csv(labels_file), stem_to_id)
    existing = (
        pd.read_csv(labels_path) if labels_path.exists() else pd.DataFrame(columns=LABEL_COLUMNS)
    )
    # Labels of an image already present are kept as they were: appending must not rewrite history.
    fresh = new_rows[~new_rows["image_id"].isin(set(existing["image_id"]))]
    merged = pd.concat([existing, fresh], ignore_index=True) if len(existing) else fresh
    merged = merged.sort_values(["image_id", "label", "x_min", "y_min"], na_position="first")
    tmp = labels_path.with_suffix(".csv.tmp")
    merged.to_csv(tmp, index=False, float_format="%.2f")
    os.replace(tmp, labels_path)
    return IngestSummary(len(sources), added, skipped, len(merged), orphan)
