"""The nightly run's no-change skip against a running Prefect server: landing sync (nothing new), DVC push
(already pushed), decision (up to date), summary. Target: under 15 s, training nothing.

Sets up, on loopback: moto's S3 server (landing bucket with a small synthetic batch, DVC remote), a
`prefect server start` on SQLite in a scratch PREFECT_HOME, and a workspace whose first nightly run
trains a tiny model. Then times `radflow nightly` again and again (nothing changed: each is a skip).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_S = 15.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="timed skip runs")
    parser.add_argument("--n-images", type=int, default=24, help="studies in the landing bucket")
    parser.add_argument("--root", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from flows.servers import prefect_api_url, prefect_server_command, stop, wait_ready
    from tests.integration.conftest import (
        AWS_ENV,
        Moto,
        free_port,
        nightly_workspace,
        synth_to_landing,
    )

    root = args.root or Path(tempfile.mkdtemp(prefix="radflow-bench-nightly-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.update(AWS_ENV)
    # Synthetic data: the validate stage may pseudonymize with the public development key.
    os.environ.setdefault("RADFLOW_PSEUDONYM_DEV_MODE", "1")
    # The checkout may be edited by others while this runs; the code must not look changed.
    os.environ["RADFLOW_CODE_VERSION"] = "bench-nightly-skip"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    load_before = os.getloadavg()

    s3 = Moto(root).start()
    port = free_port()
    api = prefect_api_url("127.0.0.1", port)
    server_env = dict(
        os.environ,
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    server_env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # SQLite, as `radflow server start`
    with (root / "prefect-server.log").open("wb") as log:
        server = subprocess.Popen(
            prefect_server_command("127.0.0.1", port, ui=False),
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        took = wait_ready(f"{api}/health", server, 180, "prefect server")
        print(f"prefect server (SQLite) ready in {took:.1f} s at {api}", flush=True)
        os.environ["AWS_ENDPOINT_URL_S3"] = s3.url
        client = s3.client()
        client.create_bucket(Bucket="landing")
        client.create_bucket(Bucket="dvc-store")
        synth_to_landing(client, "landing", "site/day1", root / "synth", args.n_images, seed=3)
        layout = nightly_workspace(
            root / "ws", "s3://landing/site", "s3://dvc-store/radflow", s3.url, {}
        )
        env = dict(
            os.environ,
            PREFECT_API_URL=api,
            PREFECT_HOME=str(root / "client-home"),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        )
        command = [sys.executable, "-m", "flows.cli", "--workspace", str(layout.root)]

        def nightly() -> tuple[float, dict]:
            start = time.monotonic()
            done = subprocess.run(
                [*command, "nightly", "--json"], env=env, capture_output=True, text=True
            )
            wall = time.monotonic() - start
            if done.returncode != 0:
                raise SystemExit(f"radflow nightly failed:\n{done.stderr[-4000:]}")
            return wall, json.loads(done.stdout.strip().splitlines()[-1])

        wall, first = nightly()
        print(
            f"first night: {first['status']} model version {first['model_version']} "
            f"in {wall:.1f} s (untimed setup)",
            flush=True,
        )
        walls, flows = [], []
        for i in range(args.repeat):
            wall, summary = nightly()
            if summary["status"] != "skipped":
                raise SystemExit(f"run {i + 1} did not skip: {summary}")
            walls.append(wall)
            flows.append(summary["duration_s"])
            print(
                f"skip {i + 1}: {wall:.2f} s wall (radflow nightly, process start to exit), "
                f"{summary['duration_s']:.2f} s inside the flow",
                flush=True,
            )
    finally:
        stop(server)
        s3.stop()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()
    figures = {
        "n_images": args.n_images,
        "repeat": args.repeat,
        "wall_s": {"median": statistics.median(walls), "max": max(walls), "all": walls},
        "flow_s": {"median": statistics.median(flows), "max": max(flows), "all": flows},
        "target_s": TARGET_S,
        "met": max(walls) < TARGET_S,
        "load_before": load_before,
        "load_after": load_after,
    }
    print(
        f"\nno-change skip with a running Prefect server: median {figures['wall_s']['median']:.2f} s, "
        f"worst {figures['wall_s']['max']:.2f} s (target < {TARGET_S:g} s: "
        f"{'met' if figures['met'] else 'MISSED'}); inside the flow median "
        f"{figures['flow_s']['median']:.2f} s\nload average {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
