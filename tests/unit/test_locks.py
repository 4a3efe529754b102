"""The one inter-process lock (core/locks): exclusion between real processes, the holder named beside
the lock, waiting with progress, refusing without waiting, and release when the holder is killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline_steps.core import locks


def hold(lock: Path, what: str, seconds: float) -> subprocess.Popen[str]:
    """A separate process that takes `lock`, says "held", and keeps it for `seconds`."""
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from pipeline_steps.core import locks
        with locks.exclusive(Path({str(lock)!r}), {what!r}):
            print("held", flush=True)
            time.sleep({seconds})
        print("released", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    lock = tmp_path / "state" / "run.lock"
    holder = hold(lock, "radflow run", 600)
    try:
        recorded = json.loads(locks.holder_path(lock).read_text())
        assert recorded["pid"] == holder.pid and recorded["what"] == "radflow run"
        assert recorded["host"] == socket.gethostname() and recorded["started_at"]
        entered = []
        with pytest.raises(locks.LockHeld) as refused, locks.exclusive(lock, "second", wait_s=0):
            entered.append(True)
        assert entered == []
        message = str(refused.value)
        assert f"radflow run (pid {holder.pid} on {socket.gethostname()}, since" in message
        assert str(lock) in message
        assert refused.value.holder is not None and refused.value.holder.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_waiting_process_hears_who_holds_it_then_gets_it(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    holder = hold(lock, "radflow nightly", 2.5)
    heard: list[tuple[int | None, float]] = []
    try:
        started = time.monotonic()
        with locks.exclusive(
            lock,
            "waiter",
            on_wait=lambda h, waited: heard.append((h.pid if h else None, waited)),
            report_every_s=0.5,
        ) as me:
            waited = time.monotonic() - started
            assert me.pid == os.getpid()
            assert json.loads(locks.holder_path(lock).read_text())["what"] == "waiter"
        assert holder.wait(30) == 0
        assert holder.stdout is not None and holder.stdout.read().strip() == "released"
    finally:
        holder.kill()
        holder.wait()
    assert heard and heard[0][0] == holder.pid  # told whom it waited for, from the start
    assert len(heard) >= 2  # and again while it waited
    assert waited > 1.0  # it did wait for the holder to let go
    assert not locks.holder_path(lock).exists()  # the record goes with the lock


def test_a_bounded_wait_gives_up_naming_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    holder = hold(lock, "radflow run", 600)
    try:
        started = time.monotonic()
        with (
            pytest.raises(locks.LockHeld, match=r"waited 1 s"),
            locks.exclusive(lock, "late", wait_s=1),
        ):
            pass
        assert time.monotonic() - started >= 1
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    holder = hold(lock, "radflow run", 600)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert locks.holder_path(lock).exists()  # the dead holder's record is left behind...
    with locks.exclusive(lock, "after the crash", wait_s=0) as me:  # ...but the lock is free
        assert me.what == "after the crash"
        assert json.loads(locks.holder_path(lock).read_text())["pid"] == os.getpid()


def test_one_process_cannot_take_the_lock_twice(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    with (
        locks.exclusive(lock, "outer"),
        pytest.raises(locks.LockHeld, match="outer"),
        locks.exclusive(lock, "inner", wait_s=0),
    ):
        pass
