"""The landing bookkeeping without S3: what is new, where it is staged, what is quarantined."""

from __future__ import annotations

import pytest

from pipeline_steps.landing import (
    DUPLICATE,
    INGESTED,
    LandingError,
    LandingObject,
    Seen,
    dump_seen,
    is_label_file,
    local_name,
    parse_location,
    plan_downloads,
    quarantine_reason,
    read_seen,
)


def test_locations_parse_to_bucket_and_prefix():
    assert parse_location("s3://landing") == ("landing", "")
    assert parse_location("s3://landing/site-a") == ("landing", "site-a/")
    assert parse_location("s3://landing/site-a/") == ("landing", "site-a/")
    for bad in ("landing/site-a", "s3://", "s3:///x", "https://landing/x"):
        with pytest.raises(LandingError, match="s3://bucket/prefix"):
            parse_location(bad)


def test_seen_keys_with_the_same_etag_are_skipped_without_a_read():
    seen = {
        "s3://b/in/a.dcm": Seen("e1", "sha-a", INGESTED, "t"),
        "s3://b/in/b.dcm": Seen("e2", "sha-b", DUPLICATE, "t"),
    }
    listing = [
        LandingObject("in/c.dcm", "e3", 10),  # new key
        LandingObject("in/a.dcm", "e1", 10),  # seen
        LandingObject("in/b.dcm", "e9", 10),  # overwritten: new ETag
        LandingObject("in/folder/", "e0", 0),  # a console-made folder marker
    ]
    todo, skipped = plan_downloads(listing, seen, "b")
    assert [o.key for o in todo] == ["in/b.dcm", "in/c.dcm"]
    assert skipped == 1
    # The same key in another bucket is another object.
    todo, skipped = plan_downloads([LandingObject("in/a.dcm", "e1", 10)], seen, "other")
    assert len(todo) == 1 and skipped == 0


def test_staged_names_keep_the_file_name_and_cannot_escape():
    assert str(local_name("in/2026-11-23/study1.dcm", "in/")) == "2026-11-23/study1.dcm"
    assert str(local_name("study1.dcm", "")) == "study1.dcm"
    assert str(local_name("in/./x.dcm", "in/")) == "x.dcm"  # harmless, normalised
    for bad in ("in/../../etc/passwd", "in//x.dcm", "in/"):
        with pytest.raises(LandingError, match="cannot be stored safely"):
            local_name(bad, "in/")


def test_label_files_are_recognised_by_suffix():
    assert is_label_file("in/labels.csv") and is_label_file("in/LABELS.CSV")
    assert not is_label_file("in/study.dcm") and not is_label_file("in/csv")


def test_only_what_is_certainly_not_dicom_is_quarantined(tmp_path, make_dicom):
    dicom = make_dicom(tmp_path / "ok.dcm")
    assert quarantine_reason(dicom, is_labels=False) is None
    junk = tmp_path / "notes.txt"
    junk.write_bytes(b"scanner maintenance on Friday\n" * 10)
    assert quarantine_reason(junk, is_labels=False) == "not_dicom"
    truncated = tmp_path / "cut.dcm"
    truncated.write_bytes(dicom.read_bytes()[:100])  # a broken DICOM goes on to ingest's checks
    assert quarantine_reason(truncated, is_labels=False) is None

    rsna = tmp_path / "rsna.csv"
    rsna.write_text("patientId,x,y,width,height,Target\nstudy1,1,2,3,4,1\n")
    assert quarantine_reason(rsna, is_labels=True) is None
    unknown = tmp_path / "other.csv"
    unknown.write_text("name,score\na,1\n")
    assert quarantine_reason(unknown, is_labels=True) == "unreadable_labels"
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 50)
    assert quarantine_reason(binary, is_labels=True) == "unreadable_labels"


def test_the_seen_index_round_trips_and_a_damaged_one_is_named():
    seen = {"s3://b/in/a.dcm": Seen("e1", "sha-a", INGESTED, "2026-11-23T02:00:00+00:00")}
    assert read_seen(dump_seen(seen), "seen.json") == seen
    with pytest.raises(LandingError, match=r"seen\.json: unreadable landing index"):
        read_seen('{"objects": {"k": {"etag": 1}}}', "seen.json")


def test_label_files_are_judged_as_ingest_reads_them(tmp_path):
    text = "patientId,x,y,width,height,Target\nstudy1,1,2,3,4,1\n"
    marked = tmp_path / "excel.csv"
    marked.write_bytes(text.encode("utf-16"))  # a byte-order mark: ingest decodes it
    assert quarantine_reason(marked, is_labels=True) is None
    unmarked = tmp_path / "unmarked.csv"
    unmarked.write_bytes(text.encode("utf-16-le"))  # no mark: ingest would refuse it
    assert quarantine_reason(unmarked, is_labels=True) == "unreadable_labels"
    ragged = tmp_path / "ragged.csv"
    ragged.write_text(text + "study2,1,2,3,4,1,extra\n")
    assert quarantine_reason(ragged, is_labels=True) == "unreadable_labels"
