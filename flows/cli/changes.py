"""`radflow changes`: the change-control records of every retrain, gate decision, skipped or failed night
and forced promotion, each with its signature checked."""

from __future__ import annotations

import argparse
import json

from flows.cli.common import workspace_dir


def _plan(value: object) -> str:
    return "-" if value is None else ("inside" if value else "OUTSIDE")


def cmd_changes(args: argparse.Namespace) -> int:
    from flows import change_control, workspace

    layout, _ = workspace.open_workspace(workspace_dir(args))
    rows = change_control.list_records(layout, args.version)
    bad = [r for r in rows if r["signature"] != "verified" or not r["consistent"]]
    if args.json:
        print(json.dumps(rows))
        return 1 if bad else 0
    if args.version is not None:
        if not rows:
            print(f"no change record of version {args.version}")
            return 1
        for row in rows:
            print(
                f"ledger row {row['ledger_row']} ({row['kind']}, {row['time']}): signature "
                f"{row['signature']} ({row['signature_detail']})"
            )
            print(json.dumps(row["record"], indent=2, sort_keys=True))
        return 1 if bad else 0
    if not rows:
        print("no change records yet; `radflow run` or `radflow nightly` writes them")
        return 0
    print(
        f"{'row':>5}  {'time (UTC)':<19}  {'kind':<8}  {'version':>7}  {'plan':<7}  signature  decision"
    )
    for row in rows:
        print(
            f"{row['ledger_row']:>5}  {str(row['time'])[:19].replace('T', ' '):<19}  "
            f"{row['kind']:<8}  {row['version'] or '-':>7}  {_plan(row['inside_plan']):<7}  "
            f"{row['signature']:<9}  {row['decision']}"
        )
    for row in bad:
        print(f"ledger row {row['ledger_row']}: {row['signature_detail']}")
    return 1 if bad else 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "changes",
        help="change-control records (retrain, gate, skipped, failed, override), signatures checked",
    )
    p.add_argument("--version", help="show the full records of this model version")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_changes)
