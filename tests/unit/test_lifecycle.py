"""Stage rules as pure functions: alias plans, one stage per version, replay, rollback target, the gate."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_steps.core.config import GateParams
from pipeline_steps.gate import decide_gate, evaluate_gate, gate_metric, paired_bootstrap
from pipeline_steps.governance.lifecycle import (
    ARCHIVED,
    AliasOp,
    GateDecision,
    Move,
    TagOp,
    TransitionError,
    UnknownLifecycle,
    lifecycle_map,
    parse_lifecycle,
    plan_transition,
    previous_production,
    promotion_requirements,
    replay,
)

WHEN = "2026-11-23T10:00:00.000000+00:00"


def _apply(aliases: dict[str, str], tags: dict[str, dict[str, str]], ops) -> None:
    """What the registry does with a plan, on dicts."""
    for op in ops:
        if isinstance(op, AliasOp):
            if op.version is None:
                del aliases[op.alias]
            else:
                aliases[op.alias] = op.version
        elif op.value is None:
            del tags[op.version][op.key]
        else:
            tags.setdefault(op.version, {})[op.key] = op.value


def test_stage_names_and_the_champion_synonym():
    assert parse_lifecycle("Production") == "production"
    assert parse_lifecycle("champion") == "production"
    with pytest.raises(UnknownLifecycle, match="candidate, staging, production"):
        parse_lifecycle("prod")
    with pytest.raises(UnknownLifecycle, match="staging, production"):
        parse_lifecycle("candidate", allowed=("staging", "production"))


def test_promotion_to_production_moves_both_aliases_and_archives_the_old_champion():
    aliases = {"production": "1", "champion": "1", "staging": "2", "candidate": "3"}
    plan = plan_transition(aliases, {}, "2", "production", WHEN)
    assert plan.moves == (Move("2", "staging", "production"), Move("1", "production", ARCHIVED))
    assert plan.aliases_after == {"production": "2", "champion": "2", "candidate": "3"}
    # the serving alias moves first: a failure after it never leaves production empty
    assert plan.ops[0] == AliasOp("production", "2", "1")
    assert TagOp("1", ARCHIVED, WHEN, None) in plan.ops
    live, tags = dict(aliases), {}
    _apply(live, tags, plan.ops)
    assert live == plan.aliases_after and tags == {"1": {ARCHIVED: WHEN}}


def test_every_plan_keeps_one_stage_per_version():
    aliases = {"production": "1", "champion": "1", "staging": "2", "candidate": "3"}
    for version, stage in [("3", "staging"), ("3", "production"), ("4", "candidate")]:
        after = plan_transition(aliases, {}, version, stage, WHEN).aliases_after
        held = [v for v in lifecycle_map(after).values()]
        assert len(held) == len(set(held)), (version, stage, after)


def test_a_new_candidate_takes_the_alias_from_the_previous_one():
    plan = plan_transition({"candidate": "3"}, {}, "4", "candidate", WHEN)
    assert plan.moves == (Move("4", None, "candidate"), Move("3", "candidate", None))
    assert plan.aliases_after == {"candidate": "4"}


def test_refused_transitions_name_the_version_and_why():
    aliases = {"production": "1", "champion": "1", "staging": "2"}
    with pytest.raises(TransitionError, match="version 2 is already in staging"):
        plan_transition(aliases, {}, "2", "staging", WHEN)
    with pytest.raises(TransitionError, match="rollback"):
        plan_transition(aliases, {}, "1", "staging", WHEN)
    with pytest.raises(TransitionError, match="only a newly registered version"):
        plan_transition(aliases, {}, "2", "candidate", WHEN)


def test_an_archived_version_back_in_production_loses_the_archived_tag():
    aliases = {"production": "2", "champion": "2"}
    plan = plan_transition(aliases, {"1": WHEN}, "1", "production", "later")
    assert plan.moves[0] == Move("1", ARCHIVED, "production")
    assert TagOp("1", ARCHIVED, None, WHEN) in plan.ops
    assert TagOp("2", ARCHIVED, "later", None) in plan.ops


def test_undoing_a_plan_restores_aliases_and_tags_exactly():
    aliases = {"production": "1", "champion": "1", "staging": "2", "candidate": "3"}
    tags = {"1": {"x": "y"}, "2": {ARCHIVED: "old"}}
    plan = plan_transition(aliases, {"2": "old"}, "2", "production", WHEN)
    live, live_tags = dict(aliases), {k: dict(v) for k, v in tags.items()}
    _apply(live, live_tags, plan.ops)
    assert live != aliases
    _apply(live, live_tags, [op.undo() for op in reversed(plan.ops)])
    assert live == aliases and live_tags == tags


def test_a_version_the_gate_never_decided_on_goes_nowhere_past_candidate():
    # A run killed between `register` and the gate leaves such a version: it was never judged.
    for stage in ("staging", "production", "champion"):
        unmet = promotion_requirements("4", stage, None, "true", "d.dir")
        assert len(unmet) == 1 and "version 4 was never evaluated by the gate" in unmet[0]
    assert promotion_requirements("4", "candidate", None, None) == []


def test_production_needs_a_passed_gate_and_validated_data_staging_only_a_decision():
    failed = GateDecision(False, "failed: ap50 0.10 < 0.20", 7)
    passed = GateDecision(True, "passed", 9)
    assert promotion_requirements("4", "staging", failed, "false") == []
    assert promotion_requirements("4", "production", passed, "true") == []
    unmet = promotion_requirements("4", "production", failed, "false", "d.dir")
    assert unmet == [
        "version 4 failed its gate (ledger row 7: failed: ap50 0.10 < 0.20)",
        "the validation of its data version d.dir did not pass (tag validation_passed=false)",
    ]
    assert "validation_passed=missing" in promotion_requirements("4", "production", passed, None)[0]


def test_replay_and_the_rollback_target():
    moves = [
        Move("1", None, "candidate"),
        Move("1", "candidate", "staging"),
        Move("1", "staging", "production"),
        Move("2", None, "candidate"),
        Move("2", "candidate", "production"),
        Move("1", "production", ARCHIVED),
    ]
    assert replay(moves) == {"production": "2"}
    assert previous_production(moves) == "1"
    rolled = [*moves, Move("1", ARCHIVED, "production"), Move("2", "production", ARCHIVED)]
    assert replay(rolled) == {"production": "1"}
    assert previous_production(rolled) == "2"  # a second rollback undoes the first
    assert previous_production(moves[:3]) is None


# --------------------------------------------------------------------------------------------
# The gate


def _scene(n_patients: int = 30, seed: int = 0):
    """Test images with one lesion each; a good model finds it, a poor one scores noise higher."""
    rng = np.random.default_rng(seed)
    gts, good, poor, patients = [], [], [], []
    for p in range(n_patients):
        for _ in range(2):
            x, y = rng.uniform(50, 400, size=2)
            box = np.array([[x, y, x + 30, y + 30]])
            far = np.array([[x + 200, y + 200, x + 230, y + 230]])
            gts.append(box)
            good.append(np.column_stack([np.vstack([box, far]), [0.9, 0.2]]))
            poor.append(np.column_stack([np.vstack([box, far]), [0.3, 0.8]]))
            patients.append(f"p{p}")
    return gts, good, poor, patients


def test_paired_bootstrap_of_identical_models_is_exactly_zero():
    gts, good, _, patients = _scene()
    delta, low, high = paired_bootstrap(gate_metric("ap50"), good, good, gts, patients, 50, 0, 0.95)
    assert delta == low == high == 0.0


def test_paired_bootstrap_sees_a_clearly_better_model():
    gts, good, poor, patients = _scene()
    delta, low, high = paired_bootstrap(
        gate_metric("ap50"), good, poor, gts, patients, 100, 0, 0.95
    )
    assert delta > 0.3 and 0 < low <= delta <= high


def test_paired_bootstrap_resamples_patients_not_images():
    # One patient holds every image: every draw is the whole set, so the interval collapses.
    gts, good, poor, _ = _scene()
    delta, low, high = paired_bootstrap(
        gate_metric("ap50"), good, poor, gts, ["one"] * len(gts), 30, 0, 0.95
    )
    assert low == pytest.approx(delta) and high == pytest.approx(delta)


def test_gate_passes_a_better_candidate_to_staging_only_without_auto_promote():
    gts, good, poor, patients = _scene()
    params = GateParams(thresholds={"ap50": 0.5}, n_boot=100)
    result = evaluate_gate(good, poor, gts, patients, params)
    assert result.passed and result.promote_to == ("staging",)
    assert result.production is not None and result.delta == pytest.approx(
        result.candidate - result.production
    )
    assert result.ci_low > 0 and result.n_patients == 30 and result.n_images == 60
    auto = evaluate_gate(good, poor, gts, patients, params, auto_promote=True)
    assert auto.promote_to == ("staging", "production")


def test_gate_fails_a_candidate_that_is_not_better():
    gts, good, poor, patients = _scene()
    params = GateParams(thresholds={}, n_boot=50)
    same = evaluate_gate(good, good, gts, patients, params)
    assert not same.passed and same.promote_to == ()
    assert "CI of the delta" in same.reason  # delta 0 passes min_delta 0, the CI does not
    worse = evaluate_gate(poor, good, gts, patients, params)
    assert not worse.passed and "delta" in worse.reason


def test_gate_fails_on_an_absolute_threshold_even_without_a_champion():
    gts, _, poor, patients = _scene()
    result = evaluate_gate(poor, None, gts, patients, GateParams(thresholds={"ap50": 0.99}))
    assert not result.passed and "ap50" in result.reason and result.production is None
    first = evaluate_gate(poor, None, gts, patients, GateParams(thresholds={}))
    assert first.passed and first.delta is None and "no production model" in first.reason


def test_min_delta_is_required_beyond_a_positive_interval():
    decision = decide_gate(
        {"ap50": 0.80},
        {"ap50": 0.78},
        (0.02, 0.01, 0.03),
        GateParams(thresholds={}, min_delta=0.05),
        n_images=10,
        n_patients=5,
    )
    assert not decision.passed
    assert [c.name for c in decision.checks if not c.passed] == ["min_delta"]


def test_an_undefined_metric_never_passes():
    decision = decide_gate(
        {"ap50": float("nan")},
        None,
        None,
        GateParams(thresholds={"ap50": 0.0}),
        n_images=3,
        n_patients=3,
    )
    assert not decision.passed


def _details(decision) -> dict[str, str]:
    return {c.name: c.detail for c in decision.checks}


def test_gate_messages_state_the_comparison_that_held():
    params = GateParams(thresholds={"ap50": 0.5}, min_delta=0.05)
    failed = decide_gate({"ap50": 0.4698}, {"ap50": 0.45}, (0.0198, -0.01, 0.04), params, 10, 5)
    assert failed.reason == (
        "failed: ap50 0.470 < floor 0.5; ap50 delta over production 0.020 < min_delta 0.05; "
        "95% CI of the delta [-0.010, 0.040]: lower bound -0.010 <= 0"
    )
    passed = decide_gate({"ap50": 0.612}, {"ap50": 0.5}, (0.112, 0.031, 0.19), params, 10, 5)
    assert passed.passed and _details(passed) == {
        "threshold:ap50": "ap50 0.612 >= floor 0.5",
        "min_delta": "ap50 delta over production 0.112 >= min_delta 0.05",
        "ci_lower_bound": "95% CI of the delta [0.031, 0.190]: lower bound 0.031 > 0",
    }


def test_gate_messages_never_round_a_value_onto_the_wrong_side_of_its_bound():
    params = GateParams(thresholds={"ap50": 0.5})
    near = decide_gate({"ap50": 0.49996}, {"ap50": 0.4}, (0.0004, 0.00004, 0.1), params, 10, 5)
    assert _details(near)["threshold:ap50"] == "ap50 0.49996 < floor 0.5"
    assert _details(near)["ci_lower_bound"].endswith("lower bound 0.00004 > 0")
    undefined = decide_gate({"ap50": float("nan")}, None, None, params, 3, 3)
    assert undefined.reason == "failed: ap50 is undefined (nan), needs >= floor 0.5"
