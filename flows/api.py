"""Online prediction (`radflow serve-api`): FastAPI over the same prediction core as the batch flow.

`POST /predict` takes one DICOM (a multipart upload in field `file`, or the raw bytes with
`Content-Type: application/dicom`) and returns the batch flow's record, after the record is in the
audit ledger. `GET /healthz` answers without a token (for probes) and, to an authenticated caller,
names the version served. A watcher thread re-resolves the stage's alias every `poll_s` seconds and
swaps in the new version when it moved; requests keep the old one until the new one is loaded.

Bounded work per request: a bearer token is checked before anything is read; the body is refused
from its Content-Length, or while it streams, past `max_body_bytes`, and goes to disk, not memory;
each request has a deadline; screening, decoding and preprocessing run in the request's own thread,
and only the forward pass goes through the model, in micro-batches (`MicroBatcher`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from flows.api_auth import ApiSecurity
from flows.api_batching import BatchedModel, MicroBatcher, RequestTimedOut, warm_up
from flows.predict import LoadedModel, load_model, record_predictions, resolve_version
from flows.review_store import keep_predicted
from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import RadflowError
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance.ledger import Ledger, LedgerError
from pipeline_steps.serving.prediction import Provenance, predict_batch, utc_now

log = logging.getLogger("radflow.api")

DICOM_TYPES = ("application/dicom", "application/octet-stream")
OPEN_PATHS = frozenset({"/healthz"})  # answered without a token (probes); details need one
AUTH_HEADER = "x-radflow-auth"  # "disabled" on every answer of a server without authentication

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ApiLimits:
    """What one request may cost, and how the forward pass is batched."""

    max_body_bytes: int = 256 * 1024 * 1024
    request_timeout_s: float = 30.0
    max_batch: int = 16  # images per forward pass
    batch_wait_s: float = 0.002  # how long the first waiting request waits for company
    max_concurrency: int = 256  # open connections and tasks; uvicorn answers 503 beyond
    # Requests screened, decoded and predicted at once; the others wait their turn, in order.
    # Two per core keeps the model fed (one request prepares while another's pass runs) without
    # dozens of threads sharing the cores and the GIL, where every request finishes as late as
    # the last one and a burst runs past its deadlines together.
    workers: int = field(default_factory=lambda: 2 * (os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------
# ASGI guards: authentication and the body cap, before the app reads anything


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than this server's limit of {limit} bytes "
            "(serve-api --max-body-mb)",
            headers={"connection": "close"},
        )


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class Guard:
    """Pure ASGI middleware, outermost: the token first, then the declared and streamed body size.

    Refusals close the connection, so an unread body is never received."""

    def __init__(self, app: ASGIApp, security: ApiSecurity, max_body_bytes: int) -> None:
        self.app, self.security, self.max_body_bytes = app, security, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        close = {"connection": "close"}
        check = self.security.check
        caller = check.verify(_header(scope, b"authorization")) if check else "(no auth)"
        scope.setdefault("state", {})["caller"] = caller
        if caller is None and scope["path"] not in OPEN_PATHS:
            # The header's value is never logged: it may be a token meant for another service.
            await _reply(
                send,
                401,
                "send a valid API token as `Authorization: Bearer TOKEN`",
                {**close, "www-authenticate": 'Bearer realm="radflow"'},
            )
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _reply(send, 400, "Content-Length is not a number", close)
                return
            if int(declared) > self.max_body_bytes:
                refusal = BodyTooLarge(self.max_body_bytes)
                await _reply(send, 413, refusal.detail, close)
                return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # chunked, or more than declared
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if check is None:
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"x-radflow-auth", b"disabled"),
                    ]
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:  # raised where no handler turned it into an answer
            if started:
                raise
            await _reply(send, 413, exc.detail, close)


# --------------------------------------------------------------------------------------------
# The served model and its alias watcher


@dataclass
class ServedModel:
    """The model being served, swapped atomically when the stage's alias moves."""

    current: LoadedModel
    loaded_at: str = field(default_factory=utc_now)
    last_check: str = ""
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)  # the forward pass, one at a time

    def swap(self, model: LoadedModel) -> None:
        self.current, self.loaded_at = model, utc_now()


class AliasWatcher(threading.Thread):
    """Polls the registry; loads and swaps in the version the alias points at when it changes."""

    def __init__(
        self,
        served: ServedModel,
        layout: Layout,
        params: Params,
        stage: str,
        poll_s: float,
        prepare: Callable[[LoadedModel], None] = lambda _model: None,
    ) -> None:
        super().__init__(name="radflow-alias-watcher", daemon=True)
        self.served, self.layout, self.params = served, layout, params
        self.stage, self.poll_s, self.prepare = stage, poll_s, prepare
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
            self.prepare(model)
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


# --------------------------------------------------------------------------------------------
# The app


class _Job:
    """One request's work in its thread. The thread may write the ledger only if the request has
    not timed out; a request that timed out answers only if the ledger write had not begun."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.committing = False
        self.done = threading.Event()
        self.record: dict[str, Any] | None = None  # set once the ledger holds it

    def claim_commit(self) -> bool:
        with self.lock:
            if self.abandoned:
                return False
            self.committing = True
            return True

    def abandon(self) -> bool:
        """True when abandoned; False when the ledger write had begun (then wait for the answer)."""
        with self.lock:
            if self.committing:
                return False
            self.abandoned = True
            return True


def create_app(
    layout: Layout,
    params: Params,
    model: LoadedModel,
    ledger: Ledger,
    *,
    security: ApiSecurity,
    limits: ApiLimits = ApiLimits(),
    stage: str = "production",
    poll_s: float = 10.0,
    code_version: str = "unknown",
    key: str,
) -> FastAPI:
    served = ServedModel(model)
    batcher = MicroBatcher(served.lock, limits.max_batch, limits.batch_wait_s)
    workers = anyio.CapacityLimiter(max(1, limits.workers))

    def prepare(loaded: LoadedModel) -> None:
        warm_up(loaded.detector, loaded.config.preprocess.input_size, limits.max_batch)

    watcher = AliasWatcher(served, layout, params, stage, poll_s, prepare)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        await anyio.to_thread.run_sync(prepare, served.current)
        batcher.start()
        if poll_s > 0:
            watcher.start()
        yield
        watcher.stopping.set()
        batcher.stop()

    docs = security.docs
    app = FastAPI(
        title="radflow",
        summary="Chest-radiograph lesion detector",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.served = served
    app.state.watcher = watcher
    app.state.batcher = batcher

    @app.get("/healthz")
    def healthz(request: Request) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "status": "ok",
            "auth": "disabled" if security.auth_disabled else "bearer token",
        }
        if request.scope.get("state", {}).get("caller") is None:
            return answer  # a probe without a token learns only that the server is up
        current = served.current
        return {
            **answer,
            "model": current.ref.as_dict(),
            "data_version": current.data_version,
            "loaded_at": served.loaded_at,
            "watching": stage,
            "last_check": served.last_check,
            "last_error": served.last_error,
            "forward_passes": batcher.batches,
        }

    def predict_file(
        scratch: Path, name: str, threshold: float | None, deadline: float, job: _Job
    ) -> dict[str, Any]:
        try:
            if time.monotonic() > deadline:  # it waited its whole deadline for a worker
                raise RequestTimedOut
            current = served.current
            cutoff = current.config.detection.score_threshold if threshold is None else threshold
            provenance = Provenance(current.ref, current.data_version, code_version)
            (record,) = predict_batch(
                BatchedModel(batcher, current.detector, deadline),
                [(name, scratch / "input.dcm")],
                current.config,
                params.ingest,
                provenance,
                threshold=cutoff,
                key=key,
            )
            if time.monotonic() > deadline or not job.claim_commit():
                raise RequestTimedOut
            # Recorded before it is returned: no ledger row, no answer.
            record_predictions(ledger, [record])
            keep_predicted(layout, params.review, [record], [scratch / "input.dcm"])
            job.record = record
            return record
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            job.done.set()

    @app.post("/predict")
    async def predict(request: Request, threshold: float | None = None) -> JSONResponse:
        deadline = time.monotonic() + limits.request_timeout_s
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise HTTPException(422, "threshold must be within [0, 1]")
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if media not in (*DICOM_TYPES, "multipart/form-data"):
            raise HTTPException(
                415, "send a multipart upload (field `file`) or application/dicom bytes"
            )
        scratch = Path(tempfile.mkdtemp(prefix="radflow-api-"))
        handed_over = False
        try:
            try:
                with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                    name = await _receive_upload(request, media, scratch / "input.dcm")
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"the upload did not arrive within {limits.request_timeout_s:g} s "
                    "(serve-api --request-timeout)",
                    headers={"connection": "close"},
                ) from None
            job = _Job()
            handed_over = True  # the worker removes the scratch folder
            try:
                with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                    record = await anyio.to_thread.run_sync(
                        predict_file,
                        scratch,
                        name,
                        threshold,
                        deadline,
                        job,
                        abandon_on_cancel=True,
                        limiter=workers,
                    )
            except TimeoutError:
                if job.abandon():
                    raise _timed_out(limits) from None
                # The ledger write had begun at the deadline: answer what it recorded.
                await anyio.to_thread.run_sync(job.done.wait)
                if job.record is None:
                    raise HTTPException(
                        503, "prediction not recorded, so not returned: the ledger write failed"
                    ) from None
                record = job.record
            except RequestTimedOut:
                raise _timed_out(limits) from None
            except LedgerError as exc:
                # Nothing is returned that the ledger does not hold.
                raise HTTPException(
                    503, f"prediction not recorded, so not returned: {exc}"
                ) from None
        finally:
            if not handed_over:
                shutil.rmtree(scratch, ignore_errors=True)
        return JSONResponse(record, status_code=422 if "error" in record else 200)

    app.add_middleware(Guard, security=security, max_body_bytes=limits.max_body_bytes)
    return app


def _timed_out(limits: ApiLimits) -> HTTPException:
    return HTTPException(
        504,
        f"the prediction did not finish within {limits.request_timeout_s:g} s "
        "(serve-api --request-timeout); nothing was recorded",
    )


async def _receive_upload(request: Request, media: str, path: Path) -> str:
    """Stream the upload to `path` (the Guard counts the bytes); returns the file's given name."""
    if media == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8)
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(400, "send the DICOM as a multipart file in field `file`")
            with path.open("wb") as out:
                await anyio.to_thread.run_sync(shutil.copyfileobj, upload.file, out)
            name = upload.filename or "upload.dcm"
        finally:
            await form.close()
    else:
        name = "upload.dcm"
        with path.open("wb") as out:
            async for chunk in request.stream():
                out.write(chunk)
    if path.stat().st_size == 0:
        raise HTTPException(400, "the upload holds no bytes")
    return name


def serve(
    layout: Layout,
    params: Params,
    *,
    host: str,
    port: int,
    stage: str,
    poll_s: float,
    security: ApiSecurity,
    limits: ApiLimits,
) -> None:
    """Load the stage's version, then serve until interrupted (uvicorn, one process)."""
    import uvicorn

    from flows import versioning
    from flows.anchoring import open_ledger
    from pipeline_steps.core.deid import pseudonym_key

    key = pseudonym_key().secret  # first: without a usable key the API does not start
    if security.auth_disabled:
        for line in (
            "=" * 72,
            f"AUTHENTICATION IS OFF (--insecure-no-auth): anyone who reaches {host}:{port} can",
            "send images to this model. For development on this machine only.",
            "=" * 72,
        ):
            log.warning(line)
    else:
        log.info("API tokens from %s", security.source)
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
            security=security,
            limits=limits,
            stage=stage,
            poll_s=poll_s,
            code_version=versioning.code_version(),
            key=key,
        )
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="info",
            access_log=False,
            limit_concurrency=limits.max_concurrency,
        )
