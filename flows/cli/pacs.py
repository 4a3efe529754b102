"""`radflow pacs ...`: the PACS loop over DICOMweb. `pull` brings new studies (and their annotation SRs)
in through ingestion; each action adds its own parser below."""

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


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pacs", help="the PACS loop over DICOMweb (RADFLOW_PACS_URL and sign-in)")
    actions = p.add_subparsers(
        dest="pacs_command", required=True, metavar="ACTION", help="what to do with the PACS"
    )
    add_pull(actions)
