"""Batch prediction (`radflow predict`, Prefect flow `batch_prediction`): a registered model over a
folder of DICOMs, one JSON line per image, every prediction in the audit ledger before it is written.

The model is resolved in the registry (a stage's alias or a version number) and loaded from MLflow;
reading, screening and inference are `pipeline_steps/serving/prediction.py`, i.e. the training
code's own reader and transforms. Per chunk: predict, append to the ledger (one transaction), then
write the lines; the JSONL file appears under its name only when the whole batch is done.

Prefect's database keeps every flow run's parameters, and a path may name a patient: the flow's
parameters are a job id, the number of images and the options, never a path. The paths (inputs,
outputs, workspace) stay in this process, in the `BatchJob` the flow is built around.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prefect import Flow, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.anchoring import open_ledger
from flows.registry import open_registry
from flows.review_store import keep_predicted
from flows.tracking import load_pyfunc
from flows.versioning import code_version
from flows.workspace import open_workspace
from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import atomic_path
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance.ledger import Ledger
from pipeline_steps.governance.lifecycle import (
    LIFECYCLE_ALIASES,
    TransitionError,
    lifecycle_of,
    parse_lifecycle,
)
from pipeline_steps.governance.signing import SignatureError
from pipeline_steps.serving.prediction import (
    PREDICTION,
    ModelRef,
    Provenance,
    ledger_payload,
    new_prediction_id,
    predict_batch,
)
from pipeline_steps.serving.serving import ServingConfig

log = logging.getLogger("radflow")

CHUNK = 32  # images read, predicted and ledgered together


@dataclass(frozen=True)
class LoadedModel:
    """A registered version, loaded: the Keras detector, its serving config and where it came from."""

    detector: Any  # keras.Model
    config: ServingConfig
    ref: ModelRef
    data_version: str


def _stage_alias(stage: str) -> str:
    return LIFECYCLE_ALIASES[parse_lifecycle(stage)][0]


def resolve_version(
    layout: Layout, params: Params, *, stage: str | None = None, version: str | None = None
) -> tuple[ModelRef, str]:
    """(model reference, data version) of `--version N`, or of the version holding `--stage`
    (production by default). Raises TransitionError when nothing holds the stage."""
    if stage and version:
        raise DataError("give either a stage or a version, not both")
    registry = open_registry(layout, params.register_.model_name)
    aliases = registry.aliases()
    if version is None:
        alias = _stage_alias(stage or "production")
        if alias not in aliases:
            raise TransitionError(
                f"no version of {registry.model_name} is in {parse_lifecycle(stage or 'production')}; "
                "promote one (`radflow promote VERSION --to production`) or pass --version N"
            )
        version = aliases[alias]
    info = registry.version(str(version))
    held = parse_lifecycle(stage) if stage else lifecycle_of(info.version, aliases)
    ref = ModelRef(registry.model_name, info.version, held, info.run_id)
    return ref, info.tags.get("data_version", "")


def load_model(
    layout: Layout, params: Params, *, stage: str | None = None, version: str | None = None
) -> LoadedModel:
    """Resolve and load a registered version (its pyfunc's Keras detector and serving config)."""
    ref, data_version = resolve_version(layout, params, stage=stage, version=version)
    pyfunc = load_pyfunc(layout, ref.name, ref.version)  # a TrackingError says why it cannot
    try:
        model = pyfunc.unwrap_python_model()
        detector, config = model.detector, model.config
    except Exception:  # not a PythonModel, or one without the detector: not radflow's
        raise DataError(
            f"{ref.name} version {ref.version} is not a radflow DICOM model (registered before the "
            "pyfunc existed?); predict with a newer version"
        ) from None
    return LoadedModel(detector, config, ref, data_version)


def list_inputs(source: Path) -> list[Path]:
    """A file, or every non-hidden file under a folder (DICOMs often have no extension), sorted."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    found = sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
    )
    if not found:
        raise DataError(f"{source}: the folder holds no files")
    return found


# --------------------------------------------------------------------------------------------
# Delivery: ledger first, then the caller's outputs


@contextmanager
def jsonl_sink(out: Path) -> Iterator[IO[str]]:
    """Lines go to a hidden temporary file beside `out`, renamed to `out` only when the batch
    finished; a failed batch leaves no file under that name."""
    with atomic_path(out) as partial, partial.open("w", encoding="utf-8") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def record_predictions(ledger: Ledger, records: Sequence[dict[str, Any]]) -> int:
    """Append the records to the ledger in one transaction; returns the last row's seq."""
    with ledger.writing() as writer:
        for record in records:
            entry = writer.append(PREDICTION, record["prediction_id"], ledger_payload(record))
    return entry.seq


def write_reports(
    records: Sequence[dict[str, Any]], paths: Sequence[Path], model: ModelRef, sr_out: Path
) -> int:
    """One DICOM SR per predicted image into the caller's folder; returns how many were written."""
    from pipeline_steps.serving.sr import write_sr

    written = 0
    for record, path in zip(records, paths, strict=True):
        if "error" in record:
            continue
        write_sr(
            path,
            record["boxes"],
            prediction_id=record["prediction_id"],
            model_name=model.name,
            model_version=model.version,
            out_dir=sr_out,
        )
        written += 1
    return written


# --------------------------------------------------------------------------------------------
# The flow


@dataclass(frozen=True)
class BatchJob:
    """What one `radflow predict` reads and writes. Kept out of the flow's parameters (Prefect stores
    them in its database) because a path may name a patient."""

    workspace: Path
    files: tuple[Path, ...]
    out: Path
    sr_out: Path | None


@dataclass(frozen=True)
class BatchSummary:
    job: str  # the flow run's `job` parameter
    out: str
    images: int
    predicted: int
    failed: int
    boxes: int
    reports: int
    model: dict[str, Any]
    ledger_rows: tuple[int, int] | None  # first and last seq written
    seconds: float  # reading, predicting, recording and writing (model loading excluded)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, ledger_rows=list(self.ledger_rows) if self.ledger_rows else None)


def _progress_logger(total: int) -> Callable[[int], None]:
    logger = get_run_logger()
    marks: set[int] = set()

    def report(done: int) -> None:
        decile = done * 10 // max(total, 1)
        if decile not in marks:
            marks.add(decile)
            logger.info("batch_prediction: %d/%d images", done, total)

    return report


def _retry_unless_refused(_task: Any, _run: Any, state: Any) -> bool:
    """Retry a load that MLflow or the network failed, not one refused for its signature: the same
    files fail the same way, and each try would download them again."""
    return not isinstance(getattr(state, "data", None), SignatureError)


load_model_task = task(
    name="load_model",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_unless_refused,
)(load_model)
# No retries below: a chunk's ledger rows commit before its lines are written, and a retry would
# record the same images again under new ids.
predict_task = task(name="predict", cache_policy=NO_CACHE)(predict_batch)
record_task = task(name="record_predictions", cache_policy=NO_CACHE)(record_predictions)


def batch_prediction(
    workspace: str,
    source: str,
    out: str,
    stage: str | None = None,
    version: str | None = None,
    threshold: float | None = None,
    sr_out: str | None = None,
    progress_bar: bool = False,
) -> dict[str, Any]:
    """Run the Prefect flow `batch_prediction` over `source` (a file, or every file under a folder;
    records name each image by the path as given). Its parameters are a job id, the number of
    images and the options; the paths reach it only inside this process."""
    job = BatchJob(
        Path(workspace),
        tuple(list_inputs(Path(source))),
        Path(out),
        Path(sr_out) if sr_out else None,
    )
    return batch_flow(job)(
        job=new_prediction_id(),
        images=len(job.files),
        stage=stage,
        version=version,
        threshold=threshold,
        sr_out=job.sr_out is not None,
        progress_bar=progress_bar,
    )


def batch_flow(batch: BatchJob) -> Flow[..., dict[str, Any]]:
    """The flow `batch_prediction` over `batch`, which it holds rather than takes as parameters."""

    def run(
        job: str,
        images: int,
        stage: str | None = None,
        version: str | None = None,
        threshold: float | None = None,
        sr_out: bool = False,
        progress_bar: bool = False,
    ) -> dict[str, Any]:
        if images != len(batch.files) or sr_out != (batch.sr_out is not None):
            raise DataError(f"batch_prediction {job}: the parameters do not describe its job")
        return _predict_files(batch, job, stage, version, threshold, progress_bar)

    return flow(name="batch_prediction", log_prints=True)(run)


def _predict_files(
    batch: BatchJob,
    job: str,
    stage: str | None,
    version: str | None,
    threshold: float | None,
    progress_bar: bool,
) -> dict[str, Any]:
    from pipeline_steps.core.deid import pseudonym_key

    key = pseudonym_key().secret  # first: without a usable key nothing is loaded or written
    layout, params = open_workspace(batch.workspace)
    files = list(batch.files)
    model = load_model_task(layout, params, stage=stage, version=version)
    cutoff = model.config.detection.score_threshold if threshold is None else float(threshold)
    provenance = Provenance(model.ref, model.data_version, code_version())
    logger = get_run_logger()
    logger.info(
        "batch_prediction %s: %d file(s) with %s version %s (%s), threshold %.3f",
        job,
        len(files),
        model.ref.name,
        model.ref.version,
        model.ref.stage or "no stage",
        cutoff,
    )
    report = _progress_logger(len(files))
    bar = _tqdm(len(files)) if progress_bar else None
    predicted = failed = boxes = reports = 0
    first = last = None
    started = time.monotonic()
    with open_ledger(layout.root) as ledger, jsonl_sink(batch.out) as sink:
        for start in range(0, len(files), CHUNK):
            chunk = files[start : start + CHUNK]
            records = predict_task(
                model.detector,
                [(str(p), p) for p in chunk],
                model.config,
                params.ingest,
                provenance,
                threshold=cutoff,
                key=key,
            )
            seq = record_task(ledger, records)
            keep_predicted(layout, params.review, records, chunk)  # for review; never fails
            first = first or seq - len(records) + 1
            last = seq
            for record in records:
                sink.write(json.dumps(record, sort_keys=True) + "\n")
            if batch.sr_out is not None:
                reports += write_reports(records, chunk, model.ref, batch.sr_out)
            failed += sum("error" in r for r in records)
            predicted += sum("error" not in r for r in records)
            boxes += sum(len(r["boxes"]) for r in records)
            report(start + len(chunk))
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    summary = BatchSummary(
        job=job,
        out=str(batch.out),
        images=len(files),
        predicted=predicted,
        failed=failed,
        boxes=boxes,
        reports=reports,
        model=model.ref.as_dict(),
        ledger_rows=(first, last) if first is not None and last is not None else None,
        seconds=round(time.monotonic() - started, 3),
    )
    logger.info(
        "batch_prediction %s: %d predicted, %d failed, %d box(es) in %.1f s (%.1f images/s); "
        "ledger rows %s",
        job,
        predicted,
        failed,
        boxes,
        summary.seconds,
        len(files) / max(summary.seconds, 1e-9),
        summary.ledger_rows,
    )
    return summary.as_dict()


def _tqdm(total: int) -> Any:
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc="predict", unit="img", file=sys.stderr, disable=None)
