"""The `radflow` command line: the parser, start-up (environment, logging) and error reporting.

Each command group lives in a module of its own: `data` (init, synth, ingest, run, step),
`registry` (models, promote, rollback), `changes` (change-control records), `nightly` (nightly,
schedule, server), `predictions` (predict, serve-api, audit, trace), `pacs` (the PACS over
DICOMweb), `review` (post-deployment monitoring from reviews), `console` (the web console) and
`console_users` (its users and roles). Commands import what they need
when they run, so `--help` stays fast.

Exit codes follow MLflow, DVC and Prefect: 0 success, 1 a failure (a RadflowError, a failed batch,
a broken ledger), 2 a usage error (argparse's own).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata

from flows.cli import (
    changes,
    console,
    console_users,
    data,
    nightly,
    pacs,
    predictions,
    registry,
    review,
)
from flows.cli.common import (
    PHI_UMASK,
    CommandParser,
    global_option_names,
    restrict_workspace,
    workspace_dir,
)
from pipeline_steps.core.errors import RadflowError

DESCRIPTION = (
    "Train, register, promote and audit a chest-radiograph detector, each command on a workspace."
)
EPILOG = "exit status: 0 success, 1 failure, 2 usage error"


def _own_info_only(record: logging.LogRecord) -> bool:
    """Below WARNING, show only radflow's and Prefect's own messages (not every HTTP request)."""
    return record.levelno >= logging.WARNING or record.name.startswith(
        ("radflow", "pipeline_steps", "flows", "prefect")
    )


# radflow runs on hospital networks without internet: nothing the embedded services start may phone
# home (offline, Prefect's temporary server logs an ERROR for each telemetry heartbeat it cannot
# send). Defaults only: a user who sets one of these opts in. DVC is off per workspace
# (core.analytics false in flows/workspace.py, DVC_NO_ANALYTICS for the DVC radflow runs).
TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the server's heartbeat, and the SDK's events
    "DO_NOT_TRACK": "1",  # the cross-tool convention; Prefect's SDK reads it first
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3's usage events (client and UI)
    "GX_ANALYTICS_ENABLED": "false",  # GX's switch (the workspace's GX context sets it too)
}


def _setup_environment() -> None:
    """Quiet noisy libraries, turn telemetry off and route radflow's loggers through Prefect; done
    at start-up, not import (before any command imports Prefect, which reads its settings once)."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    # TensorFlow's C++ start-up chatter (oneDNN, CPU features) is noise to a user; Python errors still raise.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline_steps,radflow")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_own_info_only)
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def _version() -> str:
    try:
        return metadata.version("radflow")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    # Every subcommand parser is a CommandParser too, so each takes GLOBAL_OPTIONS after its name.
    parser = CommandParser(prog="radflow", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {_version()}",
        help="print radflow's version and exit",
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="what to do (COMMAND --help: its options)",
    )
    # The order of `radflow --help`.
    data.add_commands(sub)
    registry.add_commands(sub)
    changes.add_commands(sub)
    nightly.add_commands(sub)
    predictions.add_commands(sub)
    pacs.add_commands(sub)
    review.add_commands(sub)
    console.add_commands(sub)
    console_users.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A global option given neither before nor after the command is absent (see GLOBAL_OPTIONS).
    for dest in global_option_names():
        if not hasattr(args, dest):
            setattr(args, dest, None)
    # Owner-only files for everything this command and the tools it starts create (PHI_UMASK);
    # the caller's umask is back when main returns (main also runs inside other processes, e.g. tests).
    previous_umask = os.umask(PHI_UMASK)
    try:
        _setup_environment()
        restrict_workspace(workspace_dir(args))
        return int(args.func(args))
    except RadflowError as exc:
        print(f"radflow: error: {exc}", file=sys.stderr)
        return 1
    finally:
        os.umask(previous_umask)
