"""`radflow init | synth | ingest | run | step`: a workspace, its data, and the training run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from flows.cli.common import progress_bar, workspace_dir
from flows.stages import STAGES
from pipeline_steps.core import locks

if TYPE_CHECKING:
    from pipeline_steps.core.config import Params
    from pipeline_steps.core.layout import Layout

log = logging.getLogger("radflow")


def cmd_init(args: argparse.Namespace) -> int:
    from flows import workspace

    layout = workspace.init(Path(args.dir or args.workspace or "."))
    print(f"workspace ready: {layout.root}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline_steps.core.config import SynthParams, load_params
    from pipeline_steps.core.layout import Layout
    from pipeline_steps.synthetic import generate_dataset

    # Any folder will do: its params.yaml's synth section when it has one, else the defaults.
    params_file = Layout(Path(args.workspace or ".")).params_file
    synth = load_params(params_file).synth if params_file.exists() else SynthParams()
    with progress_bar("synth") as bar:
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
    layout: Layout,
    params: Params,
    dicom_dir: Path,
    labels: Path | None,
    replace: bool,
    label_format: str = "auto",
) -> dict[str, object]:
    """Archive, scan and label one folder, then record the data version; the summary as a dict."""
    from flows import versioning
    from pipeline_steps.ingest import ingest_directory

    with progress_bar("ingest") as bar:
        summary = ingest_directory(
            dicom_dir,
            labels,
            layout,
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


def _say_waiting(holder: locks.Holder | None, waited_s: float) -> None:
    who = holder.describe() if holder else "another process (it has not said who)"
    print(
        f"radflow: waiting for the workspace's run lock, held by {who}; waited {waited_s:.0f} s "
        "(Ctrl-C stops waiting)",
        file=sys.stderr,
        flush=True,
    )


@contextmanager
def _run_lock(layout: Layout, what: str, no_wait: bool) -> Iterator[None]:
    """One run per workspace: wait for the run lock (saying who holds it), or with --no-wait refuse."""
    from flows import retraining

    stack = ExitStack()
    try:
        stack.enter_context(
            retraining.exclusive_run(
                layout, what, wait_s=0 if no_wait else None, on_wait=_say_waiting
            )
        )
    except locks.LockHeld as exc:
        raise locks.LockHeld(
            f"another run is working in {layout.root}: "
            f"{exc.holder.describe() if exc.holder else 'a process that has not said who'} holds "
            f"{exc.path}. Nothing was done (--no-wait); run again once it has finished, or "
            "without --no-wait to wait for it.",
            exc.path,
            exc.holder,
        ) from None
    with stack:
        yield


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows import workspace

    if args.reviewed:
        return _ingest_reviewed(args)
    layout, params = workspace.open_workspace(workspace_dir(args))
    # A run reads data/raw while it trains: an ingest waits for it (and vice versa).
    with _run_lock(layout, "radflow ingest", args.no_wait):
        result = _ingest(
            layout,
            params,
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
        "(rejected files are kept, unmodified"
        + ("; symbolic links are not followed" if "symlink" in quarantined else "")
        + ")",
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


def _ingest_reviewed(args: argparse.Namespace) -> int:
    """`radflow ingest --reviewed`: the ledger's reviewed findings as labels (flows/review_labels.py)."""
    from flows import workspace
    from flows.review_labels import ingest_reviewed
    from pipeline_steps.core.errors import ConfigError

    given = [o for o, v in (("--labels", args.labels), ("--replace", args.replace)) if v]
    if args.label_format != "auto":
        given.append("--label-format")
    if given:
        raise ConfigError(
            f"radflow ingest --reviewed takes its images and labels from the reviews in the audit "
            f"ledger: drop {', '.join(given)} (or ingest a folder with --dicom-dir)"
        )
    layout, params = workspace.open_workspace(workspace_dir(args))
    with (
        _run_lock(layout, "radflow ingest --reviewed", args.no_wait),
        progress_bar("ingest") as bar,
    ):
        result = ingest_reviewed(layout, params, progress=bar)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    lines = [
        f"{result.reviewed_images} reviewed image(s): {len(result.imported)} labelled from their "
        f"review ({result.label_rows} label rows), {len(result.unchanged)} imported before"
    ]
    if result.already_labelled:
        lines.append(
            f"  {len(result.already_labelled)} already labelled otherwise in data/raw (those "
            f"labels were kept): {', '.join(result.already_labelled)}"
        )
    if result.image_not_kept:
        lines.append(
            f"  {len(result.image_not_kept)} image_not_kept (the DICOM is neither in data/raw "
            f"nor in the review store): {', '.join(result.image_not_kept)}"
        )
    if result.not_imported:
        issues = (result.ingest or {}).get("issues_file")
        lines.append(
            f"  {len(result.not_imported)} staged but not labelled"
            + (f"; see {issues}" if issues else "")
        )
    if result.data_version is None:
        lines.append("nothing new: data version unchanged, nothing recorded")
    else:
        lines.append(f"data version: {result.data_version} (ledger row {result.ledger_row})")
    print("\n".join(lines))
    return 0


def _ensure_data(layout: Layout, params: Params) -> None:
    """A workspace without data gets the deterministic default dataset, recorded like any ingest."""
    from pipeline_steps.synthetic import generate_dataset

    if layout.raw_dvc.exists():
        return
    staging = layout.synth_staging
    shutil.rmtree(staging, ignore_errors=True)
    log.info("no data yet: synthesizing the default dataset (%d images)", params.synth.n_images)
    with progress_bar("synth") as bar:
        # Byte-identical to a serial run (tested), so the data version is the same on every machine.
        summary = generate_dataset(params.synth, staging, progress=bar, workers=os.cpu_count() or 1)
    result = _ingest(layout, params, summary.images_dir, summary.labels_path, replace=True)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("default dataset recorded: data version %s", result["data_version"])


def cmd_run(args: argparse.Namespace) -> int:
    from flows import retraining, servers, versioning, workspace

    # A bad params.yaml, or a service that does not answer, fails here, before any work starts.
    layout, params = workspace.open_workspace(workspace_dir(args))
    servers.check_reachable(mlflow=True, prefect=True, s3=True)
    with _run_lock(layout, "radflow run", args.no_wait):
        _ensure_data(layout, params)
        # Like `dvc repro`: nothing changed since the last successful run -> nothing to do.
        outcome = retraining.retrain_if_stale(
            layout,
            params,
            force=args.force,
            on_stale=lambda verdict: log.info("training: %s", verdict.reason),
        )
    if not outcome.trained:
        done = outcome.decision.run_summary()
        print(
            json.dumps(done)
            if args.json
            else f"up to date: model version {done['model_version']}\n{outcome.decision.reason}\n"
            "(radflow run --force retrains anyway)"
        )
        return 0
    assert outcome.registered is not None and outcome.last is not None
    result, metrics = outcome.registered, outcome.last.metrics
    summary = {
        "run_id": result["run_id"],
        "model_name": result["model_name"],
        "model_version": result["model_version"],
        "data_version": versioning.data_version(layout),
        "metrics": metrics,
        # The champion/challenger decision on this version (the flow's `gate` step).
        "gate": outcome.gate,
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
            + (
                f"gate: {summary['gate']['reason']}; now in "
                f"{(summary['gate']['stages'] or ['candidate'])[-1]}\n"
                if summary["gate"]
                else ""
            )
            + f"MLflow UI: mlflow ui --backend-store-uri sqlite:///{layout.mlflow_db}\n"
            f"reports: {layout.reports}"
        )
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    from flows import servers, stages, workspace

    layout, params = workspace.open_workspace(workspace_dir(args))
    # The stages that cannot do without the registry (extract_features goes on without a champion).
    servers.check_reachable(mlflow=args.stage in ("register", "gate"), s3=args.stage == "register")
    # `dvc repro` runs each stage through here: it waits for (or with --no-wait refuses) a
    # `radflow run`, nightly or ingest working in the same workspace, stage by stage.
    with (
        _run_lock(layout, f"radflow step {args.stage}", args.no_wait),
        progress_bar(args.stage) as bar,
    ):
        result = stages.run_stage(args.stage, layout, params, bar)
    log.info(
        "stage %s done: %s", args.stage, getattr(result, "__dict__", None) or type(result).__name__
    )
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "init", help="make DIR a radflow workspace (git + DVC, params.yaml, dvc.yaml)"
    )
    p.add_argument(
        "dir", nargs="?", help="where (default: --workspace, else the current directory)"
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "synth", help="write synthetic chest-radiograph DICOMs and RSNA-format labels"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the DICOMs to")
    p.add_argument(
        "--n-images",
        type=int,
        metavar="N",
        help="how many images (default: synth.n_images of params.yaml, or its default)",
    )
    p.add_argument(
        "--seed", type=int, help="random seed (default: synth.seed of params.yaml, or its default)"
    )
    p.add_argument(
        "--workers", type=int, help="processes (default: one per core; output is identical)"
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "ingest", help="add DICOMs (and labels) to data/raw and record a data version"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dicom-dir",
        metavar="DIR",
        help="folder of DICOM files (searched recursively)",
    )
    source.add_argument(
        "--reviewed",
        action="store_true",
        help="instead of a folder: the reviewed predictions in the audit ledger, their reviewed "
        "findings as labels (images kept for review; labelled images keep their labels)",
    )
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
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="when another run holds this workspace, stop at once instead of waiting for it",
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "run", help="the main job: data (default synthetic) -> trained, registered model"
    )
    p.add_argument("--json", action="store_true", help="print one JSON summary object")
    p.add_argument(
        "--force",
        action="store_true",
        help="train even when data, params and code are unchanged since the last run",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="when another run holds this workspace, stop at once instead of waiting for it",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("step", help="run one pipeline stage without Prefect (used by dvc.yaml)")
    p.add_argument("stage", choices=list(STAGES), help="the stage to run")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="when another run holds this workspace, stop at once instead of waiting for it",
    )
    p.set_defaults(func=cmd_step)
