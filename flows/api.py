"""Online prediction (`radflow serve-api`): FastAPI over the same prediction core as the batch flow.

`POST /predict` takes one DICOM (a multipart upload in field `file`, or the raw bytes with
`Content-Type: application/dicom`) and returns the batch flow's record, after the record is in the
audit ledger. `GET /healthz` names the version served. A watcher thread re-resolves the stage's alias
every `poll_s` seconds and swaps in the new version when it moved; requests keep the old one until
the new one is loaded.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from flows.predict import LoadedModel, load_model, record_predictions, resolve_version
from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import RadflowError
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance.ledger import Ledger, LedgerError
from pipeline_steps.serving.prediction import Provenance, predict_batch, utc_now

log = logging.getLogger("radflow.api")

MAX_UPLOAD_BYTES = 256 * 1024 * 1024
DICOM_TYPES = ("application/dicom", "application/octet-stream")


@dataclass
class ServedModel:
    """The model being served, swapped atomically when the stage's alias moves."""

    current: LoadedModel
    loaded_at: str = field(default_factory=utc_now)
    last_check: str = ""
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)  # Keras calls, one at a time

    def swap(self, model: LoadedModel) -> None:
        self.current, self.loaded_at = model, utc_now()


class AliasWatcher(threading.Thread):
    """Polls the registry; loads and swaps in the version the alias points at when it changes."""

    def __init__(
        self, served: ServedModel, layout: Layout, params: Params, stage: str, poll_s: float
    ) -> None:
        super().__init__(name="radflow-alias-watcher", daemon=True)
        self.served, self.layout, self.params = served, layout, params
        self.stage, self.poll_s = stage, poll_s
        self.stopping = threading.Event()

    def check_once(self) -> bool:
        """True when a new version was swapped in."""
        try:
            ref, _ = resolve_version(self.layout, self.params, stage=self.stage)
            self.served.last_check = utc_now()
            if ref.version == self.served.current.ref.version:
                self.served.last_error = ""
                return False
            log.info(
                "alias %s moved: version %s -> %s; loading",
                self.stage,
                self.served.current.ref.version,
                ref.version,
            )
            model = load_model(self.layout, self.params, version=ref.version)
            model = LoadedModel(model.detector, model.config, ref, model.data_version)
        except RadflowError as exc:
            # Keep serving the loaded version; /healthz shows why the check failed.
            self.served.last_error = str(exc)
            log.warning(
                "alias check failed, still serving version %s: %s",
                self.served.current.ref.version,
                exc,
            )
            return False
        self.served.swap(model)
        self.served.last_error = ""
        log.info("now serving %s version %s", ref.name, ref.version)
        return True

    def run(self) -> None:
        while not self.stopping.wait(self.poll_s):
            self.check_once()


def create_app(
    layout: Layout,
    params: Params,
    model: LoadedModel,
    ledger: Ledger,
    *,
    stage: str = "production",
    poll_s: float = 10.0,
    code_version: str = "unknown",
    key: str,
) -> FastAPI:
    served = ServedModel(model)
    watcher = AliasWatcher(served, layout, params, stage, poll_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        if poll_s > 0:
            watcher.start()
        yield
        watcher.stopping.set()

    app = FastAPI(title="radflow", summary="Chest-radiograph lesion detector", lifespan=lifespan)
    app.state.served = served
    app.state.watcher = watcher

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        current = served.current
        return {
            "status": "ok",
            "model": current.ref.as_dict(),
            "data_version": current.data_version,
            "loaded_at": served.loaded_at,
            "watching": stage,
            "last_check": served.last_check,
            "last_error": served.last_error,
        }

    def predict_file(path: Path, name: str, threshold: float | None) -> dict[str, Any]:
        with served.lock:
            current = served.current
            cutoff = current.config.detection.score_threshold if threshold is None else threshold
            provenance = Provenance(current.ref, current.data_version, code_version)
            (record,) = predict_batch(
                current.detector,
                [(name, path)],
                current.config,
                params.ingest,
                provenance,
                threshold=cutoff,
                key=key,
            )
        # Recorded before it is returned: no ledger row, no answer.
        record_predictions(ledger, [record])
        return record

    @app.post("/predict")
    async def predict(request: Request, threshold: float | None = None) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(400, "send the DICOM as a multipart file in field `file`")
            name = upload.filename or "upload.dcm"
            data = await upload.read()
        elif content_type.split(";")[0].strip() in DICOM_TYPES:
            name, data = "upload.dcm", await request.body()
        else:
            raise HTTPException(
                415, "send a multipart upload (field `file`) or application/dicom bytes"
            )
        if not data:
            raise HTTPException(400, "the upload holds no bytes")
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"uploads are limited to {MAX_UPLOAD_BYTES} bytes")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise HTTPException(422, "threshold must be within [0, 1]")
        with tempfile.TemporaryDirectory(prefix="radflow-api-") as scratch:
            path = Path(scratch) / "input.dcm"
            path.write_bytes(data)
            try:
                record = await run_in_threadpool(predict_file, path, name, threshold)
            except LedgerError as exc:
                # Nothing is returned that the ledger does not hold.
                raise HTTPException(
                    503, f"prediction not recorded, so not returned: {exc}"
                ) from None
        return JSONResponse(record, status_code=422 if "error" in record else 200)

    return app


def serve(
    layout: Layout,
    params: Params,
    *,
    host: str,
    port: int,
    stage: str,
    poll_s: float,
) -> None:
    """Load the stage's version, then serve until interrupted (uvicorn, one process)."""
    import uvicorn

    from flows import versioning
    from pipeline_steps.core.deid import pseudonym_key
    from pipeline_steps.governance.ledger import open_ledger

    key = pseudonym_key().secret  # first: without a usable key the API does not start
    started = time.monotonic()
    model = load_model(layout, params, stage=stage)
    log.info(
        "serving %s version %s (%s) on http://%s:%d, loaded in %.1f s",
        model.ref.name,
        model.ref.version,
        stage,
        host,
        port,
        time.monotonic() - started,
    )
    with open_ledger(layout.root) as ledger:
        app = create_app(
            layout,
            params,
            model,
            ledger,
            stage=stage,
            poll_s=poll_s,
            code_version=versioning.code_version(),
            key=key,
        )
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
