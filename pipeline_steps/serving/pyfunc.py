"""The MLflow pyfunc of the detector: `predict` takes DICOM paths or bytes, returns boxes in original pixels.

It only wires `serving.py` (the training code's own pre- and post-processing) into MLflow's model
interface, so `mlflow models serve -m models:/radflow-detector@production` serves the same path that
training and evaluation use. This module imports MLflow because it *is* the MLflow model definition.
"""

from __future__ import annotations

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
