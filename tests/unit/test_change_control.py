"""Change control on plain data: the param diff, the plan's rules, the acceptance criteria, the decision,
the in-toto statement signed as DSSE (a tampered record fails), the ledger rule that blocks a promotion,
and the model card built from a version's metrics."""

from __future__ import annotations

import base64
import json

import pytest

from pipeline_steps.core.change_control_params import ChangeControlParams
from pipeline_steps.core.config import parse_params
from pipeline_steps.core.errors import ConfigError
from pipeline_steps.core.params_migrations import moved_auto_promote
from pipeline_steps.governance import change_control as cc
from pipeline_steps.governance import model_card
from pipeline_steps.governance.ledger import Ledger
from pipeline_steps.governance.signing import (
    SignatureError,
    load_keys,
    sign_payload,
    verify_envelope,
)

BASE = {"train.width": "24", "train.epochs": "16", "train.seed": "7", "test.nms_iou": "0.3"}
NO_DATA_CHANGE = cc.data_change("a.dir", "a.dir", ["h1", "h2"], ["h1", "h2"])


def test_param_diff_names_each_changed_key_both_ways():
    diff = cc.param_diff(BASE, BASE | {"train.width": "32", "train.new": "1"})
    assert diff == {
        "train.new": {"from": None, "to": "1"},
        "train.width": {"from": "24", "to": "32"},
    }
    assert cc.param_diff(BASE, dict(BASE)) == {}


def test_an_architecture_change_is_outside_the_plan_naming_the_rule():
    diff = cc.param_diff(BASE, BASE | {"train.width": "32"})
    broken = cc.check_plan(ChangeControlParams(), diff, NO_DATA_CHANGE)
    assert [v.rule for v in broken] == ["fixed:train.width"]
    assert "24 -> 32" in broken[0].detail


def test_ranges_may_change_and_unlisted_keys():
    plan = ChangeControlParams()
    inside = cc.param_diff(BASE, BASE | {"train.epochs": "32", "train.seed": "8"})
    assert cc.check_plan(plan, inside, NO_DATA_CHANGE) == []
    too_many = cc.param_diff(BASE, BASE | {"train.epochs": "100"})
    assert [v.rule for v in cc.check_plan(plan, too_many, NO_DATA_CHANGE)] == ["range:train.epochs"]
    unlisted = cc.param_diff(BASE, BASE | {"test.nms_iou": "0.5"})
    assert [v.rule for v in cc.check_plan(plan, unlisted, NO_DATA_CHANGE)] == [
        "unlisted:test.nms_iou"
    ]


def test_new_data_is_in_the_plan_dropped_data_is_not():
    grown = cc.data_change("a.dir", "b.dir", ["h1"], ["h1", "h2", "h3"])
    assert grown["new_images"] == 2 and grown["removed_images"] == 0 and grown["changed"]
    assert cc.check_plan(ChangeControlParams(), {}, grown) == []
    assert [
        v.rule for v in cc.check_plan(ChangeControlParams(allow_new_data=False), {}, grown)
    ] == ["data:new"]
    shrunk = cc.data_change("a.dir", "c.dir", ["h1", "h2"], ["h1"])
    assert [v.rule for v in cc.check_plan(ChangeControlParams(), {}, shrunk)] == ["data:removed"]
    unknown = cc.data_change(None, "a.dir", None, ["h1"])
    assert unknown["new_images"] is None and not unknown["changed"]


GATE = {
    "passed": True,
    "delta": 0.05,
    "ci_low": 0.01,
    "ci_high": 0.09,
    "checks": [
        {"name": "threshold:ap50", "passed": True, "detail": "ap50 0.6 >= floor 0.5"},
        {"name": "min_delta", "passed": True, "detail": "delta 0.05 >= 0"},
        {"name": "ci_lower_bound", "passed": True, "detail": "CI lower bound 0.01 > 0"},
    ],
}
CANDIDATE = {
    "ap50": 0.6,
    "ap50_ci_low": 0.52,
    "ap50_ci_high": 0.68,
    "subgroup.sex.f.sens_at_1fp": 0.70,
    "subgroup.sex.f.n_images": 40.0,
    "subgroup.sex.m.sens_at_1fp": 0.40,
    "subgroup.sex.m.n_images": 40.0,
    "subgroup.sex.unknown.sens_at_1fp": 0.10,
    "subgroup.sex.unknown.n_images": 3.0,
}
PRODUCTION = {
    "subgroup.sex.f.sens_at_1fp": 0.72,
    "subgroup.sex.m.sens_at_1fp": 0.65,
    "subgroup.sex.unknown.sens_at_1fp": 0.9,
}


def test_acceptance_judges_floors_on_their_bound_and_subgroups_against_production():
    plan = ChangeControlParams()
    criteria = {
        c.name: c
        for c in cc.evaluate_acceptance(plan, {"ap50": 0.5}, GATE, CANDIDATE, PRODUCTION, True)
    }
    assert criteria["floor:ap50"].passed and criteria["floor:ap50"].interval == (0.52, 0.68)
    assert criteria["gate:ci_lower_bound"].interval == (0.01, 0.09)
    assert criteria["subgroup:sex.f"].passed  # 0.70 >= 0.72 - 0.1
    assert criteria["subgroup:sex.m"].passed is False  # 0.40 < 0.65 - 0.1
    assert criteria["subgroup:sex.unknown"].passed is None  # 3 images: reported, not judged
    assert criteria["validation"].passed
    assert not cc.accepted(list(criteria.values()))
    strict = cc.evaluate_acceptance(plan, {"ap50": 0.55}, GATE, CANDIDATE, None, True)
    floor = next(c for c in strict if c.name == "floor:ap50")
    assert floor.passed is False and "0.520" in floor.detail  # the bound, not the point, is judged
    point = cc.evaluate_acceptance(
        ChangeControlParams(floor_bound="point"), {"ap50": 0.55}, GATE, CANDIDATE, None, True
    )
    assert next(c for c in point if c.name == "floor:ap50").passed
    missing = cc.evaluate_acceptance(plan, {"ap50": 0.0}, GATE, {"ap50": 0.6}, None, False)
    assert {c.name: c.passed for c in missing}["floor:ap50"] is False  # no interval: not met
    assert {c.name: c.passed for c in missing}["validation"] is False


def test_the_decision_follows_gate_plan_acceptance_and_auto_promote():
    assert cc.decide(True, False, True, True)[0] == ()
    stages, words = cc.decide(False, True, True, True)
    assert stages == () and "outside the change control plan" in words
    assert cc.decide(True, True, False, True)[0] == ("staging",)
    assert cc.decide(True, True, True, False)[0] == ("staging",)
    assert cc.decide(True, True, True, True)[0] == ("staging", "production")


def _record(violations=()):
    predicate = cc.build_predicate(
        "retrain",
        model="m",
        version="2",
        time="2026-12-06T00:00:00+00:00",
        actor="radflow-pipeline",
        decision="stays candidate",
        violations=violations,
        plan=ChangeControlParams(),
    )
    return cc.statement([cc.data_subject("abc.dir")], predicate)


def test_the_statement_is_in_toto_v1_and_its_signature_catches_tampering(tmp_path):
    stmt = _record([cc.Violation("fixed:train.width", "changed")])
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["subject"] == [{"name": "data/raw", "digest": {"md5": "abc"}}]
    assert stmt["predicateType"].startswith("https://radflow")
    assert stmt["predicate"]["inside_plan"] is False
    keys = load_keys(tmp_path / ".radflow", env={})
    envelope = sign_payload(keys, cc.statement_bytes(stmt), cc.PAYLOAD_TYPE)
    assert json.loads(verify_envelope(envelope, keys)) == json.loads(cc.statement_bytes(stmt))
    forged = dict(stmt, predicate=dict(stmt["predicate"], inside_plan=True, violations=[]))
    tampered = envelope | {"payload": base64.b64encode(cc.statement_bytes(forged)).decode()}
    with pytest.raises(SignatureError, match="[Bb]ad signature"):
        verify_envelope(tampered, keys)


def test_an_outside_plan_record_in_the_ledger_blocks_promotion(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        assert cc.plan_requirements(cc.latest_judged(ledger, "m", "2"), "2") == []
        for kind, inside in (("retrain", False), ("override", None)):
            ledger.append(
                cc.LEDGER_KIND,
                cc.ledger_subject("m", "2"),
                {
                    "kind": kind,
                    "inside_plan": inside,
                    "violations": [{"rule": "fixed:train.width", "detail": "24 -> 32"}],
                },
            )
        entry = cc.latest_judged(ledger, "m", "2")
        assert entry is not None and entry.payload["kind"] == "retrain"  # not the override
        (reason,) = cc.plan_requirements(entry, "2")
        assert "outside the change control plan" in reason and "fixed:train.width" in reason


def test_gate_auto_promote_moves_to_change_control_with_a_warning(caplog):
    params = parse_params({"gate": {"auto_promote": True}})
    assert params.change_control.auto_promote is True
    assert "change_control.auto_promote" in caplog.text
    with pytest.raises(ConfigError, match="both"):
        moved_auto_promote(
            {"gate": {"auto_promote": True}, "change_control": {"auto_promote": False}}, "p.yaml"
        )
    with pytest.raises(ConfigError, match="fixed and given a range"):
        parse_params({"change_control": {"ranges": {"train.width": [1, 2]}}})


def test_the_model_card_holds_the_metrics_and_names_what_the_model_misses():
    metrics = {
        "ap50": 0.488,
        "ap50_ci_low": 0.412,
        "ap50_ci_high": 0.558,
        "sens_at_1fp": 0.556,
        "n_images": 300.0,
        "lesion_size.lt8mm.sens_at_1fp": 0.062,
        "lesion_size.gt_20mm.sens_at_1fp": 0.9,
        "subgroup.manufacturer.acme.sens_at_1fp": 0.3,
        "subgroup.manufacturer.acme.n_images": 50.0,
    }
    card = model_card.build_card(
        model="m",
        version="3",
        tags={"data_version": "abc.dir"},
        metrics=metrics,
        intended_use={"purpose": "p", "limits": ["l <b>"]},
        training_data={"images_by_split": {"train": 10}},
        record=_record()["predicate"],
        record_row=7,
        record_sha256="f" * 64,
    )
    assert card["metrics"]["ap50"] == {
        "label": "AP@0.5",
        "value": 0.488,
        "ci_low": 0.412,
        "ci_high": 0.558,
    }
    assert card["lesion_sizes"] == {"gt_20mm": 0.9, "lt8mm": 0.062}
    modes = card["known_failure_modes"]
    assert any("lesions of < 8 mm: 6% found" in m for m in modes)
    assert any("acme" in m for m in modes) and not any(">= 20 mm" in m for m in modes)
    html = model_card.render_html(card)
    assert "0.488" in html and "[0.412, 0.558]" in html and "l &lt;b&gt;" in html
    assert "&gt;= 20 mm" in html and "[-, -]" not in html


def test_the_cards_training_data_counts_splits_manufacturers_and_lesion_sizes(tmp_path):
    from datetime import UTC, datetime

    import pandas as pd

    from flows.model_card import training_data
    from flows.registry import VersionInfo
    from pipeline_steps.core.config import Params
    from pipeline_steps.core.layout import Layout

    layout = Layout(tmp_path)
    layout.manifest.parent.mkdir(parents=True)
    layout.metadata.parent.mkdir(parents=True, exist_ok=True)
    layout.registration.parent.mkdir(parents=True)
    ids = ["a", "b", "c", "d"]
    pd.DataFrame(
        {"image_id": ids, "split": ["train", "train", "train", "test"], "patient_pseudonym": ids}
    ).to_parquet(layout.manifest)
    pd.DataFrame(
        {
            "image_id": ids,
            "manufacturer": ["Acme", "Acme", "", "Other"],
            "spacing_col_mm": [0.5] * 4,
            "spacing_row_mm": [0.5] * 4,
        }
    ).to_parquet(layout.metadata)
    # 10 px x 0.5 mm = 5 mm, 50 px = 25 mm; the test image's lesion is not training data.
    pd.DataFrame(
        {
            "image_id": ["a", "b", "d"],
            "x_min": [0.0, 0.0, 0.0],
            "y_min": [0.0, 0.0, 0.0],
            "x_max": [10.0, 50.0, 10.0],
            "y_max": [10.0, 50.0, 10.0],
        }
    ).to_parquet(layout.labels)
    layout.registration.write_text(json.dumps({"model_version": "3"}))
    info = VersionInfo("3", "run", datetime.now(UTC), {"data_version": "abc.dir"}, ())
    summary = training_data(layout, Params(), info)
    assert summary["images_by_split"] == {"test": 1, "train": 3}
    assert summary["manufacturers_of_training_images"] == {"Acme": 2, "unknown": 1}
    assert summary["training_lesions_by_diameter"] == {"<8mm": 1, ">=20mm": 1}
    assert list(model_card.by_size({">=20mm": 1, "12-20mm": 2, "<8mm": 3, "8-12mm": 4})) == [
        "<8mm",
        "8-12mm",
        "12-20mm",
        ">=20mm",
    ]
    assert list(
        model_card.lesion_table(
            {f"lesion_size.{s}.sens_at_1fp": 0.5 for s in ("gt_20mm", "12-20mm", "lt8mm", "8-12mm")}
        )
    ) == ["lt8mm", "8-12mm", "12-20mm", "gt_20mm"]
    other = VersionInfo("4", "run", datetime.now(UTC), {}, ())
    assert "another version's" in training_data(layout, Params(), other)["note"]
