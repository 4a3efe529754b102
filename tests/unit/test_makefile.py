"""The Makefile creates .venv with a Python that radflow supports (3.11), and says what it needs
when none is on PATH, before anything is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAMP = ".radflow-installed"

# A stand-in for an unsupported interpreter: answers the Makefile's version questions as 3.12 would.
FAKE_312 = """#!/bin/sh
case "$2" in
  *sys.exit*) exit 1 ;;
  *platform*) echo 3.12.3 ;;
  *) echo 3.12 ;;
esac
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _bin(tmp_path: Path, pythons: dict[str, str | Path]) -> Path:
    """A PATH folder with grep and the given interpreters (a script's text, or a real one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    grep = shutil.which("grep")
    assert grep
    (bin_dir / "grep").symlink_to(grep)
    for name, python in pythons.items():
        if isinstance(python, Path):
            (bin_dir / name).symlink_to(python)
        else:
            (bin_dir / name).write_text(python)
            (bin_dir / name).chmod(0o755)
    return bin_dir


def _make(bin_dir: Path, venv: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    assert make
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MAKELEVEL")}
    env["PATH"] = str(bin_dir)
    return subprocess.run(
        [make, "-C", str(ROOT), *flags, f"VENV={venv}", f"{venv}/{STAMP}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_no_supported_python_on_path_is_a_clear_error(tmp_path):
    venv = tmp_path / "venv"
    done = _make(_bin(tmp_path, {"python3": FAKE_312}), venv)
    assert done.returncode != 0
    assert "radflow needs Python 3.11" in done.stderr and "python3.11" in done.stderr
    assert not venv.exists()  # it stopped before creating anything


def test_python311_is_chosen_over_an_unsupported_python3(tmp_path):
    # the interpreter running the tests is 3.11 (requires-python); its binary, not a shim script
    python311 = Path(sys.executable).resolve()
    bin_dir = _bin(tmp_path, {"python3": FAKE_312, "python3.11": python311})
    done = _make(bin_dir, tmp_path / "venv", "-n")
    assert done.returncode == 0, done.stderr
    assert f"{bin_dir}/python3.11 -m venv {tmp_path / 'venv'}" in done.stdout


def test_an_existing_venv_on_another_python_is_named(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_312)
    (venv / "bin" / "python").chmod(0o755)
    done = _make(_bin(tmp_path, {}), venv)
    assert done.returncode != 0
    assert "runs Python 3.12.3; radflow needs 3.11" in done.stderr
