"""The review store (flows/review_store.py): predicted inputs kept byte for byte, owner-only, by
content id, once, and never at the cost of the prediction."""

from __future__ import annotations

import hashlib
import logging
import stat

import pytest

from flows.review_store import keep_input, keep_predicted
from pipeline_steps.core.config import ReviewParams
from pipeline_steps.core.deid import image_id_for
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.layout import Layout

DICOM = b"\0" * 128 + b"DICM" + bytes(range(256)) * 4


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bytes_are_kept_exactly_owner_only_under_the_content_id(tmp_path):
    layout = Layout(tmp_path)
    kept = keep_input(layout, _sha(DICOM), DICOM)
    assert kept == layout.review_image(image_id_for(_sha(DICOM)))
    assert kept.read_bytes() == DICOM
    assert _mode(kept) == 0o600
    assert _mode(layout.review_images) == 0o700
    assert _mode(layout.review_images.parent) == 0o700
    assert [p.name for p in layout.review_images.iterdir()] == [kept.name]  # no temp file left


def test_a_file_is_kept_exactly(tmp_path):
    layout = Layout(tmp_path / "ws")
    source = tmp_path / "Doe_John.dcm"
    source.write_bytes(DICOM[::-1])
    kept = keep_input(layout, _sha(DICOM[::-1]), source)
    assert kept is not None and kept.read_bytes() == DICOM[::-1]
    assert source.name not in str(kept)


def test_an_image_already_kept_or_in_the_dataset_is_not_copied_again(tmp_path):
    layout = Layout(tmp_path)
    first = keep_input(layout, _sha(DICOM), DICOM)
    assert first is not None
    before = first.stat()
    assert keep_input(layout, _sha(DICOM), DICOM) is None
    assert first.stat().st_ino == before.st_ino and first.stat().st_mtime_ns == before.st_mtime_ns

    other = DICOM + b"x"
    raw = layout.raw_image(image_id_for(_sha(other)))
    raw.parent.mkdir(parents=True)
    raw.write_bytes(other)
    assert keep_input(layout, _sha(other), other) is None
    assert not layout.review_image(image_id_for(_sha(other))).exists()


def test_content_that_is_not_the_predicted_one_is_refused_and_nothing_left(tmp_path):
    layout = Layout(tmp_path)
    with pytest.raises(DataError, match="changed since it was predicted"):
        keep_input(layout, _sha(DICOM), DICOM + b"edited")
    assert list(layout.review_images.iterdir()) == []


def _record(data: bytes, **extra) -> dict:
    return {"prediction_id": "p", "file_sha256": _sha(data), "boxes": [], **extra}


def test_only_successful_predictions_are_kept_and_params_can_turn_it_off(tmp_path):
    layout = Layout(tmp_path)
    good, refused = DICOM, DICOM + b"refused"
    records = [_record(good), _record(refused, reason="corrupt", error="x")]
    assert keep_predicted(layout, ReviewParams(keep_inputs=False), records, [good, refused]) == 0
    assert not layout.review_images.exists()
    assert keep_predicted(layout, ReviewParams(), records, [good, refused]) == 1
    assert sorted(p.name for p in layout.review_images.iterdir()) == [
        f"{image_id_for(_sha(good))}.dcm"
    ]
    # A second pass keeps nothing new.
    assert keep_predicted(layout, ReviewParams(), records, [good, refused]) == 0


def test_a_copy_that_fails_is_a_warning_without_the_file_name(tmp_path, caplog):
    layout = Layout(tmp_path / "ws")
    gone = tmp_path / "Doe_Jane_1970.dcm"  # predicted, then removed before the copy
    records = [_record(DICOM), _record(DICOM + b"2")]
    second = tmp_path / "second.dcm"
    second.write_bytes(DICOM + b"2")
    with caplog.at_level(logging.WARNING, logger="radflow"):
        kept = keep_predicted(layout, ReviewParams(), records, [gone, second])
    assert kept == 1  # the failure did not stop the next input
    assert layout.review_image(image_id_for(_sha(DICOM + b"2"))).read_bytes() == DICOM + b"2"
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    text = warning.getMessage()
    assert image_id_for(_sha(DICOM)) in text
    assert "Doe_Jane" not in text and str(tmp_path) not in text
