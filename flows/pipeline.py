"""The training pipeline as a Prefect flow: validate -> preprocess -> extract_features -> train -> test -> register
-> gate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import stages, versioning
from pipeline_steps import preprocess, validate


def _progress(stage: str) -> Callable[[int, int], None]:
    """Log progress every ~10% through Prefect's logger (the CLI draws bars instead)."""
    logger = get_run_logger()
    marks: set[int] = set()

    def report(done: int, total: int) -> None:
        decile = done * 10 // max(total, 1)
        if decile not in marks:
            marks.add(decile)
            logger.info("%s: %d/%d images", stage, done, total)

    return report


# Stages read and write workspace files (the same contract as dvc.yaml), so Prefect's
# result cache is off; skipping unchanged work is DVC's and the run decision's job.
validate_task = task(name="validate", cache_policy=NO_CACHE)(validate.run)
preprocess_task = task(name="preprocess", cache_policy=NO_CACHE)(preprocess.run)
extract_features_task = task(name="extract_features", cache_policy=NO_CACHE)(
    stages.extract_features
)
train_task = task(name="train", cache_policy=NO_CACHE)(stages.train)
test_task = task(name="test", cache_policy=NO_CACHE)(stages.test)
register_task = task(
    name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20]
)(stages.register)
# Moves already made are skipped on a re-run, so a retry after a registry hiccup is safe.
gate_task = task(name="gate", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[10])(
    stages.gate
)


@flow(name="training_pipeline", log_prints=True)
def training_pipeline(workspace: str) -> dict[str, Any]:
    layout, params = stages.open_workspace(Path(workspace))
    validate_task(
        layout, params.ingest, params.validate_, data_version=versioning.data_version(layout)
    )
    preprocess_task(layout, params.preprocess, progress=_progress("preprocess"))
    extract_features_task(layout, params, progress=_progress("extract_features"))
    train_task(layout, params)
    test_task(layout, params)
    registered = register_task(layout, params)
    gate_task(layout, params)
    return registered.__dict__
