"""Retrain if stale: the run decision, then the training pipeline (with its gate) and the record of a
successful run. The one rule behind `radflow run` and the nightly flow; each says the outcome its own way.

Both hold the workspace's run lock (`exclusive_run`), so no other run of the workspace is alive while
they work, and both first recover what a run killed mid-way left (`recover`): the previous training
outputs put back, the gate of a version registered but never gated finished, that run recorded, and
its Prefect flow runs marked crashed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flows import decision, gate, versioning, workspace
from flows.decision import Decision, Fingerprint, LastRun
from pipeline_steps.core import locks
from pipeline_steps.core.config import Params
from pipeline_steps.core.deid import pseudonym_key
from pipeline_steps.core.files import write_text_atomic
from pipeline_steps.core.layout import Layout

log = logging.getLogger("radflow")

Check = Callable[[Layout, Params, bool], Decision]
Record = Callable[[Layout, Fingerprint, dict[str, Any]], LastRun]


def run_lock(layout: Layout) -> Path:
    """The workspace's run lock: one `radflow run` or nightly run at a time."""
    return layout.run_lock


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


# ---------------------------------------------------------------------------------------------
# A run in progress, and what the next run does when one was killed


def _pending(layout: Layout) -> Path:
    """What a training run is doing while it runs (removed once it is recorded)."""
    return layout.pending_run


def _start_pending(layout: Layout, fp: Fingerprint) -> None:
    previous = gate.read_registration(layout) or {}
    record = {
        "fingerprint": asdict(fp),
        "pid": os.getpid(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "previous_run_id": previous.get("run_id"),
        "failed": False,
    }
    write_text_atomic(_pending(layout), json.dumps(record, indent=2))


def _read_pending(layout: Layout) -> dict[str, Any] | None:
    try:
        record = json.loads(_pending(layout).read_text())
        record["fingerprint"] = Fingerprint(**record["fingerprint"])
        return dict(record)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return {"fingerprint": None, "previous_run_id": None, "failed": False}


@dataclass(frozen=True)
class Recovery:
    """What `recover` found and did."""

    restored: list[str] = field(default_factory=list)  # training outputs put back
    gated: dict[str, Any] | None = None  # the gate decision it finished
    recorded: LastRun | None = None  # the killed run, recorded as the last successful one
    crashed_runs: list[str] = field(default_factory=list)  # Prefect flow runs marked crashed

    @property
    def anything(self) -> bool:
        return bool(self.restored or self.gated or self.recorded or self.crashed_runs)


def recover(layout: Layout, params: Params, record: Record | None = None) -> Recovery:
    """Before anything else, under the run lock: what a run that was killed (or failed) left behind.

    - training outputs it had set aside: put back when it registered nothing, else dropped;
    - a version it registered that the gate never decided on: gated now (the version must not sit in
      the registry unjudged), and the run recorded as the last successful one when it was this
      workspace's run (so the decision that follows does not train it again);
    - its Prefect flow runs still RUNNING: marked CRASHED."""
    record = record or record_run
    restored: list[str] = []
    if workspace.has_set_aside(layout):
        if workspace.registered_since_set_aside(layout):
            workspace.discard_set_aside(layout)
        else:
            restored = workspace.restore_outputs(layout)
            log.warning(
                "an earlier run stopped before registering: its training outputs were replaced by "
                "the previous ones (%s)",
                ", ".join(restored) or "there were none",
            )
    pending = _read_pending(layout)
    gated = None
    ungated = gate.ungated_registration(layout, params)
    if ungated is not None:
        log.warning(
            "version %s was registered by a run that stopped before the gate decided: finishing "
            "its gate first",
            ungated["model_version"],
        )
        from flows.stages import STAGES

        gated = STAGES["gate"].run(layout, params, None)
    recorded = None
    registered = gate.read_registration(layout)
    if (
        pending is not None
        and pending["fingerprint"] is not None
        and registered is not None
        and registered.get("run_id") != pending["previous_run_id"]
        and gate.recorded_decision(layout, str(registered["model_version"])) is not None
    ):
        # That run registered a version and it is gated: only its record was missing.
        recorded = record(layout, pending["fingerprint"], registered)
    crashed: list[str] = []
    if pending is not None and not pending["failed"]:
        try:
            from flows.pipeline import mark_crashed_runs

            crashed = mark_crashed_runs(layout)
        except Exception as exc:  # the run goes on: a stale entry in Prefect's UI is not its work
            log.warning("could not mark the stopped run's Prefect flow runs crashed: %s", exc)
        if crashed:
            log.warning("marked crashed in Prefect: %s", ", ".join(crashed))
    with suppress(FileNotFoundError):
        _pending(layout).unlink()
    return Recovery(restored, gated, recorded, crashed)


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
    The caller holds the workspace's run lock; what a killed run left is recovered first.
    """
    recover(layout, params, record)
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

    _start_pending(layout, verdict.fingerprint)
    try:
        registered = training_pipeline(str(layout.root))
        last = record(layout, verdict.fingerprint, registered)
    except BaseException:
        # A failure the process lived to see: Prefect has the flow run's state already.
        pending = json.loads(_pending(layout).read_text())
        write_text_atomic(_pending(layout), json.dumps(pending | {"failed": True}, indent=2))
        raise
    with suppress(FileNotFoundError):
        _pending(layout).unlink()
    return Retraining(
        verdict, registered, last, gate.recorded_decision(layout, str(registered["model_version"]))
    )
