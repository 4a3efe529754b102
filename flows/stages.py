"""The pipeline's stages as one table: name -> the function that runs it with its own params section.

The Prefect flow (flows/pipeline.py) wraps each entry as a task and `radflow step NAME` (what
`dvc repro` calls) runs it bare, so both run the same code. Each entry also names the step module
in pipeline_steps and the other modules its wiring calls (the MLflow and registry edges, the test
report): the code a stage depends on, which tests/unit/test_architecture.py checks against the
stage's `deps` in dvc.yaml.

Step modules are imported inside the functions: TensorFlow alone takes seconds to import, and
`radflow step validate` should not pay for it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flows import versioning
from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.layout import Layout

if TYPE_CHECKING:
    from flows.tracking import Registered

log = logging.getLogger("radflow")

Progress = Callable[[int, int], None]


def validate(layout: Layout, params: Params, progress: Progress | None = None) -> Any:
    from pipeline_steps import validate as step

    return step.run(
        layout, params.ingest, params.validate_, data_version=versioning.data_version(layout)
    )


def preprocess(layout: Layout, params: Params, progress: Progress | None = None) -> Any:
    from pipeline_steps import preprocess as step

    return step.run(layout, params.preprocess, progress)


def extract_features(layout: Layout, params: Params, progress: Progress | None = None) -> Any:
    """Radiomic features, plus embeddings from the champion's backbone when MLflow has one.

    Without a champion (none yet, or MLflow unreachable) the stage still succeeds, without
    embeddings, and the log says why. The drift reference is the configured table, else the
    production version's training images (flows/drift_reference.py)."""
    from flows import drift_reference, tracking
    from pipeline_steps import extract_features as step

    training = None
    if not params.extract_features.drift.reference:
        training, why = drift_reference.production_training(layout, params.register_.model_name)
        if training is None:
            log.info("extract_features: no drift reference: %s", why)
    if not params.extract_features.embeddings:
        log.info("extract_features: no CNN embeddings (extract_features.embeddings is false)")
        return step.run(layout, params.extract_features, progress, training=training)
    champion, why = tracking.load_champion(layout, params.register_.model_name)
    embedder = None
    if champion is None:
        log.info("extract_features: no CNN embeddings: %s", why)
    else:
        try:
            embedder = step.build_embedder(
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
    return step.run(layout, params.extract_features, progress, embedder=embedder, training=training)


def train(layout: Layout, params: Params, progress: Progress | None = None) -> dict[str, object]:
    from pipeline_steps import train as step

    # The training core logs each epoch itself; no second callback is needed here.
    result = step.run(layout, params.train, params.test, params.preprocess, params.synth)
    return {"epochs_run": result.epochs_run, "resumed_from_epoch": result.resumed_from_epoch}


def test(layout: Layout, params: Params, progress: Progress | None = None) -> dict[str, float]:
    from pipeline_steps import test as step
    from pipeline_steps.core import report

    metrics = step.run(
        layout,
        params.test,
        params.preprocess.input_size,
        spacing_mm=params.preprocess.target_spacing_mm,
    )
    # The report judges the metrics against the gate's floors: one source for both.
    report.run(layout, params.gate.thresholds)
    return metrics


def register(layout: Layout, params: Params, progress: Progress | None = None) -> Registered:
    """Log and register the trained model; idempotent: when a version was already registered from
    the same data version, code version and params, that version is the answer (and
    reports/registration.json names it) instead of a duplicate."""
    from dataclasses import replace

    from flows import registry, tracking
    from pipeline_steps.core.files import write_text_atomic
    from pipeline_steps.register import build_registration, read_lineage, read_results

    metrics, history = read_results(layout)
    lineage = read_lineage(layout, versioning.data_version(layout), versioning.data_git_rev(layout))
    registration = build_registration(params, lineage, versioning.code_version(), metrics, history)
    registration = replace(
        registration,
        tags={**registration.tags, registry.CODE_HASH_TAG: versioning.current_code_hash()},
    )
    if tracking.store_exists(layout):
        same = registry.find_same_registration(
            registry.open_registry(layout, registration.model_name), registration.tags
        )
        if same is not None:
            log.info(
                "register: version %s was already registered from this data version, code "
                "version and params (run %s); not registering a duplicate",
                same.version,
                same.run_id,
            )
            found = tracking.Registered(same.run_id, registration.model_name, same.version)
            write_text_atomic(
                layout.registration,
                json.dumps(found.__dict__ | {"tags": same.tags}, indent=2),
            )
            return found
    registered = tracking.log_and_register(layout, registration, layout.model)
    try:
        _name_version_in_report(layout, registered)
    except Exception as exc:  # the version exists: a retry of the stage would register another
        log.warning(
            "register: version %s is registered, but its report copy could not be completed: %s",
            registered.model_version,
            str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
        )
    return registered


def _name_version_in_report(layout: Layout, registered: Registered) -> None:
    """The test report logged to the run, with the registered version and run filled in. The
    workspace copy stays as the `test` stage wrote it (a DVC out of that stage)."""
    import tempfile
    from pathlib import Path

    from flows import tracking
    from pipeline_steps.core import report

    if not layout.report_page.is_file():
        return
    page = report.with_registration(
        layout.report_page.read_text(),
        report.Registration(registered.model_name, registered.model_version, registered.run_id),
    )
    with tempfile.TemporaryDirectory(prefix="radflow-report-") as tmp:
        named = Path(tmp) / layout.report_page.name
        named.write_text(page, encoding="utf-8")
        client = tracking.mlflow_client(tracking.tracking_uri(layout))
        client.log_artifact(registered.run_id, str(named), artifact_path="reports/latest")


def gate(layout: Layout, params: Params, progress: Progress | None = None) -> dict[str, object]:
    """The version just registered (reports/registration.json) becomes the candidate and faces
    production; reports/gate.json holds the decision, the ledger its record."""
    from flows.gate import recorded_outcome, run_gate

    if not layout.registration.exists():
        raise DataError(f"{layout.registration}: missing. Run the `register` stage first.")
    registered = json.loads(layout.registration.read_text())
    # A version registered before (the same data, code and params) keeps the decision it had.
    recorded = recorded_outcome(layout, params, str(registered["model_version"]))
    if recorded is not None:
        log.info(
            "gate: version %s was already decided (ledger row %s): %s",
            registered["model_version"],
            recorded["ledger_row"],
            recorded.get("reason"),
        )
        return recorded
    outcome = run_gate(
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


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Layout, Params, Progress | None], Any]
    module: str  # the step module in pipeline_steps (named as the stage, but for `test`'s report)
    calls: tuple[str, ...] = ()  # modules the wiring above calls besides the step module
    retries: int = 0
    retry_delay_s: tuple[float, ...] = ()


# In pipeline order. Stages read and write workspace files (the contract of dvc.yaml), so whether
# a stage needs to run is DVC's and the run decision's call, not Prefect's result cache.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("validate", validate, "pipeline_steps.validate", ("flows.versioning",)),
        Stage("preprocess", preprocess, "pipeline_steps.preprocess"),
        Stage(
            "extract_features",
            extract_features,
            "pipeline_steps.extract_features",
            ("flows.tracking", "flows.drift_reference"),
        ),
        Stage("train", train, "pipeline_steps.train"),
        Stage("test", test, "pipeline_steps.test", ("pipeline_steps.core.report",)),
        Stage(
            "register",
            register,
            "pipeline_steps.register",
            (
                "flows.tracking",
                "flows.versioning",
                "flows.registry",
                "pipeline_steps.core.report",
            ),
            retries=2,
            retry_delay_s=(5, 20),
        ),
        # Moves already made are skipped on a re-run, so a retry after a registry hiccup is safe.
        Stage("gate", gate, "pipeline_steps.gate", ("flows.gate",), retries=1, retry_delay_s=(10,)),
    )
}


def run_stage(name: str, layout: Layout, params: Params, progress: Progress | None) -> object:
    """One stage by name, as `dvc repro` runs it (no Prefect)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    return STAGES[name].run(layout, params, progress)
