"""`radflow pacs pull` against a real Orthanc (DICOMweb, authentication on): studies found over QIDO-RS,
instances retrieved over WADO-RS and ingested as one batch; nothing asked for twice; non-images skipped
with a reason; labels from a CSV and from TID 1500 SR annotations; an outage mid-pull keeps nothing; a
refused sign-in names the settings; no patient identity anywhere radflow writes or logs."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid

from flows import pacs_pull, stages, versioning, workspace
from flows.cli import main
from flows.pacs import Pacs, PacsUnavailable
from pipeline_steps.core.layout import Layout
from pipeline_steps.landing import sop_key
from pipeline_steps.serving.sr import build_sr
from pipeline_steps.synthetic.dicom import PHI_KEYWORDS
from tests.conftest import build_dicom
from tests.integration.conftest import set_params
from tests.integration.pacs_common import synthetic_studies

pytestmark = pytest.mark.integration

# Fast retries: an outage fails in well under a second.
PARAMS = {
    "pacs": {"attempts": 2, "backoff_s": 0.05, "timeout_s": 10},
    "validate": {"min_images": 2, "positive_fraction": [0.0, 1.0]},
    "preprocess": {"workers": 1},
}
IDENTITY = [k for k in PHI_KEYWORDS if k != "StudyDate"]  # the index keeps a query's latest date


@pytest.fixture
def ws(tmp_path, orthanc, monkeypatch) -> Layout:
    import flows.cli

    # main() configures logging and the environment for its process: not for the test session's.
    monkeypatch.setattr(flows.cli, "_setup_environment", lambda: None)
    for name, value in orthanc.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RADFLOW_PSEUDONYM_DEV_MODE", "1")  # synthetic data only
    layout = workspace.init(tmp_path / "ws")
    set_params(layout.root, PARAMS)
    return layout


@pytest.fixture
def retrieved(monkeypatch) -> list[str]:
    """SOP Instance UIDs asked for over WADO-RS."""
    asked: list[str] = []
    real = Pacs.retrieve

    def counting(self, study_uid, series_uid, sop_uid):
        asked.append(sop_uid)
        return real(self, study_uid, series_uid, sop_uid)

    monkeypatch.setattr(Pacs, "retrieve", counting)
    return asked


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def encapsulated_pdf(source: Dataset) -> Dataset:
    """A scanned referral filed in the image's study, as PACS holds them."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "StudyInstanceUID",
        "StudyDate",
    ):
        setattr(ds, keyword, source.get(keyword))
    ds.AccessionNumber = source.get("AccessionNumber", "")
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Referral"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n"
    return ds


def identity_of(paths: list[Path]) -> set[str]:
    values = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        values |= {str(ds.get(k, "") or "").strip() for k in IDENTITY}
    return {v for v in values if len(v) >= 6}


def leaks(root: Path, phi: set[str]) -> list[str]:
    """Files under `root` (parquet read as tables) that hold any of the values."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            text = pd.read_parquet(path).to_csv()
        else:
            text = path.read_bytes().decode("latin-1")
        hits = sorted(v for v in phi if v in text)
        if hits:
            found.append(f"{path.relative_to(root)}: {hits}")
    return found


def cli_pull(ws: Layout, capfd, *extra: str) -> dict:
    assert main(["pacs", "pull", "--workspace", str(ws.root), "--json", *extra]) == 0
    out = capfd.readouterr()
    return json.loads(out.out.strip().splitlines()[-1]) | {"_log": out.out + out.err}


def test_a_pull_ingests_new_studies_with_csv_labels_and_a_repull_asks_for_nothing(
    ws, orthanc, tmp_path, retrieved, capfd, caplog
):
    caplog.set_level(logging.DEBUG)
    paths = synthetic_studies(tmp_path / "synth", 4)
    orthanc.upload(paths)
    pdf = encapsulated_pdf(pydicom.dcmread(paths[0]))
    orthanc.upload([dicom_bytes(pdf)])
    # The site's label CSV names images by SOP Instance UID (a PACS has no file names).
    sop_of = {
        p.stem: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths
    }
    labels = pd.read_csv(tmp_path / "synth" / "labels.csv", dtype=str)
    labels["patientId"] = labels["patientId"].map(sop_of)
    labels.to_csv(tmp_path / "pacs_labels.csv", index=False)

    first = cli_pull(ws, capfd, "--labels", str(tmp_path / "pacs_labels.csv"))
    assert first["studies"] == 4 and first["new_images"] == 4 and first["archived"] == 4
    assert first["skipped_not_an_image"] == 1  # the PDF ...
    assert sorted(retrieved) == sorted(sop_of.values())  # ... never even retrieved
    assert first["labels_imported"] == len(labels) and not first["label_issues"]
    assert first["data_version"] == versioning.data_version(ws)
    assert len(list(ws.raw_images.glob("*.dcm"))) == 4
    stored = pd.read_csv(ws.raw_labels)
    assert len(stored) == len(labels) and set(stored["image_id"]) == {
        p.stem for p in ws.raw_images.glob("*.dcm")
    }
    index = json.loads(ws.pacs_pulled.read_text())
    everything = set(sop_of.values()) | {str(pdf.SOPInstanceUID)}
    assert set(index["instances"]) == {sop_key(s) for s in everything}
    assert index["instances"][sop_key(str(pdf.SOPInstanceUID))]["status"] == "not_an_image"
    (query,) = index["queries"].values()
    dates = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyDate) for p in paths}
    assert query["last_study_date"] == max(dates)
    assert not ws.pacs_incoming.exists()

    retrieved.clear()
    second = cli_pull(ws, capfd)
    assert retrieved == []  # no WADO-RS request for anything pulled before
    assert second["new_images"] == 0 and second["unchanged"] == 5 and second["archived"] == 0
    assert second["data_version"] is None and versioning.data_version(ws) == first["data_version"]

    # What ingestion's pipeline makes of the pulled studies holds no patient identity, nor does
    # anything radflow wrote or logged on the way.
    _, params = workspace.open_workspace(ws.root)
    stages.validate(ws, params)
    stages.preprocess(ws, params)
    phi = identity_of(paths) | {str(pdf.SOPInstanceUID)}
    assert phi, "the synthetic studies carry patient headers"
    for folder in (ws.processed, ws.interim, ws.reports, ws.pacs_state):
        assert not leaks(folder, phi), leaks(folder, phi)
    logged = first["_log"] + second["_log"] + caplog.text
    assert not [v for v in phi if v in logged]
    assert orthanc.password not in logged and orthanc.password not in ws.pacs_pulled.read_text()


def test_labels_from_sr_annotations_skipping_radflow_output_and_screening_like_ingest(
    ws, orthanc, tmp_path, retrieved
):
    paths = synthetic_studies(tmp_path / "synth", 2, seed=3)
    orthanc.upload(paths)
    source = pydicom.dcmread(paths[0])
    boxes = [
        {"x_min": 40, "y_min": 60, "x_max": 140, "y_max": 170, "score": 1, "label": "Nodule/Mass"},
        {"x_min": 300, "y_min": 210, "x_max": 380, "y_max": 300, "score": 1, "label": "opacity"},
    ]
    annotation = build_sr(
        source,
        boxes,
        prediction_id="annotation-1",
        model_name="Annotate",
        model_version="2.1",
        manufacturer="Acme Imaging",
    )
    annotation.SeriesDescription = "Reference annotations"
    ours = build_sr(
        source,
        [boxes[0] | {"score": 0.4, "label": "opacity"}],
        prediction_id="prediction-1",
        model_name="radflow-detector",
        model_version="3",
    )
    # An image the screening refuses (not a chest), in a DX study of its own.
    hand = build_dicom(tmp_path / "hand.dcm", np.full((300, 280), 900, np.uint16), body_part="HAND")
    orthanc.upload([dicom_bytes(annotation), dicom_bytes(ours), hand])
    layout, params = workspace.open_workspace(ws.root)

    result = pacs_pull.pull_and_ingest(layout, params)
    assert result["new_images"] == 3 and result["archived"] == 3
    assert sum(result["quarantined"].values()) == 1  # the hand: archived, with its reason code
    assert result["sr_label_sources"] == 1 and result["sr_labels"] == 2
    assert result["skipped_radflow_output"] == 1  # radflow's own predictions are never labels
    assert result["labels_imported"] == 2 and not result["label_issues"]
    assert str(annotation.SOPInstanceUID) in retrieved  # read to find the boxes ...
    assert len(list(layout.raw_images.glob("*.dcm"))) == 3  # ... but no SR is archived
    stored = pd.read_csv(layout.raw_labels)
    (image_id,) = set(stored["image_id"])
    archived = pydicom.dcmread(layout.raw_image(image_id), stop_before_pixels=True)
    assert archived.SOPInstanceUID == source.SOPInstanceUID  # the image the boxes were drawn on
    got = stored.sort_values("label")[["label", "x_min", "y_min", "x_max", "y_max"]]
    assert got.values.tolist() == [
        ["nodule_mass", 40.0, 60.0, 140.0, 170.0],
        ["opacity", 300.0, 210.0, 380.0, 300.0],
    ]


def test_an_annotation_stored_after_its_image_was_pulled_labels_the_archived_image(
    ws, orthanc, tmp_path, retrieved
):
    paths = synthetic_studies(tmp_path / "synth", 2, seed=9)
    orthanc.upload(paths)
    layout, params = workspace.open_workspace(ws.root)
    first = pacs_pull.pull_and_ingest(layout, params)
    assert first["archived"] == 2 and first["labels_imported"] == 0
    source = pydicom.dcmread(paths[1])
    box = {"x_min": 50, "y_min": 70, "x_max": 150, "y_max": 160, "score": 1, "label": "opacity"}
    annotation = build_sr(
        source,
        [box],
        prediction_id="annotation-late",
        model_name="Annotate",
        model_version="2.1",
        manufacturer="Acme Imaging",
    )
    annotation.SeriesDescription = "Reference annotations"
    orthanc.upload([dicom_bytes(annotation)])
    retrieved.clear()

    second = pacs_pull.pull_and_ingest(layout, params)
    assert retrieved == [str(annotation.SOPInstanceUID)]  # the image is not asked for again
    assert second["new_images"] == 0 and second["relabelled_images"] == 1
    assert second["archived"] == 0 and second["labels_imported"] == 1
    assert not second["label_issues"]
    assert second["data_version"] not in (None, first["data_version"])  # the labels changed
    (row,) = pd.read_csv(layout.raw_labels).itertuples()
    archived = pydicom.dcmread(layout.raw_image(row.image_id), stop_before_pixels=True)
    assert archived.SOPInstanceUID == source.SOPInstanceUID
    assert (row.label, row.x_min, row.y_min, row.x_max, row.y_max) == ("opacity", 50, 70, 150, 160)
    assert len(list(layout.raw_images.glob("*.dcm"))) == 2


def test_an_outage_mid_pull_keeps_nothing_and_the_next_pull_takes_each_instance_once(
    ws, orthanc, tmp_path, monkeypatch
):
    paths = synthetic_studies(tmp_path / "synth", 4, seed=5)
    orthanc.upload(paths)
    layout, params = workspace.open_workspace(ws.root)
    before = versioning.data_version(layout) if layout.raw_dvc.exists() else None
    asked: list[str] = []
    real = Pacs.retrieve

    def stopping_after_two(self, study_uid, series_uid, sop_uid):
        if len(asked) == 2:
            orthanc.stop()
        asked.append(sop_uid)
        return real(self, study_uid, series_uid, sop_uid)

    monkeypatch.setattr(Pacs, "retrieve", stopping_after_two)
    with pytest.raises(PacsUnavailable) as err:
        pacs_pull.pull_and_ingest(layout, params)
    message = str(err.value)
    assert "RADFLOW_PACS_URL" in message and "Nothing of this pull was kept" in message
    assert orthanc.password not in message
    assert not layout.pacs_incoming.exists() and not layout.pacs_pulled.exists()
    assert not list(layout.raw_images.glob("*.dcm"))
    assert (versioning.data_version(layout) if layout.raw_dvc.exists() else None) == before

    orthanc.start()
    asked.clear()
    monkeypatch.setattr(
        Pacs, "retrieve", lambda self, *uids: (asked.append(uids[2]), real(self, *uids))[1]
    )
    result = pacs_pull.pull_and_ingest(layout, params)
    assert result["archived"] == 4 and result["data_version"] != before
    assert sorted(asked) == sorted(set(asked)) and len(asked) == 4  # each instance once
    assert len(json.loads(layout.pacs_pulled.read_text())["instances"]) == 4


def test_studies_are_found_by_study_date_range_and_modality(ws, orthanc, tmp_path):
    paths = synthetic_studies(tmp_path / "synth", 4, seed=21)
    orthanc.upload(paths)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    by_date = sorted((str(h.StudyDate), str(h.StudyInstanceUID)) for h in headers)
    _, params = workspace.open_workspace(ws.root)
    pacs = pacs_pull.connect(params)

    def found(**filters) -> set[str]:
        wanted = pacs_pull.pull_filters(params.pacs.pull, **filters)
        return set(pacs_pull.find_studies(pacs, wanted))

    everything = {uid for _, uid in by_date}
    assert found() == everything
    first_day, last_day = by_date[0][0], by_date[-1][0]
    assert found(date_from=last_day) == {u for d, u in by_date if d >= last_day}
    assert found(date_to=first_day) == {u for d, u in by_date if d <= first_day}
    assert found(date_from="20990101") == set()
    for modality in {str(h.Modality) for h in headers}:
        assert found(modalities=[modality]) == {
            str(h.StudyInstanceUID) for h in headers if h.Modality == modality
        }
    assert found(modalities=["CT"]) == set()


def test_a_refused_sign_in_names_the_settings_not_the_secret(ws, orthanc, monkeypatch, capfd):
    monkeypatch.setenv("RADFLOW_PACS_PASSWORD", "not-the-password-4711")
    assert main(["pacs", "pull", "--workspace", str(ws.root)]) == 1
    err = capfd.readouterr().err
    assert "RADFLOW_PACS_USER" in err and "RADFLOW_PACS_PASSWORD" in err and "401" in err
    assert "not-the-password-4711" not in err and orthanc.password not in err
    assert not ws.pacs_pulled.exists() and not ws.pacs_incoming.exists()
