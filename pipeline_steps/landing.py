"""The bookkeeping of new data's sources: which objects (S3 landing) or instances (PACS) are new, where
each goes, and which are quarantined or skipped, with the reason.

Plain functions on listings and local files; the edges that list and download are `flows/landing.py`
(S3) and `flows/pacs_pull.py` (PACS).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

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


# ---------------------------------------------------------------------------------------------
# The PACS source (flows/pacs_pull.py): instances are remembered by a hash of their SOP Instance
# UID, never by the UID itself, so the index names no study, series or image of a patient.

# What became of a PACS instance (besides INGESTED, DUPLICATE and LABELS above).
NOT_AN_IMAGE = "not_an_image"  # a document, key object, presentation state, waveform: skipped
NOT_A_LABEL_SOURCE = "not_a_label_source"  # an SR without TID 1500 planar ROIs: skipped
RADFLOW_OUTPUT = "radflow_output"  # an SR radflow itself stored (predictions): never labels
BAD_UID = "bad_uid"  # the PACS listed an instance without a well-formed SOP Instance UID

# The SR classes that can hold TID 1500 planar ROIs (what read_sr_boxes accepts): label sources.
SR_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    }
)
# SOP class families that never hold an image: not even retrieved. Anything else is retrieved and
# kept only when it has pixel data.
NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key objects (other than SR_CLASSES)
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, STL
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
)
# radflow's own prediction SRs (pipeline_steps/serving/sr.py) stored back into the PACS: they are
# model output, and training on them would teach the model its own mistakes.
RADFLOW_SR_MANUFACTURER = "radflow"
RADFLOW_SR_SERIES = "radflow detections"
IMAGE, SR, OTHER = "image", "sr", "other"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class PacsInstance:
    """One instance a QIDO-RS search listed. The UIDs stay in memory: only `key` is stored."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str = ""  # empty when the PACS did not say

    @property
    def key(self) -> str:
        return sop_key(self.sop_uid)


@dataclass(frozen=True)
class Pulled:
    """An instance of an earlier, committed pull."""

    status: str
    sha256: str  # of the retrieved file; empty when it was not retrieved
    pulled_at: str


@dataclass(frozen=True)
class PacsIndex:
    instances: dict[str, Pulled]  # sop_key -> what became of it
    queries: dict[str, dict[str, str]]  # query_key -> {"last_study_date", "pulled_at"}


def sop_key(sop_uid: str) -> str:
    """How the PACS index names an instance: the sha256 of its SOP Instance UID (hex)."""
    return hashlib.sha256(sop_uid.strip().encode("ascii", "replace")).hexdigest()


def valid_uid(uid: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters."""
    return len(uid) <= 64 and _UID.fullmatch(uid) is not None


def instance_kind(sop_class: str) -> str:
    """IMAGE (retrieve it, keep it if it has pixels), SR (retrieve it: a label source) or OTHER."""
    if sop_class in SR_CLASSES:
        return SR
    if sop_class.startswith(NON_IMAGE_PREFIXES):
        return OTHER
    return IMAGE


def is_radflow_sr(manufacturer: str, series_description: str) -> bool:
    return (
        manufacturer.strip() == RADFLOW_SR_MANUFACTURER
        or series_description.strip() == RADFLOW_SR_SERIES
    )


def plan_pull(
    listing: Iterable[PacsInstance], index: PacsIndex
) -> tuple[list[PacsInstance], list[PacsInstance], int]:
    """(instances to handle, instances with a malformed UID, instances pulled before): an instance
    whose key is in the index is never asked for again; one listed twice is handled once."""
    todo: dict[str, PacsInstance] = {}
    bad: list[PacsInstance] = []
    known = 0
    for inst in listing:
        if not (valid_uid(inst.sop_uid) and valid_uid(inst.study_uid)):
            bad.append(inst)
        elif inst.key in index.instances:
            known += 1
        else:
            todo.setdefault(inst.key, inst)
    return sorted(todo.values(), key=lambda i: i.key), bad, known


def study_date_range(date_from: str, date_to: str) -> str:
    """QIDO-RS's StudyDate range matching ("A-B", "A-", "-B"); empty for no bound at all."""
    return f"{date_from}-{date_to}" if date_from or date_to else ""


def query_key(url: str, modalities: Iterable[str], date_from: str, date_to: str) -> str:
    """How the index names a query (the PACS URL holds no credentials: flows/pacs.py refuses them)."""
    return f"{url} modalities={','.join(sorted(modalities))} dates={date_from}-{date_to}"


def read_pacs_index(text: str, source: str) -> PacsIndex:
    try:
        raw = json.loads(text)
        return PacsIndex(
            {k: Pulled(**v) for k, v in raw["instances"].items()},
            {k: dict(v) for k, v in raw["queries"].items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LandingError(
            f"{source}: unreadable PACS index ({type(exc).__name__}). Delete it to pull every "
            "instance again (images already archived are recognised by content and not added twice)."
        ) from None


def dump_pacs_index(index: PacsIndex) -> str:
    return json.dumps(
        {
            "version": 1,
            "instances": {k: asdict(v) for k, v in sorted(index.instances.items())},
            "queries": dict(sorted(index.queries.items())),
        },
        indent=1,
    )


def rekey_labels(table: pd.DataFrame, fmt: str) -> pd.DataFrame:
    """A label table whose rows name images by SOP Instance UID, keyed instead by `sop_key` (the
    names of the staged files), so the UIDs never reach a staged file name."""
    column = "patientId" if fmt == "rsna" else "image_id"
    out = table.copy()
    out[column] = out[column].map(lambda k: sop_key(str(k)) if isinstance(k, str) else k)
    return out


def sr_label_rows(boxes: Iterable[Mapping[str, Any]]) -> tuple[pd.DataFrame, int]:
    """(canonical label rows, boxes without a label) from `read_sr_boxes` output: one row per box,
    keyed by the sop_key of the image the box was drawn on, its finding as a snake_case label."""
    from pipeline_steps.core.labels import LABEL_COLUMNS, normalize_label

    rows: list[dict[str, Any]] = []
    unlabelled = 0
    for box in boxes:
        label = normalize_label(box.get("label", ""))
        if not label:
            unlabelled += 1
            continue
        rows.append(
            {
                "image_id": sop_key(str(box["referenced_sop_instance_uid"])),
                "label": label,
                **{c: float(box[c]) for c in ("x_min", "y_min", "x_max", "y_max")},
            }
        )
    return pd.DataFrame(rows, columns=LABEL_COLUMNS), unlabelled
