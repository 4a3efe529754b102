"""`radflow serve-api`'s guards over real HTTP: a real uvicorn server on loopback in this process,
serving a small untrained detector with a real ledger and synthetic DICOMs. Bearer tokens before
anything is read, bodies capped from Content-Length and while streaming, per-request deadlines,
the forward pass alone under the model lock and batched, and a bounded hypothesis fuzz of the API
(set RADFLOW_FUZZ_EXAMPLES for a large budget)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from flows.api_auth import ApiSecurity, TokenCheck, hash_token

pytestmark = [pytest.mark.integration]

TOKEN = "rfapi_test-token-for-the-serve-api-suite-000000000"
AUTH = {"authorization": f"Bearer {TOKEN}"}
DICOM = {"content-type": "application/dicom"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerLog(logging.Handler):
    """Every ERROR record (tracebacks included) logged by the server while it ran."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return "\n".join(formatter.format(r) for r in self.records)


class AllLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Served:
    url: str
    app: object
    ledger: object
    errors: ServerLog
    lines: AllLines


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """A small untrained detector (128 px input) as a loaded version, and synthetic DICOMs."""
    from flows.predict import LoadedModel
    from pipeline_steps.core.config import (
        DetectionParams,
        IngestParams,
        PreprocessParams,
        SynthParams,
        TrainParams,
    )
    from pipeline_steps.core.detector import build_detector
    from pipeline_steps.serving.prediction import ModelRef
    from pipeline_steps.serving.serving import ServingConfig
    from pipeline_steps.synthetic import generate_dataset

    data = tmp_path_factory.mktemp("api-data")
    synth = SynthParams(n_images=3, seed=5, native_size=(512, 512), images_per_patient=(1, 1))
    summary = generate_dataset(synth, data)
    images = sorted(summary.images_dir.glob("*.dcm"))
    preprocess = PreprocessParams(input_size=128, target_spacing_mm=2.8)
    train = TrainParams(width=8, depth=3)
    config = ServingConfig.from_params(preprocess, DetectionParams(), IngestParams())
    detector = build_detector(preprocess.input_size, train)
    loaded = LoadedModel(
        detector, config, ModelRef("radflow-detector", "1", "production", "r"), "md5"
    )
    return loaded, images


@contextmanager
def serving(
    model_and_data,
    tmp_path: Path,
    *,
    security: ApiSecurity | None = None,
    **limits: object,
) -> Iterator[Served]:
    import uvicorn

    from flows.api import ApiLimits, create_app
    from pipeline_steps.core.config import Params
    from pipeline_steps.core.layout import Layout
    from pipeline_steps.governance.ledger import Ledger

    loaded, _ = model_and_data
    security = security or ApiSecurity(TokenCheck([hash_token("suite", TOKEN)]), False, "test")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    app = create_app(
        Layout(tmp_path),
        Params(),
        loaded,
        ledger,
        security=security,
        limits=ApiLimits(**limits),  # type: ignore[arg-type]
        poll_s=0,
        code_version="test",
        key="k" * 40,
    )
    port = _free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="info", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    errors, lines = ServerLog(), AllLines()
    root = logging.getLogger()
    watched = [root, logging.getLogger("uvicorn.error"), logging.getLogger("radflow.api")]
    for logger in watched:
        logger.addHandler(errors)
        logger.addHandler(lines)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API did not start")
        time.sleep(0.05)
    try:
        yield Served(f"http://127.0.0.1:{port}", app, ledger, errors, lines)
    finally:
        server.should_exit = True
        thread.join(30)
        for logger in watched:
            logger.removeHandler(errors)
            logger.removeHandler(lines)
        ledger.close()


@pytest.fixture(scope="module")
def api(model_and_data, tmp_path_factory):
    with serving(
        model_and_data,
        tmp_path_factory.mktemp("api"),
        max_body_bytes=1024 * 1024,
        request_timeout_s=3.0,
    ) as served:
        yield served


def _rows(served: Served) -> int:
    return len(list(served.ledger.entries(kind="prediction")))  # type: ignore[attr-defined]


def _raw_request(url: str, head: str, body: bytes = b"", wait_s: float = 10.0) -> bytes:
    """Send `head` (and `body`) on a raw socket and return what the server answers within wait_s."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(head.encode() + body)
        sock.settimeout(wait_s)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            pass
        return answer


# --------------------------------------------------------------------------------------------
# Authentication


def test_every_endpoint_but_the_health_check_needs_a_valid_token(api, model_and_data):
    _, images = model_and_data
    body = images[0].read_bytes()
    rows = _rows(api)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        reply = httpx.post(f"{api.url}/predict", content=body, headers={**DICOM, **headers})
        assert reply.status_code == 401, reply.text
        assert reply.headers["www-authenticate"].startswith("Bearer")
    assert _rows(api) == rows  # nothing was predicted or recorded
    for path in ("/docs", "/redoc", "/openapi.json", "/nothing-here"):
        assert httpx.get(f"{api.url}{path}").status_code == 401
        assert httpx.get(f"{api.url}{path}", headers=AUTH).status_code == 404  # docs are off
    # the probe learns that the server is up, and nothing about the model
    probe = httpx.get(f"{api.url}/healthz")
    assert probe.status_code == 200 and probe.json() == {"status": "ok", "auth": "bearer token"}
    detail = httpx.get(f"{api.url}/healthz", headers=AUTH).json()
    assert detail["model"]["version"] == "1"
    reply = httpx.post(f"{api.url}/predict", content=body, headers={**DICOM, **AUTH}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["prediction_id"] in {
        e.subject
        for e in api.ledger.entries(kind="prediction")  # type: ignore[attr-defined]
    }
    # no token, hash or header value in what the server logged
    logged = "\n".join(api.lines.lines)
    assert TOKEN not in logged and "wrong" not in logged


def test_an_unauthenticated_upload_is_refused_before_its_body_is_sent(api):
    # Headers only, announcing 1 GiB: the 401 comes back without the body being read.
    head = (
        "POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/dicom\r\n"
        f"content-length: {1 << 30}\r\n\r\n"
    )
    answer = _raw_request(api.url, head, wait_s=5)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_docs_are_served_only_when_enabled_and_then_behind_the_token(model_and_data, tmp_path):
    security = ApiSecurity(TokenCheck([hash_token("suite", TOKEN)]), True, "test")
    with serving(model_and_data, tmp_path, security=security) as served:
        assert httpx.get(f"{served.url}/openapi.json").status_code == 401
        assert httpx.get(f"{served.url}/docs").status_code == 401
        spec = httpx.get(f"{served.url}/openapi.json", headers=AUTH)
        assert spec.status_code == 200 and "/predict" in spec.json()["paths"]
        assert httpx.get(f"{served.url}/docs", headers=AUTH).status_code == 200


def test_a_server_without_authentication_says_so_on_every_answer(model_and_data, tmp_path):
    security = ApiSecurity(None, False, "none")
    with serving(model_and_data, tmp_path, security=security) as served:
        health = httpx.get(f"{served.url}/healthz")
        assert health.headers["x-radflow-auth"] == "disabled"
        assert health.json()["auth"] == "disabled" and health.json()["model"]["version"] == "1"


# --------------------------------------------------------------------------------------------
# Bodies capped before and while they are read


def test_a_declared_oversized_body_is_refused_before_it_is_read(api):
    # Only the headers are sent: a server that read the body first would never answer.
    head = (
        "POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/dicom\r\n"
        f"authorization: Bearer {TOKEN}\r\ncontent-length: {1 << 30}\r\n\r\n"
    )
    started = time.monotonic()
    answer = _raw_request(api.url, head, wait_s=10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"connection: close" in answer.lower()
    assert time.monotonic() - started < 9


def test_a_chunked_body_is_cut_off_at_the_cap(api):
    rows = _rows(api)
    sent = 0

    def chunks():
        nonlocal sent
        for _ in range(1024):  # 64 MiB offered against a 1 MiB cap
            sent += 65536
            yield b"\0" * 65536

    try:
        reply = httpx.post(
            f"{api.url}/predict", content=chunks(), headers={**DICOM, **AUTH}, timeout=30
        )
        status = reply.status_code
        assert status == 413, reply.text
        assert "1048576 bytes" in reply.json()["detail"]
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the server closed the connection while more was offered: also a refusal
    # the client was stopped long before it sent everything (loopback buffers hold a few MiB)
    assert sent < 32 * 1024 * 1024
    assert _rows(api) == rows
    # and the multipart route has the same cap
    big = httpx.post(
        f"{api.url}/predict",
        files={"file": ("big.dcm", b"\0" * (2 * 1024 * 1024))},
        headers=AUTH,
        timeout=30,
    )
    assert big.status_code == 413


def test_a_body_within_the_cap_is_still_predicted_after_refusals(api, model_and_data):
    _, images = model_and_data
    with images[1].open("rb") as fh:
        reply = httpx.post(
            f"{api.url}/predict", files={"file": ("x.dcm", fh)}, headers=AUTH, timeout=60
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["image"] == "x.dcm"


# --------------------------------------------------------------------------------------------
# Deadlines, and the model lock held only for the forward pass


def test_a_stalled_upload_gets_408_at_the_request_deadline(api):
    head = (
        "POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/dicom\r\n"
        f"authorization: Bearer {TOKEN}\r\ncontent-length: 1000\r\n\r\n"
    )
    started = time.monotonic()
    answer = _raw_request(api.url, head, body=b"DICM", wait_s=20)  # then nothing more
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert time.monotonic() - started < 15


def test_a_prediction_past_its_deadline_is_504_and_not_recorded(api, model_and_data):
    _, images = model_and_data
    lock = api.app.state.served.lock  # type: ignore[attr-defined]
    rows = _rows(api)
    with lock:  # the model is busy for longer than the request's 3 s
        reply = httpx.post(
            f"{api.url}/predict",
            content=images[0].read_bytes(),
            headers={**DICOM, **AUTH},
            timeout=30,
        )
    assert reply.status_code == 504, reply.text
    assert "nothing was recorded" in reply.json()["detail"]
    time.sleep(0.5)
    assert _rows(api) == rows
    after = httpx.post(
        f"{api.url}/predict", content=images[0].read_bytes(), headers={**DICOM, **AUTH}, timeout=30
    )
    assert after.status_code == 200, after.text
    assert not api.errors.records, api.errors.text()  # the abandoned work left no traceback


def test_screening_and_decoding_do_not_wait_for_the_model(api, model_and_data):
    # While the model is busy (its lock held), a file that screening rejects is answered at once:
    # only the forward pass waits for the lock.
    _, images = model_and_data
    truncated = images[0].read_bytes()[:2000]
    lock = api.app.state.served.lock  # type: ignore[attr-defined]
    with lock:
        started = time.monotonic()
        reply = httpx.post(
            f"{api.url}/predict", content=truncated, headers={**DICOM, **AUTH}, timeout=30
        )
        took = time.monotonic() - started
    assert reply.status_code == 422 and reply.json()["reason"] == "corrupt", reply.text
    assert took < 2.5  # well inside the 3 s deadline the lock would have run into


def test_requests_that_wait_together_share_a_forward_pass(model_and_data, tmp_path):
    _, images = model_and_data
    body = images[2].read_bytes()
    with serving(model_and_data, tmp_path, batch_wait_s=0.3, max_batch=16) as served:
        alone = httpx.post(
            f"{served.url}/predict", content=body, headers={**DICOM, **AUTH}, timeout=60
        ).json()
        batcher = served.app.state.batcher  # type: ignore[attr-defined]
        before = batcher.batches
        with ThreadPoolExecutor(6) as pool:
            replies = list(
                pool.map(
                    lambda _: httpx.post(
                        f"{served.url}/predict", content=body, headers={**DICOM, **AUTH}, timeout=60
                    ),
                    range(6),
                )
            )
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        # six requests (twice each with flip TTA) in fewer forward passes than requests
        assert batcher.largest > 1
        assert batcher.batches - before < 6
        # batched or alone, the same boxes
        for reply in replies:
            assert reply.json()["boxes"] == alone["boxes"]
        assert len({r.json()["prediction_id"] for r in replies}) == 6


# --------------------------------------------------------------------------------------------
# Fuzzing: no input gets a 5xx or a server traceback

FUZZ_EXAMPLES = int(os.environ.get("RADFLOW_FUZZ_EXAMPLES", "30"))
_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@st.composite
def requests_(draw, dicom: bytes):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]))
    path = draw(
        st.sampled_from(["/predict", "/healthz", "/docs", "/openapi.json", "/", "/predict/"])
        | _TEXT.map(lambda t: "/" + t.replace(" ", "").replace("?", "").replace("#", ""))
    )
    params = draw(
        st.dictionaries(
            st.sampled_from(["threshold", "x"]),
            st.sampled_from(["0.5", "-1", "nan", "inf", "1e308", "", "abc", "0"]) | _TEXT,
            max_size=2,
        )
    )
    auth = draw(
        st.sampled_from(
            [f"Bearer {TOKEN}", f"Bearer {TOKEN}", "Bearer", "Basic abc", "", f"bearer  {TOKEN} "]
        )
        | _TEXT
    )
    ctype = draw(
        st.sampled_from(
            [
                "application/dicom",
                "application/octet-stream",
                "multipart/form-data",
                "multipart/form-data; boundary=xyz",
                "text/plain",
                "",
            ]
        )
        | _TEXT
    )
    cut = draw(st.integers(0, len(dicom)))
    flips = draw(
        st.lists(st.tuples(st.integers(0, len(dicom) - 1), st.integers(0, 255)), max_size=8)
    )
    mutated = bytearray(dicom[:cut] if draw(st.booleans()) else dicom)
    for at, value in flips:
        if at < len(mutated):
            mutated[at] = value
    body = draw(st.sampled_from([b"", bytes(mutated)]) | st.binary(max_size=2048))
    multipart = draw(st.booleans())
    return method, path, params, auth, ctype, body, multipart


def test_fuzzed_requests_never_get_a_5xx_or_a_traceback(model_and_data, tmp_path):
    _, images = model_and_data
    dicom = images[0].read_bytes()
    statuses: dict[int, int] = {}
    with (
        serving(
            model_and_data, tmp_path, max_body_bytes=512 * 1024, request_timeout_s=20.0
        ) as served,
        httpx.Client(base_url=served.url, timeout=60) as client,
    ):

        @settings(
            max_examples=FUZZ_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(requests_(dicom))
        def one(request):
            method, path, params, auth, ctype, body, multipart = request
            # HTTP trims a header value's outer whitespace (and httpx refuses to send it)
            auth, ctype = auth.strip(), ctype.strip()
            headers = {"authorization": auth} if auth else {}
            try:
                if multipart and method in ("POST", "PUT", "PATCH"):
                    files = {"file": ("f.dcm", body)}
                    reply = client.request(
                        method, path, params=params, headers=headers, files=files
                    )
                else:
                    if ctype:
                        headers["content-type"] = ctype
                    reply = client.request(
                        method, path, params=params, headers=headers, content=body
                    )
            except httpx.LocalProtocolError:
                reject()  # a request the client itself will not send
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            assert reply.status_code < 500, (request, reply.status_code, reply.text[:500])
            assert not served.errors.records, served.errors.text()

        one()
    assert not served.errors.records, served.errors.text()
    assert len(statuses) > 2, statuses  # the fuzz reached more than one kind of answer
