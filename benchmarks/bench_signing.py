"""Benchmark of model signing: the cost of signing at registration and of verifying per model load,
as a ratio to loading the model itself.

    python benchmarks/bench_signing.py                        # a default-architecture detector
    python benchmarks/bench_signing.py --workspace WS         # also WS's registered version (latest)

Without a workspace: a default-architecture detector saved as an MLflow Keras model folder (what
`keras_model` of a version holds), then, each `--repeats` times: sign its files (model-signing, the
elliptic key), verify them, and load the model from the folder; and once, the SBOM of the
environment that registration writes (`cyclonedx-py environment`). With `--workspace`: the version as
radflow loads it, `load_pyfunc` (download, verify, load from the verified folder) against MLflow's
own unverified load of `models:/NAME/VERSION`, and `check_signatures` (download and verify both
logged models, what `radflow models verify` does). Medians are printed, with the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _folder_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def bench_folder(repeats: int) -> dict[str, float]:
    import mlflow

    from flows import sbom
    from pipeline_steps.core.config import Params
    from pipeline_steps.core.detector import build_detector
    from pipeline_steps.governance import signing

    params = Params()
    detector = build_detector(params.preprocess.input_size, params.train)
    with tempfile.TemporaryDirectory(prefix="bench-signing-") as tmp:
        root = Path(tmp)
        folder = root / "keras_model"
        mlflow.keras.save_model(detector, str(folder))
        keys = signing.load_keys(root / "state", {})
        signature = root / "keras_model.sig"
        sign_s = _median_s(lambda: signing.sign_model(keys, folder, signature), repeats)
        verify_s = _median_s(lambda: signing.verify_model(keys, folder, signature), repeats)
        load_s = _median_s(lambda: mlflow.keras.load_model(str(folder)), repeats)
        sbom_s = _median_s(lambda: sbom.environment_sbom(root / "sbom.json"), 1)
        return {
            "sbom_s": sbom_s,
            "files": float(sum(1 for p in folder.rglob("*") if p.is_file())),
            "size_mb": _folder_size_mb(folder),
            "sign_s": sign_s,
            "verify_s": verify_s,
            "load_s": load_s,
        }


def bench_workspace(workspace: Path, repeats: int) -> dict[str, float]:
    import mlflow

    from flows import registry, tracking
    from flows.workspace import open_workspace

    layout, params = open_workspace(workspace)
    name = params.register_.model_name
    version = registry.open_registry(layout, name).versions()[-1].version
    uri = tracking.tracking_uri(layout)
    mlflow.set_tracking_uri(uri)
    path = list(sys.path)

    def unverified() -> None:
        try:
            mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        finally:
            sys.path[:] = path

    tracking.load_pyfunc(layout, name, version)  # warm-up: imports, TensorFlow start-up
    unverified_s = _median_s(unverified, repeats)
    verified_s = _median_s(lambda: tracking.load_pyfunc(layout, name, version), repeats)
    check_s = _median_s(lambda: tracking.check_signatures(layout, name, version), repeats)
    return {
        "version": float(version),
        "unverified_load_s": unverified_s,
        "verified_load_s": verified_s,
        "check_s": check_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, help="a workspace with a registered version")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    f = bench_folder(args.repeats)
    print(
        f"keras_model folder ({int(f['files'])} files, {f['size_mb']:.1f} MB): "
        f"sign {f['sign_s'] * 1000:.0f} ms ({f['sign_s'] / f['load_s']:.1%} of the load), "
        f"verify {f['verify_s'] * 1000:.0f} ms ({f['verify_s'] / f['load_s']:.1%} of the load), "
        f"load {f['load_s'] * 1000:.0f} ms; the environment's SBOM (once per registration) "
        f"{f['sbom_s']:.1f} s"
    )
    if args.workspace is not None:
        w = bench_workspace(args.workspace, args.repeats)
        print(
            f"version {int(w['version'])}: MLflow's unverified pyfunc load "
            f"{w['unverified_load_s'] * 1000:.0f} ms; radflow's load_pyfunc (download, verify, load) "
            f"{w['verified_load_s'] * 1000:.0f} ms "
            f"({w['verified_load_s'] / w['unverified_load_s']:.2f}x); "
            f"models verify (both logged models) {w['check_s'] * 1000:.0f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
