import json

import numpy as np
import pandas as pd
import pytest

from pipeline_steps import features as features_step
from pipeline_steps.config import DriftParams, ExtractFeaturesParams
from pipeline_steps.features import content_mask, glcm, image_features, texture_features
from pipeline_steps.layout import Layout
from pipeline_steps.preprocess import QUANT, Letterbox, plan_geometry


def test_glcm_counts_symmetric_pairs_by_hand():
    q = np.array([[0, 0, 1], [0, 1, 1]])
    p = glcm(q, np.ones_like(q, bool), (0, 1), levels=2)
    # horizontal pairs (0,0) (0,1) (0,1) (1,1); symmetric -> [[2, 2], [2, 2]] / 8
    assert np.allclose(p, 0.25)
    vertical = glcm(q, np.ones_like(q, bool), (1, 0), levels=2)
    # vertical pairs (0,0) (0,1) (1,1) -> [[2, 1], [1, 2]] / 6
    assert np.allclose(vertical, np.array([[2, 1], [1, 2]]) / 6)


def test_glcm_ignores_pairs_that_touch_the_padding():
    q = np.array([[0, 1, 1, 1]])
    field = np.array([[False, True, True, True]])
    p = glcm(q, field, (0, 1), levels=2)
    assert p[1, 1] == pytest.approx(1.0)  # the (0, 1) pair crosses into the padding


def test_texture_measures_order_checkerboard_above_smooth():
    yy, xx = np.mgrid[0:64, 0:64]
    checker = ((yy + xx) % 2).astype(np.float32) * 0.9 + 0.05
    smooth = (xx / 64.0).astype(np.float32)
    field = np.ones((64, 64), bool)
    rough = texture_features(checker, field, levels=8, distances=(1,))
    calm = texture_features(smooth, field, levels=8, distances=(1,))
    assert rough["glcm_contrast_d1"] > 10 * calm["glcm_contrast_d1"]
    assert rough["glcm_homogeneity_d1"] < calm["glcm_homogeneity_d1"]
    assert rough["glcm_correlation_d1"] < 0 < calm["glcm_correlation_d1"]
    assert calm["glcm_correlation_d1"] == pytest.approx(1.0, abs=0.2)


def test_features_do_not_depend_on_the_letterbox_padding():
    rng = np.random.default_rng(0)
    content = np.clip(rng.normal(0.5, 0.15, (60, 40)), 0, 1).astype(np.float32)
    content[::7] = 0.0  # black pixels inside the image must still count as image
    params = ExtractFeaturesParams()
    narrow, wide = np.zeros((64, 64), np.float32), np.zeros((64, 64), np.float32)
    narrow[2:62, 12:52] = content
    wide[0:60, 0:40] = content
    narrow_field = np.zeros((64, 64), bool)
    narrow_field[2:62, 12:52] = True
    f_narrow = image_features(narrow, params, narrow_field)
    wide_field = np.zeros((64, 64), bool)
    wide_field[0:60, 0:40] = True
    f_wide = image_features(wide, params, wide_field)
    for name in ("mean", "std", "q05", "q50", "glcm_contrast_d1", "glcm_energy_d4"):
        assert f_narrow[name] == pytest.approx(f_wide[name]), name
    assert f_narrow["mean"] == pytest.approx(float(content.mean()))


def test_content_mask_is_exactly_the_resized_image():
    g = plan_geometry(400, 300, 0.7, 0.7, 128, 2.8)
    image = Letterbox(g)(np.full((400, 300), 0.5, np.float32))
    row = {"orig_rows": 400, "orig_cols": 300, "scale_x": g.scale_x, "scale_y": g.scale_y}
    mask = content_mask({**row, "pad_x": g.pad_x, "pad_y": g.pad_y}, 128)
    assert np.array_equal(mask, image > 0)


def _processed(tmp_path, n=6):
    """A processed folder written by hand: one shard, its manifest."""
    layout = Layout(tmp_path)
    shards = layout.processed / "shards"
    shards.mkdir(parents=True)
    g = plan_geometry(256, 200, 1.4, 1.4, 128, 2.8)
    rng = np.random.default_rng(5)
    images, rows = [], []
    for i in range(n):
        pixels = np.clip(rng.normal(0.3 + 0.05 * i, 0.1, (256, 200)), 0, 1).astype(np.float32)
        images.append(np.rint(Letterbox(g)(pixels) * QUANT).astype(np.uint16))
        rows.append(
            {
                "image_id": f"img{i}",
                "split": "train" if i < 4 else "unlabelled",
                "shard": "all-0000.npy",
                "index": i,
                "orig_rows": 256,
                "orig_cols": 200,
                "scale_x": g.scale_x,
                "scale_y": g.scale_y,
                "pad_x": g.pad_x,
                "pad_y": g.pad_y,
            }
        )
    np.save(shards / "all-0000.npy", np.stack(images))
    pd.DataFrame(rows).to_parquet(layout.manifest)
    return layout


def test_stage_writes_a_row_per_image_and_a_drift_report(tmp_path):
    layout = _processed(tmp_path)
    seen = []
    table = features_step.run(layout, ExtractFeaturesParams(), lambda d, t: seen.append((d, t)))
    assert sorted(table["image_id"]) == [f"img{i}" for i in range(6)]
    assert seen[-1] == (6, 6)
    assert {"glcm_contrast_d1", "glcm_homogeneity_d4", "lung_coverage", "q95"} <= set(table.columns)
    assert table["mean"].is_monotonic_increasing  # the synthetic images brighten with i
    stored = pd.read_parquet(layout.features)
    pd.testing.assert_frame_equal(stored, table)
    drift = json.loads((layout.reports / "drift" / "drift.json").read_text())
    assert drift["status"] == "no_reference" and drift["drift"] is False

    # against itself as reference: nothing drifts
    stored.to_parquet(tmp_path / "reference.parquet")
    params = ExtractFeaturesParams(drift=DriftParams(reference="reference.parquet"))
    features_step.run(layout, params)
    drift = json.loads((layout.reports / "drift" / "drift.json").read_text())
    assert drift["status"] == "compared" and drift["drift"] is False
    assert max(f["ks"] for f in drift["features"]) == 0.0
    assert (layout.reports / "drift" / "drift.html").read_text().count("<img ") == len(
        drift["features"]
    )


def test_an_all_black_image_still_gets_finite_features():
    feats = image_features(np.zeros((32, 32), np.float32), ExtractFeaturesParams())
    assert all(np.isfinite(v) for k, v in feats.items() if not k.startswith("glcm_correlation"))
    assert feats["mean"] == 0.0 and feats["field_fraction"] == 1.0
