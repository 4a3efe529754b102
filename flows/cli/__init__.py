"""The `radflow` command line: the parser, start-up (environment, logging) and error reporting.

Each command group lives in a module of its own: `data` (init, synth, ingest, run, step), `registry`
(models, promote, rollback), `nightly` (nightly, schedule, server) and `predictions` (predict,
serve-api, audit, trace). Commands import what they need when they run, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from flows.cli import data, nightly, predictions, registry
from pipeline_steps.core.errors import RadflowError

DESCRIPTION = "The `radflow` command line: init, synth, ingest, run and step, each on a workspace."


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radflow", description=DESCRIPTION)
    parser.add_argument(
        "--workspace", metavar="DIR", help="radflow checkout to work on (default: .)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # The order of `radflow --help`.
    data.add_commands(sub)
    registry.add_commands(sub)
    nightly.add_commands(sub)
    predictions.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_environment()
    try:
        return int(args.func(args))
    except RadflowError as exc:
        print(f"radflow: error: {exc}", file=sys.stderr)
        return 2
