"""Atomic writes (core/files): a reader sees the old file or the new one, never half of one."""

from pathlib import Path

import pytest

from pipeline_steps.core.files import (
    atomic_path,
    copy_atomic,
    write_bytes_atomic,
    write_text_atomic,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_replaces_the_target_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "metrics.json"  # the folder is created
    write_text_atomic(target, "old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert _leftovers(target.parent) == []


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "labels.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_temporary_names_are_hidden_and_can_keep_every_suffix(tmp_path: Path) -> None:
    seen = {}
    for name, keep in [("detector.keras", True), ("best.weights.h5", True), ("a.csv", False)]:
        with atomic_path(tmp_path / name, keep_suffix=keep) as tmp:
            seen[name] = tmp.name
            tmp.write_text(name)
    assert all(n.startswith(".") for n in seen.values())
    assert seen["detector.keras"].endswith(".keras")
    assert seen["best.weights.h5"].endswith(".weights.h5")  # Keras checks the double suffix
    assert not seen["a.csv"].endswith(".csv")  # folder scans for *.csv never see a partial file
    assert (tmp_path / "best.weights.h5").read_text() == "best.weights.h5"


def test_copy_atomic(tmp_path: Path) -> None:
    src = tmp_path / "in.dcm"
    src.write_bytes(b"DICM" * 10)
    copy_atomic(src, tmp_path / "out" / "x.dcm")
    assert (tmp_path / "out" / "x.dcm").read_bytes() == src.read_bytes()
