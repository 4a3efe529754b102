"""The landing location's bookkeeping: which objects are new, where each goes, and which are quarantined.

Plain functions on listings and local files; the S3 edge that lists and downloads is `flows/landing.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from pipeline_steps.core.errors import DataError

# What became of an object once its batch was committed.
INGESTED = "ingested"  # a new DICOM, archived in data/raw
LABELS = "labels"  # a label CSV, imported with the DICOMs of its batch
DUPLICATE = "duplicate"  # content already archived (or seen) under another key
QUARANTINED = "quarantined"  # kept aside with a reason, never in data/raw

LABEL_SUFFIXES = (".csv",)


class LandingError(DataError):
    """The landing location cannot be read; nothing of the batch was kept."""


@dataclass(frozen=True)
class LandingObject:
    key: str
    etag: str
    size: int


@dataclass(frozen=True)
class Seen:
    """An object of an earlier, committed batch."""

    etag: str
    sha256: str
    status: str
    synced_at: str


def parse_location(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); the prefix is "" or ends in "/"."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise LandingError(f"{url!r}: the landing location must look like s3://bucket/prefix")
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def object_id(bucket: str, key: str) -> str:
    """How the seen-index names an object: its full S3 URL, so two locations never collide."""
    return f"s3://{bucket}/{key}"


def plan_downloads(
    listing: Iterable[LandingObject], seen: Mapping[str, Seen], bucket: str
) -> tuple[list[LandingObject], int]:
    """(objects to download, objects skipped): an object whose key and ETag were seen is skipped
    without being read; a new key, or a known key with a new ETag, is downloaded (and then
    compared by content hash). Folder markers (keys ending in "/") are ignored."""
    todo: list[LandingObject] = []
    skipped = 0
    for obj in listing:
        if obj.key.endswith("/"):
            continue
        known = seen.get(object_id(bucket, obj.key))
        if known is not None and known.etag == obj.etag:
            skipped += 1
        else:
            todo.append(obj)
    return sorted(todo, key=lambda o: o.key), skipped


def local_name(key: str, prefix: str) -> PurePosixPath:
    """Where an object is staged, relative to the staging folder: its key below the prefix.

    Label files are matched to DICOMs by file name (without extension), so the name is kept;
    anything that could escape the staging folder is refused."""
    rel = PurePosixPath(key[len(prefix) :] if key.startswith(prefix) else key)
    if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
        raise LandingError(f"landing key {key!r} cannot be stored safely (empty, '.' or '..')")
    return rel


def is_label_file(key: str) -> bool:
    return key.lower().endswith(LABEL_SUFFIXES)


def quarantine_reason(path: Path, is_labels: bool) -> str | None:
    """Why a downloaded object must not be ingested, or None. Only what is certainly not a DICOM
    (or not a label table) is stopped here; a damaged DICOM is archived by ingest and rejected by
    validation with its reason code, as for any other source."""
    if is_labels:
        from pipeline_steps.core.labels import read_label_file, resolve_format

        try:  # read as ingest will read it: size limit, encoding, CSV shape, a known format
            resolve_format(list(read_label_file(path).columns), "auto")
        except DataError:
            return "unreadable_labels"
        return None
    from pipeline_steps.core.dicom_io import UnreadableDicom, scan_header

    try:
        scan_header(path)
    except UnreadableDicom as exc:
        return "not_dicom" if exc.reason == "not_dicom" else None
    return None


def read_seen(text: str, source: str) -> dict[str, Seen]:
    try:
        raw = json.loads(text)
        return {k: Seen(**v) for k, v in raw["objects"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise LandingError(
            f"{source}: unreadable landing index ({type(exc).__name__}). Delete it to re-check "
            "every object by content hash (nothing is ingested twice)."
        ) from None


def dump_seen(seen: Mapping[str, Seen]) -> str:
    return json.dumps(
        {"version": 1, "objects": {k: asdict(v) for k, v in sorted(seen.items())}}, indent=1
    )
