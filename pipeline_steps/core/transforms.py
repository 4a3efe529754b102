"""The image and box geometry shared by training, testing and serving: display windowing, resampling
to a common spacing, letterboxing to the model's square input, and the exact inverse that maps
model boxes back to original DICOM pixels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline_steps.core.config import PreprocessParams
from pipeline_steps.core.dicom_io import DicomImage
from pipeline_steps.core.shards import BOX_COLUMNS, QUANT


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

    @property
    def content(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the resized image inside the canvas; the rest is letterbox padding."""
        out_w, out_h = round(self.orig_cols * self.scale_x), round(self.orig_rows * self.scale_y)
        return self.pad_x, self.pad_y, self.pad_x + out_w, self.pad_y + out_h


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
        # One affine map and a clip, on one float32 buffer (this runs on every full-size image).
        # pydicom's windowing never inverts MONOCHROME1; the sign below is the one place it happens.
        scale = 1.0 / (high - low)
        if image.photometric == "MONOCHROME1":
            slope, offset = -scale, high * scale  # 1 - (x - low) / (high - low)
        else:
            slope, offset = scale, -low * scale
        out = np.multiply(pixels, np.float32(slope), dtype=np.float32)
        out += np.float32(offset)
        return np.clip(out, 0.0, 1.0, out=out)


class Letterbox:
    """Resize by a planned Geometry and pad to a square of `size` (zeros = black border)."""

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        x0, y0, x1, y1 = self.geometry.content
        resized = np.asarray(
            Image.fromarray(np.asarray(image, dtype=np.float32), mode="F").resize(
                (x1 - x0, y1 - y0), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )
        canvas = np.zeros((self.geometry.size, self.geometry.size), dtype=np.float32)
        canvas[y0:y1, x0:x1] = resized
        return canvas


def preprocess_image(image: DicomImage, geometry: Geometry, params: PreprocessParams) -> np.ndarray:
    """One decoded image to its uint16 model input."""
    display = DisplayWindow(params.window, params.percentiles)(image)
    boxed = Letterbox(geometry)(display)
    np.clip(boxed, 0.0, 1.0, out=boxed)
    boxed *= np.float32(QUANT)
    return np.rint(boxed).astype(np.uint16)


# --------------------------------------------------------------------------------------------
# Boxes


def transform_boxes(
    labels: pd.DataFrame, manifest: pd.DataFrame, size: int
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Ground-truth boxes in model-input pixels, and the boxes that had to be clipped.

    A box is clipped to the original image (so, after geometry, to the resized image and never into
    the letterbox padding); `clipped` marks it. A box with no area left is dropped. Both are reported.
    """
    positives = labels.dropna(subset=["x_min"]).merge(
        manifest[["image_id", "orig_rows", "orig_cols", "scale_x", "scale_y", "pad_x", "pad_y"]],
        on="image_id",
    )
    positives = positives.sort_values(
        ["image_id", "x_min", "y_min", "x_max", "y_max"], kind="stable"
    ).reset_index(drop=True)
    original = positives[["x_min", "y_min", "x_max", "y_max"]].to_numpy(np.float64)
    rows = positives["orig_rows"].to_numpy(np.float64)
    cols = positives["orig_cols"].to_numpy(np.float64)
    limits = np.column_stack([np.zeros_like(cols), np.zeros_like(rows), cols, rows])
    low = np.minimum(original[:, :2], original[:, 2:])  # a box given corner-swapped is still a box
    high = np.maximum(original[:, :2], original[:, 2:])
    inside = np.hstack([np.maximum(low, limits[:, :2]), np.minimum(high, limits[:, 2:])])
    clipped = ~np.isclose(inside, np.hstack([low, high])).all(axis=1)
    empty = (inside[:, 2] <= inside[:, 0]) | (inside[:, 3] <= inside[:, 1])
    mapped = inside.copy()
    mapped[:, [0, 2]] = inside[:, [0, 2]] * positives[["scale_x"]].to_numpy() + positives[
        ["pad_x"]
    ].to_numpy(np.float64)
    mapped[:, [1, 3]] = inside[:, [1, 3]] * positives[["scale_y"]].to_numpy() + positives[
        ["pad_y"]
    ].to_numpy(np.float64)
    mapped = np.clip(mapped, 0, size)  # rounding of the content edge cannot leave the canvas
    boxes = pd.DataFrame(
        {
            "image_id": positives["image_id"].astype(str),
            "label": positives["label"].astype(str),
            "x_min": mapped[:, 0],
            "y_min": mapped[:, 1],
            "x_max": mapped[:, 2],
            "y_max": mapped[:, 3],
            "clipped": clipped,
        },
        columns=BOX_COLUMNS,
    )
    report = [
        {
            "image_id": str(positives.at[k, "image_id"]),
            "original": [float(v) for v in original[k]],
            "clipped_to": None if empty[k] else [float(v) for v in inside[k]],
            "dropped": bool(empty[k]),
        }
        for k in np.flatnonzero(clipped | empty)
    ]
    return boxes[~empty].reset_index(drop=True), report


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
