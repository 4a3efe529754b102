"""Fuzzing the parameter and label-file parsers at a large budget (the test suite runs the same
strategies for a few seconds: tests/unit/test_parser_fuzz.py).

    python benchmarks/fuzz_parsers.py --seconds 600            # split across the targets
    python benchmarks/fuzz_parsers.py --seconds 60 --target labels --seed 7

Targets:
- `params`: `load_params` on random bytes, random YAML documents over the real section and key
  names, mutated copies of the repository's params.yaml, and deeply nested or alias-heavy files;
- `labels`: `read_label_file` + `import_labels` on label CSVs in every supported format (and
  broken ones), cells drawn from absurd values, in eight encodings, some mutated, and random bytes;
- `ingest`: the same label files through `ingest_directory` with two real DICOMs, into a fresh
  workspace each time (reading, size checks, merge, the CSVs written and read back).

An example passes when it ends in a value or the documented error (ConfigError, DataError), and
its imported boxes are finite and inside their image. Hypothesis runs with random seeds (unless
--seed), in chunks, until the time is spent; the first failure is shrunk, printed, and the script
exits 1. Prints per target: examples, outcomes, examples/s and the slowest example.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pipeline_steps.core.errors import DataError  # noqa: E402
from pipeline_steps.core.labels import BOX_COLUMNS  # noqa: E402
from pipeline_steps.core.layout import Layout  # noqa: E402
from pipeline_steps.ingest import ingest_directory  # noqa: E402
from tests.conftest import build_dicom  # noqa: E402
from tests.unit.test_parser_fuzz import FORMATS, LABEL_FILES, TARGETS  # noqa: E402

CHUNK = 50  # examples per hypothesis run (time is checked between runs); a run ends at the first failure


def _ingest_target(folder: Path):
    """check(data, fmt) for the `ingest` target: two DICOMs named as the label files' keys."""
    src = folder / "in"
    build_dicom(src / "a.dcm", patient_id="P1")  # 280 columns x 300 rows
    build_dicom(src / "b.dcm", np.zeros((512, 512), np.uint16), patient_id="P2")
    sizes = {"a": (300, 280), "b": (512, 512)}
    count = iter(range(10**9))

    def check_ingest(data: bytes, fmt: str = "auto") -> str:
        work = folder / f"ws{next(count)}"
        labels = work / "labels.csv"
        labels.parent.mkdir(parents=True)
        labels.write_bytes(data)
        layout = Layout(work)
        try:
            summary = ingest_directory(src, labels, layout, label_format=fmt)
        except DataError:
            assert not layout.raw.exists(), "a refused label file must leave nothing behind"
            return "refused"
        table = pd.read_csv(layout.raw_labels, dtype={"image_id": str, "label": str})
        ids = {}
        for stem in ("a", "b"):
            (image_id,) = [
                p.stem
                for p in layout.raw_images.iterdir()
                if p.read_bytes() == (src / f"{stem}.dcm").read_bytes()
            ]
            ids[image_id] = sizes[stem]
        boxes = table.dropna(subset=BOX_COLUMNS)
        for image_id, x0, y0, x1, y1 in boxes[["image_id", *BOX_COLUMNS]].itertuples(index=False):
            rows, columns = ids[image_id]
            assert 0 <= x0 < x1 <= columns and 0 <= y0 < y1 <= rows, (image_id, x0, y0, x1, y1)
        assert summary.label_rows == len(table)
        return "imported"

    return check_ingest


def fuzz(name: str, check, strategies, seconds: float, rng_seed: int | None) -> dict:
    outcomes: Counter[str] = Counter()
    slowest = 0.0

    def one(args: tuple) -> None:
        nonlocal slowest
        start = time.perf_counter()
        outcomes[check(*args)] += 1
        slowest = max(slowest, time.perf_counter() - start)

    start = time.perf_counter()
    runs = 0
    failure = None
    while time.perf_counter() - start < seconds:
        test = settings(
            max_examples=CHUNK,
            derandomize=False,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )(given(st.tuples(*strategies))(one))
        if rng_seed is not None:
            test = seed(rng_seed + runs)(test)
        runs += 1
        try:
            test()
        except Exception as exc:  # the shrunk failing example was printed by hypothesis
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            break
    elapsed = time.perf_counter() - start
    total = sum(outcomes.values())
    return {
        "target": name,
        "examples": total,
        "outcomes": dict(outcomes),
        "seconds": round(elapsed, 1),
        "examples_per_s": round(total / elapsed, 1) if elapsed else 0.0,
        "slowest_ms": round(slowest * 1000, 1),
        "failure": failure,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="total, split across targets")
    parser.add_argument(
        "--target",
        choices=["all", "params", "labels", "ingest"],
        default="all",
        help="what to fuzz",
    )
    parser.add_argument("--seed", type=int, default=None, help="fixed seeds (default: random)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    os.environ.setdefault("RADFLOW_PSEUDONYM_DEV_MODE", "1")
    names = ["params", "labels", "ingest"] if args.target == "all" else [args.target]
    results = []
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="radflow-fuzz-") as tmp:
        targets = dict(TARGETS)
        targets["ingest"] = (_ingest_target(Path(tmp)), (LABEL_FILES, FORMATS))
        for name in names:
            check, strategies = targets[name]
            result = fuzz(name, check, strategies, args.seconds / len(names), args.seed)
            results.append(result)
            print(json.dumps(result), flush=True)
            if result["failure"]:
                break
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failed = [r for r in results if r["failure"]]
    print(
        "FAILED: " + "; ".join(f"{r['target']}: {r['failure']}" for r in failed)
        if failed
        else "no failure"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
