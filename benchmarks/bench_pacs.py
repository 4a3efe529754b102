"""radflow and a PACS, against a real Orthanc on loopback. One function per measure; `--only` picks
some (default: all in this file).

- `pull`: `radflow pacs pull`'s throughput in instances/s (QIDO-RS searches, WADO-RS retrieves,
  staging, ingestion's screening, the DVC data version, the index) for `--pull-studies` synthetic
  studies into a fresh workspace, against the bare limit on the same Orthanc: the same searches and
  retrieves through the same edge (flows/pacs.py), keeping nothing. Also a re-pull (nothing new).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


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
        "--pull-studies", type=int, default=50, help="pull: synthetic studies in the PACS"
    )
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
