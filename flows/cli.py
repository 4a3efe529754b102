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
from datetime import UTC, datetime
from pathlib import Path

from pipeline_steps.core.errors import RadflowError

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
    from pipeline_steps.core.config import SynthParams, load_params
    from pipeline_steps.synthetic import generate_dataset

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
    from pipeline_steps.core.layout import Layout
    from pipeline_steps.ingest import ingest_directory

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
    from pipeline_steps.core.layout import Layout
    from pipeline_steps.synthetic import generate_dataset

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
    from flows import decision

    # Like `dvc repro`: nothing changed since the last successful run -> nothing to do.
    verdict = decision.check(layout, workspace.load(layout), force=args.force)
    if verdict.up_to_date:
        done = verdict.run_summary()
        print(
            json.dumps(done)
            if args.json
            else f"up to date: model version {done['model_version']}\n{verdict.reason}\n"
            "(radflow run --force retrains anyway)"
        )
        return 0
    log.info("training: %s", verdict.reason)
    from flows.pipeline import training_pipeline

    result = training_pipeline(str(layout.root))
    versioning.commit_stages(layout)
    metrics = json.loads(layout.metrics.read_text())
    decision.record_success(layout, verdict.fingerprint, result, metrics)
    gate_file = layout.reports / "gate.json"
    gate = json.loads(gate_file.read_text()) if gate_file.exists() else None
    summary = {
        "run_id": result["run_id"],
        "model_name": result["model_name"],
        "model_version": result["model_version"],
        "data_version": versioning.data_version(layout),
        "metrics": metrics,
        # The champion/challenger decision on this version (the flow's `gate` step).
        "gate": (
            {k: gate.get(k) for k in ("passed", "reason", "stages", "production_version")}
            if gate and str(gate.get("version")) == str(result["model_version"])
            else None
        ),
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
    from flows import stages

    layout, params = stages.open_workspace(_ws(args))
    with _bar(args.stage) as bar:
        result = stages.run_stage(args.stage, layout, params, bar)
    log.info(
        "stage %s done: %s", args.stage, getattr(result, "__dict__", None) or type(result).__name__
    )
    return 0


# -- the model registry: stages, promotion, rollback and their history (issue 6) --------------


@contextmanager
def _governance(args: argparse.Namespace) -> Iterator[tuple[object, object]]:
    """The workspace's registry and ledger. MLflow's HTTP retries are kept short here (unless set),
    so an unreachable server is reported in seconds rather than minutes."""
    from flows import registry, stages

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    layout, params = stages.open_workspace(_ws(args))
    with registry.governance(layout, params) as pair:
        yield pair


def _instant(text: str) -> datetime:
    """An ISO-8601 time for --at; without a zone it is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 time (e.g. 2026-11-23T14:00:00Z or 2026-11-23)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number within [0, 1]")
    return value


def _short(value: object, width: int = 12) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_models(args: argparse.Namespace) -> int:
    from flows import registry

    with _governance(args) as (reg, ledger):
        assert isinstance(reg, registry.ModelRegistry)
        if args.action == "history" or args.at is not None:
            return _print_history(args, reg, ledger)
        rows = registry.list_versions(reg, ledger)  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no versions of {reg.model_name} yet; `radflow run` registers one")
        return 0
    print(
        f"{'version':>7}  {'stage':<10}  {'ap50':>6}  {'cpm':>6}  {'gate':<6}  "
        f"{'data_version':<12}  {'created (UTC)':<16}  promoted by"
    )
    for row in rows:
        metrics = row["metrics"]
        ap50, cpm = metrics.get("ap50"), metrics.get("cpm")
        by = f"{row['promoted_by']} {row['promoted_at'][:16]}" if row["promoted_by"] else "-"
        print(
            f"{row['version']:>7}  {_short(row['stage'], 10):<10}  "
            f"{'-' if ap50 is None else f'{ap50:.3f}':>6}  {'-' if cpm is None else f'{cpm:.3f}':>6}  "
            f"{_short(row['gate'], 6):<6}  {_short(row['data_version']):<12}  "
            f"{row['created'][:16].replace('T', ' '):<16}  {by}"
        )
    return 0


def _print_history(args: argparse.Namespace, reg: object, ledger: object) -> int:
    from flows import registry
    from pipeline_steps.governance.ledger import Ledger, timestamp

    assert isinstance(reg, registry.ModelRegistry) and isinstance(ledger, Ledger)
    if args.at is not None:
        state = registry.stages_at(ledger, reg.model_name, args.at)
        answer = {"model": reg.model_name, "at": timestamp(args.at), "stages": state}
        if args.json:
            print(json.dumps(answer))
            return 0
        print(f"{reg.model_name} at {answer['at']}:")
        for stage in ("production", "staging", "candidate"):
            held = state.get(stage)
            print(
                f"  {stage:<10} "
                + (
                    f"version {held['version']} (since {held['since']}, by {held['actor']}: "
                    f"{held['reason']}; ledger row {held['ledger_row']})"
                    if held
                    else "none"
                )
            )
        return 0
    entries = registry.transitions(ledger, reg.model_name)
    if args.json:
        print(json.dumps([e.as_dict() for e in entries]))
        return 0
    if not entries:
        print(f"no stage transitions of {reg.model_name} recorded yet")
    for e in entries:
        p = e.payload
        flags = " [forced]" if p.get("forced") else ""
        flags += " [rollback]" if p.get("cause") == "rollback" else ""
        print(
            f"{e.seq:>5}  {e.recorded_at[:19].replace('T', ' ')}  version {p['version']:>4}  "
            f"{p.get('from_stage') or 'none':>10} -> {p.get('to_stage') or 'none':<10}  "
            f"{p.get('actor')}: {p.get('reason')}{flags}"
        )
    return 0


def _print_transition(done: object) -> None:
    from flows import registry

    assert isinstance(done, registry.Transition)
    for move, entry in zip(done.moves, done.entries, strict=True):
        print(
            f"version {move.version}: {move.from_stage or 'none'} -> {move.to_stage or 'none'} "
            f"(ledger row {entry.seq})"
        )


def cmd_promote(args: argparse.Namespace) -> int:
    from flows import registry

    with _governance(args) as (reg, ledger):
        done = registry.promote(
            reg,  # type: ignore[arg-type]
            ledger,  # type: ignore[arg-type]
            args.version,
            args.to,
            actor=args.actor or registry.default_actor(),
            reason=args.reason,
            force=args.force,
            allowed=("staging", "production"),
        )
    _print_transition(done)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from flows import registry

    with _governance(args) as (reg, ledger):
        done = registry.rollback(
            reg,  # type: ignore[arg-type]
            ledger,  # type: ignore[arg-type]
            actor=args.actor or registry.default_actor(),
            reason=args.reason,
        )
    _print_transition(done)
    return 0


def _add_registry_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "models", help="model versions with stage, metrics, data version and who promoted them"
    )
    p.add_argument("action", nargs="?", choices=["history"], help="history: every stage transition")
    p.add_argument(
        "--at",
        type=_instant,
        metavar="TIME",
        help="with history: which version held each stage at TIME (ISO-8601; UTC if no zone)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("promote", help="move a model version to staging or production")
    p.add_argument("version")
    p.add_argument("--to", required=True, metavar="STAGE", help="staging | production")
    p.add_argument("--reason", required=True, help="why; kept in the audit ledger")
    p.add_argument("--actor", help="who (default: $RADFLOW_ACTOR, else the login name)")
    p.add_argument(
        "--force",
        action="store_true",
        help="promote to production without a passed gate or data validation (recorded)",
    )
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="put the previous production version back in production")
    p.add_argument("--reason", required=True, help="why; kept in the audit ledger")
    p.add_argument("--actor", help="who (default: $RADFLOW_ACTOR, else the login name)")
    p.set_defaults(func=cmd_rollback)


# -- nightly retraining, its schedule and a local Prefect server (issue 7) ----------------------


def cmd_nightly(args: argparse.Namespace) -> int:
    from flows import workspace
    from flows.nightly import nightly_retraining, run_log

    layout = workspace.resolve(_ws(args))
    workspace.load(layout)  # fail on a bad params.yaml before Prefect starts
    state = nightly_retraining(str(layout.root), force=args.force, return_state=True)
    # This run's line (another run may have appended one since).
    run_id = str(state.state_details.flow_run_id)
    lines = run_log(layout).read_text().splitlines() if run_log(layout).exists() else []
    mine = [json.loads(line) for line in lines if run_id in line]
    summary = mine[-1] if mine else {"status": "failed", "error": state.message}
    if args.json:
        print(json.dumps(summary))
    elif summary["status"] == "failed":
        print(f"nightly: FAILED: {summary.get('error')}", file=sys.stderr)
    else:
        version = summary.get("model_version") or "-"
        print(f"nightly: {summary['status']} (model version {version}): {summary.get('reason')}")
    return 1 if state.is_failed() or state.is_crashed() else 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from flows import servers, workspace

    layout = workspace.resolve(_ws(args))
    params = workspace.load(layout)
    print(
        f"serving nightly_retraining/radflow-nightly: cron {params.nightly.cron!r} "
        f"({params.nightly.timezone}) on {layout.root}; Ctrl-C stops it",
        flush=True,
    )
    servers.serve_nightly(layout, params)
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from flows import servers

    return servers.start_prefect_server(args.host, args.port, ui=not args.no_ui)


def _add_nightly_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "nightly",
        help="one nightly run: landing sync, ingest + DVC push, decide, train + gate, summary",
    )
    p.add_argument("--force", action="store_true", help="retrain even when nothing changed")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser(
        "schedule",
        help="serve the nightly deployment on params.yaml's cron (needs PREFECT_API_URL)",
    )
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("server", help="local services")
    server = p.add_subparsers(dest="service", required=True)
    p = server.add_parser("start", help="a Prefect server (SQLite unless configured), foreground")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--no-ui", action="store_true", help="API only")
    p.set_defaults(func=cmd_server)


# -- predictions, the online API, the audit ledger and traces (issue 8) -------------------------


def cmd_predict(args: argparse.Namespace) -> int:
    from flows import workspace
    from flows.predict import batch_prediction

    layout = workspace.resolve(_ws(args))
    workspace.load(layout)  # a bad params.yaml fails before Prefect starts
    summary = batch_prediction(
        str(layout.root),
        args.input,  # kept as given: records name each image by the path the caller used
        str(Path(args.out).resolve()),
        stage=args.stage,
        version=args.version,
        threshold=args.threshold,
        sr_out=str(Path(args.sr_out).resolve()) if args.sr_out else None,
        progress_bar=not args.json,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        m = summary["model"]
        print(
            f"{summary['predicted']} image(s) predicted, {summary['failed']} failed, "
            f"{summary['boxes']} box(es) by {m['name']} version {m['version']} "
            f"({m['stage'] or 'no stage'})\n"
            f"records: {summary['out']}\n"
            f"ledger rows: {summary['ledger_rows']}"
            + (f"\nDICOM SR: {summary['reports']} file(s) in {args.sr_out}" if args.sr_out else "")
        )
    return 1 if summary["failed"] and not summary["predicted"] else 0


def cmd_serve_api(args: argparse.Namespace) -> int:
    from flows import api, workspace

    layout = workspace.resolve(_ws(args))
    params = workspace.load(layout)
    api.serve(
        layout, params, host=args.host, port=args.port, stage=args.stage, poll_s=args.poll_seconds
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from flows import audit, workspace

    layout = workspace.resolve(_ws(args))
    if args.action == "verify":
        result = audit.verify(layout)
        if args.json:
            print(json.dumps(result.__dict__))
        elif result.ok:
            print(f"ledger intact: {result.rows} row(s) verified; head {result.head}")
        else:
            print(
                f"ledger BROKEN at row {result.first_bad}: {result.problem}\n"
                f"({result.rows} row(s) before it verified; last good hash {result.head})",
                file=sys.stderr,
            )
        return 0 if result.ok else 1
    if args.out:
        out = Path(args.out)
        partial = out.with_name(out.name + ".partial")
        with partial.open("w", encoding="utf-8") as fh:
            count = audit.export(layout, fh, since=args.since, until=args.until, kind=args.kind)
        os.replace(partial, out)
        print(f"{count} ledger row(s) written to {out}", file=sys.stderr)
    else:
        count = audit.export(layout, sys.stdout, since=args.since, until=args.until, kind=args.kind)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from flows import audit, workspace

    layout = workspace.resolve(_ws(args))
    result = audit.trace(layout, workspace.load(layout), args.prediction_id)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for line in audit.format_trace(result):
            print(line)
    return 1 if any(ok is False for ok in result["checks"].values()) else 0


def _add_prediction_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "predict", help="predict a DICOM file or folder with a registered model (JSON lines)"
    )
    p.add_argument("--input", required=True, metavar="DIR|FILE")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--stage", choices=["production", "staging", "candidate"], help="default: production"
    )
    which.add_argument("--version", metavar="N")
    p.add_argument(
        "--threshold", type=_unit_interval, help="score threshold (default: the model's own)"
    )
    p.add_argument(
        "--sr-out", metavar="DIR", help="also write one DICOM SR (TID 1500) per image here"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON, no bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve-api", help="HTTP API: POST /predict, GET /healthz (FastAPI)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--stage", default="production", choices=["production", "staging"])
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=10.0,
        help="how often to check whether the stage's alias moved (0: never)",
    )
    p.set_defaults(func=cmd_serve_api)

    p = sub.add_parser("audit", help="verify or export the audit ledger")
    p.add_argument("action", choices=["verify", "export"])
    p.add_argument("--since", type=_instant, metavar="TIME", help="export: from (ISO-8601)")
    p.add_argument("--until", type=_instant, metavar="TIME", help="export: until (ISO-8601)")
    p.add_argument("--kind", help="export: only rows of this kind (prediction, transition, gate)")
    p.add_argument("--out", metavar="FILE.jsonl", help="export: write here instead of stdout")
    p.add_argument("--json", action="store_true", help="verify: print the result as JSON")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "trace", help="a prediction's model, run, data version, validation and training images"
    )
    p.add_argument("prediction_id")
    p.add_argument("--json", action="store_true", help="one machine-readable object")
    p.set_defaults(func=cmd_trace)


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
    p.add_argument(
        "--force",
        action="store_true",
        help="train even when data, params and code are unchanged since the last run",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("step", help="run one pipeline stage without Prefect (used by dvc.yaml)")
    p.add_argument(
        "stage",
        choices=["validate", "preprocess", "extract_features", "train", "test", "register", "gate"],
    )
    p.set_defaults(func=cmd_step)

    _add_registry_commands(sub)
    _add_nightly_commands(sub)
    _add_prediction_commands(sub)
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
