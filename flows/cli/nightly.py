"""`radflow nightly | schedule | server`: nightly retraining, its schedule and a local Prefect server."""

from __future__ import annotations

import argparse
import json
import sys

from flows.cli.common import workspace_dir


def cmd_nightly(args: argparse.Namespace) -> int:
    from flows import servers, workspace

    # A bad params.yaml, or a service that does not answer, fails here, before Prefect starts.
    layout, params = workspace.open_workspace(workspace_dir(args))
    servers.check_reachable(mlflow=True, prefect=True, s3=True, pacs=params.nightly.pacs)
    from flows.nightly import nightly_retraining

    state = nightly_retraining(str(layout.root), force=args.force, return_state=True)
    # This run's line (another run may have appended one since).
    run_id = str(state.state_details.flow_run_id)
    log_file = layout.nightly_log
    lines = log_file.read_text().splitlines() if log_file.exists() else []
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

    layout, params = workspace.open_workspace(workspace_dir(args))
    servers.check_reachable(prefect=True)
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


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    server = p.add_subparsers(dest="service", required=True, metavar="SERVICE", help="which one")
    p = server.add_parser("start", help="a Prefect server (SQLite unless configured), foreground")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=4200, help="port to listen on")
    p.add_argument("--no-ui", action="store_true", help="API only")
    p.set_defaults(func=cmd_server)
