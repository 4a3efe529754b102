"""The one inter-process lock of radflow: an OS file lock (filelock), with who holds it written beside
it, so that a process that waits or gives up can say whose run it met.

The operating system releases the lock when its holder exits, killed or not, so a crash never leaves
a stale lock; the holder file it leaves behind is only read while the lock is held by someone."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline_steps.core.errors import RadflowError
from pipeline_steps.core.files import write_text_atomic

# How often a waiting process says again whom it waits for.
REPORT_EVERY_S = 30.0


class LockHeld(RadflowError):
    """Another process holds the lock and the caller would not (or no longer) wait for it."""

    def __init__(self, message: str, path: Path, holder: Holder | None) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: written beside it by the holder once it has the lock."""

    what: str  # e.g. "radflow run"
    pid: int
    host: str
    started_at: str  # ISO-8601, UTC

    def describe(self) -> str:
        return f"{self.what} (pid {self.pid} on {self.host}, since {self.started_at})"


def holder_path(lock: Path) -> Path:
    """Where the holder of `lock` is written: beside it, `<name>.holder`."""
    return lock.with_name(lock.name + ".holder")


def read_holder(lock: Path) -> Holder | None:
    """The holder recorded beside `lock`; None when there is no (readable) record."""
    try:
        raw = json.loads(holder_path(lock).read_text())
        return Holder(str(raw["what"]), int(raw["pid"]), str(raw["host"]), str(raw["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_holder(lock: Path) -> str:
    holder = read_holder(lock)
    return holder.describe() if holder else "another process (it has not said who)"


Waiting = Callable[[Holder | None, float], None]


@contextmanager
def exclusive(
    lock: Path,
    what: str,
    *,
    wait_s: float | None = None,
    on_wait: Waiting | None = None,
    report_every_s: float = REPORT_EVERY_S,
) -> Iterator[Holder]:
    """Hold `lock` for the block, recording `what` (and this pid, host and time) beside it.

    `wait_s`: None waits as long as it takes, 0 tries once, else at most that many seconds; when the
    lock stays taken, LockHeld names its holder. `on_wait(holder, waited_s)` hears whom this process
    waits for when it starts waiting, then every `report_every_s`."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: Prefect may release in another thread of this process than the one that
    # acquired. Not a singleton: a second `exclusive` on the same file in one process waits like any
    # other process would (filelock refuses it outright where it would wait forever).
    file_lock = FileLock(lock, thread_local=False)
    started = time.monotonic()
    told = False
    while True:
        waited = time.monotonic() - started
        remaining = None if wait_s is None else max(wait_s - waited, 0.0)
        step = report_every_s if remaining is None else min(report_every_s, remaining)
        try:
            file_lock.acquire(timeout=step if (told or remaining == 0) else 0)
            break
        except Timeout:
            holder = read_holder(lock)
            if wait_s is not None and time.monotonic() - started >= wait_s:
                raise LockHeld(
                    f"{lock} is held by "
                    f"{holder.describe() if holder else 'another process (it has not said who)'}"
                    + (f"; waited {wait_s:g} s" if wait_s else ""),
                    lock,
                    holder,
                ) from None
            if on_wait is not None:
                on_wait(holder, time.monotonic() - started)
            told = True
    me = Holder(what, os.getpid(), socket.gethostname(), _now())
    try:
        write_text_atomic(holder_path(lock), json.dumps(asdict(me)))
        yield me
    finally:
        # Only the holder writes or removes the record, so this removes our own.
        with suppress(OSError):
            holder_path(lock).unlink()
        file_lock.release()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
