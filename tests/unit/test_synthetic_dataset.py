"""The synthetic dataset on disk: RSNA labels CSV, summary and byte-level determinism."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from pipeline_steps.synthetic.dataset import SynthSummary, format_labels, generate_dataset
from pipeline_steps.synthetic.lesions import Box
from tests.unit.synthetic_common import SEED, SMALL, sha256_tree, small_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary]:
    return small_dataset(tmp_path_factory.mktemp("synth"))


def test_labels_csv_is_rsna_format(dataset):
    out, summary = dataset
    text = summary.labels_path.read_text()
    lines = text.splitlines()
    assert lines[0] == "patientId,x,y,width,height,Target"
    rows = list(csv.DictReader(io.StringIO(text)))
    stems = {p.stem for p in summary.images_dir.glob("*.dcm")}
    assert {r["patientId"] for r in rows} == stems
    negatives = [r for r in rows if r["Target"] == "0"]
    positives = [r for r in rows if r["Target"] == "1"]
    assert len(negatives) + len(positives) == len(rows)
    for r in negatives:
        assert [r[k] for k in ("x", "y", "width", "height")] == ["", "", "", ""]
    negative_ids = [r["patientId"] for r in negatives]
    assert len(negative_ids) == len(set(negative_ids))
    assert not set(negative_ids) & {r["patientId"] for r in positives}
    for r in positives:
        x, y, w, h = (float(r[k]) for k in ("x", "y", "width", "height"))
        assert x >= 0 and y >= 0 and w > 0 and h > 0
    assert summary.n_boxes == len(positives) and summary.n_images == len(stems) == SMALL.n_images
    assert summary.n_positive == len({r["patientId"] for r in positives})


def test_format_labels_writes_one_row_per_box_and_one_per_negative():
    text = format_labels([("cxr-a", [Box(3, 4, 5, 6), Box(1, 2, 3, 4)]), ("cxr-b", [])])
    assert text == (
        "patientId,x,y,width,height,Target\n"
        "cxr-a,1.0,2.0,3.0,4.0,1\n"
        "cxr-a,3.0,4.0,5.0,6.0,1\n"
        "cxr-b,,,,,0\n"
    )


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate_dataset(SMALL, again)
    assert sha256_tree(again) == sha256_tree(out)
    other = tmp_path / "other"
    generate_dataset(SMALL, other, seed=SEED + 1)
    other_hashes = set(sha256_tree(other).values())
    assert not other_hashes & set(sha256_tree(out).values())


def test_images_do_not_depend_on_generation_order_or_dataset_size(dataset, tmp_path):
    out, _ = dataset
    small = tmp_path / "prefix"
    generate_dataset(SMALL, small, n_images=3)
    prefix = sha256_tree(small)
    full = sha256_tree(out)
    images = {k: v for k, v in prefix.items() if k.startswith("images")}
    assert len(images) == 3 and all(full[k] == v for k, v in images.items())
    # Rerunning smaller into the same folder leaves no stale images behind.
    generate_dataset(SMALL, small, n_images=2)
    assert len(list((small / "images").glob("*.dcm"))) == 2


def test_parallel_generation_writes_the_same_bytes(tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    generate_dataset(SMALL, serial, n_images=3)
    generate_dataset(SMALL, parallel, n_images=3, workers=2)
    assert sha256_tree(serial) == sha256_tree(parallel)
