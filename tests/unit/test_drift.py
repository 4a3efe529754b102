import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline_steps.core import drift
from pipeline_steps.core.config import DriftParams
from pipeline_steps.core.drift import compare, ks_statistic, psi, write_report
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.layout import Layout


def test_psi_by_hand_on_two_bins():
    reference = np.array([0.0, 0.0, 1.0, 1.0])  # edge at the median: half and half
    current = np.array([0.0, 1.0, 1.0, 1.0])  # a quarter and three quarters
    expected = (0.25 - 0.5) * np.log(0.25 / 0.5) + (0.75 - 0.5) * np.log(0.75 / 0.5)
    assert psi(reference, current, bins=2) == pytest.approx(expected)


def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 5000)
    assert psi(reference, reference) == pytest.approx(0.0)
    assert psi(reference, rng.normal(0, 1, 5000)) < 0.02
    small, large = psi(reference, rng.normal(0.3, 1, 5000)), psi(reference, rng.normal(1, 1, 5000))
    assert 0.02 < small < large and large > 0.5


def test_psi_sees_a_shift_away_from_a_constant_reference_either_way():
    reference = np.full(100, 3.0)
    assert psi(reference, np.full(100, 3.0)) == pytest.approx(0.0)
    assert psi(reference, np.full(100, 3.5)) > 1.0
    assert psi(reference, np.full(100, 2.5)) > 1.0


def test_ks_statistic_matches_scipy():
    rng = np.random.default_rng(1)
    for shift in (0.0, 0.2, 1.0):
        a, b = rng.normal(0, 1, 700), rng.normal(shift, 1.3, 450)
        assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic)
    assert ks_statistic(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    ties = np.array([1.0, 1.0, 2.0, 2.0])
    assert ks_statistic(ties, ties) == 0.0


def _tables(shift=0.0, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    ref = pd.DataFrame(
        {
            "image_id": [f"r{i}" for i in range(n)],
            "split": "train",
            "mean": rng.normal(0.5, 0.1, n),
            "noise": rng.gamma(2.0, 0.01, n),
            "flag": rng.random(n) < 0.5,  # boolean: not a feature
            "only_ref": rng.random(n),
        }
    )
    cur = pd.DataFrame(
        {
            "image_id": [f"c{i}" for i in range(n)],
            "split": "unlabelled",
            "mean": rng.normal(0.5 + shift, 0.1, n),
            "noise": rng.gamma(2.0, 0.01, n),
            "flag": rng.random(n) < 0.5,
        }
    )
    return ref, cur


def test_compare_flags_only_the_shifted_feature_and_decides_by_threshold():
    ref, cur = _tables(shift=0.05)
    report = compare(ref, cur, DriftParams())
    by_name = {f.name: f for f in report.features}
    assert set(by_name) == {"mean", "noise"} and report.skipped == ("only_ref",)
    assert by_name["mean"].flagged_by == ("psi", "ks")
    assert not by_name["noise"].flagged and report.drift and report.flagged == ["mean"]
    assert by_name["mean"].ks_pvalue < 1e-6 < by_name["noise"].ks_pvalue

    lenient = compare(ref, cur, DriftParams(psi=50.0, ks=0.9))
    assert not lenient.drift and lenient.flagged == []
    two_needed = compare(ref, cur, DriftParams(min_drifted_features=2))
    assert two_needed.flagged == ["mean"] and not two_needed.drift
    assert report.metrics()["drift"] == 1.0 and two_needed.metrics()["drift"] == 0.0


def test_compare_ignores_missing_values():
    ref, cur = _tables()
    cur.loc[:99, "noise"] = np.nan
    report = compare(ref, cur, DriftParams())
    noise = next(f for f in report.features if f.name == "noise")
    assert noise.n_current == len(cur) - 100 and np.isfinite(noise.psi)


def test_report_is_written_as_json_and_an_html_table_with_plots(tmp_path):
    ref, cur = _tables(shift=0.05)
    report = compare(ref, cur, DriftParams())
    layout = Layout(tmp_path)
    write_report(report, ref, cur, layout)
    saved = json.loads((tmp_path / "reports" / "drift" / "drift.json").read_text())
    assert saved["drift"] is True and saved["flagged"] == ["mean"]
    assert [f["flagged"] for f in saved["features"]] == [True, False]
    page = layout.drift_page.read_text()
    assert "Drift: YES" in page and page.count("data:image/png;base64,") == 2
    assert page.index(">mean<") < page.index(">noise<")  # flagged features first


def test_run_names_the_key_when_the_reference_is_missing(tmp_path):
    layout = Layout(tmp_path)
    ref, cur = _tables()
    with pytest.raises(DataError, match=r"extract_features\.drift\.reference"):
        drift.run(layout, DriftParams(reference="nope.parquet"), cur)
    ref.to_parquet(tmp_path / "ref.parquet")
    result = drift.run(layout, DriftParams(reference="ref.parquet"), cur)
    assert result is not None and not result.drift and result.reference == "ref.parquet"
    assert json.loads((layout.reports / "drift" / "drift.json").read_text())["reference"] == (
        "ref.parquet"
    )


def test_embedding_drift_compares_only_embeddings_of_the_same_model():
    rng = np.random.default_rng(0)
    ref = pd.DataFrame(rng.normal(size=(300, 3)), columns=["emb_000", "emb_001", "emb_002"])
    cur = ref.copy()
    cur["emb_001"] += 2.0  # one dimension moved
    params = DriftParams()
    same = drift.embedding_drift(ref, "det/3", cur, "det/3", params)
    assert same["status"] == "compared" and same["flagged"] == ["emb_001"]
    assert same["dimensions"] == 3
    other = drift.embedding_drift(ref, "det/2", cur, "det/3", params)
    assert other["status"] == "model_mismatch" and "flagged" not in other
    assert drift.embedding_drift(None, "", cur, "det/3", params)["status"] == (
        "no_reference_embeddings"
    )
    assert drift.embedding_drift(ref, "det/3", None, "", params)["status"] == "no_embeddings"
