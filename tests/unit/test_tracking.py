"""The MLflow edge's own errors: a model that cannot be loaded is a TrackingError naming it."""

from pathlib import Path

import pytest

from flows import tracking
from pipeline_steps.core.errors import TrackingError
from pipeline_steps.core.layout import Layout


def test_a_version_that_cannot_be_loaded_is_named_with_the_store(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(TrackingError, match=r"cannot load radflow-detector version 7 from sqlite:"):
        tracking.load_pyfunc(Layout(tmp_path), "radflow-detector", "7")


def test_an_error_without_a_message_still_gives_a_reason(tmp_path: Path, monkeypatch):
    from mlflow.tracking import MlflowClient

    def silent(*_args: object) -> None:
        raise RuntimeError()  # no text: the reason falls back to the exception's type

    # The first MLflow call of a load: the version is looked up before its files are verified.
    monkeypatch.setattr(MlflowClient, "get_model_version", silent)
    with pytest.raises(TrackingError, match=r"version 1 from .*: RuntimeError$"):
        tracking.load_pyfunc(Layout(tmp_path), "m", "1")


def test_credentials_in_the_store_uri_never_reach_the_message(tmp_path: Path, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://radflow:s3cret@127.0.0.1:1/mlflow")
    monkeypatch.setattr(
        mlflow.pyfunc, "load_model", lambda _uri: (_ for _ in ()).throw(OSError("x"))
    )
    monkeypatch.setattr(
        mlflow.tracking.MlflowClient,
        "get_model_version",
        lambda *_a: (_ for _ in ()).throw(OSError("x")),
    )
    with pytest.raises(TrackingError) as caught:
        tracking.load_pyfunc(Layout(tmp_path), "m", "1")
    assert "s3cret" not in str(caught.value)
