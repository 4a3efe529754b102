"""The up-to-date decision as a pure function, and the code fingerprint it relies on."""

from __future__ import annotations

from dataclasses import replace

from flows.decision import Drift, Fingerprint, LastRun, decide
from flows.versioning import code_hash

FP = Fingerprint(
    data_version="aaaa.dir",
    params_hash="p" * 16,
    code_version="c0ffee",
    code_hash="h" * 16,
    tracking_uri="http://mlflow:5000",
)
LAST = LastRun(FP, "radflow-detector", "7", "run-7", {"ap50": 0.5}, "2026-11-23T02:00:00+00:00")
NO_DRIFT = Drift("compared", False)


def test_nothing_changed_and_no_drift_is_up_to_date_with_the_last_version():
    verdict = decide(FP, LAST, NO_DRIFT, force=False)
    assert verdict.up_to_date
    assert "unchanged since model version 7" in verdict.reason
    assert verdict.run_summary() == {
        "run_id": "run-7",
        "model_name": "radflow-detector",
        "model_version": "7",
        "data_version": "aaaa.dir",
        "metrics": {"ap50": 0.5},
    }


def test_each_change_is_named():
    cases = {
        "data version": replace(FP, data_version="bbbb.dir"),
        "params": replace(FP, params_hash="q" * 16),
        "code": replace(FP, code_hash="i" * 16),
        "tracking server": replace(FP, tracking_uri="http://other:5000"),
    }
    for label, current in cases.items():
        verdict = decide(current, LAST, NO_DRIFT, force=False)
        assert not verdict.up_to_date
        assert verdict.reason.startswith("changed since model version 7: ")
        assert label in verdict.reason
    both = decide(replace(FP, data_version="b.dir", params_hash="q"), LAST, NO_DRIFT, force=False)
    assert "data version" in both.reason and "params" in both.reason


def test_a_commit_without_a_content_change_is_not_a_change():
    # The commit id alone is not compared: a rebase or an unrelated commit retrains nothing.
    assert decide(replace(FP, code_version="beef"), LAST, NO_DRIFT, force=False).up_to_date


def test_drift_no_record_and_force_each_mean_retrain():
    drift = decide(FP, LAST, Drift("compared", True, ("p50", "glcm_contrast")), force=False)
    assert not drift.up_to_date and "p50, glcm_contrast" in drift.reason
    assert not decide(FP, None, NO_DRIFT, force=False).up_to_date
    forced = decide(FP, LAST, NO_DRIFT, force=True)
    assert not forced.up_to_date and forced.reason.startswith("forced")
    # No drift reference configured is not drift.
    assert decide(FP, LAST, Drift("no_reference", False), force=False).up_to_date


def test_the_code_hash_follows_file_contents_not_times(tmp_path):
    (tmp_path / "pipeline_steps").mkdir()
    (tmp_path / "flows").mkdir()
    module = tmp_path / "pipeline_steps" / "train.py"
    module.write_text("EPOCHS = 1\n")
    (tmp_path / "flows" / "cli.py").write_text("")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    first = code_hash(tmp_path)
    module.write_text("EPOCHS = 1\n")  # rewritten, same bytes
    assert code_hash(tmp_path) == first
    module.write_text("EPOCHS = 2\n")
    assert code_hash(tmp_path) != first
    module.write_text("EPOCHS = 1\n")
    (tmp_path / "pipeline_steps" / "new.py").write_text("")
    assert code_hash(tmp_path) != first
    (tmp_path / "pipeline_steps" / "new.py").unlink()
    (tmp_path / "README.md").write_text("docs are not code")
    assert code_hash(tmp_path) == first


def test_the_reason_names_the_production_training_data_drift_was_judged_against():
    drift = Drift("compared", False, reference_model_version="radflow-detector/3")
    verdict = decide(FP, LAST, drift, force=False)
    assert verdict.up_to_date
    assert (
        "drift: no (against the training data of production radflow-detector/3)" in verdict.reason
    )
    assert "drift: no reference" in decide(FP, LAST, Drift("no_reference", False), False).reason


# --------------------------------------------------------------------------------------------
# A failed run leaves the previous training outputs (flows/workspace.outputs_kept_until_registered)


def _outputs_workspace(tmp_path):
    """A workspace folder with dvc.yaml's train/test/register outs from an earlier run."""
    import os

    from flows.workspace import template
    from pipeline_steps.core.layout import Layout

    layout = Layout(tmp_path)
    layout.dvc_yaml.write_bytes(template("dvc.yaml"))
    layout.model.parent.mkdir(parents=True)
    layout.model.write_bytes(b"model v1")
    layout.metrics.write_text('{"ap50": 0.5}')
    layout.plots.mkdir(parents=True)
    (layout.plots / "froc.png").write_bytes(b"png v1")
    os.chmod(layout.model, 0o444)  # as DVC leaves a cached out
    return layout


def _rewrite_outputs(layout) -> None:
    """What the stages of a new run do: the model replaced, metrics.json rewritten in place (as the
    test stage writes it), a plot folder replaced, a registration record added."""
    import os

    tmp = layout.model.with_name(".new.keras")
    tmp.write_bytes(b"model v2")
    os.replace(tmp, layout.model)
    with layout.metrics.open("w") as fh:
        fh.write('{"ap50": 0.1}')
    (layout.plots / "froc.png").unlink()
    (layout.plots / "pr.png").write_bytes(b"png v2")


def test_a_run_that_fails_before_registering_leaves_the_previous_outputs(tmp_path):
    import pytest

    from flows.workspace import has_set_aside, outputs_kept_until_registered

    layout = _outputs_workspace(tmp_path)
    with pytest.raises(RuntimeError, match="registry down"), outputs_kept_until_registered(layout):
        _rewrite_outputs(layout)
        raise RuntimeError("registry down")
    assert layout.model.read_bytes() == b"model v1"
    assert layout.metrics.read_text() == '{"ap50": 0.5}'  # although rewritten in place
    assert sorted(p.name for p in layout.plots.iterdir()) == ["froc.png"]
    assert not layout.registration.exists() and not has_set_aside(layout)


def test_a_registered_run_keeps_its_outputs_and_a_killed_one_is_put_back_by_the_next(tmp_path):
    from flows.workspace import (
        has_set_aside,
        outputs_kept_until_registered,
        registered_since_set_aside,
        restore_outputs,
        set_aside_outputs,
    )

    layout = _outputs_workspace(tmp_path)
    with outputs_kept_until_registered(layout) as registered:
        _rewrite_outputs(layout)
        layout.registration.write_text('{"model_version": "2"}')
        registered()
    assert layout.model.read_bytes() == b"model v2" and not has_set_aside(layout)

    # A run killed after training, before registering: its set-aside stays behind...
    set_aside_outputs(layout)
    layout.model.write_bytes(b"model v3")
    assert has_set_aside(layout) and not registered_since_set_aside(layout)
    # ...and the next run puts the registered outputs back.
    assert "models/detector.keras" in restore_outputs(layout)
    assert layout.model.read_bytes() == b"model v2" and not has_set_aside(layout)
