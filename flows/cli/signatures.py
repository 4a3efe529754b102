"""`radflow models verify N` and `radflow models sign N --reason ...`: a version's signatures."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from pipeline_steps.core.errors import RadflowError

if TYPE_CHECKING:
    from pipeline_steps.core.config import Params
    from pipeline_steps.core.layout import Layout


def _version(args: argparse.Namespace) -> str:
    if not args.version:
        raise RadflowError(
            f"`radflow models {args.action}` needs a version number (`radflow models` lists them)"
        )
    return str(args.version)


def _ready(layout: Layout) -> None:
    from flows import servers, tracking
    from pipeline_steps.governance.lifecycle import TransitionError

    servers.check_reachable(mlflow=True)
    if not tracking.store_exists(layout):
        raise TransitionError(
            f"no model is registered yet: {tracking.public_uri(tracking.tracking_uri(layout))} "
            "does not exist; `radflow run` trains and registers one"
        )


def cmd_verify(args: argparse.Namespace, layout: Layout, params: Params) -> int:
    from flows.signatures import verify_version

    version = _version(args)
    _ready(layout)
    result = verify_version(layout, params, version)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0 if result.ok else 1
    print(f"{result.model_name} version {result.version}: {'OK' if result.ok else 'FAILED'}")
    for check in result.checks:
        key = check.key_id or "-"
        kind = " (workspace-development key)" if check.development else ""
        state = "OK" if not check.problem else f"FAILED: {check.problem}"
        print(f"  {check.model:<12} key {key}{kind}  {state}")
    return 0 if result.ok else 1


def cmd_sign(args: argparse.Namespace, layout: Layout, params: Params) -> int:
    from flows import registry
    from flows.signatures import sign_deliberately

    version = _version(args)
    if not args.reason:
        raise RadflowError(
            "`radflow models sign` needs --reason: who signed and why go to the ledger"
        )
    _ready(layout)
    tags, entry = sign_deliberately(
        layout,
        params,
        version,
        actor=args.actor or registry.default_actor(),
        reason=args.reason,
        force=args.force,
    )
    print(
        f"{params.register_.model_name} version {version} signed with key "
        f"{tags['signature_key_id']} ({tags['signature']}); ledger row {entry.seq}"
    )
    return 0
