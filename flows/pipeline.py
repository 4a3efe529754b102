"""The training pipeline as a Prefect flow: each stage of flows/stages.STAGES as a task, in order
(validate -> preprocess -> extract_features -> train -> test -> register -> gate); and the flow runs
of a workspace that a killed process left RUNNING, marked crashed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.stages import STAGES, Stage
from flows.workspace import open_workspace, outputs_kept_until_registered
from pipeline_steps.core.layout import Layout

log = logging.getLogger("radflow")

# The flows that run on a workspace (parameter `workspace`): this one and flows/nightly.FLOW_NAME.
WORKSPACE_FLOWS = ("training_pipeline", "nightly_retraining")


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


@flow(name=WORKSPACE_FLOWS[0], log_prints=True)
def training_pipeline(workspace: str) -> dict[str, Any]:
    layout, params = open_workspace(Path(workspace))
    results: dict[str, Any] = {}
    # The previous model and metrics stay in place unless this run registers a version.
    with outputs_kept_until_registered(layout) as registered:
        for name, run in TASKS.items():
            results[name] = run(layout, params, _progress(name))
            if name == "register":
                registered()
    return dict(results["register"].__dict__)


def mark_crashed_runs(layout: Layout) -> list[str]:
    """Mark CRASHED the flow runs of this workspace's flows that are still RUNNING although their
    process is gone: called by a run that holds the workspace's run lock, so no other run of this
    workspace is alive (but the calling flow run and its parents, which are skipped). Returns the
    names of the runs marked."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.runtime import flow_run as current
    from prefect.states import Crashed

    alive = {
        str(i)
        for i in (current.id, current.parent_flow_run_id, current.root_flow_run_id)
        if i is not None
    }
    marked = []
    with get_client(sync_client=True) as client:
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(WORKSPACE_FLOWS))),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            ),
            # Given explicitly: Prefect 3.8's sync client sends null for them, which its API refuses.
            sort=FlowRunSort.START_TIME_DESC,
            limit=200,
        )
        for run in running:
            workspace = str((run.parameters or {}).get("workspace") or "")
            if str(run.id) in alive or not workspace or Path(workspace).resolve() != layout.root:
                continue
            client.set_flow_run_state(
                run.id,
                Crashed(
                    message="its process ended without reporting (killed?); marked crashed by the "
                    "next run of the workspace"
                ),
                force=True,
            )
            marked.append(f"{run.name} ({run.id})")
    return marked
