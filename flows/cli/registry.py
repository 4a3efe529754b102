"""`radflow models | promote | rollback`: the model registry's versions, stages and their history
(`models verify | sign`: a version's signatures, in flows/cli/signatures.py)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from flows.cli.common import instant, workspace_dir

if TYPE_CHECKING:
    from pipeline_steps.core.config import Params
    from pipeline_steps.core.layout import Layout
    from pipeline_steps.governance.ledger import Ledger

# What `radflow promote --to` accepts: candidate is the gate's to set.
PROMOTE_TO = ("staging", "production")


def _open(args: argparse.Namespace) -> tuple[Layout, Params]:
    """The workspace. MLflow's HTTP retries are kept short here (unless set), so an unreachable
    server is reported in seconds rather than minutes."""
    from flows import workspace

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return workspace.open_workspace(workspace_dir(args))


@contextmanager
def _governance(layout: Layout, params: Params) -> Iterator[tuple[object, object]]:
    """The workspace's registry and ledger, for a transition: refused before MLflow is opened (which
    would create the embedded store) when nothing was ever registered in this workspace."""
    from flows import registry, servers, tracking
    from pipeline_steps.governance.lifecycle import TransitionError

    servers.check_reachable(mlflow=True)
    if not tracking.store_exists(layout):
        raise TransitionError(
            f"no model is registered yet: {tracking.public_uri(tracking.tracking_uri(layout))} "
            "does not exist; `radflow run` trains and registers one"
        )
    with registry.governance(layout, params) as pair:
        yield pair


def _short(value: object, width: int = 12) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_models(args: argparse.Namespace) -> int:
    from flows import registry, servers, tracking
    from flows.anchoring import open_ledger

    layout, params = _open(args)
    if args.action in ("verify", "sign"):
        from flows.cli import signatures

        command = signatures.cmd_verify if args.action == "verify" else signatures.cmd_sign
        return command(args, layout, params)
    model_name = params.register_.model_name
    if args.action == "history" or args.at is not None:
        # The history is the ledger's alone: MLflow is not opened.
        with open_ledger(layout.root) as ledger:
            return _print_history(args, model_name, ledger)
    rows: list[dict[str, Any]] = []
    # An empty registry is an empty list; opening MLflow would create the workspace's store.
    if tracking.store_exists(layout):
        servers.check_reachable(mlflow=True)
        with registry.governance(layout, params) as (reg, ledger):
            rows = registry.list_versions(reg, ledger)
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no versions of {model_name} yet; `radflow run` registers one")
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


def _print_history(args: argparse.Namespace, model_name: str, ledger: Ledger) -> int:
    from flows import registry
    from pipeline_steps.governance.ledger import timestamp

    if args.at is not None:
        state = registry.stages_at(ledger, model_name, args.at)
        answer = {"model": model_name, "at": timestamp(args.at), "stages": state}
        if args.json:
            print(json.dumps(answer))
            return 0
        print(f"{model_name} at {answer['at']}:")
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
    entries = registry.transitions(ledger, model_name)
    if args.json:
        print(json.dumps([e.as_dict() for e in entries]))
        return 0
    if not entries:
        print(f"no stage transitions of {model_name} recorded yet")
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
    from pipeline_steps.governance.lifecycle import parse_lifecycle

    parse_lifecycle(args.to, PROMOTE_TO)  # a wrong --to fails before MLflow is opened
    layout, params = _open(args)
    with _governance(layout, params) as (reg, ledger):
        done = registry.promote(
            reg,  # type: ignore[arg-type]
            ledger,  # type: ignore[arg-type]
            args.version,
            args.to,
            actor=args.actor or registry.default_actor(),
            reason=args.reason,
            force=args.force,
            allowed=PROMOTE_TO,
        )
        if args.force:  # an override is a change record of its own
            from flows import change_control

            change_control.record_override(
                layout,
                params,
                ledger,
                done,
                actor=done.entries[0].payload["actor"],
                reason=args.reason,
            )
    _print_transition(done)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from flows import registry

    layout, params = _open(args)
    with _governance(layout, params) as (reg, ledger):
        done = registry.rollback(
            reg,  # type: ignore[arg-type]
            ledger,  # type: ignore[arg-type]
            actor=args.actor or registry.default_actor(),
            reason=args.reason,
        )
    _print_transition(done)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "models", help="model versions with stage, metrics, data version and who promoted them"
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["history", "verify", "sign"],
        help="history: every stage transition; verify N: check version N's files against its "
        "signature; sign N --reason WHY: sign version N deliberately (recorded in the ledger)",
    )
    p.add_argument("version", nargs="?", help="with verify or sign: the model version number")
    p.add_argument(
        "--at",
        type=instant,
        metavar="TIME",
        help="with history: which version held each stage at TIME (ISO-8601; UTC if no zone)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--reason", help="with sign: why; kept in the audit ledger")
    p.add_argument("--actor", help="with sign: who (default: $RADFLOW_ACTOR, else the login name)")
    p.add_argument(
        "--force",
        action="store_true",
        help="with sign: sign even though an existing signature fails to verify (recorded)",
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("promote", help="move a model version to staging or production")
    p.add_argument("version", help="the model version number (`radflow models` lists them)")
    p.add_argument(
        "--to", required=True, metavar="STAGE", help="staging | production (champion: production)"
    )
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
