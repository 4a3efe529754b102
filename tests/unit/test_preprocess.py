import hashlib

import numpy as np
import pandas as pd
import pytest

from pipeline_steps import preprocess as preprocess_step
from pipeline_steps import validate as validate_step
from pipeline_steps.config import IngestParams, PreprocessParams, SplitParams, ValidateParams
from pipeline_steps.dicom_io import read_image
from pipeline_steps.ingest import NO_FINDING
from pipeline_steps.layout import Layout
from pipeline_steps.preprocess import (
    QUANT,
    DisplayWindow,
    assign_split,
    load_split,
    plan_geometry,
    preprocess_image,
)


def test_geometry_inverse_is_exact_and_image_fits():
    g = plan_geometry(2048, 1760, 0.175, 0.175, 256, 1.4)
    assert g.pad_x > 0 and g.pad_y == 0  # portrait image: padded left/right
    assert round(g.orig_rows * g.scale_y) <= 256 and round(g.orig_cols * g.scale_x) <= 256
    boxes = np.array([[100.0, 200.0, 300.0, 450.5], [0, 0, 1760, 2048]])
    assert np.allclose(g.inverse(g.forward(boxes)), boxes, atol=1e-9)
    full = g.forward(boxes[1:])[0]
    assert full[0] == pytest.approx(g.pad_x) and full[2] <= 256


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


def test_split_is_deterministic_patient_level_and_close_to_fractions():
    params = SplitParams()
    patients = [f"pat-{i:05d}" for i in range(4000)]
    splits = [assign_split(p, params) for p in patients]
    assert splits == [assign_split(p, params) for p in patients]
    counts = pd.Series(splits).value_counts(normalize=True)
    assert counts["test"] == pytest.approx(params.test_fraction, abs=0.02)
    assert counts["val"] == pytest.approx(params.val_fraction, abs=0.02)
    assert assign_split("pat-00001", SplitParams(salt="other")) in {"train", "val", "test"}


def _workspace(tmp_path, make_dicom, n=8):
    layout = Layout(tmp_path)
    rows = []
    for i in range(n):
        yy, xx = np.mgrid[0:400, 0:360]
        img = (1000 + 2000 * np.exp(-((yy - 200) ** 2 + (xx - 100 - 20 * i) ** 2) / 800)).astype(
            np.uint16
        )
        mono1 = i % 3 == 0
        make_dicom(
            layout.raw_images / f"img{i:02d}.dcm",
            4095 - img if mono1 else img,
            patient_id=f"P{i}",
            photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
        )
        if i % 2:
            rows.append([f"img{i:02d}", "opacity", 80 + 20 * i, 180, 120 + 20 * i, 220])
        else:
            rows.append([f"img{i:02d}", NO_FINDING, None, None, None, None])
    layout.raw.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max"]).to_csv(
        layout.raw_labels, index=False
    )
    validate_step.run(layout, IngestParams(), ValidateParams(min_images=2))
    return layout


def _digest(layout):
    h = hashlib.sha256()
    for path in sorted((layout.processed).rglob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_stage_writes_manifest_shards_and_boxes_identically_serial_or_pool(tmp_path, make_dicom):
    layout = _workspace(tmp_path, make_dicom)
    serial = preprocess_step.run(layout, PreprocessParams(workers=1, shard_size=3))
    first = _digest(layout)
    pooled = preprocess_step.run(layout, PreprocessParams(workers=2, shard_size=3))
    assert _digest(layout) == first
    pd.testing.assert_frame_equal(serial, pooled)

    assert len(serial) == 8 and set(serial["split"]) <= {"train", "val", "test"}
    per_patient = serial.groupby("patient_pseudonym")["split"].nunique()
    assert (per_patient == 1).all()
    boxes = pd.read_parquet(layout.boxes)
    assert len(boxes) == 4
    assert (
        (
            (boxes[["x_min", "y_min", "x_max", "y_max"]] >= 0)
            & (boxes[["x_min", "y_min", "x_max", "y_max"]] <= 256)
        )
        .all()
        .all()
    )

    # the streamed images are [0, 1] floats, and a box sits on the bright blob it labels
    split = serial["split"].iloc[1]
    view = load_split(layout.processed, split)
    for image, img_boxes in view.examples():
        assert image.dtype == np.float32 and image.min() >= 0.0 and image.max() <= 1.0
        for x0, y0, x1, y1 in img_boxes:
            inside = image[int(y0) : int(y1), int(x0) : int(x1)].mean()
            assert inside > image[image > 0].mean()


def test_undecodable_file_is_reported_and_others_survive(tmp_path, make_dicom):
    layout = _workspace(tmp_path, make_dicom, n=4)
    victim = layout.raw_images / "img01.dcm"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 5000])  # header intact, pixel data truncated
    manifest = preprocess_step.run(layout, PreprocessParams(workers=1))
    assert "img01" not in set(manifest["image_id"]) and len(manifest) == 3
    failures = (layout.processed / "failures.json").read_text()
    assert "img01" in failures


def test_preprocess_image_is_quantized_unit_range(tmp_path, make_dicom):
    image = read_image(make_dicom(tmp_path / "a.dcm"), 0.35)
    g = plan_geometry(300, 280, 0.35, 0.35, 128, 1.4)
    out = preprocess_image(image, g, PreprocessParams(input_size=128))
    assert out.dtype == np.uint16 and out.shape == (128, 128)
    assert out.max() <= QUANT
