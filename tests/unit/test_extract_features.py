import json
import shutil

import numpy as np
import pandas as pd
import pytest

from pipeline_steps import extract_features as features_step
from pipeline_steps.core.config import DriftParams, ExtractFeaturesParams
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.shards import QUANT
from pipeline_steps.core.transforms import Letterbox, plan_geometry
from pipeline_steps.extract_features import content_mask, glcm, image_features, texture_features


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


def _processed(tmp_path, n=6, keyed=False):
    """A processed folder written by hand: one shard, its manifest (with the preprocess cache keys
    when `keyed`: image i's key depends on i alone, as a content hash would)."""
    layout = Layout(tmp_path)
    shards = layout.processed / "shards"
    shards.mkdir(parents=True, exist_ok=True)
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
            | ({"cache_key": f"key{i:04d}"} if keyed else {})
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


# --------------------------------------------------------------------------------------------
# CNN embeddings and incremental rows


def _detector(seed, size=64, width=8, depth=3):
    """A tiny randomly initialised radflow detector (the architecture the champion has)."""
    import keras

    from pipeline_steps.core.config import TrainParams
    from pipeline_steps.core.detector import build_detector

    keras.utils.set_random_seed(seed)
    return build_detector(size, TrainParams(width=width, depth=depth))


def test_backbone_layer_is_the_deepest_widest_map_not_the_neck():
    import keras

    from pipeline_steps.core.config import TrainParams
    from pipeline_steps.core.detector import stage_channels

    model = _detector(0, size=64, width=8, depth=3)
    name = features_step.backbone_layer(model, 64)
    layer = model.get_layer(name)
    # stride 2 ** (depth + 1) = 16 -> 4x4 at 64 px; channels of the last residual stage
    probe = keras.Model(model.inputs[0], layer.output)
    out = probe(np.zeros((1, 64, 64, 1), np.float32), training=False)
    assert tuple(out.shape) == (1, 4, 4, stage_channels(TrainParams(width=8, depth=3))[-1])
    assert isinstance(layer, keras.layers.ReLU)
    (source,) = [n.operation for n in layer._inbound_nodes[0].parent_nodes]
    assert isinstance(source, keras.layers.Add)  # the residual stage's output, not the neck


def test_embeddings_have_one_vector_per_image_and_are_deterministic():
    rng = np.random.default_rng(1)
    images = rng.random((5, 64, 64)).astype(np.float32)
    embed = features_step.build_embedder(_detector(0), 64, model_version="m/1")
    first = embed(images)
    assert first.shape == (5, 64) and first.dtype == np.float32  # 8 * 8 channels at depth 3
    assert np.isfinite(first).all() and first.std(axis=0).max() > 0
    assert np.array_equal(embed(images), first)
    # the same image alone or among others (batches are padded to a fixed size)
    assert np.array_equal(embed(images[3:4])[0], first[3])
    # a rebuilt model with the same weights gives the same vectors
    again = features_step.build_embedder(_detector(0), 64, model_version="m/1")
    assert np.array_equal(again(images), first)


def test_embeddings_change_when_the_model_changes():
    rng = np.random.default_rng(2)
    images = rng.random((4, 64, 64)).astype(np.float32)
    a = features_step.build_embedder(_detector(0), 64, model_version="m/1")
    b = features_step.build_embedder(_detector(1), 64, model_version="m/2")
    assert a.cache_id != b.cache_id
    assert not np.allclose(a(images), b(images))


def test_stage_writes_embeddings_with_their_model_version_and_drops_them_without_a_champion(
    tmp_path,
):
    import pyarrow.parquet as pq

    layout = _processed(tmp_path, keyed=True)
    params = ExtractFeaturesParams()
    embed = features_step.build_embedder(_detector(0, size=128), 128, model_version="det/3")
    result = features_step.build_features(layout, params, embedder=embed)
    path = layout.embeddings
    stored = pd.read_parquet(path)
    assert list(stored["image_id"]) == list(result.table["image_id"])
    assert set(stored["model_version"]) == {"det/3"}
    vectors = stored.filter(like=features_step.EMBEDDING_PREFIX).to_numpy(np.float32)
    assert vectors.shape == (6, 64)
    images = np.load(layout.processed / "shards" / "all-0000.npy").astype(np.float32) / QUANT
    assert np.array_equal(vectors, embed(images))
    metadata = pq.read_schema(path).metadata
    assert metadata[b"radflow:model_version"] == b"det/3"
    assert metadata[b"radflow:layer"] == embed.layer.encode()
    # the radiomic table does not carry them (it is the DVC out; embeddings are not)
    assert not any(c.startswith(features_step.EMBEDDING_PREFIX) for c in result.table.columns)

    # no champion: the stage succeeds, the radiomic table is the same, and no stale embeddings stay
    without = features_step.build_features(layout, params)
    assert not path.exists() and without.embeddings is None
    pd.testing.assert_frame_equal(without.table, result.table)


def test_a_model_that_cannot_embed_costs_the_embeddings_not_the_stage(tmp_path, caplog):
    layout = _processed(tmp_path, keyed=True)
    embed = features_step.build_embedder(_detector(0, size=128), 128, model_version="det/3")
    features_step.build_features(layout, ExtractFeaturesParams(), embedder=embed)

    def refuses(batch, training):  # e.g. a champion of another architecture or input size
        raise ValueError("bad input")

    broken = features_step.Embedder(refuses, "det/4", "", "x")
    result = features_step.build_features(layout, ExtractFeaturesParams(), embedder=broken)
    assert result.embeddings is None and len(result.table) == 6
    assert not layout.embeddings.exists()
    assert "det/4 could not embed the images (ValueError: bad input)" in caplog.text


def test_rerun_computes_only_the_new_images_rows_and_matches_a_fresh_run(tmp_path):
    params = ExtractFeaturesParams()
    embed = features_step.build_embedder(_detector(0, size=128), 128, model_version="det/3")
    layout = _processed(tmp_path / "ws", n=6, keyed=True)
    cache = tmp_path / "cache"
    first = features_step.build_features(layout, params, embedder=embed, cache_dir=cache)
    assert (first.stats.computed, first.stats.embedded) == (6, 6)
    same = features_step.build_features(layout, params, embedder=embed, cache_dir=cache)
    assert (same.stats.computed, same.stats.embedded) == (0, 0)

    # a night with two new studies: the same six images, plus two
    shutil.rmtree(layout.processed)
    layout = _processed(tmp_path / "ws", n=8, keyed=True)
    grown = features_step.build_features(layout, params, embedder=embed, cache_dir=cache)
    assert (grown.stats.computed, grown.stats.embedded) == (2, 2)
    fresh = features_step.build_features(layout, params, embedder=embed, cache_dir=tmp_path / "c2")
    assert (fresh.stats.computed, fresh.stats.embedded) == (8, 8)
    pd.testing.assert_frame_equal(grown.table, fresh.table, check_exact=True)
    pd.testing.assert_frame_equal(grown.embeddings, fresh.embeddings, check_exact=True)

    # feature params that change values invalidate the radiomic rows, not the embeddings
    coarser = ExtractFeaturesParams(glcm_levels=16)
    changed = features_step.build_features(layout, coarser, embedder=embed, cache_dir=cache)
    assert (changed.stats.computed, changed.stats.embedded) == (8, 0)
    # drift thresholds do not change a row
    looser = ExtractFeaturesParams(drift=DriftParams(psi=0.5))
    assert features_step.build_features(layout, looser, cache_dir=cache).stats.computed == 0
    # another champion: new embeddings for every image
    other = features_step.build_embedder(_detector(1, size=128), 128, model_version="det/4")
    assert (
        features_step.build_features(layout, params, embedder=other, cache_dir=cache).stats.embedded
        == 8
    )


def test_embedding_drift_compares_like_with_like_only(tmp_path):
    layout = _processed(tmp_path, keyed=True)
    embed = features_step.build_embedder(_detector(0, size=128), 128, model_version="det/3")
    features_step.build_features(layout, ExtractFeaturesParams(), embedder=embed)
    reference = tmp_path / "ref"
    shutil.copytree(layout.features.parent, reference)
    params = ExtractFeaturesParams(drift=DriftParams(reference="ref/features.parquet"))

    features_step.build_features(layout, params, embedder=embed)
    report = json.loads((layout.reports / "drift" / "drift.json").read_text())
    section = report["embeddings"]
    assert section["status"] == "compared" and section["model_version"] == "det/3"
    assert section["dimensions"] == 64 and section["flagged"] == [] and section["max_ks"] == 0.0

    other = features_step.build_embedder(_detector(1, size=128), 128, model_version="det/4")
    features_step.build_features(layout, params, embedder=other)
    section = json.loads((layout.reports / "drift" / "drift.json").read_text())["embeddings"]
    assert section["status"] == "model_mismatch"
    assert (section["model_version"], section["reference_model_version"]) == ("det/4", "det/3")

    features_step.build_features(layout, params)
    section = json.loads((layout.reports / "drift" / "drift.json").read_text())["embeddings"]
    assert section["status"] == "no_embeddings"
