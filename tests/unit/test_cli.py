"""The `radflow` command line's conventions, in-process: exit codes (1 failure, 2 usage), global options
after the command, --version, help on every argument, inputs checked before Prefect or MLflow start,
and an empty registry listed without creating one."""

from __future__ import annotations

import argparse
import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest

from flows.cli import build_parser, main

SOURCE = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _process_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() sets up logging and environment variables for the process it runs in (Prefect's
    extra loggers among them): not for the test session's other tests."""
    import flows.cli

    monkeypatch.setattr(flows.cli, "_setup_environment", lambda: None)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "0")


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace as `workspace.resolve` sees one (params.yaml, dvc.yaml, .dvc/), without git or DVC
    run: enough for every check made before a command's work starts. Its MLflow store is the
    embedded one."""
    root = tmp_path / "ws"
    (root / ".dvc").mkdir(parents=True)
    shutil.copyfile(SOURCE / "params.yaml", root / "params.yaml")
    shutil.copyfile(SOURCE / "dvc.yaml", root / "dvc.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


def _parsers(parser: argparse.ArgumentParser, path: str = "radflow"):
    """(command path, parser) for radflow's parser and every (nested) subcommand's."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def _no_flow(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the Prefect flow started before the inputs were checked")


# --------------------------------------------------------------------------------------------
# 1. Exit codes


def test_a_radflow_error_exits_1_and_a_usage_error_exits_2(tmp_path, capsys):
    assert main(["--workspace", str(tmp_path / "nowhere"), "models"]) == 1
    assert "is not a radflow workspace" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["models", "--no-such-option"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as missing:
        main(["promote", "1", "--to", "staging"])  # --reason is required
    assert missing.value.code == 2 and "--reason" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 2. A batch with failed files


def _fake_batch(failed: int, predicted: int):
    def batch_prediction(workspace, source, out, **_kwargs):
        Path(out).write_text("".join("{}\n" for _ in range(failed + predicted)))
        return {
            "out": out,
            "images": failed + predicted,
            "predicted": predicted,
            "failed": failed,
            "boxes": 0,
            "reports": 0,
            "model": {"name": "radflow-detector", "version": "1", "stage": "production"},
            "ledger_rows": [1, failed + predicted],
            "seconds": 0.1,
        }

    return batch_prediction


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_predict_exits_1_when_any_file_failed_and_still_writes_the_records(
    ws, tmp_path, monkeypatch, capsys, json_flag
):
    import flows.predict

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_bytes(b"x")
    out = tmp_path / "preds.jsonl"
    args = ["--workspace", str(ws), "predict", "--input", str(tmp_path / "in"), "--out", str(out)]
    monkeypatch.setattr(flows.predict, "batch_prediction", _fake_batch(failed=2, predicted=3))
    assert main([*args, *json_flag]) == 1
    err = capsys.readouterr().err
    assert "2 of 5 file(s) failed" in err and str(out) in err and "reason" in err
    assert len(out.read_text().splitlines()) == 5

    monkeypatch.setattr(flows.predict, "batch_prediction", _fake_batch(failed=0, predicted=5))
    assert main([*args, *json_flag]) == 0
    assert "failed;" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 3. Global options, before or after the command


def test_global_options_are_taken_before_or_after_any_command():
    parser = build_parser()
    assert parser.parse_args(["models", "--workspace", "W"]).workspace == "W"
    assert parser.parse_args(["--workspace", "W", "models"]).workspace == "W"
    # Given before, a subcommand's parser does not overwrite it with its own default.
    assert parser.parse_args(["--workspace", "W", "server", "start"]).workspace == "W"
    assert parser.parse_args(["server", "start", "--workspace", "W"]).workspace == "W"
    assert parser.parse_args(["--workspace", "A", "models", "--workspace", "B"]).workspace == "B"


def test_every_top_level_option_is_one_definition_shared_by_every_command():
    from flows.cli.common import GLOBAL_OPTIONS

    parser = build_parser()
    top = {
        option: action
        for option, action in parser._option_string_actions.items()
        if option not in ("-h", "--help", "--version")  # what radflow itself answers
    }
    assert "--workspace" in top
    for path, sub in _parsers(parser):
        for option, action in top.items():
            assert sub._option_string_actions.get(option) is action, (path, option)
            assert action is GLOBAL_OPTIONS._option_string_actions[option]


def test_no_workspace_given_means_the_current_directory(ws, monkeypatch, capsys):
    monkeypatch.chdir(ws)
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


# --------------------------------------------------------------------------------------------
# 4. --version


def test_version_prints_the_package_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"radflow {metadata.version('radflow')}"


# --------------------------------------------------------------------------------------------
# 5. Help


def test_every_argument_of_every_command_has_help_and_shows_its_default():
    for path, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"{path} {name}: no help"
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{path} {choice.dest}: no help"
            default = action.default
            if (
                default is None
                or default is False
                or default is argparse.SUPPRESS
                or isinstance(action, argparse._HelpAction | argparse._VersionAction)
            ):
                continue
            shown = formatter._expand_help(action)
            assert "default" in shown, f"{path} {name}: default {default!r} not shown: {shown!r}"


def test_help_shows_default_values():
    pages = {path: parser.format_help() for path, parser in _parsers(build_parser())}
    assert "(default: 8000)" in " ".join(pages["radflow serve-api"].split())
    assert "(default: 4200)" in " ".join(pages["radflow server start"].split())
    assert "(default: the current directory)" in " ".join(pages["radflow models"].split())


# --------------------------------------------------------------------------------------------
# 6. Inputs checked before services start


def test_predict_reports_a_missing_input_before_prefect_starts(ws, tmp_path, monkeypatch, capsys):
    import flows.predict

    monkeypatch.setattr(flows.predict, "batch_prediction", _no_flow)
    code = main(
        [
            *("--workspace", str(ws), "predict"),
            *("--input", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "p.jsonl")),
        ]
    )
    assert code == 1 and "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = main(
        [
            *("--workspace", str(ws), "predict"),
            *("--input", str(tmp_path / "empty"), "--out", str(tmp_path / "p.jsonl")),
        ]
    )
    assert code == 1 and "holds no files" in capsys.readouterr().err


def test_predict_without_a_pseudonym_key_fails_before_prefect_starts(
    ws, tmp_path, monkeypatch, capsys
):
    import flows.predict

    monkeypatch.setattr(flows.predict, "batch_prediction", _no_flow)
    monkeypatch.delenv("RADFLOW_PSEUDONYM_DEV_MODE", raising=False)
    monkeypatch.delenv("RADFLOW_PSEUDONYM_KEY", raising=False)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_bytes(b"not read: the key is checked first")
    code = main(
        [
            *("--workspace", str(ws), "predict"),
            *("--input", str(tmp_path / "in"), "--out", str(tmp_path / "p.jsonl")),
        ]
    )
    assert code == 1 and "RADFLOW_PSEUDONYM_KEY is not set" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_commands_report_a_missing_workspace_before_prefect_starts(tmp_path, monkeypatch, capsys):
    import flows.nightly
    import flows.predict

    monkeypatch.setattr(flows.predict, "batch_prediction", _no_flow)
    monkeypatch.setattr(flows.nightly, "nightly_retraining", _no_flow)
    missing = str(tmp_path / "nowhere")
    for args in (
        ["predict", "--input", str(tmp_path), "--out", str(tmp_path / "p.jsonl")],
        ["nightly"],
        ["run"],
    ):
        assert main([*args, "--workspace", missing]) == 1, args
        assert "is not a radflow workspace" in capsys.readouterr().err


def test_ingest_reports_a_missing_labels_file_before_copying_anything(ws, tmp_path, capsys):
    (tmp_path / "dicoms").mkdir()
    (tmp_path / "dicoms" / "a.dcm").write_bytes(b"x")
    code = main(
        [
            *("--workspace", str(ws), "ingest", "--dicom-dir", str(tmp_path / "dicoms")),
            *("--labels", str(tmp_path / "labels.csv")),
        ]
    )
    assert code == 1 and "labels file not found" in capsys.readouterr().err
    assert not (ws / "data").exists()


def test_promote_checks_its_stage_and_the_registry_before_opening_mlflow(ws, capsys):
    code = main(["--workspace", str(ws), "promote", "1", "--to", "prod", "--reason", "x"])
    assert code == 1 and "unknown stage 'prod'" in capsys.readouterr().err
    code = main(["--workspace", str(ws), "promote", "1", "--to", "staging", "--reason", "x"])
    assert code == 1 and "no model is registered yet" in capsys.readouterr().err
    code = main(["--workspace", str(ws), "rollback", "--reason", "x"])
    assert code == 1 and "no model is registered yet" in capsys.readouterr().err
    assert not (ws / "mlflow.db").exists()


# --------------------------------------------------------------------------------------------
# 7. An empty registry


def test_models_on_an_empty_registry_is_an_empty_list_and_creates_no_store(ws, capsys):
    assert main(["--workspace", str(ws), "models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["--workspace", str(ws), "models"]) == 0
    assert "no versions of radflow-detector yet" in capsys.readouterr().out
    assert not (ws / "mlflow.db").exists()


def test_a_store_without_the_model_lists_no_versions():
    from flows import registry
    from pipeline_steps.governance.lifecycle import TransitionError

    class Unregistered:
        model_name = "radflow-detector"

        def versions(self):
            return []

        def aliases(self):
            raise TransitionError("no model named 'radflow-detector' is registered")

    assert registry.list_versions(Unregistered(), ledger=None) == []  # type: ignore[arg-type]
