"""What the command groups share: the workspace argument, progress bars and argument types."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path


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
