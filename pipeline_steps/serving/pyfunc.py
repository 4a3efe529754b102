"""The MLflow pyfunc of the detector: `predict` takes base64 DICOM bytes, returns boxes in original pixels.

It wires the serving rule (`prediction.py`: screened by ingestion's rule before decoding, the
training code's own pre- and post-processing in `serving.py`) into MLflow's model interface, so
`mlflow models serve -m models:/radflow-detector@production` answers as `radflow predict` and
`radflow serve-api` do, and like them writes every prediction to the audit ledger before it answers:

- `RADFLOW_LEDGER_URL`: the ledger (any SQLAlchemy URL: the team's PostgreSQL, or
  `sqlite:///WORKSPACE/ledger.db`), with `RADFLOW_PSEUDONYM_KEY` for the UID hashes it keeps. Without
  a ledger it can write, the served model refuses to answer (HTTP 503), unless
- `RADFLOW_SERVING_UNAUDITED=1`: it then answers all the same, and every row says `audit: unaudited`.
- `RADFLOW_SERVING_INPUT_DIR=DIR`: for batch scoring only, values `file:PATH` name files inside DIR.
  Unset (the default), the model reads no file: a path is refused without looking at it.

It also says what a logged model must carry to load without radflow installed: its own source files
(`code_files`) and the distributions they need (`SERVING_PACKAGES`). This module imports MLflow
because it *is* the MLflow model definition, and the ledger because the served model writes it.
"""

from __future__ import annotations

import ast
import logging
import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc.model import PythonModel

from pipeline_steps.core.deid import pseudonym_key
from pipeline_steps.core.errors import DataError, RadflowError
from pipeline_steps.governance.ledger import (
    LEDGER_URL_ENV,
    Ledger,
    LedgerError,
    local_anchor_store,
)
from pipeline_steps.serving.prediction import (
    PREDICTION,
    ModelRef,
    Outcome,
    Provenance,
    Source,
    ledger_payload,
    predict_inputs,
    served_source,
)
from pipeline_steps.serving.serving import (
    BOX_KEYS,
    CONFIG_ARTIFACT,
    DETECTOR_ARTIFACT,
    INPUT_COLUMN,
    ServingConfig,
)

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

    from pipeline_steps.core.config import DetectionParams

log = logging.getLogger("radflow.serving")

# The folder that holds the `pipeline_steps` package (the checkout, or site-packages).
CODE_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "pipeline_steps"
# What the served model needs beside the standard library and `code_files()`: the distributions
# those files import (tests/unit/test_model_portability.py checks that), TensorFlow as keras's
# backend, pydicom's decoders for compressed pixel data (plugins found by entry point, never
# imported; pylibjpeg-libjpeg is GPL and opt-in, so pinned only where it is installed), the
# ledger's database drivers (SQLAlchemy; psycopg2 for a PostgreSQL ledger), and MLflow to serve it.
SERVING_PACKAGES = (
    "mlflow",
    "tensorflow-cpu",
    "keras",
    "numpy",
    "pandas",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pylibjpeg-libjpeg",
    "pyjpegls",
    "pillow",
    "pydantic",
    "pyyaml",
    "sqlalchemy",
    "psycopg2-binary",
    "charset-normalizer",  # core/labels.py reads label files with it (never called when serving)
)
UNAUDITED_ENV = "RADFLOW_SERVING_UNAUDITED"
INPUT_DIR_ENV = "RADFLOW_SERVING_INPUT_DIR"
OUTPUT_COLUMNS = (
    "boxes",
    "image_sha256",
    "rows",
    "columns",
    "error",
    "reason",
    "prediction_id",
    "audit",
)
RECORDED, UNAUDITED = "recorded", "unaudited"  # the `audit` column
_CHUNK = 16  # images decoded and held at once
_TRUE = ("1", "true", "yes", "on")


class ServingRefused(MlflowException):
    """The served model will not answer (HTTP 503): it cannot record what it would answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=TEMPORARILY_UNAVAILABLE)


@dataclass(frozen=True)
class Identity:
    """What the model's own MLmodel file says about it (run, code and data versions)."""

    run_id: str = ""
    code_version: str = ""
    data_version: str = ""

    @classmethod
    def of_artifact(cls, artifact: str) -> Identity:
        import yaml

        for folder in list(Path(artifact).parents)[:3]:
            mlmodel = folder / "MLmodel"
            if mlmodel.is_file():
                try:
                    raw = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
                except (OSError, yaml.YAMLError):
                    return cls()
                meta = raw.get("metadata") or {}
                return cls(
                    str(raw.get("run_id") or ""),
                    str(meta.get("code_version") or ""),
                    str(meta.get("data_version") or ""),
                )
        return cls()


def unaudited_allowed(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(UNAUDITED_ENV, "").strip().lower() in _TRUE


@contextmanager
def unaudited(environ: MutableMapping[str, str] | None = None) -> Iterator[None]:
    """Run a block with RADFLOW_SERVING_UNAUDITED=1: for checks that are not predictions (MLflow's
    input-example validation while a version is logged), never for serving."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    before = env.get(UNAUDITED_ENV)
    env[UNAUDITED_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            env.pop(UNAUDITED_ENV, None)
        else:
            env[UNAUDITED_ENV] = before


class RadiographDetector(PythonModel):
    """`predict` takes a `dicom` column of base64 DICOM bytes; params: `score_threshold`."""

    def load_context(self, context: Any) -> None:
        import keras

        self.bind(
            keras.models.load_model(context.artifacts[DETECTOR_ARTIFACT], compile=False),
            ServingConfig.from_json(Path(context.artifacts[CONFIG_ARTIFACT]).read_text()),
            Identity.of_artifact(context.artifacts[DETECTOR_ARTIFACT]),
        )

    def bind(
        self,
        model: Any,
        config: ServingConfig,
        identity: Identity | None = None,
        registered: ModelRef | None = None,
    ) -> RadiographDetector:
        """Hold a loaded detector and its config (what `load_context` reads from the artifacts);
        `registered` names the registry version when it is known, else it is looked up once."""
        size = config.preprocess.input_size
        fixed = [d for d in model.input_shape[1:3] if d is not None]
        if any(d != size for d in fixed):  # a fully convolutional model takes any size
            raise DataError(
                f"model input {model.input_shape} does not match preprocess.input_size {size}"
            )
        self._model, self._config = model, config
        self._identity = identity or Identity()
        self._registered = registered
        self._ledger: Ledger | None = None
        self._key = ""
        self._lock = threading.Lock()
        return self

    @property
    def detector(self) -> Any:
        """The loaded Keras detector (batch prediction and the API call the serving core directly)."""
        return self._model

    @property
    def config(self) -> ServingConfig:
        return self._config

    # MLflow reads the `model_input` hint; DataFrame means "no schema from hints", so the explicit
    # signature (a `dicom` string column) is the one enforced.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        cutoff = self._threshold(params)
        values = input_values(model_input)
        folder = os.environ.get(INPUT_DIR_ENV, "").strip()
        input_dir = Path(folder) if folder else None
        sources = [
            (f"{INPUT_COLUMN}[{i}]", served_source(v, f"{INPUT_COLUMN}[{i}]", input_dir=input_dir))
            for i, v in enumerate(values)
        ]
        ledger, key, provenance, why = self._audit_setup()
        outcomes = self._predict(sources, provenance, cutoff, key)
        audit = UNAUDITED
        if ledger is not None:
            try:
                with ledger.writing() as writer:
                    for outcome in outcomes:
                        record = outcome.record
                        writer.append(PREDICTION, record["prediction_id"], ledger_payload(record))
                audit = RECORDED
            except LedgerError as exc:
                why = f"the ledger refused the predictions: {exc}"
                if not unaudited_allowed():
                    raise ServingRefused(
                        f"predictions not recorded, so not returned: {exc}"
                    ) from None
        if audit == UNAUDITED:
            log.warning("answering UNAUDITED (%s=1): %s", UNAUDITED_ENV, why)
        return frame(outcomes, audit)

    def predict_files(
        self, paths: Sequence[str | Path], threshold: float | None = None
    ) -> pd.DataFrame:
        """Score local files inside a radflow process (the gate's evaluation of a test split): the
        same rule and columns as `predict`, with no ledger rows, since these are not predictions
        about patients; `audit` says `unaudited`. Not reachable through MLflow's server."""
        cutoff = self._threshold({"score_threshold": threshold} if threshold is not None else None)
        sources: list[tuple[str, Source]] = [(str(p), Path(p)) for p in paths]
        provenance = Provenance(
            ModelRef("", "", None, self._identity.run_id),
            self._identity.data_version,
            self._identity.code_version,
        )
        return frame(self._predict(sources, provenance, cutoff, ""), UNAUDITED)

    # -- internals ---------------------------------------------------------------------------

    def _threshold(self, params: dict[str, Any] | None) -> float:
        value = (params or {}).get("score_threshold")
        cutoff = self._config.detection.score_threshold if value is None else float(value)
        if not 0.0 <= cutoff <= 1.0:
            raise MlflowException.invalid_parameter_value(
                f"score_threshold {value} is not within [0, 1]"
            )
        return cutoff

    def _predict(
        self, sources: Sequence[tuple[str, Source]], provenance: Provenance, cutoff: float, key: str
    ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for start in range(0, len(sources), _CHUNK):
            outcomes += predict_inputs(
                self._model,
                sources[start : start + _CHUNK],
                self._config,
                self._config.ingest,
                provenance,
                threshold=cutoff,
                key=key,
            )
        return outcomes

    def _audit_setup(self) -> tuple[Ledger | None, str, Provenance, str]:
        """(ledger, key, provenance, why unaudited): the ledger to write before answering, or None
        when it cannot be had and RADFLOW_SERVING_UNAUDITED=1 allows answering without it.
        Raises ServingRefused otherwise."""
        bare = Provenance(
            ModelRef("", "", None, self._identity.run_id),
            self._identity.data_version,
            self._identity.code_version,
        )
        url = os.environ.get(LEDGER_URL_ENV, "").strip()
        try:
            if not url:
                raise _NoAudit(
                    f"no audit ledger is configured: set {LEDGER_URL_ENV} (the team's ledger, or "
                    f"sqlite:///WORKSPACE/ledger.db), or {UNAUDITED_ENV}=1 to answer without one"
                )
            if not self._key:  # resolved once: development mode warns on every resolution
                try:
                    self._key = pseudonym_key().secret
                except RadflowError as exc:
                    raise _NoAudit(str(exc)) from None
            key = self._key
            ref = self._registered_ref()
            with self._lock:
                if self._ledger is None or self._ledger.url != url:
                    self._ledger = Ledger(url, anchors=local_anchor_store())
                ledger = self._ledger
        except (_NoAudit, LedgerError) as exc:
            if unaudited_allowed():
                return None, "", bare, str(exc)
            raise ServingRefused(f"not answering: {exc}") from None
        provenance = Provenance(ref, self._identity.data_version, self._identity.code_version)
        return ledger, key, provenance, ""

    def _registered_ref(self) -> ModelRef:
        """The registered version this model is (looked up once by its run in the registry that
        MLFLOW_TRACKING_URI names), so that `radflow trace` can follow its ledger rows."""
        if self._registered is not None:
            return self._registered
        run_id = self._identity.run_id
        if not run_id:
            raise _NoAudit(
                "the model folder names no MLflow run, so its ledger rows could not be traced"
            )
        try:
            from mlflow import MlflowClient

            found = MlflowClient().search_model_versions(f"run_id = '{run_id}'")
        except Exception as exc:
            raise _NoAudit(
                f"cannot look up the registered version of run {run_id} "
                f"({type(exc).__name__}); is MLFLOW_TRACKING_URI the registry it came from?"
            ) from None
        if not found:
            raise _NoAudit(
                f"run {run_id} holds no registered model version, so its predictions could not be "
                "traced; serve a registered version (models:/NAME/VERSION or @alias)"
            )
        latest = max(found, key=lambda mv: int(mv.version))
        # The alias the server was started with is not known here; the ledger's transition rows
        # say which stage the version held at each prediction's time.
        self._registered = ModelRef(str(latest.name), str(latest.version), None, run_id)
        return self._registered


class _NoAudit(Exception):
    """Why the served model cannot record its predictions."""


def frame(outcomes: Sequence[Outcome], audit: str) -> pd.DataFrame:
    """The signature's output columns, one row per input, in input order."""
    rows = []
    for outcome in outcomes:
        record = outcome.record
        rows_, cols = outcome.shape or (0, 0)
        rows.append(
            {
                "boxes": record["boxes"],
                "image_sha256": record.get("image_sha256", ""),
                "rows": rows_,
                "columns": cols,
                "error": record.get("error", ""),
                "reason": record.get("reason", ""),
                "prediction_id": record["prediction_id"],
                "audit": audit,
            }
        )
    return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def input_values(model_input: object) -> list[object]:
    """The `dicom` values of whatever the pyfunc was handed (a DataFrame after schema enforcement)."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"the input needs a `{INPUT_COLUMN}` column (base64-encoded DICOM bytes)"
            )
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, dict):
        value = model_input.get(INPUT_COLUMN)
        return list(value) if isinstance(value, list | tuple) else [value]
    if isinstance(model_input, str | bytes):
        return [model_input]
    return list(model_input)  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------
# What a logged model carries


def code_files(module: str = __name__) -> list[Path]:
    """The radflow source files `module` imports, directly or not (imports inside functions and
    under TYPE_CHECKING included), with the `__init__.py` of every package on the way, relative to
    CODE_ROOT. Logged as the model's `code_paths`, they let it load where radflow is not installed,
    and they are the code the version was registered with, whatever radflow becomes later."""
    found: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in found or (source := _source(name)) is None:
            continue  # another distribution's module, or a name imported from a module
        found[name] = source
        parts = name.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]
        package = name if source.name == "__init__.py" else ".".join(parts[:-1])
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"), str(source))):
            if isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` packages up
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                pending += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return sorted(source.relative_to(CODE_ROOT) for source in found.values())


def _source(module: str) -> Path | None:
    """The file of a radflow module, or None for anything else (another package, a class name)."""
    if module != PACKAGE and not module.startswith(f"{PACKAGE}."):
        return None
    path = CODE_ROOT.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Signature


def signature(test: DetectionParams) -> ModelSignature:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    box = Object([Property(k, "double") for k in BOX_KEYS] + [Property("label", "string")])
    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(Array(box), "boxes"),
                ColSpec("string", "image_sha256"),
                ColSpec("long", "rows"),
                ColSpec("long", "columns"),
                ColSpec("string", "error"),
                ColSpec("string", "reason"),
                ColSpec("string", "prediction_id"),
                ColSpec("string", "audit"),
            ]
        ),
        params=ParamSchema([ParamSpec("score_threshold", "double", test.score_threshold)]),
    )
