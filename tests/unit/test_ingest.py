import numpy as np
import pandas as pd
import pytest

from pipeline_steps.core.deid import image_id_for
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import file_sha256
from pipeline_steps.core.labels import NO_FINDING
from pipeline_steps.core.layout import Layout
from pipeline_steps.ingest import ingest_directory

VINDR = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]


def _rsna(path, rows):
    pd.DataFrame(rows, columns=["patientId", "x", "y", "width", "height", "Target"]).to_csv(
        path, index=False
    )


def _id(path):
    return image_id_for(file_sha256(path))


def test_ingest_renames_by_content_and_converts_rsna_labels(tmp_path, make_dicom):
    src = tmp_path / "in"
    a = make_dicom(src / "Smith_John.dcm", patient_id="P1")
    make_dicom(src / "Doe_Jane.dcm", patient_id="P2")
    labels = tmp_path / "labels.csv"
    _rsna(
        labels,
        [
            ["Smith_John", 10, 20, 30, 40, 1],
            ["Doe_Jane", None, None, None, None, 0],
            ["Ghost", 1, 1, 2, 2, 1],
        ],
    )
    layout = Layout(tmp_path)
    raw = layout.raw
    summary = ingest_directory(src, labels, layout)

    assert (summary.seen, summary.added, summary.skipped_existing) == (2, 2, 0)
    assert (summary.accepted, summary.quarantined) == (2, {})
    assert summary.label_format == "rsna"
    assert summary.labels_imported == 2
    assert summary.labels_without_image == 1
    names = sorted(p.name for p in (raw / "images").iterdir())
    assert f"{_id(a)}.dcm" in names
    assert not any("Smith" in n or "Doe" in n for n in names)  # source names may carry PHI
    table = pd.read_csv(raw / "labels.csv")
    pos = table[table["label"] != NO_FINDING].iloc[0]
    assert (pos.x_min, pos.y_min, pos.x_max, pos.y_max) == (10, 20, 40, 60)
    assert (table["label"] == NO_FINDING).sum() == 1
    issues = pd.read_csv(layout.raw_label_issues)
    assert issues[["source_row", "kind"]].values.tolist() == [[4, "orphan_label"]]
    assert "Ghost" not in (layout.raw_label_issues).read_text()


def test_every_file_is_archived_and_counted_by_verdict(tmp_path, make_dicom):
    src = tmp_path / "in"
    good = make_dicom(src / "good.dcm", patient_id="P1")
    (src / "copy").mkdir()
    (src / "copy" / "same.dcm").write_bytes(good.read_bytes())  # two files, one content
    ct = make_dicom(src / "ct.dcm", modality="CT")
    junk = src / "junk.bin"
    junk.write_bytes(b"\x00" * 10)
    layout = Layout(tmp_path)
    raw = layout.raw
    summary = ingest_directory(src, None, layout)

    assert summary.seen == 4
    assert (summary.added, summary.skipped_existing) == (3, 1)
    assert summary.accepted == 2
    assert summary.quarantined == {"corrupt": 1, "modality_not_allowed": 1}
    assert summary.accepted + sum(summary.quarantined.values()) == summary.seen
    # Rejected files are archived as they came, not dropped or rewritten.
    for path in (ct, junk):
        assert (raw / "images" / f"{_id(path)}.dcm").read_bytes() == path.read_bytes()
    assert summary.label_format == ""
    assert summary.unlabelled == (_id(good),)
    assert not (layout.raw_label_issues).exists()


def test_unlabelled_images_and_labels_of_quarantined_ones_are_reported(tmp_path, make_dicom):
    src = tmp_path / "in"
    a = make_dicom(src / "a.dcm", patient_id="P1")
    b = make_dicom(src / "b.dcm", patient_id="P2")
    make_dicom(src / "c.dcm", body_part="KNEE")
    labels = tmp_path / "labels.csv"
    _rsna(labels, [["a", 10, 10, 20, 20, 1], ["c", None, None, None, None, 0]])
    summary = ingest_directory(src, labels, Layout(tmp_path))
    assert summary.unlabelled == (_id(b),)
    assert summary.labels_for_quarantined == 1
    assert _id(a) not in summary.unlabelled


def test_vindr_labels_are_fused_with_reader_rows_kept(tmp_path, make_dicom):
    src = tmp_path / "in"
    a = make_dicom(src / "0005e8e3.dicom", patient_id="P1")  # VinDr ships .dicom files
    b = make_dicom(src / "000434271f.dicom", patient_id="P2")
    labels = tmp_path / "train.csv"
    pd.DataFrame(
        [
            ["0005e8e3", "Nodule/Mass", 8, "R8", 10, 10, 50, 50],
            ["0005e8e3", "Nodule/Mass", 8, "R9", 14, 12, 54, 48],
            ["0005e8e3", "No finding", 14, "R10", None, None, None, None],
            ["000434271f", "No finding", 14, "R8", None, None, None, None],
            ["000434271f", "Cardiomegaly", 3, "R9", 120, 40, 100, 90],  # line 6: inverted
            ["ffff", "Nodule/Mass", 8, "R9", 1, 1, 9, 9],  # line 7: no such file
        ],
        columns=VINDR,
    ).to_csv(labels, index=False)
    layout = Layout(tmp_path)
    raw = layout.raw
    summary = ingest_directory(src, labels, layout)

    assert summary.label_format == "vindr"
    table = pd.read_csv(raw / "labels.csv")
    assert table.values.tolist() == [[_id(a), "nodule_mass", 12.0, 11.0, 52.0, 49.0]]
    assert summary.labels_imported == 1
    readers = pd.read_csv(layout.raw_readers)
    assert len(readers) == summary.reader_rows == 4
    assert set(readers["rad_id"]) == {"R8", "R9", "R10"}
    # b's only finding was unusable: b is reported unlabelled rather than called negative.
    assert summary.unlabelled == (_id(b),)
    assert summary.label_issues == {"inverted_box": 1, "orphan_label": 1}
    issues = pd.read_csv(layout.raw_label_issues).set_index("source_row")
    assert issues.loc[6, "image_id"] == _id(b)
    assert issues.loc[7, "kind"] == "orphan_label"
    assert (issues["labels_sha256"] == file_sha256(labels)[:16]).all()
    assert "ffff" not in (layout.raw_label_issues).read_text()


def test_labels_of_an_image_are_never_rewritten_by_a_later_ingest(tmp_path, make_dicom):
    src = tmp_path / "in"
    a = make_dicom(src / "a.dcm", patient_id="P1")
    labels = tmp_path / "labels.csv"
    _rsna(labels, [["a", 10, 10, 20, 20, 1]])
    layout = Layout(tmp_path)
    raw = layout.raw
    ingest_directory(src, labels, layout)
    again = ingest_directory(src, labels, layout)  # the same labels again: nothing to report
    assert (again.labels_imported, again.label_issues) == (0, {})
    assert not (layout.raw_label_issues).exists()

    _rsna(labels, [["a", 30, 30, 5, 5, 1]])
    changed = ingest_directory(src, labels, layout)
    assert changed.label_issues == {"already_labelled": 1}
    assert pd.read_csv(raw / "labels.csv")[["x_min", "x_max"]].values.tolist() == [[10, 30]]
    issues = pd.read_csv(layout.raw_label_issues)
    assert issues[["kind", "image_id"]].values.tolist() == [["already_labelled", _id(a)]]


def test_ingest_appends_only_new_files_and_replace_starts_over(tmp_path, make_dicom):
    src = tmp_path / "in"
    make_dicom(src / "a.dcm", patient_id="P1")
    layout = Layout(tmp_path)
    raw = layout.raw
    ingest_directory(src, None, layout)
    make_dicom(src / "b.dcm", patient_id="P2")
    second = ingest_directory(src, None, layout)
    assert (second.added, second.skipped_existing) == (1, 1)
    assert len(list((raw / "images").iterdir())) == 2

    other = tmp_path / "other"
    make_dicom(other / "c.dcm", patient_id="P3")
    replaced = ingest_directory(other, None, layout, replace=True)
    assert replaced.added == 1
    assert len(list((raw / "images").iterdir())) == 1


def test_ingest_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing"):
        ingest_directory(tmp_path / "missing", None, Layout(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files"):
        ingest_directory(tmp_path / "empty", None, Layout(tmp_path))


@pytest.mark.parametrize(
    ("columns", "fmt", "match"),
    [
        (["foo"], "auto", "unrecognised columns"),
        (["patientId", "x", "y", "width", "height", "Target"], "vindr", "missing column"),
    ],
)
def test_a_bad_label_file_fails_before_anything_is_copied(
    tmp_path, make_dicom, columns, fmt, match
):
    make_dicom(tmp_path / "in" / "a.dcm")
    bad = tmp_path / "labels.csv"
    pd.DataFrame(np.ones((1, len(columns))), columns=columns).to_csv(bad, index=False)
    with pytest.raises(DataError, match=match):
        ingest_directory(tmp_path / "in", bad, Layout(tmp_path), label_format=fmt)
    assert not Layout(tmp_path).raw.exists()


# ---- symbolic links in the input folder are not followed; labels are checked at import


def test_symlinks_in_the_input_folder_are_not_followed_nor_archived(tmp_path, make_dicom):
    outside = tmp_path / "elsewhere"
    secret = outside / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    elsewhere_dicom = make_dicom(outside / "other_patient.dcm", patient_id="P9")
    src = tmp_path / "in"
    good = make_dicom(src / "good.dcm", patient_id="P1")
    (src / "passwd.dcm").symlink_to(secret)
    (src / "looks_fine.dcm").symlink_to(elsewhere_dicom)  # a DICOM, but outside the folder
    (src / "linked_folder").symlink_to(outside, target_is_directory=True)
    (src / "inside.dcm").symlink_to(good)  # inside the folder: its target is ingested anyway
    layout = Layout(tmp_path / "ws")
    summary = ingest_directory(src, None, layout)

    assert summary.seen == 5
    assert (summary.accepted, summary.added) == (1, 1)
    assert summary.quarantined == {"symlink": 4}
    assert summary.accepted + sum(summary.quarantined.values()) == summary.seen
    archived = sorted(layout.raw_images.iterdir())
    assert [p.read_bytes() for p in archived] == [good.read_bytes()]
    assert not any(b"root:x:0:0" in p.read_bytes() for p in layout.raw.rglob("*") if p.is_file())


def test_a_folder_of_links_only_says_why_nothing_was_ingested(tmp_path, make_dicom):
    target = make_dicom(tmp_path / "real" / "a.dcm")
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.dcm").symlink_to(target)
    with pytest.raises(DataError, match=r"no files found; 1 symbolic link\(s\) were not followed"):
        ingest_directory(src, None, Layout(tmp_path / "ws"))
    assert not (tmp_path / "ws" / "data").exists()


def test_the_raw_archive_is_owner_only(tmp_path, make_dicom):
    src = tmp_path / "in"
    make_dicom(src / "a.dcm")
    layout = Layout(tmp_path / "ws")
    layout.raw.mkdir(parents=True, mode=0o755)  # an existing workspace, made before
    layout.raw.chmod(0o755)
    ingest_directory(src, None, layout)
    assert oct(layout.raw.stat().st_mode & 0o777) == oct(0o700)
    assert oct(layout.raw_images.stat().st_mode & 0o777) == oct(0o700)
    for path in layout.raw_images.iterdir():
        assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_boxes_outside_the_image_are_refused_before_they_reach_labels_csv(tmp_path, make_dicom):
    src = tmp_path / "in"
    a = make_dicom(src / "a.dcm", patient_id="P1")  # 280 columns x 300 rows
    labels = tmp_path / "labels.csv"
    _rsna(
        labels,
        [
            ["a", 10, 20, 30, 40, 1],  # line 2
            ["a", 260, 20, 30, 40, 1],  # line 3: x_max 290 > 280
            ["a", 1e308, 1e308, 1e308, 1e308, 1],  # line 4
            ["a", 10, 20, 30, 40, 1],  # line 5: repeats line 2
        ],
    )
    layout = Layout(tmp_path)
    summary = ingest_directory(src, labels, layout)
    assert summary.label_issues == {"bad_value": 1, "box_outside_image": 1, "duplicate_row": 1}
    table = pd.read_csv(layout.raw_labels)
    assert table[["image_id", "x_min", "y_min", "x_max", "y_max"]].values.tolist() == [
        [_id(a), 10, 20, 40, 60]
    ]
    issues = pd.read_csv(layout.raw_label_issues).set_index("source_row")
    assert issues.loc[3, "kind"] == "box_outside_image"
    assert "280 columns x 300 rows" in issues.loc[3, "message"]
    assert issues.loc[5, "message"].startswith("repeats line 2")


def test_a_utf16_label_file_is_read_by_its_mark_and_without_one_refused_before_copying(
    tmp_path, make_dicom
):
    src = tmp_path / "in"
    a = make_dicom(src / "a.dcm", patient_id="P1")
    text = "patientId,x,y,width,height,Target\r\na,10,20,30,40,1\r\n"
    with_mark = tmp_path / "excel.csv"
    with_mark.write_bytes(text.encode("utf-16"))  # what Excel's "Unicode text" writes
    summary = ingest_directory(src, with_mark, Layout(tmp_path / "ws1"))
    assert (summary.label_format, summary.labels_imported) == ("rsna", 1)
    assert pd.read_csv(Layout(tmp_path / "ws1").raw_labels)["image_id"].tolist() == [_id(a)]

    without = tmp_path / "nomark.csv"
    without.write_bytes(text.encode("utf-16-le"))
    with pytest.raises(DataError, match=r"nomark\.csv: line 1: NUL bytes.*suggests utf_16"):
        ingest_directory(src, without, Layout(tmp_path / "ws2"))
    assert not Layout(tmp_path / "ws2").raw.exists()


@pytest.mark.parametrize(
    ("change", "reason", "names"),
    [
        ({"BitsAllocated": 0}, "corrupt", "BitsAllocated 0"),
        ({"BitsAllocated": 12}, "corrupt", "BitsAllocated 12"),
        ({"BitsStored": 20}, "corrupt", "BitsStored 20"),
        ({"PixelRepresentation": 2}, "corrupt", "PixelRepresentation 2"),
        ({"SamplesPerPixel": None}, "corrupt", "SamplesPerPixel missing"),
    ],
)
def test_impossible_or_oversized_pixel_modules_are_refused_at_screening(
    tmp_path, make_dicom, monkeypatch, change, reason, names
):
    """Values the pixel data cannot be laid out by are quarantined from the header with a reason,
    never first found out by a decoder. (A frame beyond the reader's limits: `too_large`, see
    tests/unit/test_serving_rule.py.)"""
    import pydicom

    from pipeline_steps.core.config import IngestParams
    from pipeline_steps.core.screening import build_metadata

    path = make_dicom(tmp_path / "in" / "x.dcm")
    ds = pydicom.dcmread(path)
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(lambda self: 1 / 0))
    metadata, quarantine = build_metadata(tmp_path / "in", IngestParams(), "k" * 32)
    assert metadata.empty
    assert quarantine["reason"].tolist() == [reason]
    assert names in quarantine["message"].iloc[0]
