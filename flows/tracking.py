"""MLflow edge: the tracking store of a workspace, the one MLflow client factory and pyfunc loader of
flows/ (the only module here that imports MLflow), and logging + registering a trained model.

A model version is the pyfunc of `pipeline_steps/serving/pyfunc.py` (DICOM in, boxes in original
pixels out), with a Keras-native copy in the same run, lineage tags, the training manifest as an
artifact and the data version as the run's dataset input. The pyfunc carries what it needs to be
served anywhere: its radflow source files as `code_paths`, and requirements pinned to this
environment (a constraints file of every installed version), so MLflow's `uv`/`virtualenv` env
managers rebuild the environment it was registered from.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from pipeline_steps.core.errors import TrackingError
from pipeline_steps.core.files import write_text_atomic
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance import signing
from pipeline_steps.register import Registration

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

PYFUNC_NAME = "model"  # the registered pyfunc, under the run's artifacts
KERAS_NAME = "keras_model"  # the Keras-native copy, for reuse (fine-tuning, export)
MANIFEST_ARTIFACT = "lineage/train_manifest.csv"
STREAM_ARTIFACT = "lineage/training_stream.json"  # the streamed synthetic studies, by identity
# Every logged model of a version is signed (model-signing bundles under the run's `signing/`):
# the pyfunc that is served and the Keras copy that the next training fine-tunes from.
SIGNED_MODELS = (PYFUNC_NAME, KERAS_NAME)
SIGNATURE_FOLDER = "signing"
SBOM_ARTIFACT = "sbom/cyclonedx.json"  # the installed environment, as registered (CycloneDX JSON)
SIGNATURE_KEY_TAG, SIGNATURE_TAG = "signature_key_id", "signature"


@dataclass(frozen=True)
class Registered:
    run_id: str
    model_name: str
    model_version: str


def tracking_uri(layout: Layout) -> str:
    """MLFLOW_TRACKING_URI when set, else the workspace's embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layout.mlflow_db}"


def store_exists(layout: Layout) -> bool:
    """Whether the tracking store can hold anything yet. A SQLite store (the workspace's embedded
    one by default) exists once its file does: opening it would create it, so callers that only read
    check this first. Any other store (a server, a database) is taken to exist."""
    uri = tracking_uri(layout)
    prefix = "sqlite:///"
    return not uri.startswith(prefix) or Path(uri.removeprefix(prefix)).exists()


def mlflow_client(uri: str) -> MlflowClient:
    """The one MLflow client factory of flows/: `uri` (usually `tracking_uri(layout)`) serves as the
    tracking store and as the model registry."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def load_pyfunc(layout: Layout, model_name: str, version: str) -> Any:
    """The registered pyfunc of `version`, loaded from a folder whose files were first verified
    against the version's signature (a SignatureError, naming the version, when they do not). Any
    other failure is a TrackingError that names the version and the store (credentials stripped)
    and MLflow's first line of explanation."""
    import mlflow

    import pipeline_steps.serving.pyfunc  # noqa: F401  (unpickling then uses this process's radflow)

    uri = tracking_uri(layout)
    # MLflow puts the model's code_paths copy first on sys.path and leaves it there. In this process
    # radflow is installed, so that copy (only the serving modules) must not shadow it: a module
    # imported later, or by a spawned child that inherits sys.path, would not be found.
    path = list(sys.path)
    with verified_model(layout, model_name, version, PYFUNC_NAME) as folder:
        try:
            mlflow.set_tracking_uri(uri)
            # The verified copy itself: what is loaded is what was checked (no second download).
            return mlflow.pyfunc.load_model(str(folder))
        except Exception as exc:
            raise TrackingError(
                f"cannot load {model_name} version {version} from {public_uri(uri)}: {_first(exc)}"
            ) from None
        finally:
            sys.path[:] = path


def _first(exc: BaseException) -> str:
    """An exception's first line, for a message."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _experiment_id(client: MlflowClient, name: str, layout: Layout) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    # Compare URIs rather than test the variable: mlflow.set_tracking_uri() exports it itself.
    if tracking_uri(layout) == f"sqlite:///{layout.mlflow_db}":
        # The embedded store keeps artifacts inside the workspace, next to mlflow.db.
        layout.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
        location = layout.mlflow_artifacts.as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def public_uri(uri: str) -> str:
    """The URI without credentials, for messages, logs and the ledger."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def serving_requirements() -> list[str]:
    """The served model's distributions (`pyfunc.SERVING_PACKAGES`) pinned to the installed
    versions, skipping those not installed (the opt-in decoders). Explicit, so MLflow does not load
    the model in a subprocess to guess them."""
    from pipeline_steps.serving.pyfunc import SERVING_PACKAGES

    pins = []
    for name in SERVING_PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def environment_constraints() -> list[str]:
    """`name==version` of every distribution installed here that an index can provide: the model's
    constraints.txt, so the dependencies of the pinned requirements resolve to the versions the model
    was trained and tested with (e.g. fastapi<0.155 stays). radflow itself and anything installed
    from a folder or a URL are left out: the model carries its radflow code instead."""
    pins: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or name.lower() == "radflow" or _installed_from_url(dist):
            continue
        pins.setdefault(name.lower().replace("_", "-"), f"{name}=={dist.version}")
    return sorted(pins.values(), key=str.lower)


def _installed_from_url(dist: metadata.Distribution) -> bool:
    """Installed from a folder, an archive or a VCS URL (PEP 610's direct_url.json), not an index."""
    return bool(dist.read_text("direct_url.json"))


def _copy_code(scratch: Path) -> Path:
    """The pyfunc's radflow source files under `scratch/code/pipeline_steps`, as `code_paths` wants
    them: MLflow copies that folder into the model and puts its parent on sys.path when loading."""
    from pipeline_steps.serving import pyfunc

    code = scratch / "code"
    for relative in pyfunc.code_files():
        target = code / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pyfunc.CODE_ROOT / relative, target)
    return code / pyfunc.PACKAGE


def _log_models(registration: Registration, model_path: Path, scratch: Path) -> str:
    """The Keras-native copy, then the registered pyfunc; returns the new version."""
    import keras
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pipeline_steps.serving import pyfunc

    config = scratch / "serving_config.json"
    config.write_text(registration.serving.to_json())
    constraints = scratch / "constraints.txt"
    constraints.write_text("\n".join(environment_constraints()) + "\n")
    # MLflow stores the file in the model as constraints.txt; requirements.txt refers to it.
    requirements = [*serving_requirements(), f"-c {constraints}"]
    detector = keras.models.load_model(model_path, compile=False)
    mlflow.keras.log_model(
        detector,
        name=KERAS_NAME,
        signature=ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *detector.input_shape[1:]))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *detector.output_shape[1:]))]),
        ),
        pip_requirements=requirements,
    )
    # MLflow validates the input example by calling predict: a check, not a prediction, so it
    # runs unaudited (a served version refuses to answer without its ledger).
    with pyfunc.unaudited():
        info = _log_pyfunc(registration, model_path, scratch, config, requirements)
    return str(info.registered_model_version)


def _log_pyfunc(
    registration: Registration,
    model_path: Path,
    scratch: Path,
    config: Path,
    requirements: list[str],
) -> Any:
    import mlflow

    from pipeline_steps.serving import pyfunc, serving

    return mlflow.pyfunc.log_model(
        name=PYFUNC_NAME,
        python_model=pyfunc.RadiographDetector(),
        code_paths=[str(_copy_code(scratch))],
        artifacts={pyfunc.DETECTOR_ARTIFACT: str(model_path), pyfunc.CONFIG_ARTIFACT: str(config)},
        signature=pyfunc.signature(registration.serving.detection),
        input_example=serving.input_example(),
        pip_requirements=requirements,
        metadata={
            "code_version": registration.tags["code_version"],
            "data_version": registration.lineage.data_version,
            "input": "column `dicom`: base64-encoded DICOM bytes",
            "output": "boxes in original DICOM pixel coordinates",
        },
        registered_model_name=registration.model_name,
    )


def log_and_register(layout: Layout, registration: Registration, model_path: Path) -> Registered:
    """One MLflow run with params, per-epoch and test metrics, reports, lineage and the model; register
    a version tagged with its lineage."""
    import mlflow

    from flows import sbom

    uri = tracking_uri(layout)
    # A signing key that cannot be read fails here, before a version exists that it could not sign.
    signing.check_can_sign(signing.load_keys(layout.state))
    mlflow.set_tracking_uri(uri)
    client = mlflow_client(uri)
    try:
        experiment_id = _experiment_id(client, registration.experiment, layout)
    except Exception as exc:
        raise TrackingError(f"MLflow at {uri} is not usable: {exc}") from exc

    lineage = registration.lineage
    with (
        mlflow.start_run(experiment_id=experiment_id) as run,
        tempfile.TemporaryDirectory(prefix="radflow-register-") as tmp,
    ):
        scratch = Path(tmp)
        # The environment the version is registered from, made first: a failure leaves no version.
        sbom_file = sbom.environment_sbom(scratch / Path(SBOM_ARTIFACT).name)
        mlflow.log_artifact(str(sbom_file), artifact_path=str(Path(SBOM_ARTIFACT).parent))
        mlflow.set_tags(registration.tags)
        mlflow.log_params(registration.params)
        for name, values in registration.history.items():
            for epoch, value in enumerate(values):
                if value is not None and math.isfinite(value):
                    mlflow.log_metric(f"train.{name}", float(value), step=epoch)
        mlflow.log_metrics({k: v for k, v in registration.metrics.items() if math.isfinite(v)})
        for report in (layout.metrics, layout.validation_report, layout.train_history):
            if report.exists():
                mlflow.log_artifact(str(report), artifact_path="reports")
        if layout.plots.exists():
            mlflow.log_artifacts(str(layout.plots), artifact_path="reports/plots")
        if layout.report_dir.exists():  # the one-page HTML report of the test stage (PNGs embedded)
            mlflow.log_artifacts(str(layout.report_dir), artifact_path="reports/latest")
        if layout.drift_dir.exists():
            mlflow.log_artifacts(str(layout.drift_dir), artifact_path="reports/drift")
        manifest = scratch / Path(MANIFEST_ARTIFACT).name
        manifest.write_bytes(lineage.manifest_csv)
        mlflow.log_artifact(str(manifest), artifact_path=str(Path(MANIFEST_ARTIFACT).parent))
        if lineage.training_stream:
            stream = scratch / Path(STREAM_ARTIFACT).name
            stream.write_bytes(lineage.training_stream)
            mlflow.log_artifact(str(stream), artifact_path=str(Path(STREAM_ARTIFACT).parent))
        # Dataset lineage: the images (content hash, split) under the DVC md5 as the digest.
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that the path is ambiguous.
            warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
            dataset = mlflow.data.from_pandas(
                lineage.manifest,
                source=str(layout.raw),
                name="data/raw",
                digest=lineage.data_version,
            )
        mlflow.log_input(dataset, context="training", tags={"data_git_rev": lineage.data_git_rev})
        # Logging validates the input example by loading the pyfunc, which, like load_pyfunc,
        # puts its code_paths copy on sys.path: keep this process's path as it was.
        path = list(sys.path)
        try:
            version = _log_models(registration, model_path, scratch)
        finally:
            sys.path[:] = path
        # Signed before the fingerprint tags: a version whose signing failed is not found again
        # by find_same_registration, so a retry registers a signed one.
        sign_version(layout, registration.model_name, version)
        for key, tag in registration.tags.items():
            client.set_model_version_tag(registration.model_name, version, key, tag)
        result = Registered(run.info.run_id, registration.model_name, version)
    # Read by the next run's recovery: never half-written.
    write_text_atomic(
        layout.registration, json.dumps(result.__dict__ | {"tags": registration.tags}, indent=2)
    )
    return result


def run_record(layout: Layout, run_id: str) -> tuple[dict[str, str], dict[str, float]]:
    """The params and (latest) metrics a run logged: what a version was trained with and scored."""
    uri = tracking_uri(layout)
    try:
        data = mlflow_client(uri).get_run(run_id).data
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise TrackingError(
            f"MLflow at {public_uri(uri)}: cannot read run {run_id} ({first})"
        ) from None
    return dict(data.params), {k: float(v) for k, v in data.metrics.items()}


def run_artifact(layout: Layout, run_id: str, path: str) -> bytes | None:
    """One artifact file of a run, or None when the run has none at `path`."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(layout))
    with tempfile.TemporaryDirectory(prefix="radflow-artifact-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=tmp
            )
        except Exception:
            return None
        return Path(local).read_bytes() if Path(local).is_file() else None


def log_run_files(layout: Layout, run_id: str, files: dict[str, bytes], artifact_path: str) -> None:
    """Files (name -> content) logged to an existing run under `artifact_path`."""
    client = mlflow_client(tracking_uri(layout))
    with tempfile.TemporaryDirectory(prefix="radflow-log-") as tmp:
        for name, content in files.items():
            target = Path(tmp) / name
            target.write_bytes(content)
            client.log_artifact(run_id, str(target), artifact_path=artifact_path)


CHAMPION_ALIAS = "production"  # the registry alias of the champion (also `champion`; see registry)


@dataclass(frozen=True)
class Champion:
    """The Keras-native copy of the registered version in production, and where it came from."""

    model: object  # keras.Model
    model_name: str
    version: str
    run_id: str


@contextmanager
def short_retries(attempts: int = 2, timeout_s: int = 20) -> Iterator[None]:
    """Bound MLflow's HTTP retries (by default ~7 with exponential backoff, minutes of waiting) for a
    lookup whose failure is not fatal; values the user set are kept."""
    names = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(attempts),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    added = [name for name in names if name not in os.environ]
    os.environ.update({name: names[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def load_champion(layout: Layout, model_name: str) -> tuple[Champion | None, str]:
    """The champion's Keras model, or None and a sentence saying why there is none (no registered
    model, no version in production, MLflow unreachable, the artifact missing). Never raises: a
    stage that merely benefits from the champion goes on without it."""
    uri = tracking_uri(layout)
    shown = public_uri(uri)  # messages go to logs: never the credentials a URI may carry
    if uri == f"sqlite:///{layout.mlflow_db}" and not layout.mlflow_db.exists():
        # Opening the embedded store would create it (and import MLflow) just to find it empty.
        return None, f"no model is registered yet ({layout.mlflow_db.name} does not exist)"
    try:
        import mlflow
        from mlflow.exceptions import MlflowException

        with short_retries():
            client = mlflow_client(uri)
            try:
                registered = client.get_registered_model(model_name)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None, f"no model named {model_name} is registered at {shown}"
                raise
            # Read from the model's alias map: a missing alias is an answer, not an error.
            aliases = {str(k): str(v) for k, v in dict(registered.aliases or {}).items()}
            if CHAMPION_ALIAS not in aliases:
                return None, f"no version of {model_name} holds the alias {CHAMPION_ALIAS!r}"
            mv = client.get_model_version(model_name, aliases[CHAMPION_ALIAS])
            with verified_model(layout, model_name, str(mv.version), KERAS_NAME) as folder:
                model = mlflow.keras.load_model(str(folder))
    except signing.SignatureError as exc:  # a champion whose files do not verify is not used
        return None, f"the champion is not used: {exc}"
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return (
            None,
            f"the champion could not be loaded from MLflow at {shown} "
            f"({type(exc).__name__}: {first})",
        )
    return Champion(model, model_name, str(mv.version), str(mv.run_id or "")), ""


# --------------------------------------------------------------------------------------------
# Signatures: each logged model of a version is signed as a load downloads it, and every load
# verifies the downloaded files before loading them from that same folder


def _model_uri(model_name: str, version: str, run_id: str, which: str) -> str:
    # The pyfunc as the registry serves it; the Keras copy as load_champion has always found it.
    return f"models:/{model_name}/{version}" if which == PYFUNC_NAME else f"runs:/{run_id}/{which}"


def _download_model(uri: str, model_uri: str, dst: Path) -> Path:
    import mlflow

    dst.mkdir(parents=True)
    # MLflow resolves a models:/ URI partly through the process's tracking URI, whatever is passed.
    mlflow.set_tracking_uri(uri)
    found = mlflow.artifacts.download_artifacts(
        artifact_uri=model_uri, dst_path=str(dst), tracking_uri=uri, registry_uri=uri
    )
    return Path(found)


def _check(
    client: MlflowClient, uri: str, keys: signing.SigningKeys, mv: Any, which: str, scratch: Path
) -> tuple[Path, signing.SignatureCheck] | None:
    """Download one logged model of `mv` and its signature under `scratch` and verify them; None
    for a Keras copy that neither exists nor was signed (versions from before it existed)."""
    run_id = str(mv.run_id or "")
    scratch.mkdir(parents=True)
    try:
        found: Path | None = Path(
            client.download_artifacts(run_id, f"{SIGNATURE_FOLDER}/{which}.sig", str(scratch))
        )
    except Exception:  # MlflowException: the run has no such artifact
        found = None
    model_uri = _model_uri(str(mv.name), str(mv.version), run_id, which)
    try:
        folder = _download_model(uri, model_uri, scratch / which)
    except Exception:
        if which == KERAS_NAME and found is None:
            return None
        raise
    if found is None or not found.is_file():
        why = (
            f"its signature {SIGNATURE_FOLDER}/{which}.sig is missing from run {run_id} (removed "
            "after signing?)"
            if SIGNATURE_KEY_TAG in dict(mv.tags or {})
            else signing.NOT_SIGNED
        )
        return folder, signing.SignatureCheck(which, "", False, why)
    try:
        key_id = signing.verify_model(keys, folder, found)
    except signing.SignatureError as exc:
        return folder, signing.SignatureCheck(which, "", False, str(exc))
    return folder, signing.SignatureCheck(which, key_id, keys.development)


def _open_version(layout: Layout, model_name: str, version: str) -> tuple[MlflowClient, str, Any]:
    """The client, store URI and registry entry of `version`; a TrackingError naming the version
    and the store (credentials stripped) when it cannot be read."""
    uri = tracking_uri(layout)
    try:
        client = mlflow_client(uri)
        return client, uri, client.get_model_version(model_name, str(version))
    except Exception as exc:
        raise TrackingError(
            f"cannot load {model_name} version {version} from {public_uri(uri)}: {_first(exc)}"
        ) from None


def check_signatures(layout: Layout, model_name: str, version: str) -> list[signing.SignatureCheck]:
    """Each logged model of `version` verified against its signature (nothing raised for a failed
    check: `radflow models verify` reports them)."""
    keys = signing.load_keys(layout.state)
    client, uri, mv = _open_version(layout, model_name, version)
    checks = []
    with tempfile.TemporaryDirectory(prefix="radflow-verify-") as tmp:
        for which in SIGNED_MODELS:
            try:
                checked = _check(client, uri, keys, mv, which, Path(tmp) / which)
            except Exception as exc:
                checks.append(
                    signing.SignatureCheck(which, "", False, f"cannot download it: {_first(exc)}")
                )
                continue
            if checked is not None:
                checks.append(checked[1])
    return checks


@contextmanager
def verified_model(layout: Layout, model_name: str, version: str, which: str) -> Iterator[Path]:
    """A private local copy of one logged model of `version`, verified against its signature with
    the trusted keys; the caller loads from it. Refused (SignatureError naming the version and what
    failed) when files changed, the signature is missing or its key is unknown."""
    keys = signing.load_keys(layout.state)
    client, uri, mv = _open_version(layout, model_name, version)
    with tempfile.TemporaryDirectory(prefix="radflow-verified-") as tmp:
        try:
            checked = _check(client, uri, keys, mv, which, Path(tmp) / which)
        except Exception as exc:
            checked, why = None, _first(exc)
        else:
            why = f"the version has no {which}"
        if checked is None:
            raise TrackingError(
                f"cannot load {model_name} version {version} from {public_uri(uri)}: {why}"
            )
        folder, check = checked
        if check.problem == signing.NOT_SIGNED:
            raise signing.SignatureError(signing.unsigned_advice(model_name, version))
        if check.problem:
            raise signing.SignatureError(
                f"refusing to load {model_name} version {version}: {which}: {check.problem}"
            )
        yield folder


def sign_version(layout: Layout, model_name: str, version: str) -> dict[str, str]:
    """Sign each logged model of `version` as a load downloads it, log the signatures to its run
    and tag the version; returns the tags."""
    keys = signing.load_keys(layout.state)
    client, uri, mv = _open_version(layout, model_name, version)
    with tempfile.TemporaryDirectory(prefix="radflow-sign-") as tmp:
        signatures = Path(tmp) / SIGNATURE_FOLDER
        signatures.mkdir()
        for which in SIGNED_MODELS:
            model_uri = _model_uri(model_name, str(version), str(mv.run_id), which)
            try:
                folder = _download_model(uri, model_uri, Path(tmp) / "models" / which)
            except Exception:
                if which == KERAS_NAME:  # a version from before the Keras copy existed
                    continue
                raise
            signing.sign_model(keys, folder, signatures / f"{which}.sig")
        client.log_artifacts(str(mv.run_id), str(signatures), artifact_path=SIGNATURE_FOLDER)
    tags = {SIGNATURE_KEY_TAG: str(keys.key_id), SIGNATURE_TAG: keys.mark}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    return tags
