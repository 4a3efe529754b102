import hashlib
import io
import json
import os
import threading
from concurrent.futures import Executor, Future, ProcessPoolExecutor

import numpy as np
import pandas as pd
import pytest

from pipeline_steps import preprocess as preprocess_step
from pipeline_steps import validate as validate_step
from pipeline_steps.core import parallel
from pipeline_steps.core.config import IngestParams, PreprocessParams, SplitParams, ValidateParams
from pipeline_steps.core.dicom_io import read_image
from pipeline_steps.core.labels import NO_FINDING
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.parallel import Crash, InlineExecutor, map_resilient
from pipeline_steps.core.shards import QUANT, load_split, write_shard
from pipeline_steps.core.transforms import (
    DisplayWindow,
    plan_geometry,
    preprocess_image,
    transform_boxes,
)
from pipeline_steps.preprocess import assign_split, build_processed, split_balance


def test_geometry_inverse_is_exact_and_image_fits():
    g = plan_geometry(2048, 1760, 0.175, 0.175, 256, 1.4)
    assert g.pad_x > 0 and g.pad_y == 0  # portrait image: padded left/right
    assert round(g.orig_rows * g.scale_y) <= 256 and round(g.orig_cols * g.scale_x) <= 256
    boxes = np.array([[100.0, 200.0, 300.0, 450.5], [0, 0, 1760, 2048]])
    assert np.allclose(g.inverse(g.forward(boxes)), boxes, atol=1e-9)
    full = g.forward(boxes[1:])[0]
    assert full[0] == pytest.approx(g.pad_x) and full[2] <= 256
    assert np.allclose(full, g.content)


def test_geometry_resamples_to_common_spacing():
    # a small field at coarse spacing is not blown up to fill the canvas
    g = plan_geometry(512, 512, 0.35, 0.35, 256, 1.4)
    assert g.scale_x == pytest.approx(0.25)
    assert g.pad_x == (256 - 128) // 2


def test_monochrome1_inverted_exactly_once(tmp_path, make_dicom):
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 4096, size=(300, 300), dtype=np.uint16)
    # a window centred on the stored range maps x and its inverse 4095 - x symmetrically
    window = (2047.5, 4096.0)
    m2 = read_image(
        make_dicom(tmp_path / "m2.dcm", stored, photometric="MONOCHROME2", window=window), 0.35
    )
    m1 = read_image(
        make_dicom(tmp_path / "m1.dcm", 4095 - stored, photometric="MONOCHROME1", window=window),
        0.35,
    )
    for mode in ("dicom", "percentile"):
        transform = DisplayWindow(mode, (0.5, 99.5))
        assert np.allclose(transform(m1), transform(m2), atol=1e-6)
        assert not np.allclose(transform(m1), 1.0 - transform(m2), atol=1e-3)


def test_display_window_does_not_modify_the_decoded_pixels(tmp_path, make_dicom):
    image = read_image(make_dicom(tmp_path / "a.dcm", photometric="MONOCHROME1"), 0.35)
    before = image.pixels.copy()
    DisplayWindow("dicom", (0.5, 99.5))(image)
    assert np.array_equal(image.pixels, before)


def test_rescale_is_applied_before_the_window(tmp_path, make_dicom):
    stored = np.full((300, 300), 1000, np.uint16)
    stored[:150] = 3000
    image = read_image(
        make_dicom(
            tmp_path / "r.dcm", stored, slope=2.0, intercept=-1000.0, window=(3000.0, 4000.0)
        ),
        0.35,
    )
    display = DisplayWindow("dicom", (0.5, 99.5))(image)
    # modality values: 1000 and 5000; window [1000, 5000]
    assert display[0, 0] == pytest.approx(1.0) and display[-1, -1] == pytest.approx(0.0)


def test_preprocess_image_is_quantized_unit_range(tmp_path, make_dicom):
    image = read_image(make_dicom(tmp_path / "a.dcm"), 0.35)
    g = plan_geometry(300, 280, 0.35, 0.35, 128, 1.4)
    out = preprocess_image(image, g, PreprocessParams(input_size=128))
    assert out.dtype == np.uint16 and out.shape == (128, 128)
    assert out.max() <= QUANT
    x0, y0, x1, y1 = g.content
    assert out[:, :x0].max() == 0 and out[:, x1:].max() == 0  # letterbox padding is black


# ---------------------------------------------------------------------------------------------
# splits


@pytest.mark.parametrize(
    ("slope", "intercept", "photometric", "window"),
    [
        (1.0, 0.0, "MONOCHROME2", (2048.0, 4096.0)),
        (1.0, 0.0, "MONOCHROME1", None),  # percentile fallback
        (1.0, -1024.0, "MONOCHROME2", (1000.0, 3000.0)),
        (-1.0, 0.0, "MONOCHROME2", (-2048.0, 4096.0)),
        (3.0, 5.0, "MONOCHROME1", (6000.0, 9000.0)),
    ],
)
def test_model_input_is_byte_identical_to_the_float64_reader(
    tmp_path, make_dicom, slope, intercept, photometric, window
):
    """The reader's float32 rescale and skipped pixel hash leave the stage's output unchanged, which
    is why PIXEL_VERSION (and with it every cached image) survives them."""
    import dataclasses

    import pydicom

    rng = np.random.default_rng(11)
    stored = rng.integers(0, 4096, size=(300, 280), dtype=np.uint16)
    stored[:20, :20] = 0
    path = make_dicom(
        tmp_path / "a.dcm",
        stored,
        slope=slope,
        intercept=intercept,
        photometric=photometric,
        window=window,
    )
    params = PreprocessParams(input_size=128, window="dicom")
    job = preprocess_step.PixelJob("k", str(path), 0.35, 0.35, 300, 280)
    fast = preprocess_step.process_file(job, params).pixels
    raw = pydicom.dcmread(path).pixel_array
    old_pixels = np.asarray(raw.astype(np.float64) * slope + intercept, dtype=np.float32)
    reference = dataclasses.replace(read_image(path, 0.35), pixels=old_pixels)
    g = plan_geometry(300, 280, 0.35, 0.35, 128, params.target_spacing_mm)
    assert fast is not None
    assert fast.tobytes() == preprocess_image(reference, g, params).tobytes()


def test_split_is_deterministic_patient_level_and_close_to_fractions():
    params = SplitParams()
    patients = [f"pat-{i:05d}" for i in range(4000)]
    splits = [assign_split(p, params) for p in patients]
    assert splits == [assign_split(p, params) for p in patients]
    counts = pd.Series(splits).value_counts(normalize=True)
    assert counts["test"] == pytest.approx(params.test_fraction, abs=0.02)
    assert counts["val"] == pytest.approx(params.val_fraction, abs=0.02)
    other = [assign_split(p, SplitParams(salt="other")) for p in patients]
    assert other != splits  # the salt is what re-splits


def test_split_is_stratified_in_expectation_within_each_stratum():
    params = SplitParams()
    rng = np.random.default_rng(0)
    patients = pd.DataFrame(
        {"patient": [f"p{i}" for i in range(6000)], "positive": rng.random(6000) < 0.3}
    )
    patients["split"] = [assign_split(p, params) for p in patients["patient"]]
    for _, stratum in patients.groupby("positive"):
        share = stratum["split"].value_counts(normalize=True)
        se = (params.test_fraction * (1 - params.test_fraction) / len(stratum)) ** 0.5
        assert abs(share["test"] - params.test_fraction) < 4 * se


def test_split_balance_flags_a_split_whose_positive_rate_is_far_off():
    rows = []
    for i in range(400):
        split = ("train", "val", "test")[i % 3]
        positive = split == "test" or (split == "train" and i % 2 == 0)
        rows.append({"patient_pseudonym": f"p{i}", "split": split, "positive": positive})
    rows.append({"patient_pseudonym": "u", "split": "unlabelled", "positive": False})
    balance = split_balance(pd.DataFrame(rows), SplitParams())
    assert "test" in balance["imbalanced"] and "val" in balance["imbalanced"]
    assert balance["splits"]["test"]["positive_rate"] == 1.0
    assert sum(s["patients"] for s in balance["splits"].values()) == 400  # unlabelled left out


# ---------------------------------------------------------------------------------------------
# the stage on tiny workspaces


def _add_images(layout, make_dicom, indices, patient=lambda i: f"P{i}", positive=None):
    """Write img<i>.dcm and their label rows (odd i positive unless `positive` says otherwise)."""
    rows = []
    for i in indices:
        yy, xx = np.mgrid[0:400, 0:360]
        img = (1000 + 2000 * np.exp(-((yy - 200) ** 2 + (xx - 100 - 20 * i) ** 2) / 800)).astype(
            np.uint16
        )
        mono1 = i % 3 == 0
        make_dicom(
            layout.raw_images / f"img{i:02d}.dcm",
            4095 - img if mono1 else img,
            patient_id=patient(i),
            photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
        )
        is_positive = (i % 2 == 1) if positive is None else positive(i)
        if is_positive:
            rows.append([f"img{i:02d}", "opacity", 80 + 20 * i, 180, 120 + 20 * i, 220])
        else:
            rows.append([f"img{i:02d}", NO_FINDING, None, None, None, None])
    layout.raw.mkdir(parents=True, exist_ok=True)
    new = pd.DataFrame(rows, columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max"])
    if layout.raw_labels.exists():
        new = pd.concat([pd.read_csv(layout.raw_labels), new], ignore_index=True)
    new.to_csv(layout.raw_labels, index=False)
    validate_step.run(layout, IngestParams(), ValidateParams(min_images=2))


def _workspace(tmp_path, make_dicom, n=8):
    layout = Layout(tmp_path)
    _add_images(layout, make_dicom, range(n))
    return layout


def _digest(layout):
    h = hashlib.sha256()
    for path in sorted((layout.processed).rglob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _fresh_digest(layout, params, tmp_path):
    """The output of a run from nothing: no previous output, an empty cache."""
    import shutil

    shutil.rmtree(layout.processed, ignore_errors=True)
    cache = tmp_path / f"fresh-cache-{len(list(tmp_path.glob('fresh-cache-*')))}"
    result = build_processed(layout, params, cache_dir=cache)
    assert result.stats.cache_hits == 0
    return _digest(layout)


@pytest.fixture
def count_decodes(monkeypatch):
    """Count real DICOM decodes (in-process runs only)."""
    calls: list[str] = []
    real = preprocess_step.read_image

    def counting(path, default_spacing_mm, **kwargs):
        calls.append(path.name)
        return real(path, default_spacing_mm, **kwargs)

    monkeypatch.setattr(preprocess_step, "read_image", counting)
    return calls


def test_stage_writes_manifest_shards_and_boxes_identically_serial_or_pool(
    tmp_path, make_dicom, monkeypatch
):
    layout = _workspace(tmp_path, make_dicom)
    serial = build_processed(
        layout, PreprocessParams(workers=1, shard_size=3), cache_dir=tmp_path / "c1"
    )
    assert serial.stats.runner == "inline" and serial.stats.decoded == 8
    first = _digest(layout)
    monkeypatch.setattr(parallel, "POOL_MIN_JOBS", 0)
    pooled = build_processed(
        layout, PreprocessParams(workers=2, shard_size=3), cache_dir=tmp_path / "c2"
    )
    assert pooled.stats.runner == "processes x2" and pooled.stats.decoded == 8
    assert _digest(layout) == first
    pd.testing.assert_frame_equal(serial.manifest, pooled.manifest)

    manifest = serial.manifest
    assert len(manifest) == 8 and set(manifest["split"]) <= {"train", "val", "test"}
    per_patient = manifest.groupby("patient_pseudonym")["split"].nunique()
    assert (per_patient == 1).all()
    assert (manifest.groupby("shard").size() <= 3).all()
    boxes = pd.read_parquet(layout.boxes)
    assert len(boxes) == 4 and not boxes["clipped"].any()
    coords = boxes[["x_min", "y_min", "x_max", "y_max"]]
    assert ((coords >= 0) & (coords <= 256)).all().all()

    # the streamed images are [0, 1] floats, and a box sits on the bright blob it labels
    split = manifest["split"].iloc[1]
    view = load_split(layout.processed, split)
    for image, img_boxes in view.examples():
        assert image.dtype == np.float32 and image.min() >= 0.0 and image.max() <= 1.0
        for x0, y0, x1, y1 in img_boxes:
            inside = image[int(y0) : int(y1), int(x0) : int(x1)].mean()
            assert inside > image[image > 0].mean()


def test_rerun_with_nothing_new_decodes_nothing_and_rewrites_no_shard(
    tmp_path, make_dicom, count_decodes
):
    layout = _workspace(tmp_path, make_dicom, n=6)
    params = PreprocessParams(workers=1, shard_size=2)
    first = build_processed(layout, params)
    assert first.stats.decoded == 6 and len(count_decodes) == 6
    shard_times = {p.name: p.stat().st_mtime_ns for p in (layout.processed / "shards").iterdir()}
    digest = _digest(layout)

    count_decodes.clear()
    again = build_processed(layout, params)
    assert count_decodes == []
    assert again.stats.decoded == 0 and again.stats.cache_hits == 6
    assert again.stats.shards_written == 0 and again.stats.shards_kept == len(shard_times)
    assert {p.name: p.stat().st_mtime_ns for p in (layout.processed / "shards").iterdir()} == (
        shard_times
    )
    assert _digest(layout) == digest
    pd.testing.assert_frame_equal(again.manifest, first.manifest)


def test_rerun_after_new_files_decodes_only_those_and_matches_a_fresh_run(
    tmp_path, make_dicom, count_decodes
):
    layout = _workspace(tmp_path, make_dicom, n=6)
    params = PreprocessParams(workers=1, shard_size=4)
    build_processed(layout, params)
    splits_before = pd.read_parquet(layout.manifest).set_index("image_id")["split"]

    # two new patients, and a new positive image of a known negative patient (P0)
    _add_images(layout, make_dicom, [6, 7])
    _add_images(layout, make_dicom, [8], patient=lambda i: "P0", positive=lambda i: True)
    count_decodes.clear()
    result = build_processed(layout, params)
    assert sorted(count_decodes) == ["img06.dcm", "img07.dcm", "img08.dcm"]
    assert result.stats.decoded == 3 and result.stats.cache_hits == 6
    incremental = _digest(layout)

    # stable: no existing image (or patient) changed split; P0's images stay together
    after = result.manifest.set_index("image_id")["split"]
    assert (after[splits_before.index] == splits_before).all()
    assert after["img08"] == after["img00"]

    assert _fresh_digest(layout, params, tmp_path) == incremental


def test_only_pixel_params_invalidate_the_cache(tmp_path, make_dicom, count_decodes):
    layout = _workspace(tmp_path, make_dicom, n=4)
    build_processed(layout, PreprocessParams(workers=1, shard_size=4))
    reshard = PreprocessParams(workers=1, shard_size=1)
    count_decodes.clear()
    result = build_processed(layout, reshard)
    assert count_decodes == [] and result.manifest["shard"].nunique() == 4
    assert result.stats.shards_written >= 1  # (a shard already holding one image is kept)
    assert _digest(layout) == _fresh_digest(layout, reshard, tmp_path)

    count_decodes.clear()
    percentile = PreprocessParams(workers=1, shard_size=1, window="percentile")
    assert build_processed(layout, percentile).stats.decoded == 4
    assert len(count_decodes) == 4


def test_damaged_cache_entry_is_recomputed_not_trusted(tmp_path, make_dicom):
    layout = _workspace(tmp_path, make_dicom, n=3)
    params = PreprocessParams(workers=1)
    cache = tmp_path / "cache"
    build_processed(layout, params, cache_dir=cache)
    digest = _digest(layout)
    entry = next(cache.rglob("*.npy"))
    np.save(entry, np.zeros((8, 8), np.uint16))  # wrong shape
    for shard in (layout.processed / "shards").iterdir():
        shard.unlink()  # force assembly from the cache
    build_processed(layout, params, cache_dir=cache)
    assert _digest(layout) == digest


def test_write_shard_streams_the_same_bytes_as_np_save():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 65535, (16, 16), dtype=np.uint16) for _ in range(5)]
    expected = io.BytesIO()
    np.save(expected, np.stack(images))
    handed_out = []

    def lazily():
        for image in images:
            handed_out.append(1)
            yield image

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.npy"
        write_shard(path, lazily(), 5, 16)
        assert path.read_bytes() == expected.getvalue()
        assert preprocess_step.shard_bytes(5, 16) == len(expected.getvalue())
        with pytest.raises(ValueError, match="4 images written, 5 declared"):
            write_shard(path, iter(images[:4]), 5, 16)
        assert path.read_bytes() == expected.getvalue()  # the old shard survives a failed write


# ---------------------------------------------------------------------------------------------
# bad input


def test_undecodable_file_is_reported_cached_and_others_survive(
    tmp_path, make_dicom, count_decodes, monkeypatch
):
    layout = _workspace(tmp_path, make_dicom, n=4)
    victim = layout.raw_images / "img01.dcm"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 5000])  # header intact, pixel data truncated
    params = PreprocessParams(workers=1)
    manifest = preprocess_step.run(layout, params)
    assert "img01" not in set(manifest["image_id"]) and len(manifest) == 3
    failures = json.loads((layout.processed / "failures.json").read_text())
    assert [(f["image_id"], f["reason"]) for f in failures] == [("img01", "decode_failed")]
    report = json.loads((layout.processed / "report.json").read_text())
    assert report["failures_by_reason"] == {"decode_failed": 1} and report["written"] == 3

    # a known-bad file is not decoded again, and is still reported
    count_decodes.clear()
    again = build_processed(layout, params)
    assert count_decodes == [] and again.stats.cached_failures == 1
    assert json.loads((layout.processed / "failures.json").read_text()) == failures
    # ... until the decoders change (a plugin installed, say)
    monkeypatch.setattr(preprocess_step, "decoder_fingerprint", lambda: "other-decoders")
    count_decodes.clear()
    assert build_processed(layout, params).stats.decoded == 1
    assert count_decodes == ["img01.dcm"]  # only the failure is retried


def test_worker_exception_is_retried_then_reported_and_not_cached(
    tmp_path, make_dicom, monkeypatch
):
    layout = _workspace(tmp_path, make_dicom, n=4)
    real = preprocess_step.process_file
    attempts = []

    def flaky(job, params):
        if job.path.endswith("img02.dcm"):
            attempts.append(job.path)
            raise MemoryError("worker ran out of memory")
        return real(job, params)

    monkeypatch.setattr(preprocess_step, "process_file", flaky)
    result = build_processed(layout, PreprocessParams(workers=1, retries=2))
    assert len(attempts) == 3  # first try + 2 retries
    assert result.stats.crashed == 1 and len(result.manifest) == 3
    failures = json.loads((layout.processed / "failures.json").read_text())
    assert failures[0]["image_id"] == "img02" and failures[0]["reason"] == "worker_crashed"
    assert "MemoryError" in failures[0]["message"]

    monkeypatch.setattr(preprocess_step, "process_file", real)
    healed = build_processed(layout, PreprocessParams(workers=1, retries=2))
    assert healed.stats.decoded == 1 and len(healed.manifest) == 4


def _square_or_die(x: int) -> int:
    if x == 3:
        os._exit(7)  # a worker killed mid-job (segfault, OOM killer)
    return x * x


def test_a_dying_worker_costs_only_its_own_item():
    pools = []

    def make():
        pools.append(ProcessPoolExecutor(max_workers=2))
        return pools[-1]

    items = list(range(8))
    results = dict(map_resilient(_square_or_die, items, make, slots=4, attempts=2))
    assert set(results) == set(items)
    assert isinstance(results[3], Crash)
    assert {i: r for i, r in results.items() if i != 3} == {i: i * i for i in items if i != 3}
    assert len(pools) >= 2  # the broken pool was replaced


class _CountingExecutor(Executor):
    """Runs calls on threads and records the most that were ever outstanding at once."""

    def __init__(self):
        self.outstanding = 0
        self.peak = 0
        self.lock = threading.Lock()

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        with self.lock:
            self.outstanding += 1
            self.peak = max(self.peak, self.outstanding)

        def run():
            result = fn(*args, **kwargs)
            with self.lock:
                self.outstanding -= 1
            future.set_result(result)

        threading.Timer(0.001, run).start()
        return future


def test_work_in_flight_is_bounded_by_slots():
    executor = _CountingExecutor()
    results = dict(map_resilient(lambda x: x + 1, list(range(200)), lambda: executor, slots=5))
    assert results == {i: i + 1 for i in range(200)}
    assert executor.peak == 5


def test_inline_executor_keeps_exceptions_in_the_future():
    future = InlineExecutor().submit(lambda: 1 / 0)
    assert isinstance(future.exception(), ZeroDivisionError)


def test_flagged_spacing_is_carried_and_reported(tmp_path, make_dicom):
    layout = Layout(tmp_path)
    make_dicom(layout.raw_images / "a.dcm", patient_id="P1", spacing=None)
    make_dicom(layout.raw_images / "b.dcm", patient_id="P2")
    layout.raw.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        [["a", "opacity", 10, 10, 50, 50], ["b", NO_FINDING, None, None, None, None]],
        columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max"],
    ).to_csv(layout.raw_labels, index=False)
    validate_step.run(layout, IngestParams(), ValidateParams(min_images=2))
    manifest = preprocess_step.run(layout, PreprocessParams(workers=1)).set_index("image_id")
    assert (
        bool(manifest.at["a", "spacing_flagged"])
        and manifest.at["a", "spacing_source"] == "default"
    )
    assert not bool(manifest.at["b", "spacing_flagged"])
    report = json.loads((layout.processed / "report.json").read_text())
    assert [f["image_id"] for f in report["spacing_flagged"]] == ["a"]


def test_boxes_leaving_the_image_are_clipped_to_it_and_reported():
    g = plan_geometry(400, 200, 0.7, 0.7, 256, 1.4)  # 200 x 100 content, padded left and right
    manifest = pd.DataFrame(
        [
            {
                "image_id": "a",
                "orig_rows": 400,
                "orig_cols": 200,
                "scale_x": g.scale_x,
                "scale_y": g.scale_y,
                "pad_x": g.pad_x,
                "pad_y": g.pad_y,
            }
        ]
    )
    labels = pd.DataFrame(
        [
            ["a", "opacity", 10.0, 10.0, 50.0, 50.0],  # inside
            ["a", "opacity", 150.0, 380.0, 260.0, 420.0],  # over the right and bottom edges
            ["a", "opacity", 210.0, 10.0, 300.0, 50.0],  # wholly outside
            ["a", NO_FINDING, None, None, None, None],
        ],
        columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max"],
    )
    boxes, report = transform_boxes(labels, manifest, 256)
    assert len(boxes) == 2 and boxes["clipped"].tolist() == [False, True]
    x0, y0, x1, y1 = g.content
    clipped = boxes[boxes["clipped"]].iloc[0]
    assert clipped["x_max"] == pytest.approx(x1) and clipped["y_max"] == pytest.approx(y1)
    assert clipped["x_min"] == pytest.approx(150 * g.scale_x + g.pad_x)
    assert [r["dropped"] for r in report] == [False, True]
    assert report[0]["clipped_to"] == [150.0, 380.0, 200.0, 400.0]
    assert report[1]["original"] == [210.0, 10.0, 300.0, 50.0]
