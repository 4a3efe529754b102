"""Patient data at rest: what a real `radflow ingest` leaves in the raw archive and the DVC cache
(a real `dvc add` and git commit) is readable by its owner only, and a workspace made before that
rule is tightened when a command starts on it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from pipeline_steps.core.layout import Layout

# DVC marks every cache file 0444 (and re-hashes files of any other mode on each status), so a
# cache file may be 0444 as long as its folders keep everyone else out.
DVC_PROTECTED = 0o444


def radflow(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        # the caller's umask is the usual 022: radflow must not rely on it
        env=dict(os.environ, DVC_NO_ANALYTICS="1"),
        preexec_fn=lambda: os.umask(0o022),
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def open_to_others(*roots: Path) -> list[str]:
    """Folders others may enter or list, and files others may write or (outside DVC's protected
    cache files) read, below and including `roots`."""
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            m = mode(path)
            if path.is_dir() and m & 0o077:
                found.append(f"{path} folder {oct(m)}")
            elif path.is_file() and (m & 0o022 or (m & 0o044 and m != DVC_PROTECTED)):
                found.append(f"{path} file {oct(m)}")
    return found


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, Path]:
    base = tmp_path_factory.mktemp("phi")
    radflow(base, "synth", "--out", str(base / "synth"), "--n-images", "3", "--seed", "5")
    radflow(base, "init", str(base / "ws"))
    layout = Layout(base / "ws")
    radflow(
        layout.root,
        "ingest",
        "--dicom-dir",
        str(base / "synth" / "images"),
        "--labels",
        str(base / "synth" / "labels.csv"),
    )
    return layout, base / "synth"


def test_the_raw_archive_and_the_dvc_cache_are_owner_only(ingested: tuple[Layout, Path]) -> None:
    layout, _ = ingested
    cache_files = [p for p in (layout.dvc_cache / "files").rglob("*") if p.is_file()]
    dicoms = [p for p in cache_files if p.read_bytes()[128:132] == b"DICM"]
    assert len(dicoms) == 3  # the originals, with their headers, are in the cache
    assert pydicom.dcmread(dicoms[0], stop_before_pixels=True).PatientName  # PHI is there
    assert open_to_others(layout.raw, layout.dvc_cache, layout.state) == []
    for folder in (layout.raw, layout.raw_images, layout.dvc_cache, layout.state):
        assert mode(folder) == 0o700, folder


def test_files_a_command_creates_are_owner_only_whatever_the_callers_umask(
    ingested: tuple[Layout, Path],
) -> None:
    layout, synth = ingested
    written = [p for p in synth.rglob("*") if p.is_file()]  # synthetic DICOMs with fake PHI
    assert written and {oct(mode(p)) for p in written} == {oct(0o600)}
    assert mode(layout.raw_dvc) == 0o600


def test_an_older_workspace_is_tightened_when_a_command_starts_on_it(
    ingested: tuple[Layout, Path],
) -> None:
    layout, _ = ingested
    # as radflow left a workspace before it set its umask: folders 0755
    for folder in (layout.raw, layout.raw_images, layout.dvc_cache, layout.state):
        folder.chmod(0o755)
    radflow(layout.root, "models", "--json")  # any command on the workspace
    assert mode(layout.dvc_cache) == mode(layout.raw) == mode(layout.state) == 0o700


def test_only_a_workspace_is_tightened_and_a_shared_dvc_cache_is_left_alone(tmp_path: Path) -> None:
    from flows.cli.common import restrict_workspace

    # a folder that merely has a data/raw is not a workspace: radflow leaves it alone
    other = Layout(tmp_path / "other")
    other.raw.mkdir(parents=True)
    other.raw.chmod(0o755)
    assert restrict_workspace(other.root) == [] and mode(other.raw) == 0o755

    ws = Layout(tmp_path / "ws")
    for folder in (ws.raw, ws.state, ws.dvc_cache):
        folder.mkdir(parents=True)
        folder.chmod(0o755)
    ws.params_file.write_text("{}\n")
    (ws.dvc_dir / "config").write_text("[cache]\n    shared = group\n    type = hardlink\n")
    assert sorted(restrict_workspace(ws.root)) == sorted([ws.raw, ws.state])
    assert mode(ws.dvc_cache) == 0o755  # shared on purpose, by the DVC config
    (ws.dvc_dir / "config").write_text("[core]\n    analytics = false\n")
    assert restrict_workspace(ws.root) == [ws.dvc_cache] and mode(ws.dvc_cache) == 0o700
