"""S3 edge of the landing location: list it, download what is new into a staging folder, ingest a batch.

A batch is all or nothing. Objects are downloaded to `.radflow/landing/incoming/` (each to a temporary
file renamed when complete), then ingested into data/raw (which copies atomically too) and recorded as a
DVC version; only then is the landing index (`.radflow/landing/seen.json`) updated. A failure anywhere
before that throws the staging folder away, so the next run starts the batch again.

The endpoint and credentials are boto3's own settings: `AWS_ENDPOINT_URL_S3` (MinIO, moto),
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, or an instance role.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline_steps.core.config import NightlyParams, Params
from pipeline_steps.core.files import atomic_path, file_sha256, write_text_atomic
from pipeline_steps.core.layout import Layout
from pipeline_steps.landing import (
    DUPLICATE,
    INGESTED,
    LABELS,
    QUARANTINED,
    LandingError,
    LandingObject,
    Seen,
    dump_seen,
    is_label_file,
    local_name,
    object_id,
    parse_location,
    plan_downloads,
    quarantine_reason,
    read_seen,
)

log = logging.getLogger("radflow")

QUARANTINE_COLUMNS = ("synced_at", "object", "etag", "sha256", "reason")


@dataclass(frozen=True)
class Landed:
    key: str
    etag: str
    sha256: str
    path: Path
    reason: str = ""


@dataclass
class Batch:
    """What one sync brought into the staging folder, not yet committed."""

    location: str
    bucket: str
    staging: Path
    images: list[Landed] = field(default_factory=list)
    labels: list[Landed] = field(default_factory=list)
    duplicates: list[Landed] = field(default_factory=list)
    quarantined: list[Landed] = field(default_factory=list)
    unchanged: int = 0  # skipped by key and ETag, without a download

    def counts(self) -> dict[str, int]:
        return {
            "new_images": len(self.images),
            "label_files": len(self.labels),
            "duplicates": len(self.duplicates),
            "quarantined": len(self.quarantined),
            "unchanged": self.unchanged,
        }


def load_seen(layout: Layout) -> dict[str, Seen]:
    path = layout.landing_seen
    return read_seen(path.read_text(), str(path)) if path.exists() else {}


def s3_client(attempts: int) -> Any:
    """boto3's own retries (standard mode: exponential backoff with jitter) on every request."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=5, read_timeout=60
    )
    return boto3.client("s3", config=config)


def list_objects(client: Any, bucket: str, prefix: str) -> list[LandingObject]:
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            found.append(
                LandingObject(str(item["Key"]), str(item["ETag"]).strip('"'), int(item["Size"]))
            )
    return found


def download(client: Any, bucket: str, obj: LandingObject, dst: Path, attempts: int) -> str:
    """Download into a temporary file next to `dst`, check its size, rename it; return its sha256."""
    from boto3.s3.transfer import TransferConfig

    with atomic_path(dst) as tmp:
        with tmp.open("wb") as fh:
            client.download_fileobj(
                bucket,
                obj.key,
                fh,
                Config=TransferConfig(num_download_attempts=attempts, use_threads=False),
            )
            fh.flush()
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        if size != obj.size:
            raise LandingError(
                f"s3://{bucket}/{obj.key}: got {size} bytes, listed as {obj.size} (changed while "
                "being read?); the next run downloads it again"
            )
        return file_sha256(tmp)


def _archived(layout: Layout, sha256: str) -> bool:
    from pipeline_steps.core.deid import image_id_for

    return layout.raw_image(image_id_for(sha256)).exists()


def sync(layout: Layout, params: NightlyParams) -> Batch:
    """Download the landing objects not seen before into the staging folder, sorted into new DICOMs,
    label files, duplicates (same content as something archived) and quarantined objects.

    Raises LandingError, with the staging folder removed, when S3 cannot be read after boto3's
    retries; nothing is kept of a failed sync."""
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import RetriesExceededError

    bucket, prefix = parse_location(params.landing)
    staging = layout.landing_incoming
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    batch = Batch(params.landing, bucket, staging)
    seen = load_seen(layout)
    known = {s.sha256 for s in seen.values() if s.status != QUARANTINED}
    try:
        client = s3_client(params.download_attempts)
        todo, batch.unchanged = plan_downloads(list_objects(client, bucket, prefix), seen, bucket)
        for obj in todo:
            labels = is_label_file(obj.key)
            folder = layout.landing_labels if labels else layout.landing_images
            dst = folder / local_name(obj.key, prefix)
            landed = Landed(
                obj.key,
                obj.etag,
                download(client, bucket, obj, dst, params.download_attempts),
                dst,
            )
            if landed.sha256 in known or (not labels and _archived(layout, landed.sha256)):
                dst.unlink()
                batch.duplicates.append(landed)
                continue
            reason = quarantine_reason(dst, labels)
            if reason is not None:
                held = layout.landing_held / landed.sha256
                held.parent.mkdir(exist_ok=True)
                os.replace(dst, held)
                batch.quarantined.append(replace(landed, path=held, reason=reason))
                continue
            known.add(landed.sha256)
            (batch.labels if labels else batch.images).append(landed)
    except (BotoCoreError, ClientError, RetriesExceededError, OSError, LandingError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise LandingError(
            f"landing sync from {params.landing} failed after retries: {detail}. Nothing was "
            "kept; the next run starts the batch again. Check the endpoint "
            "(AWS_ENDPOINT_URL_S3), credentials and bucket."
        ) from None
    log.info("landing %s: %s", params.landing, batch.counts())
    return batch


def discard(batch: Batch) -> None:
    shutil.rmtree(batch.staging, ignore_errors=True)


def commit(layout: Layout, batch: Batch) -> None:
    """Record every object of the batch in the landing index, keep quarantined objects (in
    .radflow/landing/quarantine/, listed in reports/landing_quarantine.csv), and drop the staging
    folder. Called once the batch's data version exists."""
    when = datetime.now(UTC).isoformat(timespec="seconds")
    seen = load_seen(layout)
    kept = layout.landing_quarantine
    if batch.quarantined:
        kept.mkdir(parents=True, exist_ok=True)
        report = layout.landing_quarantine_report
        report.parent.mkdir(parents=True, exist_ok=True)
        new_file = not report.exists()
        with report.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if new_file:
                writer.writerow(QUARANTINE_COLUMNS)
            for q in batch.quarantined:
                os.replace(q.path, kept / q.sha256)
                writer.writerow((when, object_id(batch.bucket, q.key), q.etag, q.sha256, q.reason))
    for status, items in (
        (INGESTED, batch.images),
        (LABELS, batch.labels),
        (DUPLICATE, batch.duplicates),
        (QUARANTINED, batch.quarantined),
    ):
        for item in items:
            seen[object_id(batch.bucket, item.key)] = Seen(item.etag, item.sha256, status, when)
    write_text_atomic(layout.landing_seen, dump_seen(seen))
    discard(batch)


@dataclass(frozen=True)
class Ingested:
    data_version: str | None  # None: nothing new to version
    added: int
    accepted: int
    quarantined: dict[str, int]
    labels_imported: int
    label_issues: dict[str, int] = field(default_factory=dict)  # kind -> label rows not imported


def ingest_staged(
    layout: Layout,
    params: Params,
    images_dir: Path,
    label_files: Sequence[Path],
    commit_batch: Callable[[], None],
) -> Ingested:
    """The path every source of new data shares (the S3 landing here, the PACS in flows/pacs_pull.py):
    archive the staged DICOMs with each label file through ingestion's own screening (rejected files
    are kept and counted by reason, as `radflow ingest` does), record the DVC data version, and only
    then let the source commit its index (`commit_batch`). A failure before the commit leaves the
    source's index as it was, so the next run takes the batch again (archiving is by content)."""
    from flows import versioning
    from pipeline_steps.ingest import IngestSummary, ingest_directory

    summaries: list[IngestSummary] = [
        ingest_directory(images_dir, labels, layout, params=params.ingest) for labels in label_files
    ] or [ingest_directory(images_dir, None, layout, params=params.ingest)]
    version = versioning.record_raw(layout)
    commit_batch()
    first = summaries[0]
    issues: dict[str, int] = {}
    for summary in summaries:
        for kind, count in summary.label_issues.items():
            issues[kind] = issues.get(kind, 0) + count
    return Ingested(
        data_version=version,
        added=sum(s.added for s in summaries),
        accepted=first.accepted,
        quarantined=first.quarantined,
        labels_imported=sum(s.labels_imported for s in summaries),
        label_issues=issues,
    )


def ingest_batch(layout: Layout, params: Params, batch: Batch) -> Ingested:
    """Archive the batch's new DICOMs with their label files, record the DVC data version, then
    commit the batch. Without new DICOMs nothing is versioned (label files alone cannot be matched
    to their images, so they are quarantined for a manual `radflow ingest`)."""
    if not batch.images:
        held = layout.landing_held
        held.mkdir(exist_ok=True)
        for lab in batch.labels:
            os.replace(lab.path, held / lab.sha256)
            batch.quarantined.append(
                replace(lab, path=held / lab.sha256, reason="labels_without_images")
            )
        batch.labels = []
        commit(layout, batch)
        return Ingested(None, 0, 0, {}, 0)
    return ingest_staged(
        layout,
        params,
        layout.landing_images,
        [lab.path for lab in batch.labels],
        lambda: commit(layout, batch),
    )
