"""`radflow pacs pull` checks its filters, its label file and the PACS settings before anything is asked
of the PACS or written to the workspace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.cli import main

SOURCE = Path(__file__).resolve().parents[2]


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import flows.cli

    monkeypatch.setattr(flows.cli, "_setup_environment", lambda: None)
    root = tmp_path / "ws"
    (root / ".dvc").mkdir(parents=True)
    shutil.copyfile(SOURCE / "params.yaml", root / "params.yaml")
    shutil.copyfile(SOURCE / "dvc.yaml", root / "dvc.yaml")
    for name in ("RADFLOW_PACS_URL", "RADFLOW_PACS_USER", "RADFLOW_PACS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return root


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--from", "2026-01-01"], "YYYYMMDD"),
        (["--from", "20260201", "--to", "20260101"], "study_date_from is after study_date_to"),
        (["--labels", "missing.csv"], "missing.csv: labels file not found"),
        ([], "RADFLOW_PACS_URL"),  # no PACS configured
    ],
)
def test_bad_input_is_refused_before_the_pacs_is_asked(ws, capsys, args, says):
    assert main(["pacs", "pull", "--workspace", str(ws), *args]) == 1
    assert says in capsys.readouterr().err
    assert not (ws / ".radflow" / "pacs").exists()


def test_a_password_in_the_environment_never_reaches_the_message(ws, capsys, monkeypatch):
    monkeypatch.setenv("RADFLOW_PACS_URL", "http://user:s3cret-pw@127.0.0.1:9/dicom-web")
    assert main(["pacs", "pull", "--workspace", str(ws)]) == 1
    err = capsys.readouterr().err
    assert "RADFLOW_PACS_USER" in err and "s3cret-pw" not in err
