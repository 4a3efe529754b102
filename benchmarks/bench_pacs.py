"""radflow and a PACS, against a real Orthanc on loopback. One function per measure; `--only` picks
some (default: all in this file).

- `latency`: study arrival to SR. A watcher polls at `--interval` in this process (the production
  model of a small workspace, random weights, already loaded); a study is stored in Orthanc as a
  modality would send it, and the clock runs until its SR can be found over QIDO-RS. Reported per
  study and as the median: the total, and its parts from the watcher's own poll summary (search,
  retrieve, predict, ledger, store); the rest is the wait for the next poll (about half the interval
  on average) and the QIDO-RS look-up that noticed the SR.
- `pull`: `radflow pacs pull`'s throughput in instances/s (QIDO-RS searches, WADO-RS retrieves,
  staging, ingestion's screening, the DVC data version, the index) for `--pull-studies` synthetic
  studies into a fresh workspace, against the bare limit on the same Orthanc: the same searches and
  retrieves through the same edge (flows/pacs.py), keeping nothing. Also a re-pull (nothing new).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _production_workspace(root: Path) -> tuple[Any, Any]:
    """A workspace with a small detector (random weights) registered and promoted to production."""
    import yaml

    from flows import registry, stages
    from flows.workspace import open_workspace
    from tests.integration.test_registry import build_workspace

    layout, params = build_workspace(root, n_images=2)
    version = stages.register(layout, params).model_version
    with registry.governance(layout, params) as (reg, ledger):
        registry.promote(
            reg, ledger, version, "production", actor="bench", reason="bench", force=True
        )
    data = yaml.safe_load(layout.params_file.read_text())
    data.setdefault("pacs", {})["watch"] = {"lookback_days": 0, "score_threshold": 0.0}
    layout.params_file.write_text(yaml.safe_dump(data))
    return open_workspace(layout.root)


def measure_latency(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from flows.pacs import Pacs, PacsSettings
    from flows.pacs_watch import StopRequest, Watcher, serve_polls
    from pipeline_steps.core.deid import pseudonym_key
    from tests.integration.orthanc import orthanc_server
    from tests.integration.pacs_common import synthetic_studies

    layout, params = _production_workspace(root / "ws")
    paths = synthetic_studies(root / "studies", args.studies, seed=7)
    with orthanc_server(root / "orthanc") as orthanc:
        env = orthanc.env()
        for name, value in env.items():
            os.environ[name] = value
        settings = PacsSettings.from_env(env, timeout_s=params.pacs.timeout_s)
        watcher = Watcher(layout, params, Pacs(settings), pseudonym_key().secret)
        probe = Pacs(settings)
        polls: list[tuple[float, dict[str, Any]]] = []
        stop = StopRequest()
        thread = threading.Thread(
            target=serve_polls,
            args=(watcher,),
            kwargs={
                "interval_s": args.interval,
                "once": False,
                "stop": stop,
                "report": lambda s: polls.append((time.monotonic(), s)),
            },
            daemon=True,
        )
        thread.start()
        while not polls:  # the model is loaded and an empty poll done: not part of a latency
            time.sleep(0.05)
        rows = []
        rng = random.Random(args.seed)
        try:
            for path in paths:
                import pydicom

                study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
                time.sleep(rng.uniform(0, args.interval))  # arrive anywhere in the poll cycle
                storing_before = sum(1 for _, s in polls if s.get("reports_stored"))
                arrived = time.monotonic()
                orthanc.upload([path])
                while not probe.client.search_for_instances(
                    study, search_filters={"Modality": "SR"}
                ):
                    time.sleep(0.02)
                    if time.monotonic() - arrived > 600:
                        raise RuntimeError("no SR after 600 s")
                seen = time.monotonic()
                # The poll that stored it reports just after its STOW: wait for its summary.
                while sum(1 for _, s in polls if s.get("reports_stored")) <= storing_before:
                    time.sleep(0.01)
                parts = [s for _, s in polls if s.get("reports_stored")][-1]["seconds"]
                rows.append(
                    {
                        "total_s": round(seen - arrived, 3),
                        **{f"{k}_s": v for k, v in parts.items()},
                        "wait_and_lookup_s": round(seen - arrived - sum(parts.values()), 3),
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            stop.event.set()
            thread.join(60)
    keys = rows[0].keys()
    return {
        "interval_s": args.interval,
        "studies": len(rows),
        "median": {k: round(statistics.median(r[k] for r in rows), 3) for k in keys},
        "max_total_s": max(r["total_s"] for r in rows),
        "per_study": rows,
    }


def _bare_retrieve(pacs: Any) -> int:
    """The pull's DICOMweb traffic alone: every study, its instances, each retrieved and dropped."""
    from flows.pacs import json_value

    n = 0
    for study in pacs.search_studies({}, ("StudyInstanceUID",)):
        uid = json_value(study, "0020000D")
        for item in pacs.search_instances(uid, ("SOPInstanceUID", "SeriesInstanceUID")):
            pacs.retrieve(uid, json_value(item, "0020000E"), json_value(item, "00080018"))
            n += 1
    return n


def measure_pull(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from flows import pacs_pull, workspace
    from flows.pacs import Pacs
    from tests.integration.orthanc import orthanc_server
    from tests.integration.pacs_common import synthetic_studies

    paths = synthetic_studies(root / "studies", args.pull_studies, seed=20261206)
    layout = workspace.init(root / "ws")
    layout, params = workspace.open_workspace(layout.root)
    with orthanc_server(root / "orthanc") as orthanc:
        orthanc.upload(paths)
        pacs = Pacs.from_env(env=orthanc.env())
        started = time.perf_counter()
        bare_n = _bare_retrieve(pacs)
        bare_s = time.perf_counter() - started
        started = time.perf_counter()
        result = pacs_pull.pull_and_ingest(layout, params, pacs)
        pull_s = time.perf_counter() - started
        started = time.perf_counter()
        again = pacs_pull.pull_and_ingest(layout, params, pacs)
        repull_s = time.perf_counter() - started
    pull_rate = result["new_images"] / pull_s
    bare_rate = bare_n / bare_s
    return {
        "instances": result["new_images"],
        "archived": result["archived"],
        "pull_s": round(pull_s, 3),
        "pull_instances_per_s": round(pull_rate, 2),
        "bare_s": round(bare_s, 3),
        "bare_instances_per_s": round(bare_rate, 2),
        "pull_over_bare": round(pull_rate / bare_rate, 3),
        "repull_s": round(repull_s, 3),
        "repull_new_images": again["new_images"],
    }


MEASURES: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "latency": measure_latency,
    "pull": measure_pull,
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--only",
        default=",".join(MEASURES),
        help=f"comma-separated measures among {', '.join(MEASURES)} (default: all)",
    )
    parser.add_argument(
        "--studies", type=int, default=8, help="latency: studies stored, one by one"
    )
    parser.add_argument(
        "--interval", type=float, default=2.0, help="latency: the watcher's poll interval, s"
    )
    parser.add_argument(
        "--pull-studies", type=int, default=50, help="pull: synthetic studies in the PACS"
    )
    parser.add_argument("--seed", type=int, default=5, help="latency: arrival times in the cycle")
    parser.add_argument("--root", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(MEASURES))
    if unknown:
        parser.error(f"unknown measure(s) {unknown}; this file has {sorted(MEASURES)}")
    os.environ.setdefault("RADFLOW_PSEUDONYM_DEV_MODE", "1")  # synthetic studies only
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("RADFLOW_LEDGER_URL", None)
    root = args.root or Path(tempfile.mkdtemp(prefix="radflow-bench-pacs-"))
    load_before = os.getloadavg()
    figures: dict[str, Any] = {"load_average_before": [round(x, 2) for x in load_before]}
    for name in chosen:
        figures[name] = MEASURES[name](args, root / name)
    figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
