"""The PACS watcher (`radflow pacs watch`, Prefect flow `pacs_watch`): new studies found over QIDO-RS,
their images retrieved over WADO-RS and predicted by the production model under the one serving rule,
and a TID 1500 SR stored back into each original study over STOW-RS.

Per study, in this order: predict (ingestion's screening and reason codes first), record every
answer in the ledger (one transaction), STOW the SRs, then mark the instances handled in the state
file. The SR's SOP Instance UID is fixed before the ledger row is written (`sr.report_uid`, from the
instance's keyed hash and the model version), so the row names it and `radflow trace <SR UID>` finds
it. A crash or a failed STOW between ledger and state is finished by the next poll from the ledger
row (no second prediction), storing an SR with the same UIDs, after asking the PACS whether it
already holds it. The bookkeeping is `pipeline_steps/serving/watch.py`.

Nothing identifying is logged or kept: studies and instances are named by keyed hashes, and the
HTTP libraries' own logs (which quote request URLs, UIDs included) are silenced while a poll runs.
"""

from __future__ import annotations

import io
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import FrameType
from typing import Any

from prefect import flow

from flows.anchoring import open_ledger
from flows.pacs import Pacs, PacsRequestError, PacsUnavailable, urls_unlogged
from flows.predict import LoadedModel, load_model, record_predictions, resolve_version
from flows.review_store import keep_predicted
from flows.versioning import code_version
from flows.workspace import open_workspace
from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import DataError, TrackingError
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.locks import LockHeld, exclusive
from pipeline_steps.governance.ledger import LedgerError
from pipeline_steps.serving.prediction import (
    PREDICTION,
    InputRejected,
    Provenance,
    Source,
    predict_batch,
    uid_hash,
)
from pipeline_steps.serving.sr import build_sr, report_uid
from pipeline_steps.serving.watch import (
    INSTANCE_FIELDS,
    STUDY_FIELDS,
    Instance,
    Study,
    WatchState,
    instances_from,
    load_state,
    recorded_predictions,
    save_state,
    studies_from,
    study_filters,
)

log = logging.getLogger("radflow.pacs_watch")

CHANNEL = "pacs_watch"  # the ledger records' `channel`: made by the watcher, with an SR
DEPLOYMENT_NAME = "radflow-pacs-watch"
SR_NOT_BUILT = (
    "sr_not_built"  # predicted and recorded, but the source's header cannot go into an SR
)
# Failures a running service outlives: the next poll tries again.
TRANSIENT = (PacsUnavailable, LedgerError, TrackingError, LockHeld)


@dataclass
class PollSummary:
    model: dict[str, Any] = field(default_factory=dict)
    studies: int = 0  # studies the searches returned
    unchanged: int = 0  # of them, not listed again (instance count as when fully handled)
    instances: int = 0  # new instances handled this poll
    predicted: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # reason code -> instances
    reports_stored: int = 0
    finished_from_ledger: int = 0  # recorded by an earlier attempt, stored now
    already_in_pacs: int = 0  # recorded earlier and its SR already there: nothing stored
    store_failed: int = 0  # STOW refused them: tried again next poll
    stopped: bool = False  # a stop request ended the poll between studies
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("search", "retrieve", "predict", "ledger", "store"), 0.0
        )
    )

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, seconds={k: round(v, 4) for k, v in self.seconds.items()})

    def line(self) -> str:
        refused = ", ".join(f"{n} {r}" for r, n in sorted(self.refused.items())) or "none"
        return (
            f"{self.studies} study(ies) ({self.unchanged} unchanged), {self.instances} new "
            f"instance(s): {self.predicted} predicted, refused: {refused}; "
            f"{self.reports_stored} SR(s) stored ({self.finished_from_ledger} finished from the "
            f"ledger, {self.already_in_pacs} already in the PACS), {self.store_failed} store "
            "failure(s)" + ("; stopped between studies" if self.stopped else "")
        )


@contextmanager
def _timed(summary: PollSummary, part: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        summary.seconds[part] += time.perf_counter() - started


def _encoded(dataset: Any, name: str) -> Source:
    """A retrieved dataset as DICOM file bytes for the serving rule, or why it cannot be."""
    try:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()
    except Exception as exc:  # any header the writer cannot take costs this instance only
        return InputRejected("corrupt", f"{name}: cannot be re-encoded ({type(exc).__name__})")


class Watcher:
    """Polls one PACS for one workspace. The model is resolved at every poll and reloaded only when
    the stage's alias has moved to another version."""

    def __init__(
        self, layout: Layout, params: Params, pacs: Pacs, key: str, stage: str = "production"
    ) -> None:
        self.layout, self.params, self.pacs, self.key, self.stage = (
            layout,
            params,
            pacs,
            key,
            stage,
        )
        self.model: LoadedModel | None = None

    def current_model(self) -> LoadedModel:
        ref, _ = resolve_version(self.layout, self.params, stage=self.stage)
        if self.model is None or self.model.ref.version != ref.version:
            self.model = load_model(self.layout, self.params, stage=self.stage)
            log.info(
                "pacs watch: %s version %s (%s) loaded",
                self.model.ref.name,
                self.model.ref.version,
                self.stage,
            )
        return self.model

    def threshold(self, model: LoadedModel) -> float:
        configured = self.params.pacs.watch.score_threshold
        return model.config.detection.score_threshold if configured is None else configured

    def poll(self, should_stop: Callable[[], bool] = lambda: False) -> PollSummary:
        """One poll over every watched study; raises PacsUnavailable, PacsAuthError, LedgerError
        (nothing of the study in progress is marked handled, so the next poll takes it up)."""
        with (
            exclusive(self.layout.pacs_watch_lock, "radflow pacs watch", wait_s=0),
            urls_unlogged(),
        ):
            model = self.current_model()
            summary = PollSummary(model=model.ref.as_dict())
            state = load_state(self.layout.pacs_watch_handled)
            watch = self.params.pacs.watch
            answers: list[dict[str, Any]] = []
            with _timed(summary, "search"):
                for modality in watch.modalities:
                    filters = study_filters(modality, watch.lookback_days, date.today())
                    answers += self.pacs.search_studies(filters, STUDY_FIELDS)
            studies = studies_from(answers, self.key)
            summary.studies = len(studies)
            for study in studies:
                if should_stop():
                    summary.stopped = True
                    break
                if state.unchanged(study):
                    summary.unchanged += 1
                    continue
                self._study(study, state, model, summary)
                save_state(self.layout.pacs_watch_handled, state)
        return summary

    # -- one study ------------------------------------------------------------------------------

    def _study(
        self, study: Study, state: WatchState, model: LoadedModel, summary: PollSummary
    ) -> None:
        with _timed(summary, "search"):
            answers = self.pacs.search_instances(study.uid, INSTANCE_FIELDS)
        instances = instances_from(answers, lambda uid: uid_hash(uid, self.key))
        pending = state.pending(instances)
        name, version = model.ref.name, model.ref.version
        sources: dict[str, Any] = {}  # instance key -> retrieved dataset
        inputs: list[tuple[Instance, Source]] = []
        unretrieved = 0
        with open_ledger(self.layout.root) as ledger:
            earlier = (
                recorded_predictions(
                    (e.payload for e in ledger.entries(kind=PREDICTION)),
                    name,
                    version,
                    {i.key for i in pending},
                )
                if pending
                else {}
            )
            with _timed(summary, "retrieve"):
                for instance in pending:
                    done = earlier.get(instance.key)
                    if done is not None and "reason" in done:
                        continue  # refused by an earlier attempt: nothing to retrieve or store
                    try:
                        dataset = self.pacs.retrieve(
                            study.uid, instance.series_uid, instance.sop_uid
                        )
                    except PacsRequestError as exc:  # gone since the search, or refused: next poll
                        log.warning(
                            "pacs watch: instance %s not retrieved: HTTP %d",
                            instance.key,
                            exc.status,
                        )
                        unretrieved += 1
                        continue
                    sources[instance.key] = dataset
                    if done is None:
                        inputs.append((instance, _encoded(dataset, instance.key)))
            records = self._predict(inputs, model, summary)
            if records:
                with _timed(summary, "ledger"):
                    record_predictions(ledger, records)  # before anything is stored
                keep_predicted(self.layout, self.params.review, records, [s for _, s in inputs])
        outcome = {**earlier, **{r["sop_instance_uid_hash"]: r for r in records}}
        reports = []
        for number, instance in enumerate(pending, start=1):
            record = outcome.get(instance.key)
            if record is None or ("reason" not in record and instance.key not in sources):
                continue  # not retrieved: the next poll
            if "reason" in record:
                state.handled[instance.key] = str(record["reason"])
                summary.instances += 1
                continue
            if instance.key in earlier and self._stored(study.uid, record):
                state.handled[instance.key] = "sr"
                summary.instances += 1
                summary.already_in_pacs += 1
                continue
            try:
                sr = build_sr(
                    sources[instance.key],
                    record["boxes"],
                    prediction_id=record["prediction_id"],
                    model_name=name,
                    model_version=version,
                    series_number=self.params.pacs.watch.series_number,
                    instance_number=number,
                    sop_instance_uid=record["sr_sop_instance_uid"],
                )
            except DataError as exc:  # the source's header cannot go into an SR: never will
                log.warning("pacs watch: no SR for instance %s: %s", instance.key, exc)
                state.handled[instance.key] = SR_NOT_BUILT
                summary.instances += 1
                summary.refuse(SR_NOT_BUILT)
                continue
            reports.append((instance, sr))
        stored = self._store(study, reports, summary)
        for instance, _ in reports:
            if instance.key in stored:
                state.handled[instance.key] = "sr"
                summary.instances += 1
                summary.reports_stored += 1
                summary.finished_from_ledger += instance.key in earlier
        if not unretrieved and not state.pending(instances):
            state.studies[study.key] = study.instances

    def _predict(
        self, inputs: list[tuple[Instance, Source]], model: LoadedModel, summary: PollSummary
    ) -> list[dict[str, Any]]:
        if not inputs:
            return []
        provenance = Provenance(model.ref, model.data_version, code_version())
        with _timed(summary, "predict"):
            records = predict_batch(
                model.detector,
                [(instance.key, source) for instance, source in inputs],
                model.config,
                self.params.ingest,
                provenance,
                threshold=self.threshold(model),
                key=self.key,
            )
        for (instance, _), record in zip(inputs, records, strict=True):
            record["channel"] = CHANNEL
            record["sop_instance_uid_hash"] = instance.key  # error records have none of their own
            if "reason" in record:
                summary.refuse(str(record["reason"]))
                log.info("pacs watch: instance %s refused: %s", instance.key, record["reason"])
            else:
                summary.predicted += 1
                record["sr_sop_instance_uid"] = report_uid(
                    instance.key, model.ref.name, model.ref.version
                )
        return records

    def _stored(self, study_uid: str, record: dict[str, Any]) -> bool:
        """Whether the PACS already holds the SR of an earlier attempt (QIDO-RS by its UID)."""
        found = self.pacs.call(
            "an SR search",
            self.pacs.client.search_for_instances,
            study_instance_uid=study_uid,
            search_filters={"SOPInstanceUID": record["sr_sop_instance_uid"]},
        )
        return bool(found)

    def _store(
        self, study: Study, reports: list[tuple[Instance, Any]], summary: PollSummary
    ) -> set[str]:
        """STOW-RS the study's SRs into it; the keys of the instances whose SR the PACS took."""
        if not reports:
            return set()
        with _timed(summary, "store"):
            response = self.pacs.store([sr for _, sr in reports], study.uid)
        failed = {
            str(item.get("ReferencedSOPInstanceUID", ""))
            for item in (getattr(response, "FailedSOPSequence", None) or ())
        }
        stored = {i.key for i, sr in reports if str(sr.SOPInstanceUID) not in failed}
        if failed:
            summary.store_failed += len(reports) - len(stored)
            log.warning(
                "pacs watch: the PACS refused %d of %d SR(s) of study %s; the next poll stores "
                "them again from the ledger",
                len(reports) - len(stored),
                len(reports),
                study.key,
            )
        return stored


# --------------------------------------------------------------------------------------------
# The service


class StopRequest:
    """SIGTERM or SIGINT asks the service to stop: between studies, and at once while it waits."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: str = ""

    def __call__(self) -> bool:
        return self.event.is_set()

    def set(self, signum: int, frame: FrameType | None = None) -> None:
        self.signal = signal.Signals(signum).name
        self.event.set()

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = {s: signal.signal(s, self.set) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def serve_polls(
    watcher: Watcher,
    *,
    interval_s: float,
    once: bool,
    stop: StopRequest,
    report: Callable[[dict[str, Any]], None] = lambda summary: None,
) -> int:
    """Poll until stopped (or once): 0 when the last poll succeeded, 1 when it failed. A poll that
    meets an unavailable PACS, ledger or registry fails with its reason and the next one resumes;
    refused credentials (PacsAuthError) and other configuration errors end the service."""
    failed = False
    while True:
        started = time.monotonic()
        try:
            summary = watcher.poll(stop)
            failed = False
            log.info(
                "pacs watch: poll done in %.2f s: %s", time.monotonic() - started, summary.line()
            )
            report({"status": "ok", **summary.as_dict()})
        except TRANSIENT as exc:
            failed = True
            log.error(
                "pacs watch: poll failed (%s: %s)%s",
                type(exc).__name__,
                exc,
                "" if once else f"; the next poll in {interval_s:g} s",
            )
            report({"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        if once or stop() or stop.event.wait(interval_s):
            break
    if stop():
        log.info("pacs watch: stopped by %s", stop.signal or "request")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------
# The Prefect flow and its deployment


def open_watcher(workspace: Path | None, stage: str = "production") -> Watcher:
    """The workspace's watcher: pseudonym key first (without one nothing is loaded), then the PACS
    settings from the environment with params.yaml's timeouts and retries."""
    from pipeline_steps.core.deid import pseudonym_key

    key = pseudonym_key().secret
    layout, params = open_workspace(workspace)
    pacs = Pacs.from_env(
        timeout_s=params.pacs.timeout_s,
        attempts=params.pacs.attempts,
        backoff_s=params.pacs.backoff_s,
    )
    return Watcher(layout, params, pacs, key, stage)


@flow(name="pacs_watch", log_prints=False)
def pacs_watch(workspace: str, stage: str = "production") -> dict[str, Any]:
    """One poll of the PACS for new studies: predict, ledger, STOW an SR into each study. Its
    parameters are the workspace and the registry stage; no study or patient reaches Prefect."""
    summary = open_watcher(Path(workspace), stage).poll()
    log.info("pacs watch: %s", summary.line())
    return summary.as_dict()


def serve_deployment(layout: Layout, params: Params, stage: str = "production") -> None:
    """Create (or update) the `radflow-pacs-watch` deployment, one poll every `pacs.watch.interval_s`,
    and run its runner here until interrupted (one run at a time)."""
    from prefect.types.entrypoint import EntrypointType

    from flows.nightly import on_server
    from pipeline_steps.core.errors import ConfigError

    if not on_server():
        raise ConfigError(
            "radflow pacs watch --serve needs a Prefect server (Prefect's temporary local server runs "
            "no scheduler): start one with `radflow server start` and set PREFECT_API_URL"
        )
    pacs_watch.serve(
        name=DEPLOYMENT_NAME,
        interval=params.pacs.watch.interval_s,
        parameters={"workspace": str(layout.root), "stage": stage},
        tags=["radflow", "pacs"],
        description=(
            f"Poll the PACS for new studies of {layout.root}'s watched modalities; predict with the "
            f"{stage} model and store a DICOM SR into each study."
        ),
        limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
