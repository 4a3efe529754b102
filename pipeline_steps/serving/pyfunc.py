"""The MLflow pyfunc of the detector: `predict` takes DICOM paths or bytes, returns boxes in original pixels.

It only wires `serving.py` (the training code's own pre- and post-processing) into MLflow's model
interface, so `mlflow models serve -m models:/radflow-detector@production` serves the same path that
training and evaluation use. It also says what a logged model must carry to load without radflow
installed: its own source files (`code_files`) and the distributions they need (`SERVING_PACKAGES`).
This module imports MLflow because it *is* the MLflow model definition.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from mlflow.pyfunc.model import PythonModel

from pipeline_steps.core.errors import DataError
from pipeline_steps.serving.serving import (
    BOX_KEYS,
    CONFIG_ARTIFACT,
    DETECTOR_ARTIFACT,
    INPUT_COLUMN,
    ServingConfig,
    input_values,
    predict_frame,
)

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

    from pipeline_steps.core.config import DetectionParams

# The folder that holds the `pipeline_steps` package (the checkout, or site-packages).
CODE_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "pipeline_steps"
# What the served model needs beside the standard library and `code_files()`: the distributions
# those files import (tests/unit/test_model_portability.py checks that), TensorFlow as keras's
# backend, pydicom's decoders for compressed pixel data (plugins found by entry point, never
# imported; pylibjpeg-libjpeg is GPL and opt-in, so pinned only where it is installed), and MLflow
# to serve it.
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
)


class RadiographDetector(PythonModel):
    """`predict` takes a `dicom` column of paths or base64 DICOM bytes; params: `score_threshold`."""

    def load_context(self, context: Any) -> None:
        import keras

        self._model = keras.models.load_model(context.artifacts[DETECTOR_ARTIFACT], compile=False)
        self._config = ServingConfig.from_json(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        size = self._config.preprocess.input_size
        fixed = [d for d in self._model.input_shape[1:3] if d is not None]
        if any(d != size for d in fixed):  # a fully convolutional model takes any size
            raise DataError(
                f"model input {self._model.input_shape} does not match preprocess.input_size {size}"
            )

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
        threshold = (params or {}).get("score_threshold")
        return predict_frame(self._model, input_values(model_input), self._config, threshold)


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
            ]
        ),
        params=ParamSchema([ParamSpec("score_threshold", "double", test.score_threshold)]),
    )
