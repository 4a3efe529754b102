"""Reviews at the edges: find the image a prediction was made on, render it for a reader (pixels only,
no header value), and append a reviewer's verdicts to the audit ledger; the console and the CLI call
these. The rules of a review and of monitoring are `pipeline_steps/governance/review.py`."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.anchoring import open_ledger
from pipeline_steps.core.config import Params
from pipeline_steps.core.dicom_io import read_image
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.layout import Layout
from pipeline_steps.core.transforms import DisplayWindow
from pipeline_steps.governance import review
from pipeline_steps.governance.ledger import Entry, Ledger
from pipeline_steps.serving.prediction import PREDICTION

DISPLAY_MAX = 1024  # longest side of a rendered image, in pixels; boxes are drawn in DICOM pixels


class ImageNotKept(DataError):
    """The DICOM a prediction was made on is in neither the dataset nor the review store."""


@dataclass(frozen=True)
class Rendered:
    """An image as a reader sees it: PNG bytes, and the DICOM's size (rows, columns)."""

    png: bytes
    size: tuple[int, int]


def image_key(record: Mapping[str, Any]) -> str | None:
    """Ingestion's content id of the predicted file (what the dataset and the review store use)."""
    key = record.get("training_membership_key")
    return str(key) if key else None


def find_image(layout: Layout, record: Mapping[str, Any]) -> Path | None:
    """The predicted DICOM: in the dataset when it was ingested, else the copy kept for review."""
    key = image_key(record)
    if key is None or not key.isalnum():
        return None
    for path in (layout.raw_image(key), layout.review_image(key)):
        if path.is_file():
            return path
    return None


def _image_path(layout: Layout, entry: Entry) -> Path:
    path = find_image(layout, entry.payload)
    if path is None:
        raise ImageNotKept(
            f"the image of prediction {entry.subject} was not kept (review.keep_inputs was off "
            "when it was made, or its copy was removed): it cannot be shown or reviewed"
        )
    return path


def image_size(layout: Layout, params: Params, entry: Entry) -> tuple[int, int]:
    """(rows, columns) of a prediction's image, from its pixels."""
    image = read_image(
        _image_path(layout, entry), params.ingest.default_spacing_mm, hash_pixels=False
    )
    rows, cols = image.pixels.shape
    return int(rows), int(cols)


def render(layout: Layout, params: Params, entry: Entry) -> Rendered:
    """The prediction's image through the model's own display window, as 8-bit PNG (longest side
    at most DISPLAY_MAX). Only pixels leave the file: no header value is drawn or embedded."""
    from PIL import Image

    image = read_image(
        _image_path(layout, entry), params.ingest.default_spacing_mm, hash_pixels=False
    )
    window = DisplayWindow(params.preprocess.window, params.preprocess.percentiles)(image)
    rows, cols = window.shape
    picture = Image.fromarray((window * 255.0 + 0.5).astype("uint8"), mode="L")
    scale = DISPLAY_MAX / max(rows, cols)
    if scale < 1.0:
        picture = picture.resize(
            (max(1, round(cols * scale)), max(1, round(rows * scale))), Image.Resampling.LANCZOS
        )
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=False)
    return Rendered(out.getvalue(), (int(rows), int(cols)))


# --------------------------------------------------------------------------------------------
# The ledger


def prediction_entry(ledger: Ledger, prediction_id: str) -> Entry:
    from flows.audit import UnknownPrediction

    found = ledger.entries(kind=PREDICTION, subject=prediction_id.strip())
    if not found:
        raise UnknownPrediction(f"no prediction {prediction_id!r} in the audit ledger")
    return found[0]


def submit(
    layout: Layout,
    params: Params,
    prediction_id: str,
    *,
    reviewer: str,
    verdicts: Mapping[int, str],
    corrections: Mapping[int, Sequence[float]],
    missed: Sequence[Sequence[float]],
    reviewed_at: str,
) -> Entry:
    """Check a review against its prediction and image, then append it to the ledger (one row,
    subject = the prediction id, linked to the prediction's row). Raises UnknownPrediction,
    ImageNotKept or ReviewError before anything is written."""
    with open_ledger(layout.root) as ledger:
        entry = prediction_entry(ledger, prediction_id)
        earlier = ledger.entries(kind=review.REVIEW, subject=entry.subject)
        # A refused input has no image; the review rule says so before the image is looked for.
        failed = bool(entry.payload.get("reason"))
        payload = review.build_review(
            entry,
            reviewer=reviewer,
            verdicts=verdicts,
            corrections=corrections,
            missed=missed,
            image_size=(0, 0) if failed else image_size(layout, params, entry),
            reviewed_at=reviewed_at,
            previous=earlier[-1] if earlier else None,
        )
        return ledger.append(review.REVIEW, entry.subject, payload)


def monitoring(layout: Layout) -> list[review.VersionMonitoring]:
    """Post-deployment monitoring per model version, from the ledger's predictions and reviews."""
    with open_ledger(layout.root) as ledger:
        predictions = ledger.entries(kind=PREDICTION)
        reviews = ledger.entries(kind=review.REVIEW)
    return review.monitoring(predictions, reviews)
