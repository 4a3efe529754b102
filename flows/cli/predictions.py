"""`radflow predict | serve-api | audit | trace`: predictions, the online API, the audit ledger and
traces."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flows.cli.common import instant, workspace_dir
from pipeline_steps.core.files import atomic_path
from pipeline_steps.core.layout import Layout


def unit_interval(text: str) -> float:
    """A --threshold: a number within [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number within [0, 1]")
    return value


def cmd_predict(args: argparse.Namespace) -> int:
    from flows import servers, workspace
    from flows.predict import batch_prediction, list_inputs
    from pipeline_steps.core.deid import pseudonym_key

    # A bad params.yaml, a missing input, no pseudonymization key or a configured MLflow/Prefect
    # server that does not answer fails here, before Prefect's server starts (~20 s).
    layout, _ = workspace.open_workspace(workspace_dir(args))
    list_inputs(Path(args.input))
    pseudonym_key()
    servers.check_reachable(mlflow=True, prefect=True)
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
    if summary["failed"]:
        # The records are written all the same; a script sees the partial failure in the exit code.
        print(
            f"radflow: {summary['failed']} of {summary['images']} file(s) failed; "
            f"the reason of each is in its record's `reason` and `error` in {summary['out']}",
            file=sys.stderr,
        )
        return 1
    return 0


def _env_number(value: float | None, variable: str, default: float) -> float:
    """An option's value, else the environment variable's, else the default."""
    import os

    from pipeline_steps.core.errors import ConfigError

    if value is not None:
        return value
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise ConfigError(f"{variable}={text!r} is not a positive number")
    return number


def cmd_serve_api(args: argparse.Namespace) -> int:
    from flows import api, servers, workspace
    from flows.api_auth import resolve_security

    # Authentication and limits are settled before the workspace and the model are opened: a server
    # without tokens fails at once, naming what to set.
    security = resolve_security(
        args.host,
        tokens_file=args.tokens_file,
        insecure_no_auth=args.insecure_no_auth,
        docs=args.docs,
    )
    max_body_mb = _env_number(args.max_body_mb, "RADFLOW_API_MAX_BODY_MB", 256)
    limits = api.ApiLimits(
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        request_timeout_s=_env_number(args.request_timeout, "RADFLOW_API_REQUEST_TIMEOUT_S", 30),
        max_batch=args.batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
        **({"workers": args.workers} if args.workers else {}),
    )
    layout, params = workspace.open_workspace(workspace_dir(args))
    # The model comes from the registry: a server that cannot reach it says so before loading.
    servers.check_reachable(mlflow=True)
    api.serve(
        layout,
        params,
        host=args.host,
        port=args.port,
        stage=args.stage,
        poll_s=args.poll_seconds,
        security=security,
        limits=limits,
    )
    return 0


def cmd_api_token(args: argparse.Namespace) -> int:
    import os

    from flows import api_auth
    from pipeline_steps.core.errors import ConfigError

    name = args.file or os.environ.get(api_auth.TOKENS_FILE_ENV, "").strip()
    if not name:
        raise ConfigError(f"name the token file: --file FILE, or set {api_auth.TOKENS_FILE_ENV}")
    path = Path(name)
    if args.action == "add":
        if not args.name:
            raise ConfigError("`radflow api-token add` needs the new token's NAME")
        token = api_auth.add_token(path, args.name)
        print(
            f"token {args.name!r} added to {path} (only its salted hash is stored); it is shown "
            "this once, keep it in the client's secret store:",
            file=sys.stderr,
        )
        print(token)
    elif args.action == "revoke":
        if not args.name:
            raise ConfigError("`radflow api-token revoke` needs the NAME of the token to revoke")
        api_auth.revoke_token(path, args.name)
        print(f"token {args.name!r} revoked in {path}; restart serve-api to apply it")
    else:
        for entry in api_auth.read_token_file(path):
            print(entry.name)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from flows import audit, workspace

    # Verifying or exporting the ledger needs no params: a broken params.yaml does not stop an audit.
    if args.action == "verify" and args.export:
        return _verify_export(Path(args.export), args.json)
    layout = workspace.resolve(workspace_dir(args))
    if args.action == "verify":
        result, anchored = audit.verify_anchored(layout)
        ok = result.ok and not anchored.failed
        if args.json:
            status = anchored.status if result.ok else "broken"
            out = result.__dict__ | {"ok": ok, "status": status, "anchoring": anchored.as_dict()}
            print(json.dumps(out))
        elif result.ok:
            print(f"ledger intact: {result.rows} row(s) verified; head {result.head}")
        else:
            print(
                f"ledger BROKEN at row {result.first_bad}: {result.problem}\n"
                f"({result.rows} row(s) before it verified; last good hash {result.head})",
                file=sys.stderr,
            )
        if not args.json:
            where = f" ({anchored.location})" if anchored.location else ""
            label = anchored.status.upper() if anchored.failed else anchored.status
            line = f"anchors{where}: {label}"
            if anchored.anchors:
                line += (
                    f"; {anchored.anchors} anchor(s), the newest at row {anchored.last_anchored}"
                )
            print(line + (f": {anchored.problem}" if anchored.problem else ""), file=sys.stderr)
        return 0 if ok else 1
    if args.action == "anchor":
        head = audit.anchor(layout)
        print(f"anchored row {head.seq} ({head.row_hash})" if head else "the ledger is empty")
        return 0
    if args.out:
        out = Path(args.out)
        with atomic_path(out) as partial, partial.open("w", encoding="utf-8") as fh:
            count = audit.export(layout, fh, since=args.since, until=args.until, kind=args.kind)
        print(f"{count} ledger row(s) written to {out}", file=sys.stderr)
    else:
        count = audit.export(layout, sys.stdout, since=args.since, until=args.until, kind=args.kind)
    return 0


def _verify_export(path: Path, as_json: bool) -> int:
    """An export checked on its own: no database, no anchor store, no params."""
    from flows import audit

    checked = audit.verify_export(path)
    if as_json:
        print(json.dumps(checked.as_dict()))
    else:
        print(
            f"export {path}: {checked.status.upper() if checked.failed else checked.status}; "
            f"{checked.rows} row(s), {checked.anchors} anchor(s), {checked.signed} signed "
            f"record(s) verified with the {checked.keys_from}'s keys"
            + ("" if checked.complete else " (a filtered export: checked what it holds)")
        )
        for problem in checked.problems:
            print(f"  {problem}", file=sys.stderr)
    return 1 if checked.failed else 0


def cmd_trace(args: argparse.Namespace) -> int:
    from flows import audit, workspace

    layout, params = workspace.open_workspace(workspace_dir(args))
    if args.regenerate is not None:
        return _regenerate(layout, args)
    result = audit.trace(layout, params, args.prediction_id)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for line in audit.format_trace(result):
            print(line)
    return 1 if any(ok is False for ok in result["checks"].values()) else 0


def _regenerate(layout: Layout, args: argparse.Namespace) -> int:
    from flows import audit
    from pipeline_steps.core.files import write_bytes_atomic
    from pipeline_steps.synthetic.dicom import encode_dicom, streamed_dataset

    found = audit.regenerate_streamed(layout, args.prediction_id, args.regenerate)
    image = found.pop("image")
    if args.out:
        dataset = streamed_dataset(image, found["seed"], found["index"])
        write_bytes_atomic(Path(args.out), encode_dicom(dataset))
        found["written_to"] = args.out
    if args.json:
        print(json.dumps(found))
    else:
        verdict = "identical" if found["identical"] else "DIFFERENT"
        print(
            f"streamed study {found['index']} of {found['model']} ({found['generator']}, seed "
            f"{found['seed']}): pixels {verdict} (sha256 {found['regenerated_sha256']}; recorded "
            f"{found['recorded_sha256']}); lesions {found['lesion_diameters_mm'] or 'none'} mm"
        )
        if args.out:
            print(f"written to {args.out}")
    return 0 if found["identical"] else 1


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "predict", help="predict a DICOM file or folder with a registered model (JSON lines)"
    )
    p.add_argument(
        "--input",
        required=True,
        metavar="DIR|FILE",
        help="a DICOM file, or a folder (every non-hidden file under it)",
    )
    p.add_argument(
        "--out", required=True, metavar="FILE.jsonl", help="one JSON record per input file"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--stage",
        choices=["production", "staging", "candidate"],
        help="predict with the version in this stage (default: production)",
    )
    which.add_argument("--version", metavar="N", help="predict with this model version")
    p.add_argument(
        "--threshold", type=unit_interval, help="score threshold (default: the model's own)"
    )
    p.add_argument(
        "--sr-out", metavar="DIR", help="also write one DICOM SR (TID 1500) per image here"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON, no bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve-api", help="HTTP API: POST /predict, GET /healthz (FastAPI)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--stage",
        default="production",
        choices=["production", "staging"],
        help="serve the version in this stage",
    )
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=10.0,
        help="how often to check whether the stage's alias moved (0: never)",
    )
    p.add_argument(
        "--tokens-file",
        metavar="FILE",
        help="accepted API tokens, as salted hashes (`radflow api-token add`) "
        "(default: $RADFLOW_API_TOKENS_FILE; $RADFLOW_API_TOKENS may hold more entries)",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="DEVELOPMENT ONLY: serve without authentication, on a loopback --host only",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        help="serve /docs, /redoc and /openapi.json, behind the same token "
        "(default: off, or on with RADFLOW_API_DOCS=1)",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        metavar="MB",
        help="refuse request bodies larger than this, before reading them "
        "(default: $RADFLOW_API_MAX_BODY_MB, else 256)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        metavar="S",
        help="answer 408/504 when a request's upload or prediction takes longer "
        "(default: $RADFLOW_API_REQUEST_TIMEOUT_S, else 30)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="requests screened, decoded and predicted at once; the rest wait in order "
        "(default: 2 per CPU core)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="most images in one forward pass when requests wait together (default: %(default)s)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=2.0,
        help="how long a request waits for others to share its forward pass (default: %(default)s)",
    )
    p.set_defaults(func=cmd_serve_api)

    p = sub.add_parser(
        "api-token", help="add, revoke or list serve-api's API tokens (stored as salted hashes)"
    )
    p.add_argument("action", choices=["add", "revoke", "list"], help="what to do")
    p.add_argument("name", nargs="?", help="the token's name (add, revoke)")
    p.add_argument(
        "--file", metavar="FILE", help="the token file (default: $RADFLOW_API_TOKENS_FILE)"
    )
    p.set_defaults(func=cmd_api_token)

    p = sub.add_parser("audit", help="verify, anchor or export the audit ledger")
    p.add_argument(
        "action",
        choices=["verify", "export", "anchor"],
        help="verify: walk the hash chain and compare it with the anchors (exit 1 when broken, "
        "truncated or rewritten); export: rows, anchors and a summary as JSON lines; anchor: "
        "publish the head to RADFLOW_LEDGER_ANCHOR now",
    )
    p.add_argument("--since", type=instant, metavar="TIME", help="export: from (ISO-8601)")
    p.add_argument("--until", type=instant, metavar="TIME", help="export: until (ISO-8601)")
    p.add_argument("--kind", help="export: only rows of this kind (prediction, transition, gate)")
    p.add_argument("--out", metavar="FILE.jsonl", help="export: write here instead of stdout")
    p.add_argument("--json", action="store_true", help="verify: print the result as JSON")
    p.add_argument(
        "--export",
        metavar="FILE.jsonl",
        help="verify: check this export offline instead (no database, no anchor store)",
    )
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "trace", help="a prediction's model, run, data version, validation and training images"
    )
    p.add_argument(
        "prediction_id",
        help="a record's prediction_id (a ULID), or the SOP Instance UID of an SR that "
        "`radflow pacs watch` stored",
    )
    p.add_argument("--json", action="store_true", help="one machine-readable object")
    p.add_argument(
        "--regenerate",
        type=int,
        metavar="INDEX",
        help="re-render streamed synthetic study INDEX of the model's training and check its "
        "pixels against the recorded SHA-256 (exit 1 when they differ)",
    )
    p.add_argument(
        "--out",
        metavar="FILE.dcm",
        help="with --regenerate: also write the re-rendered study as a DICOM file",
    )
    p.set_defaults(func=cmd_trace)
