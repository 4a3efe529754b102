"""The processed dataset on disk: uint16 image shards written as streaming .npy files, the manifest
and box tables beside them, and a memory-mapped reader of one split for training and testing."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_steps.core.files import atomic_path

SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"
QUANT = 65535.0  # shards store [0, 1] as uint16: half the bytes of float32, far below the detector's noise
MANIFEST_COLUMNS = [
    "image_id",
    "content_hash",
    "patient_pseudonym",
    "split",
    "positive",
    "shard",
    "index",
    "orig_rows",
    "orig_cols",
    "scale_x",
    "scale_y",
    "pad_x",
    "pad_y",
    "spacing_source",
    "spacing_flagged",
    "cache_key",
]
BOX_COLUMNS = ["image_id", "label", "x_min", "y_min", "x_max", "y_max", "clipped"]


# --------------------------------------------------------------------------------------------
# Shards


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The header np.save writes for a C-order uint16 array of `shape` (format 1.0)."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint16)), "fortran_order": False}
    np.lib.format.write_array_header_1_0(buffer, {**header, "shape": shape})
    return buffer.getvalue()


def write_shard(path: Path, images: Iterable[np.ndarray], count: int, size: int) -> None:
    """Stream `count` (size, size) uint16 images into one .npy, byte-identical to np.save(np.stack(...)),
    holding one image at a time."""
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        fh.write(_npy_header((count, size, size)))
        written = 0
        for image in images:
            fh.write(np.ascontiguousarray(image, dtype=np.uint16).tobytes())
            written += 1
        if written != count:
            raise ValueError(f"{path.name}: {written} images written, {count} declared")


def shard_bytes(count: int, size: int) -> int:
    return len(_npy_header((count, size, size))) + count * size * size * 2


@dataclass(frozen=True)
class ProcessedSplit:
    """Streaming view of one split: images are memory-mapped shard by shard, never all loaded at once."""

    processed_dir: Path
    manifest: pd.DataFrame  # rows of this split
    boxes: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.manifest)

    def examples(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for shard, rows in self.manifest.groupby("shard", sort=True):
            data = np.load(self.processed_dir / "shards" / str(shard), mmap_mode="r")
            for _, row in rows.sort_values("index").iterrows():
                image = np.asarray(data[int(row["index"])], dtype=np.float32) / QUANT
                yield image, self.boxes.get(str(row["image_id"]), np.zeros((0, 4), np.float32))


def load_split(processed_dir: Path, split: str) -> ProcessedSplit:
    manifest = pd.read_parquet(processed_dir / "manifest.parquet")
    rows = (
        manifest[manifest["split"] == split].sort_values(["shard", "index"]).reset_index(drop=True)
    )
    boxes = pd.read_parquet(processed_dir / "boxes.parquet")
    grouped = {
        str(k): g[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float32)
        for k, g in boxes.groupby("image_id")
    }
    return ProcessedSplit(processed_dir, rows, grouped)
