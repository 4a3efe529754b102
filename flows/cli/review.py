"""`radflow review monitoring`: post-deployment monitoring per model version from the reviews in the
audit ledger (coverage, reviewed precision, missed-lesion rate), as a table, JSON or Prometheus text."""

from __future__ import annotations

import argparse
import json

from flows.cli.common import workspace_dir


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(versions: list[dict[str, object]], by_day: bool) -> str:
    head = ("model", "version", "predictions", "reviewed", "coverage", "precision", "missed_rate")
    lines = []
    for mon in versions:
        lines.append(_row(mon["model"], mon["version"], mon))
        if by_day:
            days = mon["by_day"]
            assert isinstance(days, dict)
            lines += [_row("", f"  {day}", tally) for day, tally in days.items()]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [head, *lines]
    )


def _row(model: object, version: object, tally: dict[str, object]) -> tuple[str, ...]:
    rates = [tally[k] for k in ("coverage", "reviewed_precision", "missed_lesion_rate")]
    return (
        str(model),
        str(version),
        str(tally["predictions"]),
        str(tally["reviewed"]),
        *(_rate(r if isinstance(r, float | int) else None) for r in rates),
    )


def cmd_monitoring(args: argparse.Namespace) -> int:
    from flows import review as review_edge
    from flows import workspace
    from pipeline_steps.governance import review

    layout, _ = workspace.open_workspace(workspace_dir(args))
    versions = review_edge.monitoring(layout)
    if args.prometheus:
        print(review.prometheus_text(versions), end="")
    elif args.json:
        print(json.dumps([m.as_dict() for m in versions]))
    elif not versions:
        print("no predictions in the audit ledger yet")
    else:
        print(_table([m.as_dict() for m in versions], args.by_day))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "review", help="reviewer feedback on predictions: post-deployment monitoring"
    )
    actions = p.add_subparsers(
        dest="review_command", required=True, metavar="ACTION", help="what to show"
    )
    m = actions.add_parser(
        "monitoring",
        help="per model version: predictions, reviewed, coverage, reviewed precision, "
        "missed-lesion rate",
    )
    out = m.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON (per version, with by_day)")
    out.add_argument(
        "--prometheus", action="store_true", help="print Prometheus text exposition (gauges)"
    )
    m.add_argument("--by-day", action="store_true", help="add a line per UTC day of prediction")
    m.set_defaults(func=cmd_monitoring)
