"""Stage `extract_features`: a per-image table of intensity, noise, contrast and texture descriptors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline_steps.config import ExtractFeaturesParams
from pipeline_steps.layout import Layout
from pipeline_steps.preprocess import QUANT, SPLITS, UNLABELLED


def image_features(image: np.ndarray, params: ExtractFeaturesParams) -> dict[str, float]:
    """Descriptors of one [0, 1] model-input image, computed inside the non-padded field."""
    field = image > 0
    values = image[field] if field.any() else image.ravel()
    quantiles = np.quantile(values, params.histogram_quantiles)
    # Lung fields are the large dark region inside the body; their coverage drifts with
    # positioning and exposure, which is what monitoring wants to see.
    body = ndimage.binary_fill_holes(image > np.quantile(values, 0.02))
    dark = (image < np.quantile(values, 0.35)) & body
    smooth = ndimage.uniform_filter(image, 3)
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
    return feats


def run(
    layout: Layout,
    params: ExtractFeaturesParams,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Stage edge: shards -> data/features/features.parquet."""
    manifest = pd.read_parquet(layout.manifest)
    rows: list[dict[str, object]] = []
    done = 0
    for split in (*SPLITS, UNLABELLED):
        part = manifest[manifest["split"] == split]
        for shard, members in part.groupby("shard", sort=True):
            data = np.load(layout.processed / "shards" / str(shard), mmap_mode="r")
            for _, row in members.sort_values("index").iterrows():
                image = np.asarray(data[int(row["index"])], dtype=np.float32) / QUANT
                rows.append(
                    {"image_id": row["image_id"], "split": split, **image_features(image, params)}
                )
                done += 1
                if progress:
                    progress(done, len(manifest))
    table = pd.DataFrame(rows)
    layout.features.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(layout.features, index=False)
    return table
