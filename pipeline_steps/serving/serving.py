"""The served model's inference path as plain functions: a decoded DICOM in, boxes in original pixels out.

Pre- and post-processing are the training code's own functions (`dicom_io.read_image`,
`transforms.plan_geometry`/`preprocess_image`, `detector.predict_boxes`, `Geometry.inverse`), so an image
gives the same tensor here as in its training shard. Which inputs get this far (screening, the input
rule) is `prediction.py`; `pyfunc.py` wraps both for MLflow.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline_steps.core.config import DetectionParams, IngestParams, PreprocessParams
from pipeline_steps.core.detector import predict_boxes
from pipeline_steps.core.dicom_io import DicomImage
from pipeline_steps.core.labels import RSNA_LABEL
from pipeline_steps.core.shards import QUANT
from pipeline_steps.core.transforms import Geometry, plan_geometry, preprocess_image

if TYPE_CHECKING:
    import keras

INPUT_COLUMN = "dicom"
BOX_KEYS = ("x_min", "y_min", "x_max", "y_max", "score")
DETECTOR_ARTIFACT = "detector"
CONFIG_ARTIFACT = "config"
# The preprocess keys that change pixels (as in preprocess.pixel_params_hash): an older model keeps
# loading when unrelated preprocess options are added or removed later.
PIXEL_KEYS = ("input_size", "target_spacing_mm", "window", "percentiles")
# The ingest keys that decide which images are screened in (screening.reject_reason): a served
# model applies the rule of the data it was trained on.
SCREENING_KEYS = ("allowed_modalities", "allowed_body_parts", "min_size_px")


@dataclass(frozen=True)
class ServingConfig:
    """What the model needs beside its weights; stored as the `config` artifact of the model."""

    preprocess: PreprocessParams
    detection: DetectionParams
    default_spacing_mm: float
    label: str = RSNA_LABEL
    # Ingestion's screening rule (SCREENING_KEYS); versions registered before it was stored get
    # ingestion's defaults.
    screening: IngestParams = field(default_factory=IngestParams)

    @classmethod
    def from_params(
        cls, preprocess: PreprocessParams, detection: DetectionParams, ingest: IngestParams
    ) -> ServingConfig:
        screening = IngestParams.model_validate({k: getattr(ingest, k) for k in SCREENING_KEYS})
        return cls(preprocess, detection, ingest.default_spacing_mm, screening=screening)

    @property
    def ingest(self) -> IngestParams:
        """The screening rule and default spacing, as ingestion's params."""
        return self.screening.model_copy(update={"default_spacing_mm": self.default_spacing_mm})

    def to_json(self) -> str:
        pixel = self.preprocess.model_dump(mode="json")
        screening = self.screening.model_dump(mode="json")
        return json.dumps(
            {
                "preprocess": {k: pixel[k] for k in PIXEL_KEYS},
                # "test": the params section it comes from; registered models carry this key.
                "test": self.detection.model_dump(mode="json"),
                "default_spacing_mm": self.default_spacing_mm,
                "label": self.label,
                "ingest": {k: screening[k] for k in SCREENING_KEYS},
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ServingConfig:
        raw = json.loads(text)
        # Keep what today's DetectionParams knows about decoding (flat keys); nested sections such as
        # the baseline's do not shape served boxes, and a model must outlive changes to them.
        decoding = {
            k: v
            for k, v in raw["test"].items()
            if k in DetectionParams.model_fields and not isinstance(v, dict)
        }
        stored = raw.get("ingest") or {}
        return cls(
            PreprocessParams.model_validate({k: raw["preprocess"][k] for k in PIXEL_KEYS}),
            DetectionParams.model_validate(decoding),
            float(raw["default_spacing_mm"]),
            str(raw["label"]),
            IngestParams.model_validate({k: stored[k] for k in SCREENING_KEYS if k in stored}),
        )


# --------------------------------------------------------------------------------------------
# The inference path (plain functions; the PythonModel below only wires them)


def prepare(image: DicomImage, params: PreprocessParams) -> tuple[np.ndarray, Geometry]:
    """A decoded image as model input, exactly as the preprocess stage stores it (uint16 / QUANT)."""
    rows, cols = image.pixels.shape
    geometry = plan_geometry(
        rows,
        cols,
        image.spacing.row_mm,
        image.spacing.col_mm,
        params.input_size,
        params.target_spacing_mm,
    )
    return preprocess_image(image, geometry, params).astype(np.float32) / np.float32(
        QUANT
    ), geometry


def detect(
    model: keras.Model, images: Sequence[DicomImage], config: ServingConfig, threshold: float
) -> list[np.ndarray]:
    """(k, 5) boxes per image in original pixel coordinates (clipped to the image), score last."""
    if not images:
        return []
    prepared = [prepare(image, config.preprocess) for image in images]
    params = config.detection.model_copy(update={"score_threshold": threshold})
    found = predict_boxes(model, np.stack([pixels for pixels, _ in prepared]), params)
    out = []
    for (_, geometry), boxes in zip(prepared, found, strict=True):
        if not len(boxes):
            out.append(np.zeros((0, 5), np.float64))
            continue
        original = geometry.inverse(boxes[:, :4])
        original[:, [0, 2]] = np.clip(original[:, [0, 2]], 0.0, geometry.orig_cols)
        original[:, [1, 3]] = np.clip(original[:, [1, 3]], 0.0, geometry.orig_rows)
        # A box wholly in the letterbox padding has nothing left after clipping: not a finding.
        kept = (original[:, 2] > original[:, 0]) & (original[:, 3] > original[:, 1])
        out.append(np.column_stack([original[kept], boxes[kept, 4].astype(np.float64)]))
    return out


def box_records(boxes: np.ndarray, label: str) -> list[dict[str, Any]]:
    return [
        {**{k: float(v) for k, v in zip(BOX_KEYS, row, strict=True)}, "label": label}
        for row in boxes
    ]


# --------------------------------------------------------------------------------------------
# Input example (no PHI)


def example_dicom(size: int = 64) -> bytes:
    """A tiny synthetic radiograph with no patient, study or institution attributes at all."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import (
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["radflow-input-example"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [5.0, 5.0]
    ramp = np.linspace(0, 4095, size * size, dtype=np.float64).reshape(size, size)
    ds.PixelData = np.rint(ramp).astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def input_example() -> pd.DataFrame:
    return pd.DataFrame({INPUT_COLUMN: [base64.b64encode(example_dicom()).decode("ascii")]})
