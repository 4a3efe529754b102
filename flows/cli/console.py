"""`radflow console`: the web console over a workspace (flows/console), for data teams, auditors and
reviewers; users and roles come from `radflow console-users`."""

from __future__ import annotations

import argparse
import logging

from flows.cli.common import workspace_dir

log = logging.getLogger("radflow.console")


def cmd_console(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from flows import console_auth, servers, workspace
    from flows.api_auth import is_loopback
    from flows.console.app import create_app
    from pipeline_steps.core.errors import ConfigError

    tls = bool(args.tls_certfile or args.tls_keyfile)
    if tls and not (args.tls_certfile and args.tls_keyfile):
        raise ConfigError("HTTPS needs both --tls-certfile and --tls-keyfile")
    if not is_loopback(args.host) and not (tls or args.behind_https_proxy):
        raise ConfigError(
            f"--host {args.host} is reachable from other machines: serve HTTPS "
            "(--tls-certfile and --tls-keyfile) or, behind a proxy that terminates HTTPS, say so "
            "with --behind-https-proxy. Sessions and passwords never travel over plain HTTP."
        )
    if args.insecure_cookies and not is_loopback(args.host):
        raise ConfigError("--insecure-cookies is for loopback development only")
    # Users first: without any, the console refuses to start and names what to set.
    users = console_auth.load_users(
        {console_auth.USERS_FILE_ENV: args.users_file} if args.users_file else None
    )
    layout, params = workspace.open_workspace(workspace_dir(args))
    servers.check_reachable(mlflow=True)
    # Pages read run artifacts (plots, manifests, cards): no progress bars in a service log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    app = create_app(layout, params, users, secure_cookies=not args.insecure_cookies)
    scheme = "https" if tls else "http"
    log.info(
        "radflow console for %s on %s://%s:%d (%d users)",
        layout.root,
        scheme,
        args.host,
        args.port,
        len(users),
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        # Paths carry prediction ids and version numbers only; still, one line per request is
        # noise in a service log, and the console logs sign-ins, reviews and promotions itself.
        access_log=False,
        ssl_certfile=args.tls_certfile,
        ssl_keyfile=args.tls_keyfile,
        proxy_headers=bool(args.behind_https_proxy),
    )
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "console",
        help="the web console: versions and their history, traces with the image, the ledger, "
        "the review queue and post-deployment monitoring",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8100, help="port (default 8100)")
    p.add_argument(
        "--users-file",
        metavar="FILE",
        help="the users and roles (default: $RADFLOW_CONSOLE_USERS_FILE, or the users in "
        "$RADFLOW_CONSOLE_USERS); `radflow console-users add` writes it",
    )
    p.add_argument("--tls-certfile", metavar="PEM", help="serve HTTPS with this certificate")
    p.add_argument("--tls-keyfile", metavar="PEM", help="the certificate's private key")
    p.add_argument(
        "--behind-https-proxy",
        action="store_true",
        help="a reverse proxy terminates HTTPS in front of a non-loopback --host",
    )
    p.add_argument(
        "--insecure-cookies",
        action="store_true",
        help="session cookies without the Secure flag (loopback development with a browser that "
        "refuses Secure cookies over http://127.0.0.1)",
    )
    p.set_defaults(func=cmd_console)
