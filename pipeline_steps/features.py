"""Stage `extract_features`: a per-image table of intensity, noise, contrast and texture descriptors,
and the drift report of that table against a reference one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline_steps.config import ExtractFeaturesParams
from pipeline_steps.layout import Layout
from pipeline_steps.preprocess import QUANT, SPLITS, UNLABELLED, geometry_of

log = logging.getLogger(__name__)

# CNN embeddings from the champion's backbone belong here too; they wait for the model registry.


def glcm(
    quantized: np.ndarray, field: np.ndarray, offset: tuple[int, int], levels: int
) -> np.ndarray:
    """Symmetric, normalized grey-level co-occurrence matrix of pixel pairs `offset` (dy, dx) apart,
    counting only pairs with both pixels inside `field`."""
    dy, dx = offset
    h, w = quantized.shape
    a = quantized[: h - dy, : w - dx]
    b = quantized[dy:, dx:]
    inside = field[: h - dy, : w - dx] & field[dy:, dx:]
    pairs = a[inside].astype(np.int64) * levels + b[inside]
    counts = (
        np.bincount(pairs, minlength=levels * levels).reshape(levels, levels).astype(np.float64)
    )
    counts += counts.T  # symmetric: (i, j) and (j, i) are the same pair seen both ways
    total = counts.sum()
    return counts / total if total else counts


def texture_features(
    image: np.ndarray, field: np.ndarray, levels: int, distances: Sequence[int]
) -> dict[str, float]:
    """Haralick-style contrast, homogeneity, energy and correlation, averaged over the horizontal and
    vertical offsets at each distance. Grey levels are a fixed split of [0, 1] (not per image), so
    the measures also move when exposure or windowing drifts."""
    quantized = np.minimum((image * levels).astype(np.int64), levels - 1)
    i, j = np.indices((levels, levels), dtype=np.float64)
    out: dict[str, float] = {}
    for d in distances:
        stats: dict[str, list[float]] = {
            "contrast": [],
            "homogeneity": [],
            "energy": [],
            "correlation": [],
        }
        for offset in ((0, d), (d, 0)):
            p = glcm(quantized, field, offset, levels)
            if not p.any():
                continue
            mu = float((i * p).sum())  # symmetric: the row and column means are equal
            var = float((((i - mu) ** 2) * p).sum())
            stats["contrast"].append(float((((i - j) ** 2) * p).sum()))
            stats["homogeneity"].append(float((p / (1.0 + (i - j) ** 2)).sum()))
            stats["energy"].append(float(np.sqrt((p**2).sum())))
            stats["correlation"].append(
                float((((i - mu) * (j - mu)) * p).sum() / var) if var > 1e-12 else 1.0
            )
        for name, values in stats.items():
            out[f"glcm_{name}_d{d}"] = float(np.mean(values)) if values else float("nan")
    return out


def image_features(
    image: np.ndarray, params: ExtractFeaturesParams, field: np.ndarray | None = None
) -> dict[str, float]:
    """Descriptors of one [0, 1] model-input image, computed inside `field` (the non-padded region;
    by default, the non-zero pixels)."""
    field = image > 0 if field is None else field
    if not field.any():  # an all-black image: describe it whole rather than not at all
        field = np.ones(image.shape, dtype=bool)
    values = image[field]
    quantiles = np.quantile(values, params.histogram_quantiles)
    # Lung fields are the large dark region inside the body; their coverage drifts with
    # positioning and exposure, which is what monitoring wants to see.
    body = ndimage.binary_fill_holes((image > np.quantile(values, 0.02)) & field)
    dark = (image < np.quantile(values, 0.35)) & body
    smooth = ndimage.uniform_filter(image, 3)
    residual = (image - smooth)[ndimage.binary_erosion(field, iterations=2)]
    if residual.size == 0:
        residual = (image - smooth)[field]
    gy, gx = np.gradient(image)
    grad = np.hypot(gx, gy)[field]
    feats: dict[str, float] = {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "skew": float(((values - values.mean()) ** 3).mean() / (values.std() ** 3 + 1e-12)),
        "lung_coverage": float(dark.sum() / max(1, body.sum())),
        "noise_mad": float(1.4826 * np.median(np.abs(residual - np.median(residual)))),
        "contrast_p95_p5": float(np.quantile(values, 0.95) - np.quantile(values, 0.05)),
        "gradient_energy": float((grad**2).mean()),
        "field_fraction": float(field.mean()),
    }
    for q, v in zip(params.histogram_quantiles, quantiles, strict=True):
        feats[f"q{int(round(q * 100)):02d}"] = float(v)
    feats.update(texture_features(image, field, params.glcm_levels, params.glcm_distances))
    return feats


def content_mask(row: Mapping[str, Any], size: int) -> np.ndarray:
    """The resized image's pixels inside the letterbox canvas, from the manifest geometry."""
    x0, y0, x1, y1 = geometry_of(row, size).content
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def run(
    layout: Layout,
    params: ExtractFeaturesParams,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Stage edge: shards -> data/features/features.parquet, then reports/drift/ against the reference."""
    from pipeline_steps import drift

    manifest = pd.read_parquet(layout.manifest)
    rows: list[dict[str, object]] = []
    done = 0
    for split in (*SPLITS, UNLABELLED):
        part = manifest[manifest["split"] == split]
        for shard, members in part.groupby("shard", sort=True):
            data = np.load(layout.processed / "shards" / str(shard), mmap_mode="r")
            size = int(data.shape[-1])
            for row in members.sort_values("index").to_dict("records"):
                image = np.asarray(data[int(row["index"])], dtype=np.float32) / QUANT
                field = content_mask(row, size)
                rows.append(
                    {
                        "image_id": row["image_id"],
                        "split": split,
                        **image_features(image, params, field),
                    }
                )
                done += 1
                if progress:
                    progress(done, len(manifest))
    table = pd.DataFrame(rows)
    layout.features.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(layout.features, index=False)
    drift.run(layout, params.drift, table)
    return table
