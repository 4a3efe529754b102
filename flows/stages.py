"""Each stage called with its own params section: shared by the Prefect flow and `radflow step` (dvc repro)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flows import tracking, versioning, workspace
from pipeline_steps.core.config import Params
from pipeline_steps.core.layout import Layout

log = logging.getLogger("radflow")

STAGES = ("validate", "preprocess", "extract_features", "train", "test", "register", "gate")


def open_workspace(root: Path) -> tuple[Layout, Params]:
    layout = workspace.resolve(root)
    return layout, workspace.load(layout)


def extract_features(
    layout: Layout, params: Params, progress: Callable[[int, int], None] | None = None
) -> object:
    """Radiomic features, plus embeddings from the champion's backbone when MLflow has one.

    Without a champion (none yet, or MLflow unreachable) the stage still succeeds, without
    embeddings, and the log says why."""
    from pipeline_steps import extract_features as features

    if not params.extract_features.embeddings:
        log.info("extract_features: no CNN embeddings (extract_features.embeddings is false)")
        return features.run(layout, params.extract_features, progress)
    champion, why = tracking.load_champion(layout, params.register_.model_name)
    embedder = None
    if champion is None:
        log.info("extract_features: no CNN embeddings: %s", why)
    else:
        try:
            embedder = features.build_embedder(
                champion.model,
                params.preprocess.input_size,
                model_version=f"{champion.model_name}/{champion.version}",
                run_id=champion.run_id,
            )
        except Exception as exc:  # an architecture without 2-D feature maps, say
            log.warning(
                "extract_features: no CNN embeddings: the champion %s/%s has no usable backbone (%s)",
                champion.model_name,
                champion.version,
                exc,
            )
    return features.run(layout, params.extract_features, progress, embedder=embedder)


def train(layout: Layout, params: Params) -> dict[str, object]:
    from pipeline_steps import train as train_step

    # The training core logs each epoch itself; no second callback is needed here.
    result = train_step.run(layout, params.train, params.test, params.preprocess.input_size)
    return {"epochs_run": result.epochs_run, "resumed_from_epoch": result.resumed_from_epoch}


def test(layout: Layout, params: Params) -> dict[str, float]:
    from pipeline_steps import test as evaluate
    from pipeline_steps.core import report

    metrics = evaluate.run(
        layout,
        params.test,
        params.preprocess.input_size,
        spacing_mm=params.preprocess.target_spacing_mm,
    )
    report.run(layout)
    return metrics


def register(layout: Layout, params: Params) -> tracking.Registered:
    from pipeline_steps.register import build_registration, read_lineage, read_results

    metrics, history = read_results(layout)
    lineage = read_lineage(layout, versioning.data_version(layout), tracking.data_git_rev(layout))
    registration = build_registration(params, lineage, workspace.code_version(), metrics, history)
    return tracking.log_and_register(layout, registration, layout.model)


def gate(layout: Layout, params: Params) -> dict[str, object]:
    """The version just registered (reports/registration.json) becomes the candidate and faces
    production; reports/gate.json holds the decision, the ledger its record."""
    import json

    from flows import registry
    from pipeline_steps.core.errors import DataError

    if not layout.registration.exists():
        raise DataError(f"{layout.registration}: missing. Run the `register` stage first.")
    registered = json.loads(layout.registration.read_text())
    outcome = registry.run_gate(
        layout,
        params,
        str(registered["model_version"]),
        data_version=str(registered.get("tags", {}).get("data_version", "")),
        run_id=str(registered.get("run_id", "")),
    )
    log.info(
        "gate: version %s %s; now in %s",
        outcome.version,
        outcome.result.reason,
        outcome.stages[-1] if outcome.stages else "candidate",
    )
    return outcome.as_dict()


def run_stage(
    name: str, layout: Layout, params: Params, progress: Callable[[int, int], None] | None
) -> object:
    """One stage by name, as `dvc repro` runs it (no Prefect)."""
    from pipeline_steps import preprocess, validate

    if name == "validate":
        return validate.run(
            layout, params.ingest, params.validate_, data_version=versioning.data_version(layout)
        )
    if name == "preprocess":
        return preprocess.run(layout, params.preprocess, progress)
    if name == "extract_features":
        return extract_features(layout, params, progress)
    if name == "train":
        return train(layout, params)
    if name == "test":
        return test(layout, params)
    if name == "register":
        return register(layout, params)
    if name == "gate":
        return gate(layout, params)
    raise ValueError(f"unknown stage {name!r}; expected one of {STAGES}")
