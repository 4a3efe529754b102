"""MLflow edge of the `gate` stage: the registered candidate and the production version scored on the
same test images, the champion/challenger decision recorded in the audit ledger, and the candidate
moved as it says.

The rules (what passes, where a pass goes) are pure functions in `pipeline_steps/gate.py`; the moves
are `flows/registry.py`'s transitions, so each is in the ledger like a manual promotion.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from flows import change_control
from flows.anchoring import open_ledger
from flows.registry import (
    GATE,
    GATE_TAGS,
    gate_evidence,
    governance,
    latest_gate,
    open_registry,
    promote,
)
from flows.tracking import load_pyfunc, store_exists
from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import DataError, TrackingError
from pipeline_steps.core.files import write_text_atomic
from pipeline_steps.core.layout import Layout
from pipeline_steps.gate import Check, GateResult, evaluate_gate
from pipeline_steps.governance.ledger import jsonable
from pipeline_steps.governance.lifecycle import (
    ARCHIVED,
    TagOp,
    UnknownVersion,
    lifecycle_map,
    lifecycle_of,
)
from pipeline_steps.governance.signing import SignatureError
from pipeline_steps.serving.serving import INPUT_COLUMN

PIPELINE_ACTOR = "radflow-pipeline"
# What a run summary (`radflow run`, the nightly flow) shows of the decision in reports/gate.json.
DECISION_KEYS = ("passed", "reason", "stages", "production_version", "change_record")


@dataclass(frozen=True)
class TestSet:
    __test__ = False  # not a pytest class

    paths: list[str]
    gts: list[np.ndarray]
    patients: list[str]
    content_hashes: list[str]

    @property
    def digest(self) -> str:
        """Identity of the images both models were scored on."""
        return hashlib.sha256("\n".join(sorted(self.content_hashes)).encode()).hexdigest()


def load_test_set(layout: Layout) -> TestSet:
    """The test split of the current data version: raw DICOM paths and original-pixel boxes."""
    import pandas as pd

    for path in (layout.manifest, layout.metadata, layout.labels):
        if not path.exists():
            raise DataError(f"{path}: missing. Run the pipeline up to `test` first.")
    manifest = pd.read_parquet(layout.manifest)
    test = manifest[manifest["split"] == "test"].sort_values("image_id")
    if test.empty:
        raise DataError(
            f"{layout.manifest}: the test split is empty; the gate has nothing to score"
        )
    files = pd.read_parquet(layout.metadata, columns=["image_id", "file"]).set_index("image_id")
    labels = pd.read_parquet(layout.labels).dropna(subset=["x_min"])
    truth = {
        str(k): g[["x_min", "y_min", "x_max", "y_max"]].to_numpy(float)
        for k, g in labels.groupby("image_id")
    }
    return TestSet(
        paths=[str(layout.raw / str(files.loc[i, "file"])) for i in test["image_id"]],
        gts=[truth.get(str(i), np.zeros((0, 4))) for i in test["image_id"]],
        patients=[str(p) for p in test["patient_pseudonym"]],
        content_hashes=[str(h) for h in test["content_hash"]],
    )


def predict_registered(
    layout: Layout, model_name: str, version: str, paths: Sequence[str], threshold: float
) -> list[np.ndarray]:
    """(k, 5) boxes per path in original pixels, from the registered pyfunc of `version`."""
    model = load_pyfunc(layout, model_name, version)
    schema = model.metadata.get_input_schema()
    if schema is None or schema.input_names() != [INPUT_COLUMN]:
        raise IncomparableModel(
            f"version {version} does not take DICOM input (registered before radflow's pyfunc?), "
            "so the gate cannot score it; promote explicitly if it should stay or go"
        )
    # Local files, scored in this process and not ledgered (an evaluation, not predictions about
    # patients): the served `predict` reads no files and records every answer.
    out = model.unwrap_python_model().predict_files(list(paths), threshold)
    failed = [e for e in out["error"] if e]
    if failed:
        raise DataError(
            f"version {version} could not read {len(failed)} test image(s) "
            f"(first: {failed[0]}); the gate needs every image scored by both models"
        )
    return [
        np.array(
            [[b["x_min"], b["y_min"], b["x_max"], b["y_max"], b["score"]] for b in boxes],
            dtype=np.float64,
        ).reshape(-1, 5)
        for boxes in out["boxes"]
    ]


class IncomparableModel(TrackingError):
    """The production version is not a DICOM pyfunc, so the gate cannot score it."""


@dataclass(frozen=True)
class GateOutcome:
    version: str
    production_version: str | None
    result: GateResult
    ledger_row: int
    stages: tuple[str, ...]  # stages the version moved to after the decision
    change_record: dict[str, Any] | None = None  # its ledger row, sha256, plan verdict, decision

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "production_version": self.production_version,
            "ledger_row": self.ledger_row,
            "stages": list(self.stages),
            "change_record": self.change_record,
            **self.result.as_dict(),
        }


def run_gate(
    layout: Layout,
    params: Params,
    version: str,
    *,
    actor: str = PIPELINE_ACTOR,
    data_version: str = "",
    run_id: str = "",
) -> GateOutcome:
    """Make `version` the candidate, score it and production on the same test images, decide, record
    the decision, and promote as the decision says. Safe to re-run: moves already made are skipped."""
    gate_params = params.gate
    name = params.register_.model_name
    with governance(layout, params) as (registry, ledger):
        test = load_test_set(layout)
        floor = params.test.metrics_score_floor  # the whole score curve, as the test stage sees it
        # Scored first: a version whose signature fails is refused before anything is recorded.
        candidate = predict_registered(layout, name, version, test.paths, floor)
        aliases = registry.aliases()
        if (
            lifecycle_of(version, aliases) is None
            and ARCHIVED not in registry.version(version).tags
        ):
            promote(
                registry,
                ledger,
                version,
                "candidate",
                actor=actor,
                reason=f"registered by training run {run_id or '?'}",
                observed=aliases,
            )
        production = lifecycle_map(registry.aliases()).get("production")
        if production == version:
            production = None
        try:
            champion = (
                predict_registered(layout, name, production, test.paths, floor)
                if production
                else None
            )
            result = evaluate_gate(
                candidate,
                champion,
                test.gts,
                test.patients,
                gate_params,
                auto_promote=params.change_control.auto_promote,
            )
        except (IncomparableModel, SignatureError) as exc:
            # No comparison, no pass: the decision is recorded and a person decides. (A candidate
            # that fails its signature was refused above, before anything was recorded.)
            alone = evaluate_gate(candidate, None, test.gts, test.patients, gate_params)
            checks = (*alone.checks[:-1], Check("champion", False, str(exc)))
            result = replace(
                alone, passed=False, promote_to=(), checks=checks, reason=f"failed: {exc}"
            )
        entry = ledger.append(
            GATE,
            f"{name}:{version}",
            {
                "model": name,
                "version": version,
                "production_version": production,
                "data_version": data_version,
                "test_set": test.digest,
                "actor": actor,
                **result.as_dict(),
            },
        )
        tags = registry.version(version).tags
        registry.apply(
            [
                TagOp(version, key, value, tags.get(key))
                for key, value in zip(
                    GATE_TAGS,
                    ("passed" if result.passed else "failed", str(entry.seq)),
                    strict=True,
                )
            ]
        )
        # The change record decides where the version goes: the gate's pass, inside the plan.
        record = change_control.record_gate(
            layout,
            params,
            registry,
            ledger,
            version,
            result,
            production=production,
            actor=actor,
            retrained=bool(run_id),
        )
        moved = []
        for stage in record.stages:
            if lifecycle_of(version, registry.aliases()) == stage:
                continue
            promote(
                registry,
                ledger,
                version,
                stage,
                actor=actor,
                reason=f"gate {result.reason}; change control: {record.decision}",
                evidence=gate_evidence(entry),
            )
            moved.append(stage)
    summary = {
        "ledger_row": record.entry.seq,
        "sha256": record.entry.payload["record_sha256"],
        "inside_plan": record.predicate["inside_plan"],
        "violations": [v["rule"] for v in record.predicate["violations"]],
        "decision": record.decision,
    }
    outcome = GateOutcome(version, production, result, entry.seq, tuple(moved), summary)
    layout.gate_report.parent.mkdir(parents=True, exist_ok=True)
    layout.gate_report.write_text(json.dumps(jsonable(outcome.as_dict()), indent=2, sort_keys=True))
    return outcome


def recorded_decision(layout: Layout, version: str) -> dict[str, Any] | None:
    """The gate's decision on `version` as reports/gate.json holds it (None: not this version's),
    in the few keys a run summary shows."""
    if not layout.gate_report.exists():
        return None
    report = json.loads(layout.gate_report.read_text())
    if not report or str(report.get("version")) != str(version):
        return None
    return {key: report.get(key) for key in DECISION_KEYS}


# ---------------------------------------------------------------------------------------------
# A gate decision already made, and one a crashed run left undone


def read_registration(layout: Layout) -> dict[str, Any] | None:
    """reports/registration.json (the register stage's record), or None when there is none."""
    if not layout.registration.exists():
        return None
    try:
        record = json.loads(layout.registration.read_text())
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("model_version") else None


def recorded_outcome(layout: Layout, params: Params, version: str) -> dict[str, Any] | None:
    """The gate's latest decision on `version` from the ledger, written to reports/gate.json as
    run_gate writes it; None when the gate never decided on it. A version registered again (the
    same data, code and params) keeps the decision it had: the gate is not run twice on one model."""
    name = params.register_.model_name
    with open_ledger(layout.root) as ledger:
        entry = latest_gate(ledger, name, version)
    if entry is None:
        return None
    internal = ("model", "data_version", "test_set", "actor")
    report = {k: v for k, v in entry.payload.items() if k not in internal}
    report |= {"version": version, "ledger_row": entry.seq, "stages": []}
    write_text_atomic(layout.gate_report, json.dumps(jsonable(report), indent=2, sort_keys=True))
    return report


def ungated_registration(layout: Layout, params: Params) -> dict[str, Any] | None:
    """The workspace's last registration when the gate never decided on its version (its run stopped
    between `register` and the gate's decision), else None. A record of another registry (the
    version there has another run) or of an archived version is not this workspace's to gate."""
    record = read_registration(layout)
    if record is None or record.get("model_name") != params.register_.model_name:
        return None
    version = str(record["model_version"])
    with open_ledger(layout.root) as ledger:
        if latest_gate(ledger, params.register_.model_name, version) is not None:
            return None
    if not store_exists(layout):
        return None
    try:
        info = open_registry(layout, params.register_.model_name).version(version)
    except UnknownVersion:
        return None
    if info.run_id != str(record.get("run_id")) or ARCHIVED in info.tags:
        return None
    return record
