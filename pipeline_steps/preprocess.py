"""Stage `preprocess`: DICOM pixels to letterboxed model input, patient-level splits, and streamable shards."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline_steps.config import PreprocessParams, SplitParams
from pipeline_steps.dicom_io import DicomImage, read_image
from pipeline_steps.errors import DataError
from pipeline_steps.ingest import NO_FINDING
from pipeline_steps.layout import Layout

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"
QUANT = 65535.0  # shards store [0, 1] as uint16: half the bytes of float32, far below the detector's noise


@dataclass(frozen=True)
class Geometry:
    """Original pixel coordinates -> model input coordinates: x' = x * scale_x + pad_x (exactly invertible)."""

    orig_rows: int
    orig_cols: int
    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int
    size: int

    def forward(self, boxes: np.ndarray) -> np.ndarray:
        out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
        out[:, [0, 2]] = out[:, [0, 2]] * self.scale_x + self.pad_x
        out[:, [1, 3]] = out[:, [1, 3]] * self.scale_y + self.pad_y
        return out

    def inverse(self, boxes: np.ndarray) -> np.ndarray:
        out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.scale_x
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.scale_y
        return out


def plan_geometry(
    rows: int, cols: int, spacing_row_mm: float, spacing_col_mm: float, size: int, target_mm: float
) -> Geometry:
    """Resample to the common spacing, shrinking further only if the image would not fit the letterbox."""
    fy, fx = spacing_row_mm / target_mm, spacing_col_mm / target_mm
    shrink = min(1.0, size / (rows * fy), size / (cols * fx))
    out_h = max(1, min(size, round(rows * fy * shrink)))
    out_w = max(1, min(size, round(cols * fx * shrink)))
    return Geometry(
        rows, cols, out_w / cols, out_h / rows, (size - out_w) // 2, (size - out_h) // 2, size
    )


class DisplayWindow:
    """Modality values -> display intensity in [0, 1] (MONOCHROME2 sense: bone bright)."""

    def __init__(self, mode: str, percentiles: tuple[float, float]) -> None:
        self.mode = mode
        self.percentiles = percentiles

    def __call__(self, image: DicomImage) -> np.ndarray:
        pixels = image.pixels
        center, width = image.window.center, image.window.width
        if self.mode == "dicom" and center is not None and width is not None and width > 1:
            low, high = center - width / 2.0, center + width / 2.0
        else:
            # A strided sample is enough for robust quantiles and ~16x cheaper.
            low, high = (float(v) for v in np.percentile(pixels[::4, ::4], self.percentiles))
            if high <= low:
                high = low + 1.0
        out = np.clip((pixels - low) / (high - low), 0.0, 1.0).astype(np.float32)
        # pydicom's windowing never inverts MONOCHROME1; this is the one place it happens.
        return 1.0 - out if image.photometric == "MONOCHROME1" else out


class Letterbox:
    """Resize by a planned Geometry and pad to a square of `size` (zeros = black border)."""

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        g = self.geometry
        out_w, out_h = round(g.orig_cols * g.scale_x), round(g.orig_rows * g.scale_y)
        resized = np.asarray(
            Image.fromarray(image.astype(np.float32), mode="F").resize(
                (out_w, out_h), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )
        canvas = np.zeros((g.size, g.size), dtype=np.float32)
        canvas[g.pad_y : g.pad_y + out_h, g.pad_x : g.pad_x + out_w] = resized
        return canvas


def assign_split(patient_pseudonym: str, params: SplitParams) -> str:
    """Patient-level split from a salted hash: deterministic, and stable when new patients arrive."""
    digest = hashlib.sha256(f"{params.salt}:{patient_pseudonym}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < params.test_fraction:
        return "test"
    if u < params.test_fraction + params.val_fraction:
        return "val"
    return "train"


def preprocess_image(image: DicomImage, geometry: Geometry, params: PreprocessParams) -> np.ndarray:
    """One decoded image to its uint16 model input."""
    display = DisplayWindow(params.window, params.percentiles)(image)
    boxed = Letterbox(geometry)(display)
    return np.round(np.clip(boxed, 0.0, 1.0) * QUANT).astype(np.uint16)


def _work(
    job: tuple[str, float, float, int, int, PreprocessParams],
) -> tuple[np.ndarray | None, str]:
    """Worker: (path, spacing, size, params) -> (uint16 image or None, error message)."""
    path, sp_row, sp_col, rows, cols, params = job
    try:
        image = read_image(Path(path), default_spacing_mm=sp_row)
    except DataError as exc:
        return None, str(exc)
    geometry = plan_geometry(
        rows, cols, sp_row, sp_col, params.input_size, params.target_spacing_mm
    )
    return preprocess_image(image, geometry, params), ""


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run(
    layout: Layout, params: PreprocessParams, progress: Callable[[int, int], None] | None = None
) -> pd.DataFrame:
    """Stage edge: metadata + labels -> shards, manifest and boxes under data/processed. Returns the manifest."""
    if not layout.metadata.exists():
        raise DataError(f"{layout.metadata}: missing. Run the `validate` stage first.")
    metadata = pd.read_parquet(layout.metadata).sort_values("image_id").reset_index(drop=True)
    labels = pd.read_parquet(layout.labels)
    labelled = set(labels["image_id"])
    positive = set(labels.loc[labels["label"] != NO_FINDING, "image_id"])
    metadata["split"] = [
        assign_split(p, params.split) if i in labelled else UNLABELLED
        for p, i in zip(metadata["patient_pseudonym"], metadata["image_id"], strict=True)
    ]

    if layout.processed.exists():
        shutil.rmtree(layout.processed)
    shards_dir = layout.processed / "shards"
    shards_dir.mkdir(parents=True)
    workers = params.workers or os.cpu_count() or 1
    manifest_rows: list[dict[str, object]] = []
    failures: list[dict[str, str]] = []
    done, total = 0, len(metadata)
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for split in (*SPLITS, UNLABELLED):
            members = metadata.index[metadata["split"] == split].tolist()
            for shard_no, chunk in enumerate(_chunks(members, params.shard_size)):
                jobs = [
                    (
                        str(layout.raw / metadata.at[i, "file"]),
                        float(metadata.at[i, "spacing_row_mm"]),
                        float(metadata.at[i, "spacing_col_mm"]),
                        int(metadata.at[i, "rows"]),
                        int(metadata.at[i, "columns"]),
                        params,
                    )
                    for i in chunk
                ]
                results = pool.map(_work, jobs) if pool else map(_work, jobs)
                arrays: list[np.ndarray] = []
                shard_name = f"{split}-{shard_no:04d}.npy"
                for i, (array, error) in zip(chunk, results, strict=True):
                    done += 1
                    if progress:
                        progress(done, total)
                    row = metadata.loc[i]
                    if array is None:
                        failures.append(
                            {"image_id": row.image_id, "reason": "decode_failed", "message": error}
                        )
                        continue
                    g = plan_geometry(
                        int(row.rows),
                        int(row.columns),
                        float(row.spacing_row_mm),
                        float(row.spacing_col_mm),
                        params.input_size,
                        params.target_spacing_mm,
                    )
                    manifest_rows.append(
                        {
                            "image_id": row.image_id,
                            "content_hash": row.content_hash,
                            "patient_pseudonym": row.patient_pseudonym,
                            "split": split,
                            "positive": row.image_id in positive,
                            "shard": shard_name,
                            "index": len(arrays),
                            **{k: v for k, v in asdict(g).items() if k != "size"},
                        }
                    )
                    arrays.append(array)
                if arrays:
                    np.save(shards_dir / shard_name, np.stack(arrays))
    finally:
        if pool:
            pool.shutdown()

    manifest = pd.DataFrame(manifest_rows)
    boxes = transform_boxes(labels, manifest, params.input_size)
    manifest.to_parquet(layout.manifest, index=False)
    boxes.to_parquet(layout.boxes, index=False)
    (layout.processed / "failures.json").write_text(json.dumps(failures, indent=2))
    for failure in failures:
        log.warning("preprocess: %s not decodable: %s", failure["image_id"], failure["message"])
    return manifest


def geometry_of(row: Mapping[str, Any], size: int) -> Geometry:
    return Geometry(
        int(row["orig_rows"]),
        int(row["orig_cols"]),
        float(row["scale_x"]),
        float(row["scale_y"]),
        int(row["pad_x"]),
        int(row["pad_y"]),
        size,
    )


def transform_boxes(labels: pd.DataFrame, manifest: pd.DataFrame, size: int) -> pd.DataFrame:
    """Ground-truth boxes in model-input pixels, clipped to the canvas."""
    positives = labels.dropna(subset=["x_min"]).merge(manifest, on="image_id")
    out: list[dict[str, object]] = []
    for _, row in positives.iterrows():
        box = geometry_of(row, size).forward(
            np.array([row.x_min, row.y_min, row.x_max, row.y_max])
        )[0]
        box = np.clip(box, 0, size)
        out.append(
            {
                "image_id": row.image_id,
                "label": row.label,
                "x_min": box[0],
                "y_min": box[1],
                "x_max": box[2],
                "y_max": box[3],
            }
        )
    return pd.DataFrame(out, columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max"])


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
