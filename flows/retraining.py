"""Retrain if stale: the run decision, then the training pipeline (with its gate) and the record of a
successful run. The one rule behind `radflow run` and the nightly flow; each says the outcome its own way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows import decision, gate, versioning
from flows.decision import Decision, Fingerprint, LastRun
from pipeline_steps.core import locks
from pipeline_steps.core.config import Params
from pipeline_steps.core.deid import pseudonym_key
from pipeline_steps.core.layout import Layout

Check = Callable[[Layout, Params, bool], Decision]
Record = Callable[[Layout, Fingerprint, dict[str, Any]], LastRun]


def run_lock(layout: Layout) -> Path:
    """The workspace's run lock: one `radflow run` or nightly run at a time."""
    # TODO(layout): a Layout property (core/layout.py) once its owner adds `run_lock`.
    return layout.state / "run.lock"


@contextmanager
def exclusive_run(
    layout: Layout,
    what: str,
    *,
    wait_s: float | None = None,
    on_wait: locks.Waiting | None = None,
) -> Iterator[locks.Holder]:
    """Hold the workspace's run lock for a run (`radflow run`, the nightly flow, an ingest): two runs
    in one workspace would race on its files, its Great Expectations store and its registry. Waits
    (`wait_s` None: as long as it takes) and raises locks.LockHeld naming the holder."""
    with locks.exclusive(run_lock(layout), what, wait_s=wait_s, on_wait=on_wait) as me:
        yield me


@dataclass(frozen=True)
class Retraining:
    """What `retrain_if_stale` did: nothing (up to date), or a new registered version."""

    decision: Decision
    registered: dict[str, Any] | None = None  # the training pipeline's result; None: up to date
    last: LastRun | None = None  # the record of this run (its metrics included)
    gate: dict[str, Any] | None = None  # the gate's decision on the new version, if it made one

    @property
    def trained(self) -> bool:
        return self.registered is not None


def record_run(layout: Layout, fp: Fingerprint, registered: dict[str, Any]) -> LastRun:
    """After a successful training run: its outputs in dvc.lock (so `dvc status` agrees), then what
    it was trained on and what it registered, as the workspace's last successful run."""
    versioning.commit_stages(layout)
    metrics = json.loads(layout.metrics.read_text())
    return decision.record_success(layout, fp, registered, metrics)


def retrain_if_stale(
    layout: Layout,
    params: Params,
    force: bool = False,
    *,
    check: Check = decision.check,
    record: Record = record_run,
    on_stale: Callable[[Decision], None] | None = None,
) -> Retraining:
    """Decide; when the model is stale (or `force`), run the training pipeline and record the run.

    The nightly flow passes Prefect tasks as `check` and `record` (retries, task runs in the UI).
    `on_stale` hears the decision before training starts, so a run that fails still knows why it ran.
    """
    verdict = check(layout, params, force)
    if verdict.up_to_date:
        return Retraining(verdict)
    if on_stale is not None:
        on_stale(verdict)
    # The validate stage would refuse anyway; failing here spares starting the flow to find out.
    pseudonym_key()
    # Imported here: the training flow's modules cost ~1 s, which a skipped run (and every importer
    # of flows.nightly, e.g. `radflow server start`) does not need.
    from flows.pipeline import training_pipeline

    registered = training_pipeline(str(layout.root))
    last = record(layout, verdict.fingerprint, registered)
    return Retraining(
        verdict, registered, last, gate.recorded_decision(layout, str(registered["model_version"]))
    )
