"""Stage `register`: what a model version is registered with — tags, params and metrics — as plain data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline_steps.config import Params
from pipeline_steps.layout import Layout

# synth shapes the data, which data_version already identifies; the rest shapes the model.
MODEL_SECTIONS = (
    "ingest",
    "validate",
    "preprocess",
    "extract_features",
    "train",
    "test",
    "register",
)


@dataclass(frozen=True)
class Registration:
    model_name: str
    experiment: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    history: dict[str, list[float]]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def params_hash(params: Params) -> str:
    return params.stage_hash(*MODEL_SECTIONS)


def build_registration(
    params: Params,
    data_version: str,
    code_version: str,
    metrics: dict[str, float],
    history: dict[str, list[float]],
) -> Registration:
    dumped = params.model_dump(mode="json", by_alias=True)
    return Registration(
        model_name=params.register_.model_name,
        experiment=params.register_.experiment,
        tags={
            "data_version": data_version,
            "code_version": code_version,
            "params_hash": params_hash(params),
        },
        params=flatten({k: dumped[k] for k in MODEL_SECTIONS}),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        history=history,
    )


def read_results(layout: Layout) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The test metrics and the training history written by the `test` and `train` stages."""
    metrics = json.loads(layout.metrics.read_text())
    history = json.loads(layout.train_history.read_text())["history"]
    return metrics, history
