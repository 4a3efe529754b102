"""Benchmark of `radflow console`: how long the review queue and the monitoring page take to load over a
ledger of many predictions, against the sign-in page (the framework's own floor) in the same run.

    python benchmarks/bench_console.py                    # 1000 predictions, 30 loads per page
    python benchmarks/bench_console.py --predictions 10000 --reviewed 0.3

A new workspace (`radflow init`), a console user, and `--predictions` prediction rows in its SQLite
ledger (each with 0-6 boxes, shaped as `radflow predict` writes them), a share of them reviewed. The
console runs as `radflow console` on loopback. Each page is fetched `--repeats` times over HTTP with
a signed-in session (time to the last byte), then loaded in Chromium (Debian's; navigation start to
the load event, as a reader waits for it). Medians and p95 are printed, with the ratio to the
sign-in page. Target: the 1000-prediction queue page under 500 ms.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECRET = "bench-secret-1"


def _radflow(ws: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--workspace", str(ws), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"radflow {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def fill_ledger(ws: Path, n: int, reviewed: float, seed: int = 0) -> None:
    """`n` predictions by version 1 over 30 days, and reviews of a share of them, in one write."""
    from pipeline_steps.governance import review
    from pipeline_steps.governance.ledger import open_ledger

    rng = random.Random(seed)
    verdicts = ("confirmed", "rejected", "corrected")
    with open_ledger(ws) as ledger, ledger.writing() as writer:
        for i in range(n):
            boxes = []
            for _ in range(rng.randint(0, 6)):
                x, y = rng.uniform(0, 2000), rng.uniform(0, 2000)
                s = rng.uniform(10, 120)
                boxes.append(
                    {
                        "x_min": x,
                        "y_min": y,
                        "x_max": x + s,
                        "y_max": y + s,
                        "score": rng.random(),
                        "label": "nodule",
                    }
                )
            pid = f"01BENCH{i:019d}"
            day = 1 + i * 30 // n
            payload = {
                "prediction_id": pid,
                "image_sha256": f"{rng.getrandbits(256):064x}",
                "file_sha256": f"{rng.getrandbits(256):064x}",
                "sop_instance_uid_hash": f"{rng.getrandbits(128):032x}",
                "boxes": boxes,
                "model": {
                    "name": "radflow-detector",
                    "version": "1",
                    "stage": "production",
                    "run_id": "0" * 32,
                },
                "data_version": "0" * 32 + ".dir",
                "code_version": "bench",
                "threshold": 0.3,
                "created_at": f"2026-11-{day:02d}T10:00:00.000Z",
                "training_membership_key": f"{i:024x}",
            }
            entry = writer.append(review.PREDICTION, pid, payload)
            if rng.random() < reviewed:
                record = {
                    "prediction_id": pid,
                    "prediction_row": entry.seq,
                    "model": {"name": "radflow-detector", "version": "1"},
                    "reviewer": "bench",
                    "reviewed_at": f"2026-11-{day:02d}T12:00:00.000Z",
                    "findings": [
                        {
                            "index": k,
                            "verdict": rng.choice(verdicts),
                            "score": b["score"],
                            "label": "nodule",
                            "box": [b["x_min"], b["y_min"], b["x_max"], b["y_max"]],
                            "corrected_box": [b["x_min"], b["y_min"], b["x_max"], b["y_max"]],
                        }
                        for k, b in enumerate(boxes)
                    ],
                    "missed": [{"box": [10, 10, 50, 50]}] * rng.randint(0, 1),
                    "training_membership_key": payload["training_membership_key"],
                    "image_size": [2048, 2048],
                    "supersedes": None,
                }
                writer.append(review.REVIEW, pid, record)


def _stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predictions", type=int, default=1000)
    ap.add_argument("--reviewed", type=float, default=0.3, help="share of predictions reviewed")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import httpx

    from tests.integration.test_registry import free_port, stop, wait_http

    tmp = Path(tempfile.mkdtemp(prefix="radflow-bench-console-"))
    ws, users = tmp / "ws", tmp / "console-users"
    proc = None
    try:
        _radflow(ws.parent, "init", str(ws))
        _radflow(
            ws,
            "console-users",
            "add",
            "bench",
            "--role",
            "reviewer",
            "--users-file",
            str(users),
            stdin=SECRET + "\n",
        )
        started = time.perf_counter()
        fill_ledger(ws, args.predictions, args.reviewed)
        fill_s = time.perf_counter() - started
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "--workspace",
                str(ws),
                "console",
                "--port",
                str(port),
                "--users-file",
                str(users),
                # httpx, unlike a browser, keeps no Secure cookie for http://127.0.0.1; timing is
                # the same either way.
                "--insecure-cookies",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/login", proc, 120, "radflow console")
        pages = {
            "sign-in page (floor)": "/login",
            "review queue (100 rows of the queue)": "/review",
            "review queue (whole queue on one page)": f"/review?per_page={args.predictions}",
            "monitoring (30 days)": "/monitoring",
        }
        http: dict[str, dict[str, float]] = {}
        with httpx.Client(base_url=base, timeout=60) as client:
            token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)[1]
            client.post("/login", data={"name": "bench", "secret": SECRET, "csrf": token})
            assert client.cookies.get("radflow_console_session"), "sign-in failed"
            for name, path in pages.items():
                client.get(path).raise_for_status()  # warm
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    reply = client.get(path)
                    times.append(time.perf_counter() - t0)
                    reply.raise_for_status()
                http[name] = _stats(times) | {"bytes": len(reply.content)}
        browser = _browser_loads(base, pages, args.repeats)
        floor = http["sign-in page (floor)"]["median_ms"]
        result = {
            "predictions": args.predictions,
            "reviewed_share": args.reviewed,
            "ledger_fill_s": round(fill_s, 2),
            "http": {k: v | {"ratio_to_floor": v["median_ms"] / floor} for k, v in http.items()},
            "browser": browser,
        }
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{args.predictions} predictions, {args.reviewed:.0%} reviewed "
        f"(ledger written in {fill_s:.1f} s); {args.repeats} loads per page"
    )
    print(
        f"{'page':42} {'HTTP median':>12} {'p95':>9} {'x floor':>8} {'Chromium median':>16} {'p95':>9}"
    )
    for name in pages:
        h, b = result["http"][name], browser[name]
        print(
            f"{name:42} {h['median_ms']:10.1f}ms {h['p95_ms']:7.1f}ms {h['ratio_to_floor']:8.1f}"
            f" {b['median_ms']:14.1f}ms {b['p95_ms']:7.1f}ms"
        )
    return 0


def _browser_loads(base: str, pages: dict[str, str], repeats: int) -> dict[str, dict[str, float]]:
    """Navigation start to the load event in Chromium, per page (signed in once)."""
    from playwright.sync_api import sync_playwright

    from tests.chromium import chromium

    out = {}
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = b.new_page()
        page.goto(f"{base}/login")
        page.fill("#name", "bench")
        page.fill("#secret", SECRET)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/models")
        for name, path in pages.items():
            page.goto(f"{base}{path}")  # warm
            times = []
            for _ in range(repeats):
                page.goto(f"{base}{path}", wait_until="load")
                timing = page.evaluate(
                    "JSON.stringify(performance.getEntriesByType('navigation')[0].toJSON())"
                )
                nav = json.loads(timing)
                times.append((nav["loadEventEnd"] - nav["startTime"]) / 1000)
            out[name] = _stats(times)
        b.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
