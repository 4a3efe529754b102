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
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from pipeline_steps.core.config import PreprocessParams, SplitParams
from pipeline_steps.core.dicom_io import DicomImage, read_image
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.layout import Layout
from pipeline_steps.ingest import NO_FINDING

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"
QUANT = 65535.0  # shards store [0, 1] as uint16: half the bytes of float32, far below the detector's noise
# Bump when the reader or the transforms below change the pixels they produce: it retires the cache.
PIXEL_VERSION = "1"
MAX_SPACING_MM = 5.0
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
# Starting worker processes costs ~1-2 s of imports (spawn), the work of ~100 images here; fewer
# misses than this run in-process, which is what keeps a 1%-new re-run cheap.
POOL_MIN_JOBS = 64


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


def preprocess_image(image: DicomImage, geometry: Geometry, params: PreprocessParams) -> np.ndarray:
    """One decoded image to its uint16 model input."""
    display = DisplayWindow(params.window, params.percentiles)(image)
    boxed = Letterbox(geometry)(display)
    np.clip(boxed, 0.0, 1.0, out=boxed)
    boxed *= np.float32(QUANT)
    return np.rint(boxed).astype(np.uint16)


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


@dataclass(frozen=True)
class Crash:
    """A job whose worker raised or died on every attempt (a property of the run, not the file)."""

    message: str


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
            _write_atomic(folder / f"{key}.npy", buffer.getvalue())
        else:
            entry = {"reason": outcome.reason, "message": outcome.message}
            _write_atomic(folder / f"{key}.{self.decoders}.fail.json", json.dumps(entry).encode())


# --------------------------------------------------------------------------------------------
# Running jobs: inline, on a process pool, or on Dask, with crash retries

T = TypeVar("T")
R = TypeVar("R")


class InlineExecutor(Executor):
    """Runs each call at submit time, in this process: the 1-worker runner, with no pickling."""

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        future: Future[R] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def map_resilient(
    fn: Callable[[T], R],
    items: Sequence[T],
    make_executor: Callable[[], Executor],
    slots: int,
    attempts: int = 2,
) -> Iterator[tuple[int, R | Crash]]:
    """Yield (index, fn(item)) as results arrive, with at most `slots` calls in flight.

    A call that raises, or whose worker dies, is retried later on its own, so a crash is pinned on
    the item that causes it rather than on the items that shared the pool; after `attempts` tries
    it comes back as a Crash. A broken process pool is replaced; finished results are never lost.
    """
    pending = deque(range(len(items)))
    suspects: deque[int] = deque()
    tries: Counter[int] = Counter()
    in_flight: dict[Future[R], int] = {}
    executor = make_executor()
    try:
        while pending or suspects or in_flight:
            while pending and len(in_flight) < slots:
                i = pending.popleft()
                in_flight[executor.submit(fn, items[i])] = i
            if not in_flight:
                i = suspects.popleft()  # alone: if the pool breaks now, this item broke it
                in_flight[executor.submit(fn, items[i])] = i
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                i = in_flight.pop(future)
                tries[i] += 1
                try:
                    result = future.result()
                except Exception as exc:
                    broken = broken or isinstance(exc, BrokenProcessPool)
                    if tries[i] >= attempts:
                        yield i, Crash(_describe(exc))
                    else:
                        suspects.append(i)
                    continue
                yield i, result
            if broken:
                # The other calls on the dead pool fail too (unless they had just finished):
                # they go back as suspects, to be run alone.
                for future, i in list(in_flight.items()):
                    if future.exception() is None:
                        yield i, future.result()
                        continue
                    tries[i] += 1
                    if tries[i] >= attempts:
                        yield i, Crash("the worker process died while it ran this image")
                    else:
                        suspects.append(i)
                in_flight.clear()
                _close(executor, cancel=True)
                executor = make_executor()
        _close(executor, cancel=False)
    except BaseException:
        _close(executor, cancel=True)
        raise


def _close(executor: Executor, cancel: bool) -> None:
    if isinstance(executor, ProcessPoolExecutor):
        executor.shutdown(wait=not cancel, cancel_futures=cancel)
    else:  # distributed's ClientExecutor has no cancel_futures: wait=False cancels
        executor.shutdown(wait=not cancel)


@dataclass(frozen=True)
class Runner:
    name: str
    make_executor: Callable[[], Executor]
    slots: int


def worker_count(params: PreprocessParams) -> int:
    if params.workers:
        return params.workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def open_runner(params: PreprocessParams, jobs: int) -> Iterator[Runner]:
    """Dask when a scheduler address is configured, else a pool of worker processes, else (too few
    jobs to pay for starting processes) this process."""
    address = params.dask_address or os.environ.get("DASK_SCHEDULER_ADDRESS", "")
    if address and jobs:
        from distributed import Client

        client = Client(address, set_as_default=False)
        try:
            threads = max(1, sum(client.nthreads().values()))
            # pure=False: a retried job must run again, not return the cached failed future.
            yield Runner(f"dask {address}", lambda: client.get_executor(pure=False), 2 * threads)
        finally:
            client.close()
        return
    workers = worker_count(params)
    if jobs < POOL_MIN_JOBS:
        yield Runner("inline", InlineExecutor, 1)
        return
    # spawn, not fork: the caller may hold threads (Prefect), and forking those can deadlock.
    # One worker is a process too: it gets the tuned allocator, and the caller's process keeps its own.
    context = multiprocessing.get_context("spawn")
    yield Runner(
        f"processes x{workers}",
        lambda: ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=tune_allocator
        ),
        4 * workers,
    )


def tune_allocator() -> None:
    """Keep freed image buffers in a worker's heap instead of handing them back to the kernel.

    Each image allocates short-lived arrays of 2-8 MB. With glibc's defaults those are mmap'd and
    unmapped per image, so every image page-faults its buffers in again; on the 2-vCPU VMs here that
    made two workers together slower than one tuned worker (page faults scale badly across vCPUs).
    Measured on 300 synthetic 1024^2 images: one process 85-99 -> 117-121 img/s; two side by side
    90 -> 193 img/s in total. Only worker processes radflow starts are tuned (not Dask's, not the
    caller's process)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's maximum on 64-bit
    mallopt(m_trim_threshold, 512 * 2**20)


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
    tmp = path.with_name(f".{path.name}.tmp")
    written = 0
    with tmp.open("wb") as fh:
        fh.write(_npy_header((count, size, size)))
        for image in images:
            fh.write(np.ascontiguousarray(image, dtype=np.uint16).tobytes())
            written += 1
    if written != count:
        tmp.unlink()
        raise ValueError(f"{path.name}: {written} images written, {count} declared")
    os.replace(tmp, path)


def shard_bytes(count: int, size: int) -> int:
    return len(_npy_header((count, size, size))) + count * size * size * 2


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
        cache_dir or layout.state / "cache" / "preprocess",
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
    shards_dir = layout.processed / "shards"
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

    _write_atomic(layout.boxes, _parquet(boxes))
    _write_atomic(layout.processed / "failures.json", json.dumps(failures, indent=2).encode())
    _write_atomic(layout.processed / "report.json", json.dumps(report, indent=2).encode())
    _write_atomic(layout.manifest, _parquet(manifest))  # last: it vouches for the shards

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
