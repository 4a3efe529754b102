"""`radflow console-users add|list|remove`: who may sign in to `radflow console`, with which roles
(secrets stored as scrypt hashes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _users_file(args: argparse.Namespace) -> Path:
    import os

    from flows.console_auth import USERS_FILE_ENV
    from pipeline_steps.core.errors import ConfigError

    name = args.users_file or os.environ.get(USERS_FILE_ENV, "").strip()
    if not name:
        raise ConfigError(
            f"name the console users file: --users-file FILE, or set {USERS_FILE_ENV}"
        )
    return Path(name)


def _read_secret(name: str) -> str:
    import getpass

    from pipeline_steps.core.errors import ConfigError

    if sys.stdin.isatty():
        secret = getpass.getpass(f"secret for {name}: ")
        if getpass.getpass("the same again: ") != secret:
            raise ConfigError("the two secrets differ; nothing was changed")
    else:  # a pipe or a file: one line, so secrets can be set from a secret store
        secret = sys.stdin.readline().rstrip("\r\n")
    if not secret:
        raise ConfigError(
            f"no secret given for {name!r}: type one, pipe one line to stdin, or use --generate"
        )
    return secret


def cmd_add(args: argparse.Namespace) -> int:
    from flows import console_auth

    path = _users_file(args)
    # Checked before a secret is asked for, so a typo does not cost a typed password.
    console_auth.check_user_name(args.name)
    roles = console_auth.check_roles(args.role or ())
    secret = console_auth.new_token() if args.generate else _read_secret(args.name)
    console_auth.add_user(path, args.name, roles, secret, replace=args.replace)
    what = "changed in" if args.replace else "added to"
    print(
        f"console user {args.name!r} ({', '.join(sorted(roles))}) {what} {path}; only a scrypt "
        "hash of the secret is stored; restart `radflow console` to apply it",
        file=sys.stderr,
    )
    if args.generate:
        print("its secret is shown this once, give it to the user:", file=sys.stderr)
        print(secret)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from flows import console_auth

    users = console_auth.read_users_file(_users_file(args))
    if not len(users):
        print("no console users; `radflow console-users add NAME --role ROLE` adds one")
        return 0
    width = max(len(u.name) for u in users)
    for user in users:
        roles = [r for r in console_auth.ROLES if r in user.roles]
        print(f"{user.name:<{width}}  {','.join(roles)}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from flows import console_auth

    path = _users_file(args)
    console_auth.remove_user(path, args.name)
    print(f"console user {args.name!r} removed from {path}; restart `radflow console` to apply it")
    if not len(console_auth.read_users_file(path)):
        print(
            f"{path} holds no user now: `radflow console` does not start until one is added",
            file=sys.stderr,
        )
    return 0


def _file_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--users-file",
        metavar="FILE",
        help="the console users file (default: $RADFLOW_CONSOLE_USERS_FILE)",
    )


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from flows.console_auth import ROLES

    p = sub.add_parser(
        "console-users",
        help="add, list or remove the users of `radflow console` and their roles",
    )
    actions = p.add_subparsers(
        dest="console_users_command", required=True, metavar="ACTION", help="what to do"
    )
    a = actions.add_parser(
        "add",
        help="add a user; the secret is typed, read as one line from stdin, or --generate'd",
    )
    a.add_argument("name", metavar="NAME", help="the user's sign-in name")
    a.add_argument(
        "--role",
        action="append",
        choices=ROLES,
        required=True,
        help="a role (repeat for several): viewer sees, reviewer reviews, promoter promotes",
    )
    a.add_argument(
        "--generate",
        action="store_true",
        help="make a random secret and print it once (e.g. for the Prometheus scrape)",
    )
    a.add_argument(
        "--replace", action="store_true", help="change the roles and secret of an existing user"
    )
    _file_option(a)
    a.set_defaults(func=cmd_add)

    ls = actions.add_parser("list", help="the users and their roles (never the hashes)")
    _file_option(ls)
    ls.set_defaults(func=cmd_list)

    rm = actions.add_parser("remove", help="remove a user")
    rm.add_argument("name", metavar="NAME", help="the user to remove")
    _file_option(rm)
    rm.set_defaults(func=cmd_remove)
