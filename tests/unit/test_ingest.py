import pandas as pd
import pytest

from pipeline_steps.errors import DataError
from pipeline_steps.ingest import NO_FINDING, file_sha256, image_id_for, ingest_directory


def _rsna(path, rows):
    pd.DataFrame(rows, columns=["patientId", "x", "y", "width", "height", "Target"]).to_csv(
        path, index=False
    )


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
    raw = tmp_path / "raw"
    summary = ingest_directory(src, labels, raw)

    assert (summary.seen, summary.added, summary.skipped_existing) == (2, 2, 0)
    assert summary.labels_without_image == 1
    names = sorted(p.name for p in (raw / "images").iterdir())
    assert f"{image_id_for(file_sha256(a))}.dcm" in names
    assert not any("Smith" in n or "Doe" in n for n in names)  # source names may carry PHI
    table = pd.read_csv(raw / "labels.csv")
    pos = table[table["label"] != NO_FINDING].iloc[0]
    assert (pos.x_min, pos.y_min, pos.x_max, pos.y_max) == (10, 20, 40, 60)
    assert (table["label"] == NO_FINDING).sum() == 1


def test_ingest_appends_only_new_files_and_replace_starts_over(tmp_path, make_dicom):
    src = tmp_path / "in"
    make_dicom(src / "a.dcm", patient_id="P1")
    raw = tmp_path / "raw"
    ingest_directory(src, None, raw)
    make_dicom(src / "b.dcm", patient_id="P2")
    second = ingest_directory(src, None, raw)
    assert (second.added, second.skipped_existing) == (1, 1)
    assert len(list((raw / "images").iterdir())) == 2

    other = tmp_path / "other"
    make_dicom(other / "c.dcm", patient_id="P3")
    replaced = ingest_directory(other, None, raw, replace=True)
    assert replaced.added == 1
    assert len(list((raw / "images").iterdir())) == 1


def test_ingest_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="missing"):
        ingest_directory(tmp_path / "missing", None, tmp_path / "raw")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files"):
        ingest_directory(tmp_path / "empty", None, tmp_path / "raw")


def test_unrecognised_label_format_is_rejected(tmp_path, make_dicom):
    make_dicom(tmp_path / "in" / "a.dcm")
    bad = tmp_path / "labels.csv"
    pd.DataFrame({"foo": [1]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match="unrecognised columns"):
        ingest_directory(tmp_path / "in", bad, tmp_path / "raw")
