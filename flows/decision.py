"""The "up to date?" decision of `radflow run` and the nightly flow: the data version, the params and the
code against the last successful run, plus the drift report.

The last successful run is `.radflow/last_run.json` in the workspace; a workspace without one (a fresh
checkout of a team deployment, say) asks the MLflow registry for a version with the same lineage tags.

Drift is judged against the same reference as the `extract_features` stage: the configured table, else
the training images of the version in production. When production has moved since the stage wrote
`reports/drift/drift.json` (or there was none then), the decision compares the features again itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

# The code's identity (RADFLOW_CODE_VERSION, the source hash) lives with the code version.
from flows.versioning import CODE_VERSION_ENV, current_code_hash
from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import TrackingError
from pipeline_steps.core.files import write_text_atomic
from pipeline_steps.core.layout import Layout


@dataclass(frozen=True)
class Fingerprint:
    """What a trained model depends on."""

    data_version: str  # DVC md5 of data/raw
    params_hash: str  # pipeline_steps.register.params_hash: the sections that shape the model
    code_version: str  # git commit, "-dirty" with uncommitted changes (the registry's tag)
    code_hash: str  # the source files themselves, so an uncommitted edit counts as a change
    tracking_uri: str  # a model registered elsewhere is not this registry's model

    def differences(self, other: Fingerprint) -> list[str]:
        names = {
            "data_version": "data version",
            "params_hash": "params",
            "code_hash": "code",
            "tracking_uri": "tracking server",
        }
        out = []
        for key, label in names.items():
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                out.append(f"{label} ({_short(theirs)} -> {_short(mine)})")
        return out


@dataclass(frozen=True)
class LastRun:
    fingerprint: Fingerprint
    model_name: str
    model_version: str
    run_id: str
    metrics: dict[str, Any] = field(default_factory=dict)
    finished_at: str = ""
    source: str = "workspace"  # workspace | registry


@dataclass(frozen=True)
class Drift:
    status: str  # compared | no_reference | missing
    drift: bool
    flagged: tuple[str, ...] = ()
    reference_model_version: str = (
        ""  # "<name>/<version>": production's training data was the reference
    )


@dataclass(frozen=True)
class Decision:
    up_to_date: bool
    reason: str
    fingerprint: Fingerprint
    last: LastRun | None

    def run_summary(self) -> dict[str, Any]:
        """`radflow run --json`'s object, for the version that is already up to date."""
        assert self.last is not None
        return {
            "run_id": self.last.run_id,
            "model_name": self.last.model_name,
            "model_version": self.last.model_version,
            "data_version": self.fingerprint.data_version,
            "metrics": self.last.metrics,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "up_to_date": self.up_to_date,
            "reason": self.reason,
            "fingerprint": asdict(self.fingerprint),
            "model_version": self.last.model_version if self.last else None,
        }


def _drift_words(drift: Drift) -> str:
    if drift.status != "compared":
        return drift.status.replace("_", " ")
    if drift.reference_model_version:
        return f"no (against the training data of production {drift.reference_model_version})"
    return "no"


def _short(value: str) -> str:
    return value if len(value) <= 14 else value[:12] + "…"


def decide(current: Fingerprint, last: LastRun | None, drift: Drift, force: bool) -> Decision:
    """Retrain unless the data, params, code and tracking server are those of the last successful
    run and the drift report does not flag drift. `force` always retrains."""
    if force:
        return Decision(False, "forced (--force): retraining whatever changed", current, last)
    if last is None:
        return Decision(False, "no successful run is recorded for this workspace", current, None)
    changed = current.differences(last.fingerprint)
    if changed:
        return Decision(
            False,
            f"changed since model version {last.model_version}: {', '.join(changed)}",
            current,
            last,
        )
    if drift.drift:
        flagged = ", ".join(drift.flagged) or "see reports/drift/drift.html"
        return Decision(False, f"the drift report flags drift ({flagged})", current, last)
    return Decision(
        True,
        f"data version, params and code unchanged since model version {last.model_version}"
        f" ({last.source} record{', ' + last.finished_at if last.finished_at else ''}); "
        f"drift: {_drift_words(drift)}",
        current,
        last,
    )


# ---------------------------------------------------------------------------------------------
# Edges: what the workspace, git and MLflow say


def fingerprint(layout: Layout, params: Params) -> Fingerprint:
    from flows import tracking, versioning
    from pipeline_steps.register import params_hash

    pinned = os.environ.get(CODE_VERSION_ENV, "").strip()
    return Fingerprint(
        data_version=versioning.data_version(layout),
        params_hash=params_hash(params),
        code_version=pinned or versioning.code_version(),
        code_hash=current_code_hash(),
        tracking_uri=tracking.tracking_uri(layout),
    )


def read_drift(layout: Layout) -> Drift:
    """The drift report the `extract_features` stage wrote."""
    path = layout.drift_report
    if not path.exists():
        return Drift("missing", False)
    report = json.loads(path.read_text())
    return Drift(
        str(report.get("status", "compared")),
        bool(report.get("drift", False)),
        tuple(str(f) for f in report.get("flagged", ())),
        str(report.get("reference_model_version", "")),
    )


def current_drift(layout: Layout, params: Params) -> Drift:
    """Drift against the reference as it is now: the stage's report while it used that reference,
    else the workspace's features compared with the production version's training images now."""
    stored = read_drift(layout)
    if params.extract_features.drift.reference:
        return stored  # a configured table wins, and the stage compared against it
    from flows.drift_reference import production_training

    training, _ = production_training(layout, params.register_.model_name)
    if training is None or stored.reference_model_version == training.model_version:
        return stored
    if not (layout.features.is_file() and layout.manifest.is_file()):
        return stored
    import pandas as pd

    from pipeline_steps.core.drift import compare_with_training

    report, _, _ = compare_with_training(
        pd.read_parquet(layout.features),
        pd.read_parquet(layout.manifest, columns=["image_id", "content_hash"]),
        training,
        params.extract_features.drift,
    )
    if report is None:
        return stored
    return Drift("compared", report.drift, tuple(report.flagged), training.model_version)


def read_last_run(layout: Layout) -> LastRun | None:
    path = layout.last_run
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        raw["fingerprint"] = Fingerprint(**raw["fingerprint"])
        return LastRun(**raw)
    except (ValueError, KeyError, TypeError):
        return None  # an unreadable record only costs a retrain


def record_success(
    layout: Layout, fp: Fingerprint, registered: dict[str, Any], metrics: dict[str, Any]
) -> LastRun:
    """After a successful run: what it was trained on and what it registered."""
    last = LastRun(
        fingerprint=fp,
        model_name=str(registered["model_name"]),
        model_version=str(registered["model_version"]),
        run_id=str(registered["run_id"]),
        metrics=metrics,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_text_atomic(layout.last_run, json.dumps(asdict(last), indent=2))
    return last


def from_registry(layout: Layout, params: Params, fp: Fingerprint) -> LastRun | None:
    """The newest registered version with this fingerprint's lineage tags, if the code is a clean
    commit (a dirty tree's version tag does not pin the code)."""
    if fp.code_version.endswith("-dirty") or fp.code_version == "unknown":
        return None
    if fp.tracking_uri == f"sqlite:///{layout.mlflow_db}" and not layout.mlflow_db.exists():
        return None  # do not create an empty store just to find nothing in it
    from flows.tracking import mlflow_client

    name = params.register_.model_name
    query = (
        f"name='{name}' and tags.data_version='{fp.data_version}' "
        f"and tags.params_hash='{fp.params_hash}' and tags.code_version='{fp.code_version}'"
    )
    try:
        client = mlflow_client(fp.tracking_uri)
        found = client.search_model_versions(query)
        if not found:
            return None
        mv = max(found, key=lambda m: int(m.version))
        metrics = {
            k: v for k, v in client.get_run(str(mv.run_id)).data.metrics.items() if "." not in k
        }
    except Exception as exc:
        raise TrackingError(
            f"MLflow at {fp.tracking_uri}: looking up the last registered version failed "
            f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
        ) from None
    return LastRun(fp, name, str(mv.version), str(mv.run_id), metrics, source="registry")


def check(layout: Layout, params: Params, force: bool = False) -> Decision:
    """The decision for the workspace as it is now."""
    fp = fingerprint(layout, params)
    if force:
        return decide(fp, None, Drift("missing", False), force=True)
    last = read_last_run(layout)
    if last is None:
        last = from_registry(layout, params, fp)
    return decide(fp, last, current_drift(layout, params), force=False)
