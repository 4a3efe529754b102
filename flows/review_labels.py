"""`radflow ingest --reviewed`: reviewed findings in the audit ledger become labels in data/raw, through
ingestion's own path, with their source (`label_sources.csv`) in the data version and the ledger."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from flows import versioning
from flows.anchoring import open_ledger
from flows.review import find_image
from pipeline_steps.core.config import Params
from pipeline_steps.core.files import atomic_path
from pipeline_steps.core.labels import LABEL_COLUMNS
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance import review
from pipeline_steps.ingest import IngestSummary, ingest_directory, merge_labels

REVIEW_LABELS = "review_labels"  # the ledger kind of one import; its subject is the data version
SOURCE = "review"  # label_sources.csv's `source` of labels made from reviews
SOURCE_COLUMNS = ["image_id", "source", "review_row", "prediction_id"]
LABEL_SOURCES = "label_sources.csv"  # in data/raw, so the source is part of the data version
IMAGE_NOT_KEPT = "image_not_kept"  # a reviewed image whose DICOM is in neither store


def label_sources_path(layout: Layout) -> Path:
    """Where each imported image's label source is listed (data/raw, versioned with the labels)."""
    return layout.raw / LABEL_SOURCES


@dataclass(frozen=True)
class ReviewedIngest:
    """What one `radflow ingest --reviewed` did, by image id (content ids, never file names)."""

    reviewed_images: int  # images with a review in the ledger
    imported: tuple[str, ...]  # images whose reviewed labels this run added to labels.csv
    label_rows: int  # rows added to labels.csv
    unchanged: tuple[str, ...]  # already in labels.csv with these very labels (an earlier import)
    already_labelled: tuple[str, ...]  # labelled otherwise in data/raw: those labels were kept
    image_not_kept: tuple[str, ...]  # reviewed, but the DICOM is neither in data/raw nor kept
    not_imported: tuple[str, ...]  # staged, yet ingestion took no label row of theirs (see issues)
    review_rows: tuple[int, ...]  # the ledger rows of the reviews imported
    data_version: str | None  # the new data version; None when there was nothing new
    ledger_row: int | None  # the `review_labels` row
    ingest: dict[str, Any] | None  # ingestion's own summary of the staged folder

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    return (
        pd.read_csv(path, dtype={"image_id": str})
        if path.exists()
        else pd.DataFrame(columns=columns)
    )


def _ingest_summary(layout: Layout, summary: IngestSummary) -> dict[str, Any]:
    return {
        "seen": summary.seen,
        "accepted": summary.accepted,
        "quarantined": summary.quarantined,
        "added": summary.added,
        "skipped_existing": summary.skipped_existing,
        "labels": summary.labels_imported,
        "label_rows": summary.label_rows,
        "label_issues": summary.label_issues,
        "labels_for_quarantined": summary.labels_for_quarantined,
        "issues_file": (
            str(summary.issues_file.relative_to(layout.root)) if summary.issues_file else None
        ),
    }


def ingest_reviewed(
    layout: Layout, params: Params, progress: Callable[[int, int], None] | None = None
) -> ReviewedIngest:
    """Import the last review of each reviewed image as its labels; the caller holds the workspace's
    run lock. Images already labelled keep their labels (ingestion's merge rule); images whose DICOM
    was not kept are skipped. Nothing new: no ingest, no data version, no ledger row."""
    with open_ledger(layout.root) as ledger:
        reviews = ledger.entries(kind=review.REVIEW)
    rows = pd.DataFrame(review.review_labels(reviews))
    if rows.empty:
        return ReviewedIngest(0, (), 0, (), (), (), (), (), None, None, None)
    # A reviewer's missed box repeating a confirmed one is one lesion, not an ingestion issue.
    rows = rows.drop_duplicates(LABEL_COLUMNS).astype({"image_id": str})
    reviewed = sorted(set(rows["image_id"]))
    existing = _read_csv(layout.raw_labels, LABEL_COLUMNS)
    _, _, clashes = merge_labels(existing, rows[LABEL_COLUMNS])
    already = sorted(set(clashes["image_id"].astype(str)))
    labelled = set(existing["image_id"].astype(str))
    unchanged = sorted(set(reviewed) & labelled - set(already))
    # The dataset's copy first, else the review store's (the console's own lookup).
    images = {
        i: find_image(layout, {"training_membership_key": i}) for i in reviewed if i not in labelled
    }
    not_kept = sorted(i for i, path in images.items() if path is None)
    staged = {i: path for i, path in images.items() if path is not None}
    if not staged:
        return ReviewedIngest(
            len(reviewed), (), 0, tuple(unchanged), tuple(already), tuple(not_kept), (), (),
            None, None, None,
        )  # fmt: skip

    new_rows = rows[rows["image_id"].isin(set(staged))]
    layout.state.mkdir(parents=True, exist_ok=True)
    # Owner-only (mkdtemp makes it 0700), inside the workspace: the copies carry their headers.
    staging = Path(tempfile.mkdtemp(prefix="reviewed-", dir=layout.state))
    try:
        images_dir = staging / "images"
        images_dir.mkdir(mode=0o700)
        for image_id, path in staged.items():
            shutil.copyfile(path, images_dir / f"{image_id}.dcm")
        labels_file = staging / "labels.csv"
        new_rows[LABEL_COLUMNS].to_csv(labels_file, index=False, float_format="%.2f")
        summary = ingest_directory(
            images_dir,
            labels_file,
            layout,
            progress=progress,
            params=params.ingest,
            label_format="canonical",
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    now_labelled = set(_read_csv(layout.raw_labels, LABEL_COLUMNS)["image_id"].astype(str))
    imported = sorted(set(staged) & now_labelled)
    sources = (
        new_rows[new_rows["image_id"].isin(set(imported))]
        .drop_duplicates("image_id")
        .assign(source=SOURCE)[SOURCE_COLUMNS]
    )
    if imported:
        path = label_sources_path(layout)
        table = pd.concat([_read_csv(path, SOURCE_COLUMNS), sources], ignore_index=True)
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
    previous = versioning.data_version(layout) if layout.raw_dvc.exists() else None
    version = versioning.record_raw(layout)
    review_rows = tuple(int(r) for r in sorted(sources["review_row"]))
    result = ReviewedIngest(
        reviewed_images=len(reviewed),
        imported=tuple(imported),
        label_rows=summary.labels_imported,
        unchanged=tuple(unchanged),
        already_labelled=tuple(already),
        image_not_kept=tuple(not_kept),
        not_imported=tuple(sorted(set(staged) - set(imported))),
        review_rows=review_rows,
        data_version=version,
        ledger_row=None,
        ingest=_ingest_summary(layout, summary),
    )
    if not imported and version == previous:  # staged images whose rows were all set aside, again
        return result
    # Counts and row numbers only: no reviewer, no free text, no path.
    payload = {
        "source": SOURCE,
        "reviewed_images": result.reviewed_images,
        "imported_images": len(result.imported),
        "label_rows": result.label_rows,
        "unchanged_images": len(result.unchanged),
        "already_labelled": len(result.already_labelled),
        IMAGE_NOT_KEPT: len(result.image_not_kept),
        "not_imported": len(result.not_imported),
        "review_rows": list(review_rows),
        "prediction_ids": sorted(str(p) for p in sources["prediction_id"]),
        "label_issues": summary.label_issues,
    }
    with open_ledger(layout.root) as ledger:
        entry = ledger.append(REVIEW_LABELS, version, payload)
    return replace(result, ledger_row=entry.seq)
