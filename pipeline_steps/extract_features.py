"""Stage `extract_features`: per-image radiomic descriptors, CNN embeddings from the champion model's
backbone, and the drift report against a reference table.

Outputs, and why embeddings get their own file:
- `data/features/features.parquet` (a DVC out): intensity, noise, contrast and texture descriptors.
  They depend only on the processed images and the `extract_features` params, which are the stage's
  DVC deps, so `dvc repro` and the run cache treat them correctly.
- `data/features/embeddings.parquet` (NOT a DVC out): the global-average-pooled deepest backbone
  feature map of the current champion (registry alias `production`), one row per image, with the
  model name/version/run in a `model_version` column and in the Parquet metadata. The champion lives
  in MLflow, outside DVC's view: were the file an out, `dvc repro` would skip the stage (or restore a
  run-cache copy made by another champion) after a promotion, and `dvc status` could not tell. So
  DVC never versions it; the stage rewrites it on every run and deletes it when no champion can be
  loaded, so it never outlives the manifest or the model it was computed from. The flip side: a
  promotion alone does not make `dvc repro` re-run the stage; the Prefect flow always runs it, and
  `radflow step extract_features` refreshes the embeddings by hand (cached rows make that cheap).
- `reports/drift/`: radiomic drift decides "drift: yes/no"; embeddings are compared too, in their
  own section, only when the reference's embeddings came from the same model version. The
  reference is `extract_features.drift.reference` when set, else the features of the production
  model's training images (found through the registry, like the champion: the same caveat about
  `dvc repro` after a promotion applies, and the run decision re-checks it; see flows/decision.py).

Both tables are incremental: a row is cached under the image's preprocess cache key (content hash
+ pixel params) and the feature params hash (radiomics) or a hash of the model's weights
(embeddings), so a night with a few new studies computes O(new) rows. Caches: `.radflow/cache/`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline_steps.core.config import ExtractFeaturesParams
from pipeline_steps.core.drift import TrainingReference
from pipeline_steps.core.files import write_bytes_atomic
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.shards import QUANT, SPLITS, UNLABELLED
from pipeline_steps.core.transforms import geometry_of

log = logging.getLogger(__name__)

# Bump when the descriptors below change for the same image and params: it retires the row cache.
FEATURE_VERSION = "1"
# A layer of this name, if the model has one, is the backbone output; otherwise it is found by shape.
BACKBONE_LAYER = "backbone"
EMBEDDING_PREFIX = "emb_"
EMBEDDING_BATCH = 16  # fixed: a short last batch is padded, so an image's embedding never depends
# on which images share its batch (an incremental run batches differently from a fresh one)


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


# --------------------------------------------------------------------------------------------
# CNN embeddings (Keras is imported only when a model is given)


def backbone_layer(model: Any, input_size: int) -> str:
    """Name of the layer whose output is the model's deepest backbone feature map.

    A layer named BACKBONE_LAYER wins. Otherwise one forward pass of a blank `input_size` image
    measures every layer's output, and the deepest backbone map is the one at the coarsest
    resolution with the most channels (the last such layer): for radflow's detector, the ReLU
    after the last residual stage, not the narrower neck convolution that reads it.
    """
    import keras

    names = [layer.name for layer in model.layers]
    if BACKBONE_LAYER in names:
        return BACKBONE_LAYER
    candidates = [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4
    ]
    if not candidates:
        raise ValueError(f"model {model.name!r} has no 2-D feature maps to embed from")
    probe = keras.Model(model.inputs[0], [layer.output for layer in candidates])
    shapes = [
        tuple(out.shape)
        for out in probe(np.zeros((1, input_size, input_size, 1), np.float32), training=False)
    ]
    best = max(
        range(len(candidates)),
        key=lambda k: (-shapes[k][1] * shapes[k][2], shapes[k][3], k),
    )
    return str(candidates[best].name)


@dataclass(frozen=True)
class Embedder:
    """A model's backbone, pooled to one vector per image, and what identifies it."""

    model: Any  # keras.Model: images (N, S, S, 1) -> (N, C)
    model_version: str  # e.g. radflow-detector/3 (name/version in the registry)
    run_id: str
    layer: str
    weights: str = ""  # sha256 of the weights: the cache's notion of "the same model"

    @property
    def cache_id(self) -> str:
        # Keyed by the weights, not the version label: a label can be reused (two workspaces,
        # a re-created registry), the weights cannot.
        blob = json.dumps([self.weights or self.model_version, self.layer, FEATURE_VERSION])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S) float32 in [0, 1] -> (N, C) float32, in fixed batches of EMBEDDING_BATCH."""
        out = []
        for start in range(0, len(images), EMBEDDING_BATCH):
            batch = images[start : start + EMBEDDING_BATCH]
            padded = np.zeros((EMBEDDING_BATCH, *batch.shape[1:], 1), np.float32)
            padded[: len(batch), ..., 0] = batch
            out.append(np.asarray(self.model(padded, training=False))[: len(batch)])
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(out).astype(np.float32)


def build_embedder(
    model: Any, input_size: int, *, model_version: str = "", run_id: str = ""
) -> Embedder:
    """The global-average-pooled deepest backbone feature map of `model` (see `backbone_layer`)."""
    import keras

    layer = backbone_layer(model, input_size)
    pooled = keras.layers.GlobalAveragePooling2D(name="radflow_embedding")(
        model.get_layer(layer).output
    )
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return Embedder(
        keras.Model(model.inputs[0], pooled), model_version, run_id, layer, digest.hexdigest()
    )


# --------------------------------------------------------------------------------------------
# Row caches


def feature_params_hash(params: ExtractFeaturesParams) -> str:
    """The params that change a row's radiomic values (not drift or embeddings), and the code version."""
    relevant = params.model_dump(mode="json", exclude={"drift", "embeddings"})
    relevant["version"] = FEATURE_VERSION
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _parquet(frame: pd.DataFrame, metadata: Mapping[str, str] | None = None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({f"radflow:{k}".encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


class RowCache:
    """Rows of numbers keyed by an image's preprocess cache key, one Parquet file per `cache_id`.

    Rows are numpy vectors under fixed column names (an embedding is a few hundred floats: dicts
    would cost ~10x the memory at 8,000 images). The file is read once and rewritten once per run
    (atomically), keeping old keys too: a switch back to an earlier data version finds them.
    Delete `.radflow/cache/` to reclaim the space."""

    def __init__(self, root: Path, cache_id: str) -> None:
        self.path = root / f"{cache_id}.parquet"
        self.columns: list[str] = []
        self.rows: dict[str, np.ndarray] = {}
        self.computed = 0  # rows computed this run (cached or not: a row without a key is not)
        self.dirty = False
        if self.path.is_file():
            try:
                frame = pd.read_parquet(self.path)
                keys = frame.pop("cache_key").astype(str)
                values = frame.to_numpy()
                self.columns = [str(c) for c in frame.columns]
                self.rows = dict(zip(keys, values, strict=True))
            except Exception:  # damaged or from an older layout: recompute rather than fail
                log.warning("extract_features: ignoring an unreadable cache %s", self.path)
                self.columns, self.rows = [], {}

    def get(self, key: str | None) -> np.ndarray | None:
        return None if key is None else self.rows.get(key)

    def put(self, key: str | None, columns: Sequence[str], values: np.ndarray) -> None:
        self.computed += 1
        if list(columns) != self.columns:
            # A cache is per params hash / model, so the names only change with code: start over.
            self.columns, self.rows = list(columns), {}
        if key is not None:
            self.rows[key] = values
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        frame = pd.DataFrame(np.stack(list(self.rows.values())), columns=self.columns)
        frame.insert(0, "cache_key", list(self.rows))
        write_bytes_atomic(self.path, _parquet(frame))


# --------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class FeatureStats:
    images: int
    computed: int  # radiomic rows computed (the rest came from the cache)
    embedded: int  # embedding rows computed by the model (the rest came from the cache)
    model_version: str  # "" when the table has no embeddings


@dataclass(frozen=True)
class FeaturesResult:
    table: pd.DataFrame
    embeddings: pd.DataFrame | None
    stats: FeatureStats


def _images(layout: Layout, manifest: pd.DataFrame) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(manifest row, [0, 1] float32 image) in the stage's order: split, shard, index."""
    for split in (*SPLITS, UNLABELLED):
        part = manifest[manifest["split"] == split]
        for shard, members in part.groupby("shard", sort=True):
            data = np.load(layout.shards / str(shard), mmap_mode="r")
            for row in members.sort_values("index").to_dict("records"):
                yield row, np.asarray(data[int(row["index"])], dtype=np.float32) / QUANT


def build_features(
    layout: Layout,
    params: ExtractFeaturesParams,
    progress: Callable[[int, int], None] | None = None,
    *,
    embedder: Embedder | None = None,
    cache_dir: Path | None = None,
    training: TrainingReference | None = None,
) -> FeaturesResult:
    """Stage edge, with what the run did: shards -> features.parquet (+ embeddings.parquet when an
    embedder is given), then reports/drift/ (see the module docstring)."""
    from pipeline_steps.core import drift

    manifest = pd.read_parquet(layout.manifest)
    cache_root = cache_dir or layout.features_cache
    keyed = "cache_key" in manifest.columns  # older manifests: no cache, everything is computed
    radiomic = RowCache(cache_root / "radiomic", feature_params_hash(params))
    embedding_cache = RowCache(cache_root / "embeddings", embedder.cache_id) if embedder else None

    ids: list[str] = []
    splits: list[str] = []
    values: list[np.ndarray] = []  # radiomic rows, in the stage's order
    columns: list[str] = radiomic.columns
    vectors: list[np.ndarray | None] = []  # embedding rows, None until the model has run
    pending: list[tuple[int, str | None, np.ndarray]] = []  # (row, key, image) awaiting the model
    embedder_failed = ""

    def flush() -> None:
        nonlocal embedder_failed
        if not pending or embedder is None or embedding_cache is None:
            return
        batch, pending[:] = list(pending), []
        if embedder_failed:
            return
        try:
            out = embedder(np.stack([image for _, _, image in batch]))
        except Exception as exc:  # an incompatible model must not cost the radiomic table
            embedder_failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            return
        names = [f"{EMBEDDING_PREFIX}{c:03d}" for c in range(out.shape[1])]
        for (index, key, _), vector in zip(batch, out, strict=True):
            vectors[index] = vector
            embedding_cache.put(key, names, vector)

    for done, (row, image) in enumerate(_images(layout, manifest), start=1):
        key = str(row["cache_key"]) if keyed else None
        cached = radiomic.get(key)
        if cached is None:
            feats = image_features(image, params, content_mask(row, image.shape[-1]))
            columns = list(feats)
            cached = np.array(list(feats.values()), dtype=np.float64)
            radiomic.put(key, columns, cached)
        values.append(cached)
        ids.append(str(row["image_id"]))
        splits.append(str(row["split"]))
        if embedding_cache is not None:
            vectors.append(embedding_cache.get(key))
            if vectors[-1] is None:
                pending.append((len(vectors) - 1, key, image))
                if len(pending) >= EMBEDDING_BATCH:
                    flush()
        if progress:
            progress(done, len(manifest))
    flush()

    columns = radiomic.columns or columns
    table = pd.DataFrame(
        np.stack(values) if values else np.zeros((0, len(columns))), columns=columns
    )
    table.insert(0, "split", splits)
    table.insert(0, "image_id", ids)
    write_bytes_atomic(layout.features, _parquet(table))
    radiomic.save()
    embeddings = None
    target = layout.embeddings
    filled = [v for v in vectors if v is not None]
    if len(filled) != len(vectors) and not embedder_failed:
        embedder_failed = "some images got no embedding"  # cannot happen: every batch is flushed
    if embedder is not None and embedding_cache is not None and not embedder_failed:
        embedding_cache.save()
        width = len(embedding_cache.columns)
        embeddings = pd.DataFrame(
            np.stack(filled).astype(np.float32) if filled else np.zeros((0, width), np.float32),
            columns=embedding_cache.columns,
        )
        embeddings.insert(0, "model_version", embedder.model_version)
        embeddings.insert(0, "split", splits)
        embeddings.insert(0, "image_id", ids)
        meta = {"model_version": embedder.model_version, "run_id": embedder.run_id}
        write_bytes_atomic(target, _parquet(embeddings, meta | {"layer": embedder.layer}))
        log.info(
            "extract_features: embeddings of %d images from %s (layer %s, %d computed) -> %s",
            len(embeddings),
            embedder.model_version,
            embedder.layer,
            embedding_cache.computed,
            target,
        )
    else:
        target.unlink(missing_ok=True)  # never leave embeddings of another model or image set
        if embedder_failed:
            log.warning(
                "extract_features: no embeddings: the champion %s could not embed the images (%s)",
                embedder.model_version if embedder else "?",
                embedder_failed,
            )
    drift.run(layout, params.drift, table, embeddings, training)
    stats = FeatureStats(
        images=len(table),
        computed=radiomic.computed,
        embedded=embedding_cache.computed if embedding_cache is not None else 0,
        model_version=embedder.model_version if embeddings is not None and embedder else "",
    )
    log.info(
        "extract_features: %d images, %d radiomic rows computed, %d from cache",
        stats.images,
        stats.computed,
        stats.images - stats.computed,
    )
    return FeaturesResult(table, embeddings, stats)


def run(
    layout: Layout,
    params: ExtractFeaturesParams,
    progress: Callable[[int, int], None] | None = None,
    *,
    embedder: Embedder | None = None,
    training: TrainingReference | None = None,
) -> pd.DataFrame:
    """Stage edge: shards -> data/features/features.parquet (and embeddings.parquet when `embedder`,
    the champion's backbone, is given), then reports/drift/ against the reference (the configured
    table, else `training`: the production model's training images). Returns the radiomic table.
    Without an embedder, any previous embeddings file is removed."""
    if embedder is None:
        log.info("extract_features: no embeddings (no champion model was given)")
    return build_features(layout, params, progress, embedder=embedder, training=training).table
