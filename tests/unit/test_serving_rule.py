"""One serving rule for every prediction path: inputs are DICOM bytes (a file only where reading files
was explicitly switched on), screened by ingestion's rule before anything decodes them (size limits
from the header included), predicted, and recorded in the ledger before the answer. A served model
that cannot record refuses to answer unless it is configured to run unaudited, and then says so.

The decompression bomb (a 4.5 MB RLE file declaring 12000 x 12000 pixels) is refused on every path
without the pixel decoder ever being reached."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    RLELossless,
    generate_uid,
)

from pipeline_steps.core import dicom_limits
from pipeline_steps.core.config import DetectionParams, IngestParams, PreprocessParams, TrainParams
from pipeline_steps.core.dicom_io import read_image, read_image_bytes
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.screening import REASONS, build_metadata
from pipeline_steps.governance.ledger import LEDGER_URL_ENV, Ledger
from pipeline_steps.serving import pyfunc
from pipeline_steps.serving.prediction import (
    INPUT_REASONS,
    InputRejected,
    ModelRef,
    read_input,
    served_source,
)
from pipeline_steps.serving.serving import ServingConfig
from tests.conftest import FAKE_PHI, build_dicom

KEY = "unit-test-key"
BOMB_SIDE = 12000


class DecoderReached(AssertionError):
    pass


@pytest.fixture
def no_decoder(monkeypatch):
    """The pixel decoder, replaced by one that only records that it was reached (and fails):
    pydicom decodes every transfer syntax through a DecodeRunner, so a bomb that reaches one was
    not refused in time. The test checks the list is empty at its end."""
    reached: list[str] = []

    def refuse(self, *args, **kwargs):
        reached.append(str(args[0]) if args else "?")
        raise DecoderReached("the pixel decoder was reached")

    monkeypatch.setattr(DecodeRunner, "__init__", refuse)
    yield reached
    assert not reached, "a pixel decoder was reached"


def _rle_bomb() -> bytes:
    """A valid RLE Lossless DICOM of 12000 x 12000 16-bit pixels, all zero: two segments (high and
    low bytes) of 144 M bytes each, written as 128-byte replicate runs. 4.5 MB on disk."""
    runs = (BOMB_SIDE * BOMB_SIDE) // 128
    segment = b"\x81\x00" * runs  # -127: repeat the next byte 128 times
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["radflow-bomb"])
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.Rows = ds.Columns = BOMB_SIDE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb_bytes() -> bytes:
    data = _rle_bomb()
    assert len(data) < 5 * 1024 * 1024  # small on disk; 288 MB once decoded
    return data


@pytest.fixture
def bomb(tmp_path, bomb_bytes) -> Path:
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bomb_bytes)
    return path


@pytest.fixture(scope="module")
def tiny_model():
    from pipeline_steps.core.detector import build_detector

    model = build_detector(64, TrainParams(width=4, depth=2))
    box = model.get_layer("box")
    kernel, _ = box.get_weights()
    box.set_weights([kernel * 0.0, np.array([4.0, 4.0, 0.5, 0.5], np.float32)])
    return model


CONFIG = ServingConfig(
    PreprocessParams(input_size=64, target_spacing_mm=1.9),
    DetectionParams(score_threshold=0.0, max_detections=5, flip_tta=False),
    0.35,
)
REGISTERED = ModelRef("radflow-detector", "7", None, "run-abc")


def _served(tiny_model) -> pyfunc.RadiographDetector:
    identity = pyfunc.Identity(run_id="run-abc", code_version="c0de", data_version="d.dir")
    return pyfunc.RadiographDetector().bind(tiny_model, CONFIG, identity, REGISTERED)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.fixture
def serving_env(monkeypatch):
    for name in (LEDGER_URL_ENV, pyfunc.UNAUDITED_ENV, pyfunc.INPUT_DIR_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --------------------------------------------------------------------------------------------
# Limits before work: the bomb


def test_the_decoder_patch_does_catch_a_decode(tmp_path, monkeypatch):
    """The guard the bomb tests rely on: an ordinary image does reach the patched decoder."""
    reached = []
    monkeypatch.setattr(DecodeRunner, "__init__", lambda self, *a, **k: reached.append(1) or 1 / 0)
    with pytest.raises(DataError, match="cannot be decoded"):
        read_image(build_dicom(tmp_path / "ok.dcm"), 0.35)
    assert reached


def test_ingestion_refuses_the_bomb_from_its_header(bomb, no_decoder):
    metadata, quarantine = build_metadata(bomb.parent, IngestParams(), KEY)
    assert metadata.empty
    (row,) = quarantine.to_dict("records")
    assert row["reason"] == "too_large" and "too_large" in REASONS
    assert "12000x12000" in row["message"] and "before decoding" in row["message"]


def test_every_prediction_input_refuses_the_bomb_before_decoding(
    bomb, bomb_bytes, no_decoder, tiny_model, serving_env
):
    # the batch flow and serve-api (a file), and bytes (the served model)
    for source in (bomb, bomb_bytes):
        with pytest.raises(InputRejected) as caught:
            read_input(source, IngestParams(), KEY, name="bomb")
        assert caught.value.reason == "too_large"
    # the reader itself, for callers that decode without screening (preprocess)
    with pytest.raises(DataError, match="before decoding"):
        read_image(bomb, 0.35)
    with pytest.raises(DataError, match="before decoding"):
        read_image_bytes(bomb_bytes, "bomb", 0.35)
    # the MLflow pyfunc, as `mlflow models serve` calls it
    serving_env.setenv(pyfunc.UNAUDITED_ENV, "1")
    out = _served(tiny_model).predict(
        None, pd.DataFrame({"dicom": [base64.b64encode(bomb_bytes).decode()]})
    )
    assert out.loc[0, "reason"] == "too_large" and out.loc[0, "boxes"] == []


def test_a_compressed_frame_that_declares_another_size_than_its_header_is_not_decoded(
    tmp_path, bomb_bytes, no_decoder
):
    """The decoder sizes its output from the codestream, not from Rows/Columns: a small header over a
    JPEG 2000 codestream declaring 60000 x 60000 is refused by the reader before decoding."""
    ds = pydicom.dcmread(build_dicom(tmp_path / "small.dcm"))
    siz = b"\xff\x4f\xff\x51" + struct.pack(">HH", 41, 0) + struct.pack(">IIII", 60000, 60000, 0, 0)
    ds.PixelData = encapsulate([siz + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000 Lossless
    path = tmp_path / "j2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError, match="declares 60000x60000 pixels, the header 300x280"):
        read_image(path, 0.35)
    with pytest.raises(InputRejected) as caught:
        read_input(path, IngestParams(), KEY)
    assert caught.value.reason == "decode_failed"


def test_a_deflated_dataset_is_measured_before_pydicom_inflates_it(tmp_path, monkeypatch):
    """pydicom inflates a deflated dataset as a whole; one that would inflate past the limit is
    refused by counting, never held (the limit lowered so the test stays small)."""
    ds = pydicom.dcmread(build_dicom(tmp_path / "plain.dcm"))
    ds.PixelData = b"\x00" * (4 << 20)  # deflates about 1000:1
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 64 * 1024

    monkeypatch.setattr(dicom_limits, "MAX_INFLATED_BYTES", 1 << 20)
    inflated = []
    monkeypatch.setattr(pydicom.filereader.zlib, "decompress", lambda *a, **k: inflated.append(1))
    metadata, quarantine = build_metadata(tmp_path, IngestParams(), KEY, files=[path])
    assert quarantine["reason"].tolist() == ["too_large"] and not inflated
    with pytest.raises(DataError, match="inflates to more than"):
        read_image(path, 0.35)
    assert not inflated


# --------------------------------------------------------------------------------------------
# The input rule


def test_a_served_value_is_never_read_as_a_server_path(tmp_path, monkeypatch):
    secret = tmp_path / "shadow"
    secret.write_text("root:x:0:0")
    looked = []
    monkeypatch.setattr(Path, "is_file", lambda self: looked.append(self) or True)
    monkeypatch.setattr(Path, "resolve", lambda self, strict=False: looked.append(self) or self)
    answers = {}
    for value in (str(secret), str(tmp_path / "missing"), f"file:{secret}", f"file:{tmp_path}/x"):
        refused = served_source(value, "dicom[0]")
        assert isinstance(refused, InputRejected)
        answers[value] = (refused.reason, str(refused))
    assert not looked  # the filesystem was never asked
    plain, with_prefix = list(answers.values())[:2], list(answers.values())[2:]
    assert plain[0] == plain[1] and plain[0][0] == "not_base64"
    assert with_prefix[0] == with_prefix[1] and with_prefix[0][0] == "path_not_allowed"
    assert str(secret) not in json.dumps(list(answers.values()))
    assert set(INPUT_REASONS) >= {"not_base64", "path_not_allowed"}


def test_files_are_read_only_inside_the_enabled_input_folder(tmp_path):
    inputs = tmp_path / "inputs"
    image = build_dicom(inputs / "a.dcm")
    outside = build_dicom(tmp_path / "outside.dcm")
    (inputs / "link.dcm").symlink_to(outside)
    assert served_source("file:a.dcm", "x", input_dir=inputs) == image.resolve()
    assert served_source(f"file:{image}", "x", input_dir=inputs) == image.resolve()
    for value in ("file:../outside.dcm", f"file:{outside}", "file:link.dcm", "file:/etc/passwd"):
        refused = served_source(value, "x", input_dir=inputs)
        assert isinstance(refused, InputRejected) and refused.reason == "path_not_allowed", value
    missing = served_source("file:nope.dcm", "x", input_dir=inputs)
    assert isinstance(missing, InputRejected) and missing.reason == "not_found"
    assert served_source(base64.b64encode(b"DICM").decode(), "x") == b"DICM"


def test_the_served_model_screens_like_ingestion(tmp_path, tiny_model, serving_env):
    serving_env.setenv(pyfunc.UNAUDITED_ENV, "1")
    good = build_dicom(tmp_path / "good.dcm")
    ct = build_dicom(tmp_path / "ct.dcm", modality="CT")
    out = _served(tiny_model).predict(
        None,
        pd.DataFrame({"dicom": [_b64(good), _b64(ct), str(good), f"file:{good}"]}),
        params={"score_threshold": 0.0},
    )
    assert list(out.columns) == list(pyfunc.OUTPUT_COLUMNS)
    assert out["reason"].tolist() == ["", "modality_not_allowed", "not_base64", "path_not_allowed"]
    assert out.loc[0, "error"] == "" and (out.loc[0, "rows"], out.loc[0, "columns"]) == (300, 280)
    assert len(out.loc[0, "boxes"]) >= 1 and out.loc[1, "boxes"] == []
    assert set(out["audit"]) == {pyfunc.UNAUDITED}
    assert out["prediction_id"].nunique() == 4


def test_files_are_served_only_from_the_configured_folder(tmp_path, tiny_model, serving_env):
    serving_env.setenv(pyfunc.UNAUDITED_ENV, "1")
    serving_env.setenv(pyfunc.INPUT_DIR_ENV, str(tmp_path / "batch"))
    build_dicom(tmp_path / "batch" / "a.dcm")
    out = _served(tiny_model).predict(None, pd.DataFrame({"dicom": ["file:a.dcm", "file:../x"]}))
    assert out["reason"].tolist() == ["", "path_not_allowed"]


# --------------------------------------------------------------------------------------------
# Recorded before the answer, or refused


def test_without_a_ledger_the_served_model_refuses_to_answer(tmp_path, tiny_model, serving_env):
    model = _served(tiny_model)
    frame = pd.DataFrame({"dicom": [_b64(build_dicom(tmp_path / "a.dcm"))]})
    with pytest.raises(pyfunc.ServingRefused) as caught:
        model.predict(None, frame)
    assert caught.value.get_http_status_code() == 503
    assert LEDGER_URL_ENV in str(caught.value) and pyfunc.UNAUDITED_ENV in str(caught.value)
    # A ledger that cannot be written is no better.
    serving_env.setenv(LEDGER_URL_ENV, f"sqlite:///{tmp_path}/no/such/folder/ledger.db")
    with pytest.raises(pyfunc.ServingRefused, match="not recorded, so not returned"):
        model.predict(None, frame)
    # Configured to run unaudited, it answers, and every row says so.
    serving_env.setenv(pyfunc.UNAUDITED_ENV, "1")
    assert model.predict(None, frame)["audit"].tolist() == [pyfunc.UNAUDITED]


def test_every_served_answer_is_in_the_ledger_first(tmp_path, tiny_model, serving_env):
    url = f"sqlite:///{tmp_path}/ledger.db"
    serving_env.setenv(LEDGER_URL_ENV, url)
    named = build_dicom(tmp_path / f"{FAKE_PHI['PatientName']}.dcm")
    ct = build_dicom(tmp_path / "ct.dcm", modality="CT")
    out = _served(tiny_model).predict(
        None, pd.DataFrame({"dicom": [_b64(named), _b64(ct), "/etc/passwd"]})
    )
    assert set(out["audit"]) == {pyfunc.RECORDED}
    with Ledger(url) as ledger:
        rows = ledger.entries(kind="prediction")
        assert ledger.verify().ok
    assert [r.subject for r in rows] == out["prediction_id"].tolist()
    first, refused, not_b64 = (r.payload for r in rows)
    assert first["model"] == REGISTERED.as_dict()
    assert first["data_version"] == "d.dir" and first["code_version"] == "c0de"
    assert first["image_sha256"] == out.loc[0, "image_sha256"] and first["sop_instance_uid_hash"]
    assert refused["reason"] == "modality_not_allowed" and not_b64["reason"] == "not_base64"
    uid = str(pydicom.dcmread(named, stop_before_pixels=True).SOPInstanceUID)
    text = json.dumps([r.payload for r in rows])
    assert uid not in text and "Testperson" not in text and "/etc/passwd" not in text


def test_a_version_that_cannot_be_traced_is_not_served_audited(
    tmp_path, tiny_model, serving_env, monkeypatch
):
    import mlflow

    class EmptyRegistry:
        def search_model_versions(self, query):
            assert query == "run_id = 'run-abc'"
            return []

    monkeypatch.setattr(mlflow, "MlflowClient", EmptyRegistry)
    serving_env.setenv(LEDGER_URL_ENV, f"sqlite:///{tmp_path}/ledger.db")
    identity = pyfunc.Identity(run_id="run-abc")
    model = pyfunc.RadiographDetector().bind(tiny_model, CONFIG, identity)
    frame = pd.DataFrame({"dicom": [_b64(build_dicom(tmp_path / "a.dcm"))]})
    with pytest.raises(pyfunc.ServingRefused, match="holds no registered model version"):
        model.predict(None, frame)


def test_the_screening_rule_travels_with_the_model():
    config = ServingConfig.from_params(
        PreprocessParams(input_size=64),
        DetectionParams(),
        IngestParams(allowed_modalities=("DX",), min_size_px=128, default_spacing_mm=0.2),
    )
    again = ServingConfig.from_json(config.to_json())
    assert again == config
    assert again.ingest.allowed_modalities == ("DX",) and again.ingest.min_size_px == 128
    assert again.ingest.default_spacing_mm == 0.2
    # versions registered before the rule was stored screen with ingestion's defaults
    old = json.loads(config.to_json())
    del old["ingest"]
    assert ServingConfig.from_json(json.dumps(old)).ingest.allowed_modalities == ("DX", "CR")


def test_the_gate_scores_local_files_in_process_without_ledger_rows(
    tmp_path, tiny_model, serving_env
):
    """`flows/gate.py` evaluates a test split through `predict_files`: the same screening, no
    ledger rows (an evaluation, not predictions about patients), reachable only in-process."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    serving_env.setenv(LEDGER_URL_ENV, url)
    good = build_dicom(tmp_path / "good.dcm")
    ct = build_dicom(tmp_path / "ct.dcm", modality="CT")
    out = _served(tiny_model).predict_files([good, str(ct)], threshold=0.0)
    assert out["reason"].tolist() == ["", "modality_not_allowed"]
    assert len(out.loc[0, "boxes"]) >= 1 and set(out["audit"]) == {pyfunc.UNAUDITED}
    with Ledger(url) as ledger:
        assert ledger.entries() == []
