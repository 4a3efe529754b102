"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer of a workspace file goes through `atomic_path`: the content is written to a temporary
name in the same folder (same filesystem, so the rename is atomic) and renamed over the target only
when writing succeeded; on any failure the temporary file is removed and the target is untouched."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` when the block exits cleanly.

    The temporary name is hidden (leading dot) so folder scans skip it. `keep_suffix` keeps the
    target's suffixes last, for writers that check them (Keras insists on `.keras`, `.weights.h5`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if keep_suffix:
        suffix = "".join(path.suffixes)  # all of them: Keras wants `.weights.h5`, not `.h5`
        name = f".{path.name.removesuffix(suffix)}.{tag}.tmp{suffix}"
    else:
        name = f".{path.name}.{tag}.tmp"
    tmp = path.with_name(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
