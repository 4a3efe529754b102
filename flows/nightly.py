"""The nightly retraining flow: sync the landing location and/or pull from the PACS, version and push new
studies, decide, retrain and gate when something changed, and always leave a run summary.

Two overlapping runs never sync, train or promote at once: a run holds the workspace's run lock (the
one `radflow run` holds too, flows/retraining.py) and,
with a Prefect server, the global concurrency limit `nightly.concurrency_limit` (which also covers
workers on other machines sharing the registry). A run that cannot get them within
`nightly.lock_wait_s` is skipped, and says so in its summary.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import decision, landing, pacs_pull, retraining, versioning, workspace
from pipeline_steps.core import locks
from pipeline_steps.core.config import NightlyParams, Params
from pipeline_steps.core.errors import RadflowError, WorkspaceError
from pipeline_steps.core.files import write_text_atomic
from pipeline_steps.core.layout import Layout

log = logging.getLogger("radflow")

FLOW_NAME = "nightly_retraining"
DEPLOYMENT_NAME = "radflow-nightly"
ARTIFACT_KEY = "radflow-nightly"
WEBHOOK_ENV = "RADFLOW_WEBHOOK_URL"
# Acquiring a Prefect concurrency slot is a server round trip; a zero timeout fails even when free.
MIN_SLOT_WAIT_S = 3.0


class RunInProgress(RadflowError):
    """Another nightly run holds the workspace lock or the global concurrency limit."""


# ---------------------------------------------------------------------------------------------
# Exclusion: the workspace lock file, and Prefect's global concurrency limit with a server


def on_server() -> bool:
    """True when PREFECT_API_URL points at a Prefect server (not the temporary local one)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


@contextmanager
def workspace_lock(layout: Layout, wait_s: float) -> Iterator[None]:
    """The workspace's run lock, waited for at most `wait_s` (nightly.lock_wait_s). The OS releases it
    when its holder dies, so a killed run never leaves a stale lock behind."""
    stack = ExitStack()
    try:
        stack.enter_context(retraining.exclusive_run(layout, "radflow nightly", wait_s=wait_s))
    except locks.LockHeld as exc:
        raise RunInProgress(
            f"another run holds the workspace's run lock {exc.path} "
            f"({exc.holder.describe() if exc.holder else 'holder unknown'}); waited {wait_s:g} s "
            "(nightly.lock_wait_s)"
        ) from None
    with stack:
        yield


def ensure_concurrency_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit if the server does not have it (an admin's own limit
    is left as it is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit)
                )


@contextmanager
def global_limit(name: str, wait_s: float) -> Iterator[None]:
    from prefect.concurrency.sync import concurrency

    ensure_concurrency_limit(name)
    stack = ExitStack()
    try:
        stack.enter_context(
            concurrency(name, occupy=1, timeout_seconds=max(wait_s, MIN_SLOT_WAIT_S), strict=True)
        )
    except TimeoutError:
        raise RunInProgress(
            f"another nightly run holds the Prefect global concurrency limit {name!r}; waited "
            f"{max(wait_s, MIN_SLOT_WAIT_S):g} s (nightly.lock_wait_s)"
        ) from None
    with stack:
        yield


@contextmanager
def exclusive(layout: Layout, params: NightlyParams) -> Iterator[None]:
    with workspace_lock(layout, params.lock_wait_s), ExitStack() as stack:
        if on_server() and params.concurrency_limit:
            stack.enter_context(global_limit(params.concurrency_limit, params.lock_wait_s))
        yield


# ---------------------------------------------------------------------------------------------
# The run summary: a JSON line in reports/nightly.jsonl (Layout.nightly_log), a Prefect markdown
# artifact, a failure hook


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunSummary:
    workspace: str
    flow_run_id: str
    started_at: str
    forced: bool
    status: str = "running"  # trained | skipped | failed
    reason: str = ""
    landing: dict[str, Any] = field(default_factory=dict)
    pacs: dict[str, Any] = field(default_factory=dict)  # counts only (flows/pacs_pull.py)
    data_version: str | None = None
    previous_data_version: str | None = None
    dvc_push: str = ""
    model_version: str | None = None
    run_id: str | None = None
    gate: dict[str, Any] | None = None
    error: str | None = None
    change_record: int | None = None  # ledger row of a skipped or failed night's change record
    finished_at: str = ""
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def append_summary(layout: Layout, summary: RunSummary) -> None:
    path = layout.nightly_log
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(summary.as_dict(), sort_keys=True) + "\n"
    # One write of one line in append mode: concurrent writers never interleave within a line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def markdown(summary: RunSummary) -> str:
    counts = summary.landing
    landed = (
        ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
        if counts
        else "no landing location"
    )
    gate = summary.gate or {}
    rows = [
        ("status", f"**{summary.status}**"),
        ("reason", summary.reason),
        ("landing", landed),
        ("pacs", ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in summary.pacs.items()) or "-"),
        ("data version", summary.data_version or "-"),
        ("previous data version", summary.previous_data_version or "-"),
        ("DVC push", summary.dvc_push or "-"),
        ("model version", summary.model_version or "-"),
        (
            "gate",
            f"{'passed' if gate.get('passed') else 'failed'}: {gate.get('reason', '')}; "
            f"now in {', '.join(gate.get('stages', [])) or 'candidate'}"
            if gate
            else "-",
        ),
        ("forced", "yes" if summary.forced else "no"),
        ("duration", f"{summary.duration_s:.1f} s"),
        ("error", summary.error or "-"),
    ]
    body = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)
    return f"# radflow nightly: {summary.status}\n\n| | |\n|---|---|\n{body}\n"


def webhook_url(params: NightlyParams) -> str:
    return os.environ.get(WEBHOOK_ENV) or params.webhook_url


def notify_failure(summary: RunSummary, url: str) -> bool:
    """POST the summary to the webhook (with a Slack-style `text`), or log it. Never raises: a broken
    hook must not hide the failure it reports. True when the webhook accepted it."""
    text = f"radflow nightly FAILED in {summary.workspace}: {summary.error}"
    log.error("%s (flow run %s)", text, summary.flow_run_id)
    if not url:
        return False
    body = json.dumps({"text": text, **summary.as_dict()}).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    for attempt in range(3):
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                if 200 <= reply.status < 300:
                    return True
        except OSError as exc:
            log.warning("failure webhook attempt %d: %s", attempt + 1, exc)
        time.sleep(2**attempt)
    log.error("the failure webhook %s did not accept the notification", url.split("?")[0])
    return False


def record_change(layout: Layout, params: Params, summary: RunSummary) -> None:
    """A night that trained nothing (skipped or failed) leaves a signed change record too; a trained
    night's record is the gate's. Never raises: the record must not hide what the night did."""
    if summary.status not in ("skipped", "failed"):
        return
    try:
        from flows.change_control import record_night

        entry = record_night(layout, params, summary.as_dict())
        summary.change_record = entry.seq
    except Exception as exc:
        log.error("the nightly run's change record could not be written: %s", exc)


def _finish(layout: Layout, params: Params, summary: RunSummary, started: float) -> None:
    summary.finished_at = _now()
    summary.duration_s = round(time.monotonic() - started, 2)
    record_change(layout, params, summary)
    append_summary(layout, summary)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            markdown(summary), key=ARTIFACT_KEY, description=f"nightly run: {summary.status}"
        )
    except Exception as exc:  # the JSON line is the record; the artifact is a view of it
        log.warning("could not create the Prefect summary artifact: %s", exc)


# ---------------------------------------------------------------------------------------------
# Steps as tasks


def push_data(layout: Layout) -> str:
    """`dvc push` of the current data version to the default DVC remote, once per version."""
    state_file = layout.nightly_state
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    version = versioning.data_version(layout)
    if state.get("pushed_data_version") == version:
        return "already pushed"
    try:
        remote = versioning.dvc(layout.root, "remote", "default").strip()
    except WorkspaceError:
        remote = ""
    if not remote:
        return "no default DVC remote (data stays in the local cache)"
    versioning.dvc(layout.root, "push", "-q")
    state["pushed_data_version"] = version
    write_text_atomic(state_file, json.dumps(state))
    return f"pushed to {remote}"


def ingest(layout: Layout, params: Params, batch: landing.Batch) -> landing.Ingested:
    try:
        return landing.ingest_batch(layout, params, batch)
    except BaseException:
        landing.discard(batch)
        raise


def _backoff(params: NightlyParams) -> list[float]:
    return [params.retry_delay_s * 2**i for i in range(params.retries)]


sync_task = task(name="sync_landing", cache_policy=NO_CACHE)(landing.sync)
# The PACS source: the pull is retried as the landing sync is; its ingest cleans up after itself.
pull_pacs_task = task(name="pull_pacs", cache_policy=NO_CACHE)(pacs_pull.pull_from_env)
ingest_pacs_task = task(name="ingest_pacs", cache_policy=NO_CACHE)(pacs_pull.ingest)
ingest_task = task(name="ingest", cache_policy=NO_CACHE)(ingest)
push_task = task(name="push_data", cache_policy=NO_CACHE)(push_data)
# Only a registry lookup (a workspace without a last-run record) can fail here, and that may pass.
decide_task = task(name="decide", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 20])(
    decision.check
)
record_task = task(name="record_run", cache_policy=NO_CACHE)(retraining.record_run)


def _crashed(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect calls this when the run's process dies under it (SIGTERM, lost infrastructure)."""
    try:
        layout, params = workspace.open_workspace(Path(flow_run.parameters["workspace"]))
        summary = RunSummary(
            str(layout.root),
            str(flow_run.id),
            _now(),
            bool(flow_run.parameters.get("force")),
            status="failed",
            error=f"crashed: {state.message}",
        )
        record_change(layout, params, summary)
        append_summary(layout, summary)
        notify_failure(summary, webhook_url(params.nightly))
    except Exception as exc:
        log.error("nightly run %s crashed (%s); could not record it: %s", flow_run.id, state, exc)


@flow(name=FLOW_NAME, on_crashed=[_crashed])
def nightly_retraining(workspace: str, force: bool = False) -> dict[str, Any]:
    """Sync -> ingest and push -> decide -> (training pipeline with its gate) -> summary."""
    from prefect.runtime import flow_run

    started = time.monotonic()
    layout, params = _open(workspace)
    run = RunSummary(str(layout.root), str(flow_run.id or ""), _now(), force)
    try:
        with exclusive(layout, params.nightly):
            _steps(layout, params, run)
    except RunInProgress as exc:
        run.status, run.reason = "skipped", str(exc)
        get_run_logger().warning("skipped: %s", exc)
    except BaseException as exc:
        run.status = "failed"
        run.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"
        notify_failure(run, webhook_url(params.nightly))
        raise
    finally:
        _finish(layout, params, run, started)
    return run.as_dict()


def _open(workspace_dir: str) -> tuple[Layout, Params]:
    # The flow's parameter is named `workspace` (the deployment's), which hides the module there.
    return workspace.open_workspace(Path(workspace_dir))


def _steps(layout: Layout, params: Params, run: RunSummary) -> None:
    logger = get_run_logger()
    nightly = params.nightly
    # Before anything else: what a killed run left (its ungated version, its outputs, its flow runs).
    retraining.recover(layout, params, record_task)
    if layout.raw_dvc.exists():
        run.previous_data_version = versioning.data_version(layout)
    if nightly.landing:
        batch = sync_task.with_options(
            retries=nightly.retries, retry_delay_seconds=_backoff(nightly)
        )(layout, nightly)
        run.landing = batch.counts()
        ingested = ingest_task(layout, params, batch)
        run.landing |= {"archived": ingested.added}
    if nightly.pacs:
        pulled = pull_pacs_task.with_options(
            retries=nightly.retries, retry_delay_seconds=_backoff(nightly)
        )(layout, params)
        run.pacs = pulled.counts()
        from_pacs = ingest_pacs_task(layout, params, pulled)
        run.pacs |= {"archived": from_pacs.added, "labels_imported": from_pacs.labels_imported}
    run.data_version = versioning.data_version(layout)
    run.dvc_push = push_task.with_options(
        retries=nightly.retries, retry_delay_seconds=_backoff(nightly)
    )(layout)

    def stale(verdict: decision.Decision) -> None:
        run.reason = verdict.reason
        logger.info("retraining: %s", verdict.reason)

    outcome = retraining.retrain_if_stale(
        layout, params, run.forced, check=decide_task, record=record_task, on_stale=stale
    )
    run.reason = outcome.decision.reason
    if not outcome.trained:
        last = outcome.decision.last
        assert last is not None
        run.status, run.model_version, run.run_id = "skipped", last.model_version, last.run_id
        logger.info("up to date: model version %s (%s)", run.model_version, run.reason)
        return
    assert outcome.registered is not None
    run.status, run.model_version, run.run_id = (
        "trained",
        str(outcome.registered["model_version"]),
        str(outcome.registered["run_id"]),
    )
    run.gate = outcome.gate
