"""The PACS source of new data: find studies (QIDO-RS), retrieve the instances not pulled before (WADO-RS)
into a staging folder, and ingest them as one batch, with the labels of a label CSV or of the TID 1500
SR annotations stored in the same studies.

A pull is all or nothing, as a landing sync is (flows/landing.py). Instances are retrieved into
`.radflow/pacs/incoming/`, each named by the sha256 of its SOP Instance UID; the batch then takes the
path every source shares (`landing.ingest_staged`: ingestion's screening and quarantine, the DVC data
version), and only then is the index `.radflow/pacs/pulled.json` updated. A failure before that (the
PACS down after the edge's retries, a refused sign-in, a full disk) removes the staging folder and
leaves the index as it was, so the next pull asks for the same instances again. No UID, name or
patient id is logged or kept outside the raw archive: the index holds hashes, the summary counts.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows import landing
from flows.pacs import Pacs, PacsUnavailable, json_value, urls_unlogged
from pipeline_steps.core.config import PacsPullParams, Params
from pipeline_steps.core.errors import ConfigError, DataError
from pipeline_steps.core.files import atomic_path, file_sha256, write_text_atomic
from pipeline_steps.core.layout import Layout
from pipeline_steps.landing import (
    BAD_UID,
    DUPLICATE,
    INGESTED,
    LABELS,
    NOT_A_LABEL_SOURCE,
    NOT_AN_IMAGE,
    OTHER,
    RADFLOW_OUTPUT,
    SR,
    PacsIndex,
    PacsInstance,
    Pulled,
    dump_pacs_index,
    instance_kind,
    is_radflow_sr,
    plan_pull,
    query_key,
    read_pacs_index,
    rekey_labels,
    sr_label_rows,
    study_date_range,
)

log = logging.getLogger("radflow")

STUDY_FIELDS = ("StudyInstanceUID", "StudyDate")
INSTANCE_FIELDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class Staged:
    key: str  # sop_key of the instance
    sha256: str = ""  # of the retrieved file; empty when it was not kept


@dataclass
class PullBatch:
    """What one pull brought into the staging folder, not yet committed."""

    query: str
    staging: Path
    studies: int = 0
    last_study_date: str = ""  # the latest StudyDate the query returned (kept in the index only)
    images: list[Staged] = field(default_factory=list)
    duplicates: list[Staged] = field(default_factory=list)  # content pulled before
    label_sources: list[Staged] = field(default_factory=list)  # SRs whose boxes became labels
    skipped: dict[str, list[Staged]] = field(default_factory=dict)  # reason -> instances
    label_files: list[Path] = field(default_factory=list)
    sr_labels: int = 0  # label rows taken from SRs
    sr_boxes_without_label: int = 0
    unchanged: int = 0  # in the index already: not asked for again
    relabelled: list[str] = field(default_factory=list)  # earlier images an SR here annotates

    def counts(self) -> dict[str, int]:
        return {
            "studies": self.studies,
            "new_images": len(self.images),
            "duplicates": len(self.duplicates),
            "sr_label_sources": len(self.label_sources),
            "sr_labels": self.sr_labels,
            "relabelled_images": len(self.relabelled),
            "unchanged": self.unchanged,
            **{f"skipped_{reason}": len(items) for reason, items in sorted(self.skipped.items())},
        }

    def skip(self, reason: str, key: str) -> None:
        self.skipped.setdefault(reason, []).append(Staged(key))


def load_index(layout: Layout) -> PacsIndex:
    path = layout.pacs_pulled
    return read_pacs_index(path.read_text(), str(path)) if path.exists() else PacsIndex({}, {})


def pull_filters(
    params: PacsPullParams,
    date_from: str | None = None,
    date_to: str | None = None,
    modalities: list[str] | None = None,
) -> PacsPullParams:
    """`params.pacs.pull` with the command line's filters on top, checked alike."""
    from pydantic import ValidationError

    update: dict[str, Any] = {}
    if date_from is not None:
        update["study_date_from"] = date_from
    if date_to is not None:
        update["study_date_to"] = date_to
    if modalities:
        update["modalities"] = tuple(m.strip().upper() for m in modalities)
    try:
        return PacsPullParams.model_validate(params.model_dump() | update)
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]) for e in exc.errors())
        raise ConfigError(f"pacs pull filters: {reasons} (dates are YYYYMMDD)") from None


def connect(params: Params, env: dict[str, str] | None = None) -> Pacs:
    """The PACS of the environment (RADFLOW_PACS_*), with params.pacs's timeout and retries."""
    p = params.pacs
    return Pacs.from_env(env=env, timeout_s=p.timeout_s, attempts=p.attempts, backoff_s=p.backoff_s)


def find_studies(pacs: Pacs, wanted: PacsPullParams) -> dict[str, str]:
    """Study Instance UID -> StudyDate of the studies the filters match (one QIDO-RS search per
    modality: a PACS need not support a list in ModalitiesInStudy)."""
    dates = study_date_range(wanted.study_date_from, wanted.study_date_to)
    found: dict[str, str] = {}
    for modality in wanted.modalities or ("",):
        filters = {"ModalitiesInStudy": modality} if modality else {}
        if dates:
            filters["StudyDate"] = dates
        for item in pacs.search_studies(filters, STUDY_FIELDS):
            uid = json_value(item, "0020000D")
            if uid:
                found[uid] = json_value(item, "00080020")
    return found


def list_instances(pacs: Pacs, study_uid: str) -> list[PacsInstance]:
    return [
        PacsInstance(
            study_uid,
            json_value(item, "0020000E"),
            json_value(item, "00080018"),
            json_value(item, "00080016"),
        )
        for item in pacs.search_instances(study_uid, INSTANCE_FIELDS)
    ]


def save(dataset: Any, dst: Path) -> str:
    """Write a retrieved dataset as a DICOM file (0600: it holds the original header) atomically;
    its sha256."""
    import pydicom

    with atomic_path(dst) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            pydicom.dcmwrite(fh, dataset, enforce_file_format=True)
    return file_sha256(dst)


def _sr_boxes(dataset: Any) -> tuple[str, list[dict[str, Any]]]:
    """(status, boxes) of a retrieved SR: LABELS with its planar ROIs, or the reason it is skipped."""
    from pipeline_steps.serving.sr import read_sr_boxes

    if is_radflow_sr(
        str(dataset.get("Manufacturer", "")), str(dataset.get("SeriesDescription", ""))
    ):
        return RADFLOW_OUTPUT, []
    try:
        boxes = read_sr_boxes(dataset)
    except DataError:
        return NOT_A_LABEL_SOURCE, []
    return (LABELS, boxes) if boxes else (NOT_A_LABEL_SOURCE, [])


def _read_labels(path: Path) -> tuple[Any, str]:
    from pipeline_steps.core.labels import read_label_file, resolve_format

    table = read_label_file(path)
    return table, resolve_format(list(table.columns), "auto")


def _retrieve(
    layout: Layout,
    pacs: Pacs,
    wanted: PacsPullParams,
    index: PacsIndex,
    batch: PullBatch,
    label_table: tuple[Any, str] | None,
) -> None:
    """Fill `batch` and its staging folder: search, list, retrieve, sort, write the label files."""
    known = {p.sha256 for p in index.instances.values() if p.sha256}
    studies = find_studies(pacs, wanted)
    batch.studies = len(studies)
    batch.last_study_date = max((d for d in studies.values() if d), default="")
    listing = [inst for uid in sorted(studies) for inst in list_instances(pacs, uid)]
    todo, bad, batch.unchanged = plan_pull(listing, index)
    for inst in bad:
        batch.skip(BAD_UID, inst.key)
    sr_rows = []
    for inst in todo:
        if instance_kind(inst.sop_class) == OTHER:  # a PDF, a key object: not even retrieved
            batch.skip(NOT_AN_IMAGE, inst.key)
            continue
        dataset = pacs.retrieve(inst.study_uid, inst.series_uid, inst.sop_uid)
        kind = instance_kind(str(dataset.get("SOPClassUID", inst.sop_class)))
        if kind == SR:
            status, boxes = _sr_boxes(dataset)
            if status != LABELS:
                batch.skip(status, inst.key)
                continue
            rows, unlabelled = sr_label_rows(boxes)
            sr_rows.append(rows)
            batch.sr_boxes_without_label += unlabelled
            batch.label_sources.append(Staged(inst.key))
            continue
        if kind == OTHER or not any(k in dataset for k in PIXEL_KEYWORDS):
            batch.skip(NOT_AN_IMAGE, inst.key)
            continue
        dst = layout.pacs_images / f"{inst.key}.dcm"
        staged = Staged(inst.key, save(dataset, dst))
        # Content pulled before under another SOP Instance UID. Content that is only in data/raw
        # (a manual ingest, or a pull that failed before its data version) is ingested again:
        # archiving is by content, and the data version then surely holds it.
        if staged.sha256 in known:
            dst.unlink()
            batch.duplicates.append(staged)
            continue
        known.add(staged.sha256)
        batch.images.append(staged)
    if label_table is not None:
        table, fmt = label_table
        path = layout.pacs_labels / "labels.csv"
        with atomic_path(path) as tmp:
            rekey_labels(table, fmt).to_csv(tmp, index=False)
        batch.label_files.append(path)
    if sr_rows:
        import pandas as pd

        rows = pd.concat(sr_rows, ignore_index=True)
        batch.sr_labels = len(rows)
        _stage_earlier_images(layout, index, batch, set(rows["image_id"]))
        path = layout.pacs_labels / "sr_labels.csv"
        with atomic_path(path) as tmp:
            rows.to_csv(tmp, index=False)
        batch.label_files.append(path)


def _stage_earlier_images(
    layout: Layout, index: PacsIndex, batch: PullBatch, keys: set[str]
) -> None:
    """Images an SR of this batch annotates that an earlier pull archived (annotated after it was
    pulled): a copy of the archived file is staged under its key, so ingestion matches the rows to
    it (it is archived already, so nothing is added but the labels)."""
    from pipeline_steps.core.deid import image_id_for

    staged = {s.key for s in batch.images}
    for key in sorted(keys - staged):
        earlier = index.instances.get(key)
        if earlier is None or earlier.status != INGESTED or not earlier.sha256:
            continue
        archived = layout.raw_image(image_id_for(earlier.sha256))
        if archived.exists():
            with atomic_path(layout.pacs_images / f"{key}.dcm") as tmp:
                shutil.copyfile(archived, tmp)
            batch.relabelled.append(key)


def pull(
    layout: Layout,
    params: Params,
    pacs: Pacs,
    *,
    date_from: str | None = None,
    date_to: str | None = None,
    modalities: list[str] | None = None,
    labels: Path | None = None,
) -> PullBatch:
    """Retrieve the instances of the matching studies that the index does not hold into the staging
    folder: images (named by sop_key), label rows of annotation SRs, and the reasons of what is
    skipped. `labels`: a label CSV (any `radflow ingest` format) naming images by SOP Instance UID.

    Raises (with the staging folder removed and the index untouched) PacsUnavailable when the PACS
    stops answering after the edge's retries, PacsAuthError on a refused sign-in."""
    wanted = pull_filters(params.pacs.pull, date_from, date_to, modalities)
    label_table = _read_labels(labels) if labels is not None else None  # before asking the PACS
    staging = layout.pacs_incoming
    shutil.rmtree(staging, ignore_errors=True)
    layout.pacs_images.mkdir(parents=True, mode=0o700)
    layout.pacs_labels.mkdir(mode=0o700)
    batch = PullBatch(
        query_key(pacs.url, wanted.modalities, wanted.study_date_from, wanted.study_date_to),
        staging,
    )
    index = load_index(layout)
    try:
        with urls_unlogged():
            _retrieve(layout, pacs, wanted, index, batch, label_table)
    except PacsUnavailable as exc:
        discard(batch)
        raise PacsUnavailable(
            f"{exc}. Nothing of this pull was kept; the next pull asks for the same instances again"
        ) from None
    except BaseException:
        discard(batch)
        raise
    log.info("pacs pull: %s", batch.counts())
    return batch


def discard(batch: PullBatch) -> None:
    shutil.rmtree(batch.staging, ignore_errors=True)


def commit(layout: Layout, batch: PullBatch) -> None:
    """Record every instance of the batch in the index (by sop_key) and the query's latest study
    date, then drop the staging folder. Called once the batch's data version exists."""
    when = datetime.now(UTC).isoformat(timespec="seconds")
    index = load_index(layout)
    for status, items in (
        (INGESTED, batch.images),
        (DUPLICATE, batch.duplicates),
        (LABELS, batch.label_sources),
        *sorted(batch.skipped.items()),
    ):
        for item in items:
            index.instances[item.key] = Pulled(status, item.sha256, when)
    previous = index.queries.get(batch.query, {}).get("last_study_date", "")
    index.queries[batch.query] = {
        "last_study_date": max(previous, batch.last_study_date),
        "pulled_at": when,
    }
    write_text_atomic(layout.pacs_pulled, dump_pacs_index(index))
    discard(batch)


def ingest(layout: Layout, params: Params, batch: PullBatch) -> landing.Ingested:
    """The batch through ingestion and a DVC data version, then the index; all or nothing. Without
    new images (or earlier images an SR of this batch annotates) nothing is versioned: CSV labels
    alone name no image of this batch."""
    try:
        if not batch.images and not batch.relabelled:
            commit(layout, batch)
            return landing.Ingested(None, 0, 0, {}, 0)
        return landing.ingest_staged(
            layout, params, layout.pacs_images, batch.label_files, lambda: commit(layout, batch)
        )
    except BaseException:
        discard(batch)
        raise


def pull_from_env(layout: Layout, params: Params, **filters: Any) -> PullBatch:
    """`pull` from the PACS the environment names (the nightly flow's task)."""
    return pull(layout, params, connect(params), **filters)


def summary(batch: PullBatch, ingested: landing.Ingested) -> dict[str, Any]:
    """Counts only: no UID, name or date of any study."""
    return batch.counts() | {
        "archived": ingested.added,
        "accepted": ingested.accepted,
        "quarantined": ingested.quarantined,
        "labels_imported": ingested.labels_imported,
        "label_issues": ingested.label_issues,
        "data_version": ingested.data_version,
    }


def pull_and_ingest(
    layout: Layout, params: Params, pacs: Pacs | None = None, **filters: Any
) -> dict[str, Any]:
    """One pull and its ingestion (`radflow pacs pull`); the summary."""
    batch = pull(layout, params, pacs or connect(params), **filters)
    return summary(batch, ingest(layout, params, batch))
