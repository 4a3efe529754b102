"""The cost of anchoring per ledger write batch: the same batches written to a fresh SQLite ledger
without anchors, with a folder store, and with S3 Object Lock on moto's server over loopback.

    python benchmarks/bench_ledger_anchor.py [--batches 200] [--rows 1] [--json out.json]

Prints per-batch wall time (median, p95, mean) for each store and the median overhead over no
anchors. The S3 figure is loopback to moto, so it is a floor: a real bucket adds the network's
round trips (two requests per batch: the lock check is once per process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.anchoring import S3AnchorStore  # noqa: E402
from pipeline_steps.governance.anchors import AnchorConfig, AnchorStore, FolderAnchorStore  # noqa: E402
from pipeline_steps.governance.ledger import Ledger  # noqa: E402

BUCKET = "bench-anchors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto_server did not start")


def run(store: AnchorStore | None, db: Path, batches: int, rows: int) -> list[float]:
    times = []
    with Ledger(f"sqlite:///{db}", anchors=store) as ledger:
        ledger.append("bench", "warm-up", {})  # schema, connection and (S3) the lock check
        for b in range(batches):
            start = time.perf_counter()
            with ledger.writing() as writer:
                for r in range(rows):
                    writer.append("prediction", f"b{b}r{r}", {"boxes": [], "score": 0.5})
            times.append(time.perf_counter() - start)
        if ledger.anchor_error:
            raise SystemExit(f"anchoring failed: {ledger.anchor_error}")
    return times


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[int(0.95 * (len(ordered) - 1))] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rows", type=int, default=1, help="rows per write batch")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    for key, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    results: dict[str, dict[str, float]] = {}
    proc, url = start_moto()
    try:
        os.environ["AWS_ENDPOINT_URL_S3"] = url
        with tempfile.TemporaryDirectory(prefix="radflow-bench-anchor-") as tmp:
            root = Path(tmp)
            s3 = S3AnchorStore.from_config(AnchorConfig(f"s3://{BUCKET}/bench"))
            s3.client.create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
            stores: dict[str, AnchorStore | None] = {
                "none": None,
                "folder": FolderAnchorStore(root / "anchors"),
                "s3 (moto, loopback)": s3,
            }
            for name, store in stores.items():
                db = root / f"{name.split()[0]}.db"
                results[name] = summary(run(store, db, args.batches, args.rows))
    finally:
        proc.terminate()
        proc.wait(10)
    base = results["none"]["median_ms"]
    print(f"{args.batches} write batches of {args.rows} row(s); load {os.getloadavg()[0]:.2f}")
    for name, figures in results.items():
        figures["overhead_median_ms"] = figures["median_ms"] - base
        print(
            f"  {name:22s} median {figures['median_ms']:7.2f} ms  p95 {figures['p95_ms']:7.2f} ms  "
            f"mean {figures['mean_ms']:7.2f} ms  (+{figures['overhead_median_ms']:.2f} ms)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
