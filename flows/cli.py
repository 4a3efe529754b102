"""The `radflow` command line: init, synth, ingest, run and step, each on a workspace."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline_steps.errors import RadflowError

log = logging.getLogger("radflow")


@contextmanager
def _bar(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm progress bar on stderr, driven by (done, total) callbacks."""
    from tqdm import tqdm

    bar: tqdm | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def _own_info_only(record: logging.LogRecord) -> bool:
    """Below WARNING, show only radflow's and Prefect's own messages (not every HTTP request)."""
    return record.levelno >= logging.WARNING or record.name.startswith(
        ("radflow", "pipeline_steps", "flows", "prefect")
    )


def _setup_environment() -> None:
    """Quiet noisy libraries and route radflow's loggers through Prefect; done at start-up, not import."""
    # TensorFlow's C++ start-up chatter (oneDNN, CPU features) is noise to a user; Python errors still raise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline_steps,radflow")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_own_info_only)
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def cmd_init(args: argparse.Namespace) -> int:
    from flows import workspace

    layout = workspace.init(Path(args.dir or args.workspace or "."))
    print(f"workspace ready: {layout.root}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline_steps.config import SynthParams, load_params
    from pipeline_steps.synth import generate_dataset

    params_file = Path(args.workspace or ".") / "params.yaml"
    synth = load_params(params_file).synth if params_file.exists() else SynthParams()
    with _bar("synth") as bar:
        summary = generate_dataset(
            synth,
            Path(args.out),
            n_images=args.n_images,
            seed=args.seed,
            progress=bar,
            workers=args.workers or os.cpu_count() or 1,
        )
    print(
        f"wrote {summary.n_images} images of {summary.n_patients} patients "
        f"({summary.n_positive} with findings, {summary.n_boxes} boxes) to {args.out}"
    )
    return 0


def _ingest(
    layout: object,
    dicom_dir: Path,
    labels: Path | None,
    replace: bool,
    label_format: str = "auto",
) -> dict[str, object]:
    """Archive, scan and label one folder, then record the data version; the summary as a dict."""
    from flows import versioning, workspace
    from pipeline_steps.ingest import ingest_directory
    from pipeline_steps.layout import Layout

    assert isinstance(layout, Layout)
    params = workspace.load(layout)
    with _bar("ingest") as bar:
        summary = ingest_directory(
            dicom_dir,
            labels,
            layout.raw,
            replace=replace,
            progress=bar,
            params=params.ingest,
            label_format=label_format,
        )
    version = versioning.record_raw(layout)
    return {
        "seen": summary.seen,
        "accepted": summary.accepted,
        "quarantined": summary.quarantined,
        "labels": summary.labels_imported,
        "data_version": version,
        "added": summary.added,
        "skipped_existing": summary.skipped_existing,
        "label_format": summary.label_format,
        "label_rows": summary.label_rows,
        "reader_rows": summary.reader_rows,
        "label_issues": summary.label_issues,
        "labels_without_image": summary.labels_without_image,
        "labels_for_quarantined": summary.labels_for_quarantined,
        "unlabelled": len(summary.unlabelled),
        "issues_file": (
            str(summary.issues_file.relative_to(layout.root)) if summary.issues_file else None
        ),
    }


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows import workspace

    layout = workspace.resolve(_ws(args))
    result = _ingest(
        layout,
        Path(args.dicom_dir),
        Path(args.labels) if args.labels else None,
        args.replace,
        label_format=args.label_format,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    quarantined = result["quarantined"]
    assert isinstance(quarantined, dict)
    reasons = ", ".join(f"{reason} {count}" for reason, count in quarantined.items())
    lines = [
        f"seen {result['seen']} files: {result['accepted']} accepted, "
        f"{sum(quarantined.values())} quarantined" + (f" ({reasons})" if reasons else ""),
        f"  archived {result['added']} new, {result['skipped_existing']} already present "
        "(rejected files are kept, unmodified)",
    ]
    if result["label_format"]:
        issues = result["label_issues"]
        assert isinstance(issues, dict)
        fused = (
            f" (fused from {result['reader_rows']} reader rows)" if result["reader_rows"] else ""
        )
        lines.append(
            f"labels ({result['label_format']}): {result['labels']} rows imported{fused}, "
            f"{result['label_rows']} in the dataset"
        )
        if issues:
            detail = ", ".join(f"{kind} {count}" for kind, count in issues.items())
            lines.append(f"  not imported: {detail}; see {result['issues_file']}")
        if result["labels_for_quarantined"]:
            lines.append(
                f"  {result['labels_for_quarantined']} imported rows belong to quarantined images"
            )
    else:
        lines.append("labels: none given")
    if result["unlabelled"]:
        lines.append(f"  {result['unlabelled']} accepted images have no label row (unlabelled)")
    lines.append(f"data version: {result['data_version']}")
    print("\n".join(lines))
    return 0


def _ensure_data(layout: object) -> None:
    """A workspace without data gets the deterministic default dataset, recorded like any ingest."""
    from flows import workspace
    from pipeline_steps.layout import Layout
    from pipeline_steps.synth import generate_dataset

    assert isinstance(layout, Layout)
    if layout.raw_dvc.exists():
        return
    params = workspace.load(layout)
    staging = layout.state / "synth"
    shutil.rmtree(staging, ignore_errors=True)
    log.info("no data yet: synthesizing the default dataset (%d images)", params.synth.n_images)
    with _bar("synth") as bar:
        # Byte-identical to a serial run (tested), so the data version is the same on every machine.
        summary = generate_dataset(params.synth, staging, progress=bar, workers=os.cpu_count() or 1)
    result = _ingest(layout, summary.images_dir, summary.labels_path, replace=True)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("default dataset recorded: data version %s", result["data_version"])


def cmd_run(args: argparse.Namespace) -> int:
    from flows import versioning, workspace

    layout = workspace.resolve(_ws(args))
    workspace.load(layout)  # fail on a bad params.yaml before any work starts
    _ensure_data(layout)
    from flows.pipeline import training_pipeline

    result = training_pipeline(str(layout.root))
    versioning.commit_stages(layout)
    metrics = json.loads(layout.metrics.read_text())
    summary = {
        "run_id": result["run_id"],
        "model_name": result["model_name"],
        "model_version": result["model_version"],
        "data_version": versioning.data_version(layout),
        "metrics": metrics,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        headline = ", ".join(
            f"{k}={metrics[k]:.3f}"
            for k in ("ap50", "sens_at_1fp", "cpm", "auroc")
            if metrics.get(k) is not None
        )
        print(
            f"registered {summary['model_name']} version {summary['model_version']} "
            f"(run {summary['run_id']})\n"
            f"data version {summary['data_version']}\n"
            f"test metrics: {headline}\n"
            f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{layout.mlflow_db}\n"
            f"reports: {layout.reports}"
        )
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    from flows import stages

    layout, params = stages.open_workspace(_ws(args))
    with _bar(args.stage) as bar:
        result = stages.run_stage(args.stage, layout, params, bar)
    log.info(
        "stage %s done: %s", args.stage, getattr(result, "__dict__", None) or type(result).__name__
    )
    return 0


def _ws(args: argparse.Namespace) -> Path:
    return Path(args.workspace) if args.workspace else Path.cwd()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radflow", description=__doc__)
    parser.add_argument(
        "--workspace", metavar="DIR", help="radflow checkout to work on (default: .)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "init", help="make DIR a radflow workspace (git + DVC, params.yaml, dvc.yaml)"
    )
    p.add_argument("dir", nargs="?")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "synth", help="write synthetic chest-radiograph DICOMs and RSNA-format labels"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--n-images", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--workers", type=int, help="processes (default: one per core; output is identical)"
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "ingest", help="add DICOMs (and labels) to data/raw and record a data version"
    )
    p.add_argument("--dicom-dir", required=True)
    p.add_argument(
        "--labels",
        help="optional label CSV: RSNA (patientId,x,y,width,height,Target), VinDr-CXR "
        "(image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max) or canonical "
        "(image_id,label,x_min,y_min,x_max,y_max), keyed by DICOM file name without extension",
    )
    p.add_argument(
        "--label-format",
        choices=["auto", "rsna", "vindr", "canonical"],
        default="auto",
        help="format of --labels (default: detected from the header)",
    )
    p.add_argument(
        "--replace", action="store_true", help="start the dataset over instead of appending"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "run", help="the main job: data (default synthetic) -> trained, registered model"
    )
    p.add_argument("--json", action="store_true", help="print one JSON summary object")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("step", help="run one pipeline stage without Prefect (used by dvc.yaml)")
    p.add_argument(
        "stage", choices=["validate", "preprocess", "extract_features", "train", "test", "register"]
    )
    p.set_defaults(func=cmd_step)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_environment()
    try:
        return int(args.func(args))
    except RadflowError as exc:
        print(f"radflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
