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
