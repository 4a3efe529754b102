"""Predictions as audit records: a DICOM goes through ingestion's checks, de-identification and the
training transforms, and comes out as one self-describing record (and a PHI-free ledger payload).

The serving rule, shared by `radflow predict`, `radflow serve-api` and the MLflow pyfunc: an input
is DICOM bytes (a file only where the caller explicitly reads files: the batch flow over the files
it was given, a served model with RADFLOW_SERVING_INPUT_DIR set); it is screened by ingestion's
rule (same reason codes, size limits from the header) before anything decodes it; then predicted;
and the caller writes the records to the ledger before it answers.

Plain functions over a loaded Keras model; reading the registry, writing JSONL or the ledger is the
job of `flows/predict.py`, `flows/api.py` and `pyfunc.py`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline_steps.core.config import IngestParams
from pipeline_steps.core.deid import image_id_for, pseudonym
from pipeline_steps.core.dicom_io import (
    DicomImage,
    UnreadableDicom,
    read_image_bytes,
    scan_bytes,
    scan_header,
)
from pipeline_steps.core.dicom_io import read_image as read_dicom_image
from pipeline_steps.core.dicom_tags import HeaderValueError
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import file_sha256
from pipeline_steps.serving.serving import ServingConfig, box_records, detect

if TYPE_CHECKING:
    import keras

PREDICTION = "prediction"  # the ledger kind of every prediction, batch or online
UID_KIND = "sop_instance_uid"  # the pseudonym kind of the salted SOP Instance UID hash
RECORD_KEYS = (
    "prediction_id",
    "image",
    "image_sha256",
    "file_sha256",
    "sop_instance_uid_hash",
    "boxes",
    "model",
    "data_version",
    "code_version",
    "threshold",
    "created_at",
)
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# A served value names a file only with this prefix (":" is not base64, so nothing is ambiguous),
# and only where reading files was switched on for the server.
FILE_PREFIX = "file:"
# Reason codes of the input rule, beside ingestion's (screening.REASONS) and `decode_failed`.
INPUT_REASONS = ("not_base64", "path_not_allowed", "not_found")


class InputRejected(DataError):
    """An input that ingestion would not accept, or that cannot be decoded; `reason` is its code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ModelRef:
    """The registered version that made a prediction, and the stage it was served from."""

    name: str
    version: str
    stage: str | None  # the alias it was loaded through (or holds), None for a bare version
    run_id: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "stage": self.stage,
            "run_id": self.run_id,
        }


@dataclass(frozen=True)
class Provenance:
    """What every record of one model states about where it came from."""

    model: ModelRef
    data_version: str  # DVC md5 of the data the model was trained on (the version's tag)
    code_version: str  # the radflow code that made the prediction


@dataclass(frozen=True)
class Screened:
    """An input that passed ingestion's checks, decoded, with its identifiers reduced to hashes."""

    image: DicomImage
    file_sha256: str
    sop_instance_uid_hash: str


# An input as a predictor takes it: a local file (the batch flow's own inputs), DICOM bytes, or an
# input already refused by the input rule (it becomes its error record, in its place).
Source = Path | bytes | InputRejected


@dataclass(frozen=True)
class Outcome:
    """One input's record, and the size of its decoded image (None when it was refused)."""

    record: dict[str, Any]
    shape: tuple[int, int] | None


# --------------------------------------------------------------------------------------------
# Identifiers


def new_prediction_id(now_ms: int | None = None, entropy: bytes | None = None) -> str:
    """A ULID: 48-bit millisecond time + 80 random bits in Crockford base32, so ids sort by time."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = secrets.token_bytes(10) if entropy is None else entropy
    if not 0 <= ms < 1 << 48 or len(rand) != 10:
        raise ValueError("a ULID needs a 48-bit time and 10 bytes of entropy")
    value = (ms << 80) | int.from_bytes(rand, "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def uid_hash(uid: str, key: str) -> str:
    """The keyed (salted) hash of a UID: stable per key, unlinkable to the UID without the key."""
    return pseudonym(uid.strip(), key, UID_KIND)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# Reading: ingestion's verdict first, then the training reader


def read_input(
    source: Path | bytes, ingest: IngestParams, key: str, *, name: str | None = None
) -> Screened:
    """Screen `source` (a file, or DICOM bytes) as ingestion does (same reason codes, the header's
    size limits included) and only then decode it as training does. `name` is what messages call
    the input (a file's name by default). Without `key` the UID hash is left empty.

    Raises InputRejected with the ingestion reason code (or `decode_failed`).
    """
    from pipeline_steps.core.screening import reject_reason

    label = name or (source.name if isinstance(source, Path) else "input")
    if isinstance(source, bytes | bytearray) and not source:
        raise InputRejected("not_dicom", f"{label}: holds no bytes")
    try:
        header = scan_header(source) if isinstance(source, Path) else scan_bytes(source, label)
        verdict = reject_reason(header.dataset, ingest, header=header)
        uid = str(header.dataset.get("SOPInstanceUID", "") or "")
    except UnreadableDicom as exc:
        raise InputRejected(exc.reason, str(exc)) from None
    except HeaderValueError as exc:
        raise InputRejected("corrupt", f"{label}: {exc}") from None
    except Exception as exc:  # a header value nobody anticipated costs this input, not the batch
        raise InputRejected(
            "corrupt", f"{label}: header cannot be interpreted ({type(exc).__name__})"
        ) from None
    if verdict is not None:
        reason, message = verdict
        raise InputRejected(reason, f"{label}: {message}")
    try:
        if isinstance(source, Path):
            image = read_dicom_image(source, ingest.default_spacing_mm)
            digest = file_sha256(source)
        else:
            image = read_image_bytes(bytes(source), label, ingest.default_spacing_mm)
            digest = hashlib.sha256(source).hexdigest()
    except DataError as exc:
        raise InputRejected("decode_failed", str(exc)) from None
    return Screened(
        image=image,
        file_sha256=digest,
        sop_instance_uid_hash=uid_hash(uid, key) if uid and key else "",
    )


def served_source(value: object, name: str, *, input_dir: Path | None = None) -> Source:
    """What a served request's value stands for, by the input rule: bytes, or base64 text of them;
    `file:PATH` only when `input_dir` is given (batch scoring), and only for a regular file inside
    it (symbolic links are followed, so one pointing outside is refused). The filesystem is never
    looked at otherwise, so every path gets the same answer whether or not it exists. Never raises:
    a refused value comes back as its InputRejected."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if not isinstance(value, str):
        return InputRejected(
            "not_base64", f"{name}: a {type(value).__name__}, not base64-encoded DICOM bytes"
        )
    text = value.strip()
    if text[: len(FILE_PREFIX)].lower() == FILE_PREFIX:
        return _local_file(text[len(FILE_PREFIX) :], name, input_dir)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return InputRejected(
            "not_base64",
            f"{name}: not base64-encoded DICOM bytes (a served model reads no files: send the "
            "file's bytes)",
        )


def _local_file(text: str, name: str, input_dir: Path | None) -> Source:
    refused = InputRejected(
        "path_not_allowed",
        f"{name}: this server reads no files outside its input folder (RADFLOW_SERVING_INPUT_DIR, "
        "for batch scoring only); send the DICOM's bytes",
    )
    if input_dir is None or not text or "\x00" in text or len(text) > 4096:
        return refused
    root = input_dir.resolve()
    try:
        path = (root / text).resolve()
    except (OSError, RuntimeError, ValueError):
        return refused
    if not path.is_relative_to(root):
        return refused
    if not path.is_file():
        return InputRejected("not_found", f"{name}: no such file in the input folder")
    return path


# --------------------------------------------------------------------------------------------
# Records


def build_record(
    prediction_id: str,
    image: str,
    screened: Screened,
    boxes: np.ndarray,
    provenance: Provenance,
    threshold: float,
    created_at: str,
    label: str,
) -> dict[str, Any]:
    return {
        "prediction_id": prediction_id,
        "image": image,
        "image_sha256": screened.image.pixel_sha256,
        "file_sha256": screened.file_sha256,
        "sop_instance_uid_hash": screened.sop_instance_uid_hash,
        "boxes": box_records(boxes, label),
        "model": provenance.model.as_dict(),
        "data_version": provenance.data_version,
        "code_version": provenance.code_version,
        "threshold": float(threshold),
        "created_at": created_at,
    }


def error_record(
    prediction_id: str,
    image: str,
    reason: str,
    message: str,
    provenance: Provenance,
    created_at: str,
) -> dict[str, Any]:
    return {
        "prediction_id": prediction_id,
        "image": image,
        "error": message,
        "reason": reason,
        "boxes": [],
        "model": provenance.model.as_dict(),
        "data_version": provenance.data_version,
        "code_version": provenance.code_version,
        "created_at": created_at,
    }


def ledger_payload(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as the ledger keeps it: without the input path, which may name a patient.

    An error message quotes the file name, so the ledger keeps only its reason code.
    """
    payload = {k: v for k, v in record.items() if k not in ("image", "error")}
    payload["training_membership_key"] = (
        image_id_for(record["file_sha256"]) if record.get("file_sha256") else None
    )
    return payload


def membership(record: Mapping[str, Any], manifest: Mapping[str, str]) -> str | None:
    """The split the predicted image was in, if the model trained or tested on it; else None.

    `manifest` maps the training manifest's content hash (ingestion's file id) to its split.
    """
    key = record.get("training_membership_key")
    if not key and record.get("file_sha256"):
        key = image_id_for(str(record["file_sha256"]))
    return manifest.get(str(key)) if key else None


# --------------------------------------------------------------------------------------------
# One batch


def predict_inputs(
    model: keras.Model,
    inputs: Sequence[tuple[str, Source]],
    config: ServingConfig,
    ingest: IngestParams,
    provenance: Provenance,
    *,
    threshold: float,
    key: str,
    new_id: Callable[[], str] = new_prediction_id,
    clock: Callable[[], str] = utc_now,
) -> list[Outcome]:
    """One outcome per (given name, source), in input order: a record with boxes, or with `error`
    and `reason`. An input that is refused or cannot be read yields its error record and the
    others go on; every one is screened before it is decoded."""
    outcomes: list[Outcome | None] = [None] * len(inputs)
    readable: list[tuple[int, Screened]] = []
    for i, (name, source) in enumerate(inputs):
        try:
            if isinstance(source, InputRejected):
                raise source
            readable.append((i, read_input(source, ingest, key, name=name)))
        except InputRejected as exc:
            record = error_record(new_id(), name, exc.reason, str(exc), provenance, clock())
            outcomes[i] = Outcome(record, None)
    found = detect(model, [s.image for _, s in readable], config, threshold)
    for (i, screened), boxes in zip(readable, found, strict=True):
        record = build_record(
            new_id(),
            inputs[i][0],
            screened,
            boxes,
            provenance,
            threshold,
            clock(),
            config.label,
        )
        rows, cols = screened.image.pixels.shape
        outcomes[i] = Outcome(record, (int(rows), int(cols)))
    return [o for o in outcomes if o is not None]


def predict_batch(
    model: keras.Model,
    inputs: Sequence[tuple[str, Source]],
    config: ServingConfig,
    ingest: IngestParams,
    provenance: Provenance,
    *,
    threshold: float,
    key: str,
    new_id: Callable[[], str] = new_prediction_id,
    clock: Callable[[], str] = utc_now,
) -> list[dict[str, Any]]:
    """One record per (given name, source), in input order: boxes, or `error` and `reason`
    (`predict_inputs` without the image sizes)."""
    outcomes = predict_inputs(
        model,
        inputs,
        config,
        ingest,
        provenance,
        threshold=threshold,
        key=key,
        new_id=new_id,
        clock=clock,
    )
    return [o.record for o in outcomes]
