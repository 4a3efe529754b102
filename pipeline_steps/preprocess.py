"""Stage `preprocess`: DICOM pixels to letterboxed model input, patient-level splits, and streamable shards.

The stage is incremental (a per-image cache keyed by content hash and pixel params), parallel (a process
pool or a Dask cluster, both behind `concurrent.futures.Executor`) and streamed (bounded work in flight,
shards written image by image). Its output bytes depend only on the data and the params.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline_steps.core.config import PreprocessParams, SplitParams
from pipeline_steps.core.dicom_io import read_image
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import write_bytes_atomic
from pipeline_steps.core.labels import NO_FINDING
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.parallel import Crash, map_resilient, open_runner
from pipeline_steps.core.shards import (
    MANIFEST_COLUMNS,
    SPLITS,
    UNLABELLED,
    shard_bytes,
    write_shard,
)
from pipeline_steps.core.transforms import (
    Geometry,
    plan_geometry,
    preprocess_image,
    transform_boxes,
)

log = logging.getLogger(__name__)
# Bump when the reader or the transforms below change the pixels they produce: it retires the cache.
PIXEL_VERSION = "1"
MAX_SPACING_MM = 5.0


def assign_split(patient_pseudonym: str, params: SplitParams) -> str:
    """Patient-level split from a salted hash of the pseudonym alone.

    Why stateless, and what that costs in stratification:
    - Stable: a patient's split depends on nothing but their pseudonym and the salt, so new patients,
      or new images of a known patient, never move anyone. Same data and params, same split,
      whichever machine or ingest order produced the workspace.
    - Stratified only in expectation. The rule is the same in the positive and the negative stratum,
      so each stratum is split at the target fractions on average, with binomial spread
      (sd = sqrt(p(1-p)/n) per stratum). The tempting fix, a hash or threshold that depends on the
      patient's positivity, is NOT stable: a later positive image flips the patient's stratum and
      moves them. Exact per-stratum counts (ranking patients within a stratum) are not stable
      either: every arrival shifts the ranks. Exact balance is only possible with state (a frozen
      registry of patient -> split, new patients assigned to the neediest split), which makes the
      split depend on ingest history, so two workspaces with the same data could disagree.
    - So imbalance is measured instead (`split_balance`, in data/processed/report.json) and a
      split beyond `balance_z` standard errors is warned about. Changing `salt` re-splits everyone.
    """
    digest = hashlib.sha256(f"{params.salt}:{patient_pseudonym}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < params.test_fraction:
        return "test"
    if u < params.test_fraction + params.val_fraction:
        return "val"
    return "train"


def split_balance(manifest: pd.DataFrame, params: SplitParams) -> dict[str, Any]:
    """Per split: images, patients, positive patients, and the z-score of the positive rate vs overall."""
    labelled = manifest[manifest["split"].isin(SPLITS)]
    patients = labelled.groupby("patient_pseudonym").agg(
        split=("split", "first"), positive=("positive", "any")
    )
    overall = float(patients["positive"].mean()) if len(patients) else 0.0
    out: dict[str, Any] = {"positive_rate": round(overall, 6), "splits": {}, "imbalanced": []}
    for split in SPLITS:
        members = patients[patients["split"] == split]
        n = len(members)
        rate = float(members["positive"].mean()) if n else 0.0
        se = (overall * (1 - overall) / n) ** 0.5 if n else 0.0
        z = (rate - overall) / se if se > 0 else 0.0
        out["splits"][split] = {
            "images": int((labelled["split"] == split).sum()),
            "patients": n,
            "positive_patients": int(members["positive"].sum()),
            "positive_rate": round(rate, 6),
            "z": round(z, 3),
        }
        if abs(z) > params.balance_z:
            out["imbalanced"].append(split)
    return out


# --------------------------------------------------------------------------------------------
# Per-image work and its cache


@dataclass(frozen=True)
class PixelJob:
    """What a worker needs to turn one file into model input: small and picklable (no DataFrames)."""

    key: str
    path: str
    spacing_row_mm: float
    spacing_col_mm: float
    rows: int
    cols: int


@dataclass(frozen=True)
class Outcome:
    """A worker's answer: the uint16 image, or why the file gave none (a property of the file)."""

    pixels: np.ndarray | None
    reason: str = ""  # decode_failed | shape_mismatch
    message: str = ""


def process_file(job: PixelJob, params: PreprocessParams) -> Outcome:
    """Worker: one DICOM file -> its model input. File problems come back as an Outcome, never raise."""
    try:
        image = read_image(Path(job.path), default_spacing_mm=job.spacing_row_mm, hash_pixels=False)
    except DataError as exc:
        return Outcome(None, "decode_failed", str(exc))
    if image.pixels.shape != (job.rows, job.cols):
        return Outcome(
            None,
            "shape_mismatch",
            f"{Path(job.path).name}: decoded {image.pixels.shape}, metadata says "
            f"{job.rows}x{job.cols}; re-run `validate`",
        )
    geometry = plan_geometry(
        job.rows,
        job.cols,
        job.spacing_row_mm,
        job.spacing_col_mm,
        params.input_size,
        params.target_spacing_mm,
    )
    return Outcome(preprocess_image(image, geometry, params))


def pixel_params_hash(params: PreprocessParams) -> str:
    """The params that change pixels (not workers, shards or splits), with the code's pixel version."""
    relevant = {
        "version": PIXEL_VERSION,
        "input_size": params.input_size,
        "target_spacing_mm": params.target_spacing_mm,
        "window": params.window,
        "percentiles": list(params.percentiles),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(
    content_hash: str,
    file_size: int,
    spacing_mm: tuple[float, float],
    shape: tuple[int, int],
    params_hash: str,
) -> str:
    """Key of one image's result. The content hash is trusted (ingest names files by it and DVC checks
    it); the size is a free guard against a file changed in place. Spacing is included because a
    flagged file takes the `ingest.default_spacing_mm`, which is not in the file."""
    blob = json.dumps([content_hash, file_size, list(spacing_mm), list(shape), params_hash])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def decoder_fingerprint() -> str:
    """Versions of the pixel decoders: a cached decode failure is retried when they change."""
    from importlib import metadata

    names = (
        "pydicom",
        "pylibjpeg",
        "pylibjpeg-libjpeg",
        "pylibjpeg-openjpeg",
        "pylibjpeg-rle",
        "python-gdcm",
        "pillow",
    )
    versions = []
    for name in names:
        try:
            versions.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=-")
    return hashlib.sha256(",".join(versions).encode()).hexdigest()[:12]


class PixelCache:
    """Per-image results: `<root>/<key[:2]>/<key>.npy`, decode failures as `<key>.<decoders>.fail.json`.

    Entries are written once, atomically, by the parent process only; a crash leaves no partial file.
    Old entries are never deleted here (a params change orphans them): delete the directory to reclaim.
    """

    def __init__(self, root: Path, decoders: str) -> None:
        self.root = root
        self.decoders = decoders

    def _dir(self, key: str) -> Path:
        return self.root / key[:2]

    def has(self, key: str) -> bool:
        return (self._dir(key) / f"{key}.npy").is_file()

    def failure(self, key: str) -> dict[str, str] | None:
        path = self._dir(key) / f"{key}.{self.decoders}.fail.json"
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return {"reason": str(entry["reason"]), "message": str(entry["message"])}

    def load(self, key: str, size: int) -> np.ndarray | None:
        """The cached image, or None when it is missing or not a (size, size) uint16 array."""
        try:
            array = np.load(self._dir(key) / f"{key}.npy", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if array.dtype != np.uint16 or array.shape != (size, size):
            return None
        return array

    def store(self, key: str, outcome: Outcome) -> None:
        folder = self._dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        if outcome.pixels is not None:
            buffer = io.BytesIO()
            np.save(buffer, outcome.pixels, allow_pickle=False)
            write_bytes_atomic(folder / f"{key}.npy", buffer.getvalue())
        else:
            entry = {"reason": outcome.reason, "message": outcome.message}
            write_bytes_atomic(
                folder / f"{key}.{self.decoders}.fail.json", json.dumps(entry).encode()
            )


# --------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class RunStats:
    """What a run did (not part of the output: a fresh and an incremental run differ only here)."""

    images: int
    cache_hits: int
    cached_failures: int
    decoded: int  # images sent to a worker (cache misses)
    failed: int
    crashed: int
    shards_written: int
    shards_kept: int
    runner: str


@dataclass(frozen=True)
class PreprocessResult:
    manifest: pd.DataFrame
    stats: RunStats


@dataclass(frozen=True)
class _Planned:
    job: PixelJob
    row: Mapping[str, Any]
    geometry: Geometry


def _plan(
    layout: Layout, metadata: pd.DataFrame, params: PreprocessParams
) -> tuple[list[_Planned], list[dict[str, str]]]:
    """A job per image (no pixels read), and the images refused before decoding."""
    params_hash = pixel_params_hash(params)
    planned: list[_Planned] = []
    refused: list[dict[str, str]] = []
    for row in metadata.to_dict("records"):
        path = layout.raw / str(row["file"])
        sp_row, sp_col = float(row["spacing_row_mm"]), float(row["spacing_col_mm"])
        if not (0.0 < sp_row <= MAX_SPACING_MM and 0.0 < sp_col <= MAX_SPACING_MM):
            # validate falls back to a flagged default; a table that still holds one is not used.
            refused.append(
                {
                    "image_id": str(row["image_id"]),
                    "reason": "bad_spacing",
                    "message": f"{row['file']}: spacing {sp_row} x {sp_col} mm is outside "
                    f"(0, {MAX_SPACING_MM}]; re-run `validate`",
                }
            )
            continue
        try:
            size = path.stat().st_size
        except OSError:
            refused.append(
                {
                    "image_id": str(row["image_id"]),
                    "reason": "missing_file",
                    "message": f"{row['file']}: not found under {layout.raw}; re-run `validate`",
                }
            )
            continue
        rows, cols = int(row["rows"]), int(row["columns"])
        key = cache_key(str(row["content_hash"]), size, (sp_row, sp_col), (rows, cols), params_hash)
        geometry = plan_geometry(
            rows, cols, sp_row, sp_col, params.input_size, params.target_spacing_mm
        )
        planned.append(
            _Planned(PixelJob(key, str(path), sp_row, sp_col, rows, cols), row, geometry)
        )
    return planned, refused


def _previous_shards(layout: Layout) -> dict[str, list[str]]:
    """Shard name -> cache keys in order, from the last manifest (if it recorded them)."""
    try:
        old = pd.read_parquet(layout.manifest, columns=["shard", "index", "cache_key"])
    except Exception:  # absent, or written by an older version without cache keys
        return {}
    return {
        str(shard): group.sort_values("index")["cache_key"].astype(str).tolist()
        for shard, group in old.groupby("shard")
    }


def build_processed(
    layout: Layout,
    params: PreprocessParams,
    progress: Callable[[int, int], None] | None = None,
    *,
    cache_dir: Path | None = None,
) -> PreprocessResult:
    """Stage edge, with what the run did: metadata + labels -> data/processed (see `run`)."""
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
    cache = PixelCache(
        cache_dir or layout.preprocess_cache,
        decoder_fingerprint(),
    )

    planned, failures = _plan(layout, metadata, params)
    total = len(metadata)
    done = len(failures)
    ok: set[str] = set()
    misses: list[PixelJob] = []
    # Identical content under two ids (possible when files are not named by their hash) is
    # decoded once and reported for each id.
    ids_by_key: dict[str, list[str]] = {}
    for item in planned:
        ids_by_key.setdefault(item.job.key, []).append(str(item.row["image_id"]))
    jobs = {item.job.key: item.job for item in planned}
    hits = cached_failures = 0
    for key, ids in ids_by_key.items():
        if cache.has(key):
            ok.add(key)
            hits += len(ids)
            continue
        known = cache.failure(key)
        if known is None:
            misses.append(jobs[key])
            continue
        cached_failures += len(ids)
        failures.extend({"image_id": image_id, **known} for image_id in ids)
    done += hits + cached_failures
    if progress:
        progress(done, total)

    crashed = failed = 0
    with open_runner(params, len(misses)) as runner:
        if misses:
            log.info("preprocess: %d of %d images to decode (%s)", len(misses), total, runner.name)
        work = functools.partial(process_file, params=params)
        for index, outcome in map_resilient(
            work, misses, runner.make_executor, runner.slots, attempts=1 + params.retries
        ):
            job = misses[index]
            ids = ids_by_key[job.key]
            if isinstance(outcome, Crash):
                # Not cached: a crash may be the machine's fault, so the next run tries again.
                crashed += len(ids)
                failures.extend(
                    {"image_id": i, "reason": "worker_crashed", "message": outcome.message}
                    for i in ids
                )
            else:
                cache.store(job.key, outcome)
                if outcome.pixels is None:
                    failed += len(ids)
                    failures.extend(
                        {"image_id": i, "reason": outcome.reason, "message": outcome.message}
                        for i in ids
                    )
                else:
                    ok.add(job.key)
            done += len(ids)
            if progress:
                progress(done, total)

    # Shards: per split in image_id order, successes only, `shard_size` to a file.
    manifest_rows: list[dict[str, Any]] = []
    shard_plan: dict[str, list[_Planned]] = {}
    for split in (*SPLITS, UNLABELLED):
        members = [item for item in planned if item.row["split"] == split and item.job.key in ok]
        for shard_no, start in enumerate(range(0, len(members), params.shard_size)):
            name = f"{split}-{shard_no:04d}.npy"
            shard_plan[name] = members[start : start + params.shard_size]
            for index, item in enumerate(shard_plan[name]):
                row = item.row
                manifest_rows.append(
                    {
                        "image_id": str(row["image_id"]),
                        "content_hash": str(row["content_hash"]),
                        "patient_pseudonym": str(row["patient_pseudonym"]),
                        "split": split,
                        "positive": row["image_id"] in positive,
                        "shard": name,
                        "index": index,
                        **{k: v for k, v in asdict(item.geometry).items() if k != "size"},
                        "spacing_source": str(row.get("spacing_source", "")),
                        "spacing_flagged": bool(row.get("spacing_flagged", False)),
                        "cache_key": item.job.key,
                    }
                )

    previous = _previous_shards(layout)
    shards_dir = layout.shards
    shards_dir.mkdir(parents=True, exist_ok=True)
    # The old manifest describes the old shards; it goes before any shard changes, so an
    # interrupted run can never leave a manifest that vouches for a shard it does not describe.
    layout.manifest.unlink(missing_ok=True)
    for stale in shards_dir.iterdir():
        if stale.name not in shard_plan:
            stale.unlink()
    size = params.input_size
    written = kept = 0
    for name, members in shard_plan.items():
        keys = [item.job.key for item in members]
        path = shards_dir / name
        if (
            previous.get(name) == keys
            and path.is_file()
            and path.stat().st_size == shard_bytes(len(keys), size)
        ):
            kept += 1
            continue
        write_shard(path, (_cached_image(cache, item, params) for item in members), len(keys), size)
        written += 1

    manifest = pd.DataFrame(manifest_rows, columns=MANIFEST_COLUMNS)
    boxes, clipped = transform_boxes(labels, manifest, size)
    failures.sort(key=lambda f: (f["image_id"], f["reason"]))
    flagged = metadata[metadata["image_id"].isin(set(manifest["image_id"]))]
    flagged = (
        flagged[flagged["spacing_flagged"].astype(bool)]
        if "spacing_flagged" in flagged
        else flagged.iloc[:0]
    )
    report = {
        "images": total,
        "written": len(manifest),
        "failures_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "spacing_flagged": [
            {
                "image_id": str(r["image_id"]),
                "spacing_source": str(r.get("spacing_source", "")),
                "spacing_mm": [float(r["spacing_row_mm"]), float(r["spacing_col_mm"])],
            }
            for r in flagged.to_dict("records")
        ],
        "boxes_clipped": clipped,
        "split_balance": split_balance(manifest, params.split),
    }

    write_bytes_atomic(layout.boxes, _parquet(boxes))
    write_bytes_atomic(layout.preprocess_failures, json.dumps(failures, indent=2).encode())
    write_bytes_atomic(layout.preprocess_report, json.dumps(report, indent=2).encode())
    write_bytes_atomic(layout.manifest, _parquet(manifest))  # last: it vouches for the shards

    stats = RunStats(
        images=total,
        cache_hits=hits,
        cached_failures=cached_failures,
        decoded=len(misses),
        failed=failed,
        crashed=crashed,
        shards_written=written,
        shards_kept=kept,
        runner=runner.name,
    )
    _log_outcome(stats, failures, report)
    return PreprocessResult(manifest, stats)


def _cached_image(cache: PixelCache, item: _Planned, params: PreprocessParams) -> np.ndarray:
    image = cache.load(item.job.key, params.input_size)
    if image is None:
        # Deleted or damaged since it was planned: recompute here rather than fail the stage.
        outcome = process_file(item.job, params)
        if outcome.pixels is None:
            raise DataError(f"{item.job.path}: {outcome.message} (it decoded earlier in this run)")
        cache.store(item.job.key, outcome)
        image = outcome.pixels
    return image


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _log_outcome(stats: RunStats, failures: list[dict[str, str]], report: dict[str, Any]) -> None:
    log.info(
        "preprocess: %d images, %d from cache, %d decoded (%s), %d shards written, %d kept",
        stats.images,
        stats.cache_hits,
        stats.decoded,
        stats.runner,
        stats.shards_written,
        stats.shards_kept,
    )
    for failure in failures:
        log.warning(
            "preprocess: %s left out (%s): %s",
            failure["image_id"],
            failure["reason"],
            failure["message"],
        )
    if report["spacing_flagged"]:
        log.warning(
            "preprocess: %d image(s) use a fallback pixel spacing (see data/processed/report.json)",
            len(report["spacing_flagged"]),
        )
    if report["boxes_clipped"]:
        log.warning(
            "preprocess: %d box(es) left their image and were clipped or dropped "
            "(see data/processed/report.json)",
            len(report["boxes_clipped"]),
        )
    for split in report["split_balance"]["imbalanced"]:
        log.warning(
            "preprocess: split %s has a positive rate %s standard errors from the overall rate",
            split,
            report["split_balance"]["splits"][split]["z"],
        )


def run(
    layout: Layout,
    params: PreprocessParams,
    progress: Callable[[int, int], None] | None = None,
    *,
    cache_dir: Path | None = None,
) -> pd.DataFrame:
    """Stage edge: metadata + labels -> shards, manifest, boxes, failures.json and report.json under
    data/processed. Returns the manifest. Per-image results are cached under `cache_dir` (default
    `.radflow/cache/preprocess`), so only new or changed images are decoded."""
    return build_processed(layout, params, progress, cache_dir=cache_dir).manifest
