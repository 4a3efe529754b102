"""The review store: the exact bytes of each predicted input, kept by content id so a radiologist can
review the prediction and its reviewed findings can become labels (`radflow ingest --reviewed`)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline_steps.core.config import ReviewParams
from pipeline_steps.core.deid import image_id_for
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import atomic_path
from pipeline_steps.core.layout import Layout

log = logging.getLogger("radflow")


def _owner_only_dirs(folder: Path, top: Path) -> None:
    """Create `folder` and make it and its parents up to `top` 0700: the copies carry PHI."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in (folder, *folder.parents):
        path.chmod(0o700)
        if path == top:
            break


def keep_input(layout: Layout, file_sha256: str, source: Path | bytes) -> Path | None:
    """Copy `source` (a file, or the bytes predicted) to `layout.review_image(id)`, atomically and
    0600; the path written, or None when the image is already kept or already in data/raw.

    The copy is hashed as it is written and must have the content `file_sha256` names (a file
    changed since it was predicted is not kept under another image's id): else DataError."""
    image_id = image_id_for(file_sha256)
    target = layout.review_image(image_id)
    if target.exists() or layout.raw_image(image_id).exists():
        return None
    _owner_only_dirs(target.parent, layout.review_images.parent)
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            if isinstance(source, bytes | bytearray):
                digest.update(source)
                out.write(source)
            else:
                with open(source, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != file_sha256:
            raise DataError(
                f"image {image_id}: the input changed since it was predicted; not kept for review"
            )
    return target


def keep_predicted(
    layout: Layout,
    params: ReviewParams,
    records: Sequence[Mapping[str, Any]],
    sources: Sequence[object],
) -> int:
    """Keep the input of each successful record (records and sources in the same order); how many
    were newly kept. Never fails the prediction: a copy that cannot be made is a warning, naming
    the image id only (a path or file name may name a patient)."""
    if not params.keep_inputs:
        return 0
    kept = 0
    for record, source in zip(records, sources, strict=True):
        digest = record.get("file_sha256")
        if record.get("reason") or not digest or not isinstance(source, Path | bytes | bytearray):
            continue
        try:
            kept += keep_input(layout, str(digest), source) is not None
        except Exception as exc:  # the prediction is recorded and answered all the same
            log.warning(
                "review store: image %s not kept for review (%s)",
                image_id_for(str(digest)),
                # an OSError's strerror, not str(exc): that would quote the path
                exc
                if isinstance(exc, DataError)
                else getattr(exc, "strerror", None) or type(exc).__name__,
            )
    return kept
