"""Change control against a real MLflow store, ledger and signing key: every gate decision leaves a signed
in-toto record; a retrain outside the plan (an architecture change) is recorded as such and cannot be
promoted without --force, which is recorded too; auto_promote takes an accepted in-plan candidate to
production through `promote`; skipped and failed nights leave records; `radflow changes` lists and
verifies them (a forged one fails); the model card holds the version's metrics and no patient data."""

from __future__ import annotations

import base64
import json

import pytest

from tests.conftest import FAKE_PHI

pytestmark = pytest.mark.integration

# The metrics the test stage would write (headline with intervals, a subgroup, a lesion band).
METRICS = {
    "ap50": 0.61,
    "ap50_ci_low": 0.52,
    "ap50_ci_high": 0.7,
    "sens_at_1fp": 0.66,
    "sens_at_1fp_ci_low": 0.55,
    "sens_at_1fp_ci_high": 0.75,
    "cpm": 0.58,
    "n_images": 4.0,
    "subgroup.sex.f.sens_at_1fp": 0.7,
    "subgroup.sex.f.n_images": 2.0,
    "lesion_size.lt8_mm.sens_at_1fp": 0.25,
}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two registered versions in the workspace's embedded MLflow store: one under the plan's
    architecture and one with train.width changed."""
    from flows import stages
    from tests.integration.test_registry import build_workspace

    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_URI", "RADFLOW_LEDGER_URL", "RADFLOW_SIGNING_KEY"):
            mp.delenv(key, raising=False)
        mp.delenv("RADFLOW_SIGNING_PUBLIC_KEYS", raising=False)
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        layout, params = build_workspace(tmp_path_factory.mktemp("cc"))
        layout.metrics.write_text(json.dumps(METRICS))
        first = stages.register(layout, params)
        train = params.train.model_copy(update={"width": params.train.width * 2})
        wide = params.model_copy(update={"train": train})
        second = stages.register(layout, wide)
        yield layout, params, wide, first, second


@pytest.fixture(scope="module")
def gated(versions):
    """Version 1 gated with auto_promote (no production yet), then version 2 against it."""
    from flows.gate import run_gate

    layout, params, wide, first, second = versions
    auto = params.model_copy(
        update={"change_control": params.change_control.model_copy(update={"auto_promote": True})}
    )
    one = run_gate(layout, auto, "1", run_id=first.run_id)
    two = run_gate(layout, wide, "2", run_id=second.run_id)
    return one, two


def cli(layout, *args):
    from tests.integration.test_registry import cli as run

    return run(layout, *args)


def test_plan_records_promotion_override_and_listing(versions, gated):
    from flows import tracking
    from flows.registry import open_registry
    from pipeline_steps.governance.ledger import open_ledger

    layout, params, wide, first, second = versions
    one, two = gated
    assert (first.model_version, second.model_version) == ("1", "2")
    # An accepted candidate inside the plan goes to production on its own with auto_promote.
    assert one.change_record["inside_plan"] is True
    assert one.stages == ("staging", "production"), one.change_record
    registry = open_registry(layout, params.register_.model_name)
    assert registry.aliases()["production"] == "1"

    # The architecture change: recorded outside the plan, naming the rule; it stays candidate.
    assert two.change_record["inside_plan"] is False
    assert two.change_record["violations"] == ["fixed:train.width"]
    assert two.stages == () and registry.aliases().get("staging") is None
    code, _, err = cli(layout, "promote", "2", "--to", "staging", "--reason", "try")
    assert code == 1 and "outside the change control plan" in err and "fixed:train.width" in err
    assert registry.aliases().get("staging") is None
    code, _, err = cli(
        layout, "promote", "2", "--to", "staging", "--force", "--reason", "a wider net, reviewed"
    )
    assert code == 0, err
    assert registry.aliases()["staging"] == "2"

    code, out, err = cli(layout, "changes", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["kind"], r["version"], r["inside_plan"]) for r in rows] == [
        ("retrain", "1", True),
        ("retrain", "2", False),
        ("override", "2", None),
    ]
    assert all(r["signature"] == "verified" and r["consistent"] for r in rows)
    assert "production" in rows[0]["decision"] and "outside" in rows[1]["decision"]
    assert "a wider net, reviewed" in rows[2]["decision"]
    with open_ledger(layout.root) as ledger:
        moves = ledger.entries(kind="transition")
        forced = [e for e in moves if e.payload.get("forced")]
    assert len(forced) == 1 and "fixed:train.width" in forced[0].payload["overridden"][0]

    code, out, _ = cli(layout, "changes", "--version", "2")
    assert code == 0 and '"rule": "fixed:train.width"' in out and '"from": "4"' in out
    assert "https://in-toto.io/Statement/v1" in out

    # The envelope is on the version's MLflow run, and it is the ledger's.
    logged = tracking.run_artifact(
        layout,
        second.run_id,
        f"change_control/record-{rows[1]['ledger_row']:06d}-retrain.dsse.json",
    )
    assert logged is not None
    statement = base64.b64decode(json.loads(logged)["payload"])
    import hashlib

    assert hashlib.sha256(statement).hexdigest() == rows[1]["record_sha256"]

    # A forged record appended to the ledger (payload edited, signature kept) fails verification.
    with open_ledger(layout.root) as ledger:
        real = ledger.entries(kind="change_record")[1].payload
        forged_statement = json.loads(statement)
        forged_statement["predicate"]["inside_plan"] = True
        body = json.dumps(forged_statement).encode()
        envelope = real["envelope"] | {"payload": base64.b64encode(body).decode()}
        ledger.append(
            "change_record",
            "radflow-detector:2",
            real | {"envelope": envelope, "record_sha256": hashlib.sha256(body).hexdigest()},
        )
    code, out, _ = cli(layout, "changes", "--json")
    assert code == 1
    last = json.loads(out)[-1]
    assert last["signature"] == "INVALID" and "signature" in last["signature_detail"].lower()


def test_the_model_card_holds_the_versions_metrics_and_no_patient_data(versions, gated):
    from flows import tracking
    from pipeline_steps.governance.ledger import open_ledger

    layout, *_ = versions
    card = json.loads((layout.model_card / "model_card.json").read_text())
    html = (layout.model_card / "model_card.html").read_text()
    version = card["model"]["version"]
    run_id = {"1": versions[3].run_id, "2": versions[4].run_id}[version]
    _, logged = tracking.run_record(layout, run_id)
    for name in ("ap50", "sens_at_1fp", "cpm"):
        assert card["metrics"][name]["value"] == pytest.approx(logged[name])
    assert card["metrics"]["ap50"]["ci_low"] == pytest.approx(logged["ap50_ci_low"])
    assert card["lesion_sizes"] == {"lt8_mm": pytest.approx(0.25)}
    assert any("< 8 mm: 25% found" in m for m in card["known_failure_modes"])
    assert card["training_data"]["images_by_split"] == {"test": 4, "train": 4}
    assert card["change_record"]["violations"][0]["rule"] == "fixed:train.width"
    assert "0.610" in html and "[0.520, 0.700]" in html
    assert tracking.run_artifact(layout, run_id, "model_card/model_card.html") is not None
    with open_ledger(layout.root) as ledger:
        records = json.dumps([e.payload for e in ledger.entries(kind="change_record")])
    for text in (json.dumps(card), html, records):
        for value in FAKE_PHI.values():
            assert str(value) not in text
        assert "pseudo-" not in text  # nor the pseudonyms


def test_skipped_and_failed_nights_leave_verified_records(versions):
    from flows import change_control, nightly

    layout, params, *_ = versions
    for status, why in (("skipped", "up to date"), ("failed", None)):
        summary = nightly.RunSummary(str(layout.root), f"run-{status}", "t", False, status=status)
        summary.reason = why or ""
        summary.error = None if why else "LandingError: the landing bucket did not answer"
        summary.data_version = "abc.dir"
        nightly.record_change(layout, params, summary)
        assert summary.change_record is not None
    rows = [r for r in change_control.list_records(layout) if r["kind"] in ("skipped", "failed")]
    assert [(r["kind"], r["inside_plan"], r["signature"]) for r in rows] == [
        ("skipped", None, "verified"),
        ("failed", None, "verified"),
    ]
    assert "up to date" in rows[0]["decision"] and "LandingError" in rows[1]["decision"]
