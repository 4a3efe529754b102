"""The docs are reference: no machine paths or session history in what users read, and every
relative link resolves to a file inside the repository (`make lint` runs this file too)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    ROOT / "README.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|root|tmp/fresh|Users)/[\w.-]+")
HISTORY = re.compile(r"\b(this|previous|last|other) session\b", re.IGNORECASE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_hold_no_machine_paths_or_session_history(doc: Path) -> None:
    text = doc.read_text()
    assert not MACHINE_PATH.findall(text), MACHINE_PATH.findall(text)
    assert not HISTORY.findall(text), HISTORY.findall(text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_stay_inside_the_repository(doc: Path) -> None:
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor
        resolved = (doc.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{target} leaves the repository"
        assert resolved.exists(), f"{target} does not exist"


def test_the_checks_catch_what_they_look_for() -> None:
    assert MACHINE_PATH.findall("see /work/main/params.yaml") and HISTORY.findall("in this session")
    assert not MACHINE_PATH.findall("models:/radflow-detector/3 and s3://bucket/tmp/x")
