"""Property test: damaged files are accepted or quarantined, never crash ingestion, and spare their batch."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline_steps.core.config import IngestParams
from pipeline_steps.core.deid import DEV_PSEUDONYM_KEY
from pipeline_steps.core.dicom_io import read_image
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.screening import REASONS, build_metadata
from tests.conftest import FAKE_PHI, build_dicom

PARAMS = IngestParams()
PIXEL_TAG = b"\xe0\x7f\x10\x00OW"


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("fuzz")
    good = [build_dicom(root / "good" / f"good{i}.dcm", patient_id=f"P{i}") for i in range(2)]
    rng = np.random.default_rng(1)
    victim = build_dicom(
        root / "victim.dcm",
        rng.integers(0, 4096, size=(260, 256), dtype=np.uint16),
        patient_id="P9",
    )
    baseline, quarantine = build_metadata(root / "good", PARAMS, DEV_PSEUDONYM_KEY)
    assert len(baseline) == 2 and quarantine.empty
    return good, victim, baseline  # a path, not bytes: hypothesis prints its arguments


def _ingest(good: list[Path], victim: bytes) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    folder = Path(tempfile.mkdtemp(prefix="radflow-fuzz-")) / "good"
    folder.mkdir()
    for path in good:
        shutil.copyfile(path, folder / path.name)
    (folder / "victim.dcm").write_bytes(victim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about what the mutation broke
        metadata, quarantine = build_metadata(folder, PARAMS, DEV_PSEUDONYM_KEY)
    return metadata, quarantine, folder


def _check_batch(metadata, quarantine, baseline, folder):
    """The invariants every mutation must keep. Returns the victim's verdict (None when accepted)."""
    assert len(metadata) + len(quarantine) == 3
    ids = list(metadata["image_id"]) + list(quarantine["image_id"])
    assert sorted(ids) == ["good0", "good1", "victim"]
    spared = metadata[metadata["image_id"] != "victim"].reset_index(drop=True)
    pd.testing.assert_frame_equal(spared, baseline)
    assert set(quarantine["reason"]) <= set(REASONS)
    text = metadata.to_csv() + quarantine.to_csv()
    assert not [value for value in FAKE_PHI.values() if value in text]
    if "victim" in set(metadata["image_id"]):
        row = metadata.set_index("image_id").loc["victim"]
        try:  # accepted from its header: decoding may still fail, but only as a DataError
            image = read_image(folder / "victim.dcm", 0.35)
        except DataError:
            return None
        assert image.pixels.shape == (row["rows"], row["columns"])
        return None
    return quarantine.set_index("image_id").loc["victim", "reason"]


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_file_is_accepted_or_quarantined_and_the_batch_is_unaffected(batch, data):
    good, victim_path, baseline = batch
    victim = victim_path.read_bytes()
    header_end = victim.index(PIXEL_TAG) + 12
    kind = data.draw(st.sampled_from(["truncate", "flip_header", "flip_anywhere"]))
    if kind == "truncate":
        mutated = victim[: data.draw(st.integers(0, len(victim) - 1))]
    else:
        limit = header_end if kind == "flip_header" else len(victim)
        flips = data.draw(
            st.lists(
                st.tuples(st.integers(0, limit - 1), st.integers(0, 7)), min_size=1, max_size=8
            )
        )
        buffer = bytearray(victim)
        for position, bit in flips:
            buffer[position] ^= 1 << bit
        mutated = bytes(buffer)
    metadata, quarantine, folder = _ingest(good, mutated)
    try:
        verdict = _check_batch(metadata, quarantine, baseline, folder)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    if kind == "truncate" and len(mutated) > header_end:
        assert verdict == "corrupt"  # cut inside the pixel data: found without decoding


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (0, "corrupt"),  # empty file
        (100, "corrupt"),  # inside the preamble
        (400, "corrupt"),  # inside the header, mid-element
        (
            "pixel_tag",
            "no_pixel_data",
        ),  # a clean cut before (7FE0,0010) reads as an image without pixels
        ("pixel_value", "corrupt"),  # inside the pixel data
    ],
)
def test_truncation_points_have_specific_reasons(batch, cut, reason):
    good, victim_path, baseline = batch
    victim = victim_path.read_bytes()
    at = {"pixel_tag": victim.index(PIXEL_TAG), "pixel_value": len(victim) - 1000}.get(cut, cut)
    metadata, quarantine, folder = _ingest(good, victim[:at])
    try:
        assert _check_batch(metadata, quarantine, baseline, folder) == reason
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
