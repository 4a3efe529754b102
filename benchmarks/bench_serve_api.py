"""Benchmark of `radflow serve-api` under hostile and heavy load, against a real server on loopback.

    python benchmarks/bench_serve_api.py                       # builds a small workspace once
    python benchmarks/bench_serve_api.py --workspace WS        # WS's production version
    python benchmarks/bench_serve_api.py --baseline-rev REV    # also REV's serve-api, same run
    python benchmarks/bench_serve_api.py --fuzz-examples 2000  # also the large-budget API fuzz

Without --workspace it makes one under --root: `radflow init`, 24 synthetic studies, one epoch of
the default architecture at the default input size (256), promoted to production (its weights are
poor; its forward pass costs what a real model's does). Prints, in one run:
1. a 1 GiB upload announced by Content-Length: seconds to the 413, and the server's RSS growth;
   the same 1 GiB sent chunked (no Content-Length): seconds to the 413 and RSS growth;
2. a decompression bomb: a DICOM of a few MB (RLE) declaring 12000x12000 pixels: seconds to the
   answer, its status and reason, and the RSS growth;
3. 50 concurrent valid requests (one synthetic 1024x1024 study each): p50/p95 latency;
4. latency of small requests while a large valid one (4096x4096, 32 MB uncompressed) is uploaded
   slowly and predicted, against the same requests with the server otherwise idle.
Targets: 1 within 1 s and under 50 MB; 2 within 1 s; 3 p95 under 500 ms (2 cores).
With --baseline-rev, the same figures for that git revision's serve-api (run from `git archive`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"upload_refusal_s": 1.0, "upload_rss_mb": 50.0, "bomb_s": 1.0, "concurrent_p95_ms": 500}
GIB = 1 << 30
BENCH_PARAMS = {
    "synth": {"n_images": 24, "native_size": [512, 512], "images_per_patient": [1, 2]},
    "validate": {"min_images": 4},
    "preprocess": {"shard_size": 8},
    "train": {"epochs": 1, "batch_size": 4},
}


# --------------------------------------------------------------------------------------------
# Set-up: workspace, inputs, server


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RADFLOW_LEDGER_URL"):
        env.pop(name, None)
    if not env.get("RADFLOW_PSEUDONYM_KEY"):
        env["RADFLOW_PSEUDONYM_DEV_MODE"] = "1"  # synthetic data only
    return env


def _radflow(ws: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"radflow {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def build_workspace(ws: Path) -> Path:
    """A workspace with version 1 in production (made once; reused while it has one)."""
    import yaml

    if (ws / ".bench-ready").exists():
        return ws
    ws.mkdir(parents=True, exist_ok=True)
    print(f"building a workspace in {ws} (once; a few minutes)", flush=True)
    _radflow(ws, "init")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    (ws / "params.yaml").write_text(yaml.safe_dump(_merge(params, BENCH_PARAMS)))
    _radflow(ws, "run", "--json")
    _radflow(ws, "promote", "1", "--to", "production", "--reason", "benchmark", "--force")
    (ws / ".bench-ready").touch()
    return ws


def make_inputs(root: Path) -> dict[str, bytes]:
    """A small valid study, a large valid one (4096x4096) and the bomb."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    from pipeline_steps.core.config import Params
    from pipeline_steps.synthetic import generate_dataset

    images = root / "inputs" / "images"
    if not images.exists() or len(list(images.glob("*.dcm"))) < 8:
        generate_dataset(Params().synth, root / "inputs", n_images=8, seed=4343)
    small = [p.read_bytes() for p in sorted(images.glob("*.dcm"))[:8]]
    ds = pydicom.dcmread(sorted(images.glob("*.dcm"))[0])
    pixels = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    reps = (-(-4096 // pixels.shape[0]), -(-4096 // pixels.shape[1]))
    large = np.ascontiguousarray(np.tile(pixels, reps)[:4096, :4096])
    ds.Rows, ds.Columns = large.shape
    ds.PixelData = large.tobytes()
    ds["PixelData"].VR = "OW"
    large_path = root / "large.dcm"
    ds.save_as(large_path, enforce_file_format=True)
    return {"small": small, "large": large_path.read_bytes(), "bomb": bomb_dicom(ds)}


def bomb_dicom(template, size: int = 12000) -> bytes:  # type: ignore[no-untyped-def]
    """A valid chest DX header declaring size x size 16-bit pixels, RLE-compressed to a few MB."""
    import copy
    import io

    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    ds = copy.deepcopy(template)
    full, rest = divmod(size, 128)
    # Per row and byte plane: replicate runs of 128 bytes (control -127), then the remainder.
    row = b"\x81\x10" * full + (bytes([257 - rest, 0x10]) if rest else b"")
    segment = row * size
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows = ds.Columns = size
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


class Server:
    """`radflow serve-api` in a subprocess (from `code`: this checkout, or an archived revision)."""

    def __init__(self, ws: Path, code: Path, token: str | None, tokens_file: Path | None) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = _env()
        env["PYTHONPATH"] = str(code)
        if tokens_file is not None:
            env["RADFLOW_API_TOKENS_FILE"] = str(tokens_file)
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        fd, name = tempfile.mkstemp(prefix="serve-api-", suffix=".log")
        self.log = Path(name)
        with os.fdopen(fd, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "--workspace", str(ws), "serve-api"]
                + ["--port", str(self.port), "--poll-seconds", "0"],
                env=env,
                cwd=code,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"serve-api did not come up:\n{tail}")
            time.sleep(0.5)

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class PeakRss:
    """The server's highest RSS while the block runs (sampled every 5 ms), less its RSS before."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak, self.base = server, 0.0, 0.0
        self.stopping = threading.Event()

    def __enter__(self) -> PeakRss:
        self.base = self.peak = self.server.rss_mb()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stopping.wait(0.005):
            self.peak = max(self.peak, self.server.rss_mb())

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # what the server does just after answering counts too
        self.stopping.set()
        self.thread.join()

    @property
    def growth_mb(self) -> float:
        return self.peak - self.base


# --------------------------------------------------------------------------------------------
# Measurements


def huge_upload(server: Server, chunked: bool, total: int = GIB, limit_s: float = 120) -> dict:
    """Send a `total`-byte body as fast as loopback takes it; seconds until the status line."""
    lines = [
        "POST /predict HTTP/1.1",
        "host: 127.0.0.1",
        "content-type: application/dicom",
        *(f"{k}: {v}" for k, v in server.headers.items()),
        "transfer-encoding: chunked" if chunked else f"content-length: {total}",
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    block = b"\0" * (1 << 20)
    frame = f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block
    sent = 0
    answered = threading.Event()

    def pump(sock: socket.socket) -> None:
        nonlocal sent
        try:
            while sent < total and not answered.is_set():
                sock.sendall(frame)
                sent += len(block)
            if chunked and not answered.is_set():
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server closed the connection: it refused the rest

    with PeakRss(server) as rss, socket.create_connection(("127.0.0.1", server.port)) as sock:
        started = time.perf_counter()
        sock.sendall(head)
        sender = threading.Thread(target=pump, args=(sock,), daemon=True)
        sender.start()
        sock.settimeout(limit_s)
        answer = b""
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except (TimeoutError, OSError):
            pass
        took = time.perf_counter() - started
        answered.set()
        with contextlib.suppress(OSError):  # already closed by the server
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(30)
    status = answer.split(b" ")[1].decode() if answer.count(b" ") >= 1 else "no answer"
    return {
        "status": status,
        "seconds": round(took, 3),
        "sent_mb": round(sent / (1 << 20), 1),
        "rss_growth_mb": round(rss.growth_mb, 1),
    }


def bomb(server: Server, body: bytes) -> dict:
    import httpx

    with PeakRss(server) as rss:
        started = time.perf_counter()
        try:
            reply = httpx.post(
                f"{server.url}/predict",
                content=body,
                headers={"content-type": "application/dicom", **server.headers},
                timeout=300,
            )
            status, reason = reply.status_code, _reason(reply)
        except httpx.HTTPError as exc:
            status, reason = "error", type(exc).__name__
        took = time.perf_counter() - started
    return {
        "status": status,
        "reason": reason,
        "seconds": round(took, 3),
        "body_mb": round(len(body) / (1 << 20), 2),
        "rss_growth_mb": round(rss.growth_mb, 1),
    }


def _reason(reply) -> str:  # type: ignore[no-untyped-def]
    try:
        data = reply.json()
    except ValueError:
        return reply.text[:80]
    return str(data.get("reason") or data.get("detail") or "")[:120]


def _post(server: Server, body: bytes, timeout: float = 300) -> tuple[float, int | str]:
    """Milliseconds and status of one request (the exception's name when there was no answer)."""
    import httpx

    started = time.perf_counter()
    try:
        reply = httpx.post(
            f"{server.url}/predict",
            content=body,
            headers={"content-type": "application/dicom", **server.headers},
            timeout=timeout,
        )
        status: int | str = reply.status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    return (time.perf_counter() - started) * 1000, status


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def concurrent(server: Server, bodies: list[bytes], n: int = 50, rounds: int = 3) -> dict:
    """`rounds` bursts of n requests released together; latency of every request."""
    for body in bodies:  # warm-up
        _post(server, body)
    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    walls = []
    for _ in range(rounds):
        barrier = threading.Barrier(n)

        def one(i: int, barrier: threading.Barrier = barrier) -> tuple[float, int | str]:
            barrier.wait()
            return _post(server, bodies[i % len(bodies)])

        started = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(one, range(n)))
        walls.append(time.perf_counter() - started)
        for ms, status in results:
            latencies.append(ms)
            statuses[status] = statuses.get(status, 0) + 1
    return {
        "requests": len(latencies),
        "statuses": statuses,
        "p50_ms": round(_pct(latencies, 0.5), 1),
        "p95_ms": round(_pct(latencies, 0.95), 1),
        "max_ms": round(max(latencies), 1),
        "burst_wall_s": round(statistics.median(walls), 2),
    }


def beside_large(server: Server, small: bytes, large: bytes, upload_s: float = 3.0) -> dict:
    """Small-request latency, idle and while a large request is uploaded over `upload_s` seconds
    and then predicted."""
    idle = [_post(server, small)[0] for _ in range(10)]
    done = threading.Event()
    large_result: dict = {}

    def send_large() -> None:
        import httpx

        def slowly():
            step = len(large) // 30
            for i in range(0, len(large), step):
                yield large[i : i + step]
                time.sleep(upload_s / 30)

        started = time.perf_counter()
        try:
            reply = httpx.post(
                f"{server.url}/predict",
                content=slowly(),
                headers={"content-type": "application/dicom", **server.headers},
                timeout=300,
            )
            large_result.update(status=reply.status_code, reason=_reason(reply))
        except httpx.HTTPError as exc:
            large_result.update(status="error", reason=type(exc).__name__)
        large_result["seconds"] = round(time.perf_counter() - started, 2)
        done.set()

    thread = threading.Thread(target=send_large, daemon=True)
    thread.start()
    busy: list[float] = []
    while not done.is_set():
        busy.append(_post(server, small)[0])
    thread.join()
    return {
        "idle_p50_ms": round(statistics.median(idle), 1),
        "busy_p50_ms": round(statistics.median(busy), 1) if busy else None,
        "busy_max_ms": round(max(busy), 1) if busy else None,
        "busy_requests": len(busy),
        "large": large_result,
    }


def measure(server: Server, inputs: dict[str, bytes], only: set[str] | None = None) -> dict:
    server.wait_ready()
    _post(server, inputs["small"][0])  # warm-up
    steps = {
        "upload_1gib_content_length": lambda: huge_upload(server, chunked=False),
        "upload_1gib_chunked": lambda: huge_upload(server, chunked=True),
        "bomb_12000x12000_rle": lambda: bomb(server, inputs["bomb"]),
        "concurrent_50": lambda: concurrent(server, inputs["small"]),
        "small_beside_large": lambda: beside_large(server, inputs["small"][0], inputs["large"]),
    }
    out = {}
    for what, step in steps.items():
        if only and what not in only:
            continue
        out[what] = step()
        print(f"{what}: {json.dumps(out[what])}", flush=True)
    out["server_rss_mb_end"] = round(server.rss_mb(), 1)
    return out


def archived(rev: str, into: Path) -> Path:
    """The files of git revision `rev` of this checkout, extracted under `into`."""
    code = into / f"rev-{rev.replace('/', '_')}"
    if not code.exists():
        code.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", rev],
            capture_output=True,
            check=True,
        ).stdout
        import io

        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(code, filter="data")
    return code


def fuzz(examples: int) -> int:
    """The test suite's HTTP fuzz at a large budget."""
    env = dict(_env(), RADFLOW_FUZZ_EXAMPLES=str(examples))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + ["tests/integration/test_serve_api.py", "-k", "fuzz"],
        env=env,
        cwd=ROOT,
    ).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", type=Path, help="a workspace with a production version")
    parser.add_argument(
        "--root", type=Path, default=Path(tempfile.gettempdir()) / "radflow-bench" / "serve-api"
    )
    parser.add_argument("--baseline-rev", help="also measure this git revision's serve-api")
    parser.add_argument("--fuzz-examples", type=int, default=0, help="also fuzz the API this much")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--only",
        help="comma-separated measurements to run (upload_1gib_content_length, "
        "upload_1gib_chunked, bomb_12000x12000_rle, concurrent_50, small_beside_large)",
    )
    args = parser.parse_args()

    from flows.api_auth import add_token

    ws = args.workspace or build_workspace(args.root / "workspace")
    inputs = make_inputs(args.root)
    tokens = args.root / "api-tokens"
    tokens.unlink(missing_ok=True)
    token = add_token(tokens, "bench")
    load = os.getloadavg()
    figures: dict = {"load_average_start": [round(x, 2) for x in load]}
    runs = [("this checkout", ROOT, token, tokens)]
    if args.baseline_rev:
        runs.append((args.baseline_rev, archived(args.baseline_rev, args.root), token, tokens))
    for label, code, tok, file in runs:
        print(f"--- serve-api of {label}", flush=True)
        server = Server(ws, code, tok, file)
        try:
            figures[label] = measure(
                server, inputs, set(args.only.split(",")) if args.only else None
            )
        finally:
            server.stop()
        print(json.dumps(figures[label], indent=2), flush=True)
    figures["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    mine = figures["this checkout"]
    if args.only:
        print(json.dumps(figures, indent=2))
        return 0
    checks = {
        "1 GiB upload (Content-Length) refused within 1 s": mine["upload_1gib_content_length"][
            "seconds"
        ]
        < TARGETS["upload_refusal_s"],
        "... with RSS growth under 50 MB": mine["upload_1gib_content_length"]["rss_growth_mb"]
        < TARGETS["upload_rss_mb"],
        "bomb answered within 1 s": mine["bomb_12000x12000_rle"]["seconds"] < TARGETS["bomb_s"],
        "50 concurrent p95 under 500 ms": mine["concurrent_50"]["p95_ms"]
        < TARGETS["concurrent_p95_ms"],
    }
    figures["targets"] = checks
    print(f"load average: start {figures['load_average_start']}, end {figures['load_average_end']}")
    for what, met in checks.items():
        print(f"{'met    ' if met else 'NOT MET'} {what}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    status = 0
    if args.fuzz_examples:
        status = fuzz(args.fuzz_examples)
        print(f"fuzz, {args.fuzz_examples} examples: {'passed' if status == 0 else 'FAILED'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
