"""`radflow pacs ...`: the PACS loop over DICOMweb. `pull` brings new studies (and their annotation SRs)
in through ingestion; `watch` predicts new studies and stores a DICOM SR into each study
(flows/pacs_watch.py). Each action adds its own parser below."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.cli.common import workspace_dir


def cmd_pacs_pull(args: argparse.Namespace) -> int:
    from flows import pacs_pull, retraining, servers, workspace

    layout, params = workspace.open_workspace(workspace_dir(args))
    labels = Path(args.labels) if args.labels else None
    # Filters and the label file are checked before anything is asked of the PACS.
    pacs_pull.pull_filters(params.pacs.pull, args.date_from, args.date_to, args.modality)
    if labels is not None and not labels.is_file():
        from pipeline_steps.core.errors import DataError

        raise DataError(f"{labels}: labels file not found")
    pacs = pacs_pull.connect(params)  # the settings (fail closed) before the probe's request
    servers.check_reachable(pacs=True)
    # A run reads data/raw while it trains: a pull waits for it (and vice versa), as an ingest does.
    with retraining.exclusive_run(layout, "radflow pacs pull"):
        result = pacs_pull.pull_and_ingest(
            layout,
            params,
            pacs,
            date_from=args.date_from,
            date_to=args.date_to,
            modalities=args.modality,
            labels=labels,
        )
    if args.json:
        print(json.dumps(result))
        return 0
    skipped = {k.removeprefix("skipped_"): v for k, v in result.items() if k.startswith("skipped_")}
    quarantined = result["quarantined"]
    lines = [
        f"pacs pull: {result['studies']} studies matched; {result['new_images']} new images, "
        f"{result['unchanged']} instances pulled before (not asked for again)",
        f"  archived {result['archived']} new, {result['accepted']} accepted"
        + (
            ", quarantined: " + ", ".join(f"{k} {v}" for k, v in quarantined.items())
            if quarantined
            else ""
        ),
    ]
    if skipped:
        lines.append("  skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    lines.append(
        f"labels: {result['labels_imported']} rows imported ({result['sr_labels']} rows from "
        f"{result['sr_label_sources']} SR annotations)"
    )
    if result["label_issues"]:
        detail = ", ".join(f"{k} {v}" for k, v in result["label_issues"].items())
        lines.append(f"  not imported: {detail}; see {layout.raw_label_issues}")
    lines.append(f"data version: {result['data_version'] or 'unchanged (nothing new)'}")
    print("\n".join(lines))
    return 0


def add_pull(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = actions.add_parser(
        "pull",
        help="pull new studies from the PACS (QIDO-RS, WADO-RS) and ingest them as one batch",
    )
    p.add_argument(
        "--from",
        dest="date_from",
        metavar="YYYYMMDD",
        help="earliest study date, inclusive (default: params.yaml pacs.pull.study_date_from)",
    )
    p.add_argument(
        "--to",
        dest="date_to",
        metavar="YYYYMMDD",
        help="latest study date, inclusive (default: params.yaml pacs.pull.study_date_to)",
    )
    p.add_argument(
        "--modality",
        nargs="+",
        metavar="MODALITY",
        help="modalities in study to ask for, e.g. DX CR (default: params.yaml pacs.pull.modalities)",
    )
    p.add_argument(
        "--labels",
        metavar="CSV",
        help="reference boxes (RSNA, VinDr-CXR or canonical CSV) naming images by SOP Instance UID; "
        "annotation SRs in the studies are read as well",
    )
    p.add_argument("--json", action="store_true", help="print the pull's summary as JSON")
    p.set_defaults(func=cmd_pacs_pull)


def cmd_pacs_watch(args: argparse.Namespace) -> int:
    from flows import pacs_watch, servers, workspace

    layout, params = workspace.open_workspace(workspace_dir(args))
    servers.check_reachable(mlflow=True, pacs=True, prefect=args.serve)
    if args.serve:
        pacs_watch.serve_deployment(layout, params, args.stage)
        return 0
    watcher = pacs_watch.open_watcher(layout.root, args.stage)
    watcher.pacs.check()  # refused credentials: an error naming the settings, before the model loads
    stop = pacs_watch.StopRequest()
    interval = args.interval if args.interval is not None else params.pacs.watch.interval_s
    report = (lambda summary: print(json.dumps(summary), flush=True)) if args.json else None
    with stop.installed():
        return pacs_watch.serve_polls(
            watcher,
            interval_s=interval,
            once=args.once,
            stop=stop,
            **({"report": report} if report else {}),
        )


def add_watch(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = actions.add_parser(
        "watch",
        help="poll the PACS for new studies, predict them and store a DICOM SR into each study",
    )
    p.add_argument("--stage", default="production", help="registry stage of the model to use")
    p.add_argument(
        "--interval",
        type=float,
        metavar="S",
        help="seconds between polls (default: params.yaml pacs.watch.interval_s)",
    )
    p.add_argument("--once", action="store_true", help="one poll, then exit (1 if it failed)")
    p.add_argument("--json", action="store_true", help="print each poll's summary as JSON")
    p.add_argument(
        "--serve",
        action="store_true",
        help="serve the radflow-pacs-watch Prefect deployment (needs PREFECT_API_URL)",
    )
    p.set_defaults(func=cmd_pacs_watch)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pacs", help="the PACS loop over DICOMweb (RADFLOW_PACS_URL and sign-in)")
    actions = p.add_subparsers(
        dest="pacs_command", required=True, metavar="ACTION", help="what to do with the PACS"
    )
    add_pull(actions)
    add_watch(actions)
