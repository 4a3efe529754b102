"""What the command groups share: the parser with its global options, progress bars and argument
types."""

from __future__ import annotations

import argparse
import configparser
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline_steps.core.layout import Layout

log = logging.getLogger("radflow.cli")

# The umask every radflow command runs under (set by `main`, inherited by the DVC, git, MLflow and
# Prefect processes it starts): what radflow and those tools create is readable by its owner only
# (files 0600, folders 0700). The raw archive, the DVC cache and SR files hold the original DICOM
# headers, patient identity included. DVC still marks its cache files 0444 (it re-hashes files of
# any other mode on every status), so the cache's folders are what keep others out.
PHI_UMASK = 0o077

# The options every command takes, before or after its name (`radflow --workspace W models` and
# `radflow models --workspace W`): defined once here, a parent of every parser. The default is
# SUPPRESS so that a subcommand's parser does not overwrite a value given before the command with
# its own default; `main` sets what was not given at all to None.
GLOBAL_OPTIONS = argparse.ArgumentParser(add_help=False)
GLOBAL_OPTIONS.add_argument(
    "--workspace",
    metavar="DIR",
    default=argparse.SUPPRESS,
    help="radflow checkout to work on (default: the current directory)",
)


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help, unless the help already words it or there is none to
    show (None or False: the option is off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.required
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """radflow's parser and each (sub)command's: it shows defaults and takes the global options.
    `add_subparsers` makes its children of this class too."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs["parents"] = [*kwargs.get("parents", ()), GLOBAL_OPTIONS]
        super().__init__(**kwargs)


def global_option_names() -> list[str]:
    """The `dest` of each global option."""
    return [action.dest for action in GLOBAL_OPTIONS._actions]


def workspace_dir(args: argparse.Namespace) -> Path:
    return Path(args.workspace) if args.workspace else Path.cwd()


@contextmanager
def progress_bar(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm progress bar on stderr, driven by (done, total) callbacks."""
    from tqdm import tqdm

    bar: tqdm | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def instant(text: str) -> datetime:
    """An ISO-8601 time for --at, --since and --until; without a zone it is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 time (e.g. 2026-11-23T14:00:00Z or 2026-11-23)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _dvc_cache_is_shared(layout: Layout) -> bool:
    """Whether the workspace's DVC config shares the cache (`cache.shared`) or moves it
    (`cache.dir`): then its modes are the owner's choice, and radflow leaves them alone."""
    config = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        config.read([layout.dvc_dir / "config", layout.dvc_dir / "config.local"])
    except configparser.Error:
        return True  # unreadable: do not guess
    return config.has_option("cache", "shared") or config.has_option("cache", "dir")


def restrict_workspace(root: Path) -> list[Path]:
    """Make the patient-data folders of an existing workspace owner-only; the folders changed.

    Workspaces made before radflow set PHI_UMASK have world-readable folders (0755) over the raw
    archive, the DVC cache and radflow's state (landing staging and quarantine). Closing the top
    folder of each is enough, since others can no longer reach anything below it: three chmod
    calls, done whenever a command starts on a workspace. Folders that are links, or are not the
    user's own, and a shared or relocated DVC cache are left as they are."""
    layout = Layout(root)
    if not (layout.params_file.is_file() and layout.dvc_dir.is_dir()):
        return []  # not a radflow workspace (e.g. `radflow synth` run in some folder): hands off
    candidates = [layout.raw, layout.state]
    if not _dvc_cache_is_shared(layout):
        candidates.append(layout.dvc_cache)
    changed = []
    for folder in candidates:
        try:
            info = folder.lstat()
        except OSError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or not mode & 0o077:
            continue
        try:
            folder.chmod(mode & 0o700)
        except OSError as exc:
            log.warning("%s could not be made owner-only (%s)", folder, exc.strerror)
            continue
        changed.append(folder)
    return changed
