"""DVC's cache with links: `radflow init` configures hardlinks, and stages that run again over outs
linked into the cache (as the Prefect flow runs them: DVC does not delete the outs first) replace
those files instead of writing into them, so the cache stays intact and `dvc status` agrees."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import versioning, workspace
from pipeline_steps.core.layout import Layout

STAGES = ("validate", "preprocess", "extract_features")
# The cached outs of those stages (dvc.yaml), which hardlinks tie to cache files.
CACHED_OUTS = ("data/raw", "data/interim", "data/processed", "data/features/features.parquet")


def radflow(root: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=root,
        capture_output=True,
        text=True,
        env=dict(os.environ, DVC_NO_ANALYTICS="1"),
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def corrupt_cache_files(cache: Path) -> list[str]:
    """Cache files whose content no longer hashes to their name (DVC names files by their md5)."""
    bad = []
    for path in sorted((cache / "files" / "md5").glob("*/*")):
        if path.suffix == ".dir":
            continue  # a directory's listing (JSON), named by the md5 of DVC's own serialization
        if hashlib.md5(path.read_bytes()).hexdigest() != path.parent.name + path.name:
            bad.append(f"{path.parent.name}/{path.name}")
    return bad


def linked_files(root: Path) -> list[Path]:
    return [
        p
        for out in CACHED_OUTS
        for p in ([root / out] if (root / out).is_file() else (root / out).rglob("*"))
        if p.is_file() and p.stat().st_nlink > 1
    ]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    for name, n, seed in (("first", 8, 1), ("second", 4, 2)):
        radflow(root, "synth", "--out", str(root / name), "--n-images", str(n), "--seed", str(seed))
    return root


def _ingest(layout: Layout, folder: Path) -> None:
    radflow(
        layout.root,
        "ingest",
        "--dicom-dir",
        str(folder / "images"),
        "--labels",
        str(folder / "labels.csv"),
    )


def _run_stages(layout: Layout) -> None:
    for stage in STAGES:  # bare, as the Prefect flow runs them: outs are not removed first
        radflow(layout.root, "step", stage)
    versioning.dvc(layout.root, "commit", "-f", "-q", *STAGES)


def test_init_configures_links_and_reruns_never_write_into_the_cache(
    tmp_path: Path, synthetic: Path
) -> None:
    layout = workspace.init(tmp_path / "ws")
    configured = versioning.dvc(layout.root, "config", "cache.type")
    assert [t.strip("[]' \n") for t in configured.split(",")] == ["hardlink", "symlink", "copy"]
    params = yaml.safe_load(layout.params_file.read_text())
    params["extract_features"]["embeddings"] = False
    layout.params_file.write_text(yaml.safe_dump(params))

    _ingest(layout, synthetic / "first")
    _run_stages(layout)
    first = linked_files(layout.root)
    # Every kind of cached out is stored once: the workspace file is the cache file.
    for out in CACHED_OUTS:
        assert any(p.is_relative_to(layout.root / out) for p in first), f"{out} is not linked"
    assert all(os.stat(p).st_mode & 0o222 == 0 for p in first)  # DVC makes them read-only
    before = {p: (p.stat().st_ino, hashlib.md5(p.read_bytes()).hexdigest()) for p in first}

    # A second run over the linked outs, with new data and new pixel params: every out changes.
    _ingest(layout, synthetic / "second")
    params["preprocess"]["window"] = "percentile"
    layout.params_file.write_text(yaml.safe_dump(params))
    _run_stages(layout)

    assert corrupt_cache_files(layout.dvc_cache) == []
    status = versioning.dvc(layout.root, "status", *STAGES)
    assert "up to date" in status, status
    for path, (inode, md5) in before.items():
        cached = layout.dvc_cache / "files" / "md5" / md5[:2] / md5[2:]
        assert cached.is_file() and hashlib.md5(cached.read_bytes()).hexdigest() == md5
        if path.exists() and path.stat().st_ino == inode:
            # Unchanged content may stay linked to the same cache file; it must still hold it.
            assert hashlib.md5(path.read_bytes()).hexdigest() == md5
    changed = [p for p in before if not p.exists() or p.stat().st_ino != before[p][0]]
    assert any(p.name == "manifest.parquet" for p in changed)
    assert any(p.name == "metadata.parquet" for p in changed)
    assert any(p.name == "features.parquet" for p in changed)

    # The check has teeth: a writer that rewrites a linked out in place corrupts the cache.
    victim = next(p for p in linked_files(layout.root) if p.name == "labels.parquet")
    with victim.open("r+b") as fh:  # root ignores the read-only mode, as a root container would
        fh.write(b"\0")
    assert corrupt_cache_files(layout.dvc_cache)
