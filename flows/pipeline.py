"""The training pipeline as a Prefect flow: each stage of flows/stages.STAGES as a task, in order
(validate -> preprocess -> extract_features -> train -> test -> register -> gate)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.stages import STAGES, Stage
from flows.workspace import open_workspace


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


def as_task(stage: Stage) -> Task[..., Any]:
    # Stages read and write workspace files (the same contract as dvc.yaml), so Prefect's
    # result cache is off; skipping unchanged work is DVC's and the run decision's job.
    return task(
        name=stage.name,
        cache_policy=NO_CACHE,
        retries=stage.retries,
        retry_delay_seconds=list(stage.retry_delay_s),
    )(stage.run)


TASKS = {name: as_task(stage) for name, stage in STAGES.items()}


@flow(name="training_pipeline", log_prints=True)
def training_pipeline(workspace: str) -> dict[str, Any]:
    layout, params = open_workspace(Path(workspace))
    results = {name: run(layout, params, _progress(name)) for name, run in TASKS.items()}
    return results["register"].__dict__
