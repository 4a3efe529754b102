"""Edge of the model card: the training data summary read from the workspace (when its outputs are the
version's), the card written to reports/model_card/ and logged on the version's MLflow run."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from flows import tracking
from pipeline_steps.core.config import Params
from pipeline_steps.core.files import write_text_atomic
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance import model_card
from pipeline_steps.governance.ledger import Entry

if TYPE_CHECKING:
    from flows.registry import VersionInfo

ARTIFACT = "model_card"


def intended_use(params: Params, tags: dict[str, str]) -> dict[str, Any]:
    ingest = params.ingest
    limits = [
        f"Input: {', '.join(ingest.allowed_modalities)} radiographs of body part "
        f"{', '.join(ingest.allowed_body_parts)}, at least {ingest.min_size_px} px; anything else is "
        "refused before it reaches the model.",
        "A second reader: its boxes are for a radiologist to review, not a diagnosis on their own.",
        f"Operating point: boxes scoring at least {params.test.score_threshold:g}; at most "
        f"{params.test.max_detections} per image.",
        "Not evaluated on lateral views, children, CT or images from other body parts.",
    ]
    if tags.get("pseudonym_key") == "development":
        limits.append(
            "Trained and tested on synthetic or test data (pseudonyms under the development key): "
            "its numbers say nothing about real patients."
        )
    return {
        "purpose": "Detection of lung nodules and opacities on frontal chest radiographs: boxes "
        "with scores, in the DICOM image's own pixel coordinates.",
        "limits": limits,
    }


def training_data(layout: Layout, params: Params, info: VersionInfo) -> dict[str, Any]:
    """Counts by split, manufacturers and lesion sizes of the training images, and the synthetic
    share, from the workspace's outputs when they are this version's (reports/registration.json
    names it); else what the version's tags hold."""
    import pandas as pd

    from pipeline_steps.core.subgroups import size_band

    summary: dict[str, Any] = {
        "data_version": info.tags.get("data_version"),
        "train_manifest_sha256": info.tags.get("train_manifest"),
        "streamed_synthetic_studies": info.tags.get("training_stream", "none"),
        "synthetic_share_of_each_epoch": params.train.synthetic.fraction,
    }
    try:
        registration = json.loads(layout.registration.read_text())
    except (OSError, ValueError):
        registration = {}
    if str(registration.get("model_version")) != info.version or not layout.manifest.exists():
        summary["note"] = "the workspace's outputs are another version's: counts not shown"
        return summary
    manifest = pd.read_parquet(layout.manifest)
    summary["images_by_split"] = {
        str(k): int(v) for k, v in manifest["split"].value_counts().sort_index().items()
    }
    train_ids = set(manifest.loc[manifest["split"] == "train", "image_id"].astype(str))
    if layout.metadata.exists():
        meta = pd.read_parquet(layout.metadata)
        meta = meta[meta["image_id"].astype(str).isin(train_ids)]
        if "manufacturer" in meta:
            makers = Counter(
                str(m) if isinstance(m, str) and m else "unknown" for m in meta["manufacturer"]
            )
            summary["manufacturers_of_training_images"] = dict(makers.most_common())
        if layout.labels.exists() and {"spacing_col_mm", "spacing_row_mm"} <= set(meta.columns):
            labels = pd.read_parquet(layout.labels).dropna(subset=["x_min"])
            spacing = meta.set_index(meta["image_id"].astype(str))[
                ["spacing_col_mm", "spacing_row_mm"]
            ]
            bands: Counter[str] = Counter()
            for row in labels.itertuples(index=False):
                image = str(row.image_id)
                if image not in spacing.index:
                    continue
                sx, sy = (float(v) for v in spacing.loc[image])
                diameter = ((row.x_max - row.x_min) * sx + (row.y_max - row.y_min) * sy) / 2
                bands[size_band(diameter)] += 1
            summary["training_lesions_by_diameter"] = model_card.by_size(bands)
    return summary


def write_and_log(
    layout: Layout,
    params: Params,
    info: VersionInfo,
    metrics: dict[str, float],
    record: dict[str, Any],
    entry: Entry,
) -> dict[str, Any]:
    """Build the card of `info`'s version, write it (JSON and HTML) and log it on its run."""
    card = model_card.build_card(
        model=params.register_.model_name,
        version=info.version,
        tags=info.tags,
        metrics=metrics,
        intended_use=intended_use(params, info.tags),
        training_data=training_data(layout, params, info),
        record=record,
        record_row=entry.seq,
        record_sha256=str(entry.payload["record_sha256"]),
    )
    files = {
        "model_card.json": json.dumps(card, indent=2, sort_keys=True),
        "model_card.html": model_card.render_html(card),
    }
    for name, text in files.items():
        write_text_atomic(layout.model_card / name, text)
    tracking.log_run_files(layout, info.run_id, {k: v.encode() for k, v in files.items()}, ARTIFACT)
    return card
