"""Bringing a DICOM folder and its labels into the workspace's raw dataset, by content hash."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline_steps.core.config import IngestParams
from pipeline_steps.core.deid import DEV_PSEUDONYM_KEY, image_id_for
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import atomic_path, file_sha256
from pipeline_steps.core.labels import (
    ALREADY_LABELLED,
    BOX_COLUMNS,
    ISSUE_COLUMNS,
    LABEL_COLUMNS,
    ORPHAN,
    READER_COLUMNS,
    LabelImport,
    import_labels,
    read_label_file,
    resolve_format,
)
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.screening import build_metadata

log = logging.getLogger(__name__)

# Reason code of an entry of the input folder that is a symbolic link (to a file or a folder):
# ingest reads only regular files inside the folder, so a link is neither followed nor archived
# (a link to /etc/passwd must not end up in data/raw and the DVC cache). Counted with the
# quarantined files of the summary, although nothing of it is kept.
SYMLINK = "symlink"


@dataclass(frozen=True)
class IngestSummary:
    seen: int  # files in the folder
    added: int  # new to the archive
    skipped_existing: int  # already archived (same content)
    accepted: int  # files whose header passes the scan (screening.build_metadata)
    # reason code -> files; accepted + quarantined = seen. Files are archived whatever their
    # reason, except symbolic links (SYMLINK), which are not followed.
    quarantined: dict[str, int]
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


def _input_entries(dicom_dir: Path) -> tuple[list[Path], list[Path]]:
    """(regular files, symbolic links) below `dicom_dir`, without following any link.

    Hidden files (a leading dot) are skipped, as are sockets, FIFOs and devices."""
    files: list[Path] = []
    links: list[Path] = []

    def unreadable(exc: OSError) -> None:
        raise DataError(
            f"{dicom_dir}: a folder inside it cannot be listed ({exc.strerror or exc}); fix its "
            "permissions and ingest again (nothing was archived)"
        )

    for folder, dirs, names in os.walk(
        dicom_dir, onerror=unreadable
    ):  # links to folders: not entered
        here = Path(folder)
        links += [here / d for d in dirs if (here / d).is_symlink()]
        for name in names:
            path = here / name
            if name.startswith("."):
                continue
            if path.is_symlink():
                links.append(path)
            elif path.is_file():
                files.append(path)
    return sorted(files), sorted(links)


def _owner_only_dir(path: Path) -> None:
    """Create `path` (and parents) and make it 0700: the raw archive holds every header's PHI."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        try:
            path.chmod(mode & 0o700)
        except OSError as exc:  # not its owner: say so, the data is still archived
            log.warning("%s is readable by others and cannot be made owner-only (%s)", path, exc)


def _archive(src: Path, layout: Layout, dicom_dir: Path) -> tuple[str, bool] | None:
    """(content id, newly archived) of one input file, or None when it turned out to be a link.

    The file is opened without following a link (a file swapped for one after the folder was
    listed is refused by the kernel) and hashed and copied through that one descriptor; the copy is
    created 0600 (it carries the original header, PHI included)."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise DataError(
            f"{dicom_dir}: a file inside it cannot be read ({exc.strerror or exc}); fix its "
            "permissions and ingest again"
        ) from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        digest = hashlib.sha256()
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
        image_id = image_id_for(digest.hexdigest())
        dst = layout.raw_image(image_id)
        if dst.exists():
            return image_id, False
        fh.seek(0)
        with atomic_path(dst) as tmp:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(out, "wb") as copy:
                shutil.copyfileobj(fh, copy, 1 << 20)
    return image_id, True


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

    Every regular file is archived (0600, in 0700 folders), whatever the scan says: rejected files
    are kept, never modified, and counted by reason. Symbolic links are not followed, wherever they
    point: they are counted under the reason `symlink` and nothing of them is archived. Labels are
    read by `read_label_file` (size limit, encoding) before anything is copied, and converted to the
    canonical table (`labels.csv`; VinDr-CXR's per-reader rows go to `labels_readers.csv`) with
    each box checked against its image's size. Label rows that could not be used (outside the
    image, not finite, inverted, repeated, ...) are appended to `label_issues.csv` with their line
    and reason, and never reach `labels.csv`.
    """
    params = params or IngestParams()
    if not dicom_dir.is_dir():
        raise DataError(f"{dicom_dir}: not a directory of DICOM files")
    sources, links = _input_entries(dicom_dir)
    if not sources:
        detail = (
            f"; {len(links)} symbolic link(s) were not followed (ingest reads only regular files "
            "inside the folder: copy the files themselves in, e.g. `cp -rL`)"
            if links
            else ""
        )
        raise DataError(f"{dicom_dir}: no files found{detail}")
    # A wrong label file fails before anything is copied.
    table = read_label_file(labels_file) if labels_file is not None else None
    if table is not None:
        label_format = resolve_format(list(table.columns), label_format)
    images_dir = layout.raw_images
    if replace and layout.raw.exists():
        shutil.rmtree(layout.raw)
    _owner_only_dir(layout.raw)
    _owner_only_dir(images_dir)

    stem_ids: dict[str, set[str]] = {}
    batch: list[str] = []
    added = skipped = late_links = 0
    for done, src in enumerate(sources, 1):
        archived = _archive(src, layout, dicom_dir)
        if archived is None:  # became a link (or something else) after the folder was listed
            late_links += 1
        else:
            image_id, new = archived
            stem_ids.setdefault(src.stem, set()).add(image_id)
            batch.append(image_id)
            added += new
            skipped += not new
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
    not_followed = len(links) + late_links
    quarantined: dict[str, int] = {SYMLINK: not_followed} if not_followed else {}
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
        sizes = {
            str(i): (int(r), int(c))
            for i, r, c in metadata[["image_id", "rows", "columns"]].itertuples(index=False)
        }
        imported = import_labels(table, stem_ids, label_format, params.wbf_iou, image_sizes=sizes)
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
        seen=len(sources) + len(links),
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
