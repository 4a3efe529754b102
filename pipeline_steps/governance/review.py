"""Reviewer feedback as data: a radiologist's verdict on each finding of a prediction (and the lesions
it missed), checked and shaped into a ledger row; post-deployment monitoring per model version; and
the reviewed findings as canonical labels for the next retrain.

Plain functions over ledger entries (`Entry`) and prediction payloads; the console and the CLI in
`flows/` read the ledger, the images and the forms, and append what these functions build.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline_steps.core.errors import DataError
from pipeline_steps.core.labels import NO_FINDING
from pipeline_steps.governance.ledger import Entry

REVIEW = "review"  # the ledger kind of a review; its subject is the prediction id
# The ledger kind of a prediction: serving.prediction.PREDICTION, which this layer cannot import
# (serving and governance are independent); tests/unit/test_review.py checks they agree.
PREDICTION = "prediction"
CONFIRMED, REJECTED, CORRECTED = "confirmed", "rejected", "corrected"
VERDICTS = (CONFIRMED, REJECTED, CORRECTED)
MAX_MISSED = 50  # lesion boxes one review may add: more is a malformed form, not a reading
LESION_LABEL = "nodule"  # the label of a reviewer's box when the finding carried none


class ReviewError(DataError):
    """A review that cannot be recorded as given; nothing was written."""


# --------------------------------------------------------------------------------------------
# One review


def check_box(box: Sequence[float], size: tuple[int, int], what: str) -> list[float]:
    """A box (x_min, y_min, x_max, y_max) in the image's pixel coordinates, or ReviewError saying
    what is wrong with it. `size` is (rows, columns)."""
    if len(box) != 4:
        raise ReviewError(f"{what}: a box needs 4 numbers (x_min, y_min, x_max, y_max)")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ReviewError(f"{what}: box coordinates must be numbers") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ReviewError(f"{what}: box coordinates must be finite numbers")
    rows, cols = size
    if x1 <= x0 or y1 <= y0:
        raise ReviewError(f"{what}: x_max must exceed x_min and y_max exceed y_min")
    if x0 < 0 or y0 < 0 or x1 > cols or y1 > rows:
        raise ReviewError(
            f"{what}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the image "
            f"({cols} x {rows} pixels: x in 0-{cols}, y in 0-{rows})"
        )
    return [round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)]


def findings_of(prediction: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The boxes of a prediction payload, as the review form numbers them (0-based)."""
    return [dict(b) for b in prediction.get("boxes") or []]


def build_review(
    prediction: Entry,
    *,
    reviewer: str,
    verdicts: Mapping[int, str],
    corrections: Mapping[int, Sequence[float]],
    missed: Sequence[Sequence[float]],
    image_size: tuple[int, int],
    reviewed_at: str,
    previous: Entry | None = None,
) -> dict[str, Any]:
    """The ledger payload of one complete reading of a prediction: a verdict for every finding (a
    corrected finding with its new box) and the lesions the model missed, as boxes.

    Raises ReviewError, naming the finding or box, for a prediction that failed, a finding without
    a verdict or with an unknown one, a correction for a finding not marked corrected, or a box
    outside the image."""
    record = prediction.payload
    if prediction.kind != PREDICTION:
        raise ReviewError(f"ledger row {prediction.seq} is a {prediction.kind}, not a prediction")
    if record.get("reason"):
        raise ReviewError(
            f"prediction {prediction.subject} failed ({record['reason']}): there is nothing to review"
        )
    if not reviewer.strip():
        raise ReviewError("a review needs a reviewer")
    boxes = findings_of(record)
    unknown = sorted(set(verdicts) - set(range(len(boxes))))
    if unknown:
        raise ReviewError(
            f"finding {unknown[0] + 1} does not exist: prediction {prediction.subject} has "
            f"{len(boxes)} finding(s)"
        )
    findings = []
    for i, box in enumerate(boxes):
        verdict = verdicts.get(i)
        if verdict is None:
            raise ReviewError(
                f"finding {i + 1} has no verdict: confirm, reject or correct every finding"
            )
        if verdict not in VERDICTS:
            raise ReviewError(f"finding {i + 1}: unknown verdict {verdict!r} (one of {VERDICTS})")
        item: dict[str, Any] = {
            "index": i,
            "verdict": verdict,
            "score": float(box.get("score", 0.0)),
            "label": box.get("label") or LESION_LABEL,
            "box": [round(float(box[k]), 2) for k in ("x_min", "y_min", "x_max", "y_max")],
        }
        if verdict == CORRECTED:
            if i not in corrections:
                raise ReviewError(f"finding {i + 1} is marked corrected but has no new box")
            item["corrected_box"] = check_box(corrections[i], image_size, f"finding {i + 1}")
        findings.append(item)
    stray = sorted(i for i in corrections if verdicts.get(i) != CORRECTED)
    if stray:
        raise ReviewError(f"finding {stray[0] + 1} has a new box but is not marked corrected")
    if len(missed) > MAX_MISSED:
        raise ReviewError(f"{len(missed)} missed lesions in one review (at most {MAX_MISSED})")
    model = record.get("model") or {}
    return {
        "prediction_id": prediction.subject,
        "prediction_row": prediction.seq,
        "model": {"name": model.get("name"), "version": str(model.get("version"))},
        "prediction_created_at": record.get("created_at"),
        "training_membership_key": record.get("training_membership_key"),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "reviewer": reviewer,
        "reviewed_at": reviewed_at,
        "findings": findings,
        "missed": [
            {"box": check_box(box, image_size, f"missed lesion {n + 1}")}
            for n, box in enumerate(missed)
        ],
        "supersedes": previous.seq if previous is not None else None,
    }


def latest_reviews(reviews: Iterable[Entry]) -> dict[str, Entry]:
    """The review that counts for each prediction id: the last one in chain order."""
    latest: dict[str, Entry] = {}
    for entry in reviews:
        if entry.kind == REVIEW:
            latest[entry.subject] = entry
    return latest


# --------------------------------------------------------------------------------------------
# Monitoring


@dataclass
class Tally:
    """Review counts over a set of predictions of one model version, and the rates they give."""

    predictions: int = 0  # predictions that returned findings (failed inputs are not counted)
    reviewed: int = 0
    findings_reviewed: int = 0
    confirmed: int = 0
    corrected: int = 0
    rejected: int = 0
    missed: int = 0

    def add(self, review: Mapping[str, Any]) -> None:
        self.reviewed += 1
        for finding in review.get("findings", []):
            self.findings_reviewed += 1
            verdict = finding["verdict"]
            if verdict == CONFIRMED:
                self.confirmed += 1
            elif verdict == CORRECTED:
                self.corrected += 1
            else:
                self.rejected += 1
        self.missed += len(review.get("missed", []))

    @property
    def coverage(self) -> float | None:
        """Share of the predictions a reviewer read."""
        return self.reviewed / self.predictions if self.predictions else None

    @property
    def reviewed_precision(self) -> float | None:
        """Share of reviewed findings that are lesions (confirmed, or corrected: a lesion the box
        did not fit)."""
        true = self.confirmed + self.corrected
        return true / self.findings_reviewed if self.findings_reviewed else None

    @property
    def missed_lesion_rate(self) -> float | None:
        """Share of the lesions reviewers saw that the model did not find."""
        lesions = self.confirmed + self.corrected + self.missed
        return self.missed / lesions if lesions else None

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "coverage": self.coverage,
            "reviewed_precision": self.reviewed_precision,
            "missed_lesion_rate": self.missed_lesion_rate,
        }


@dataclass
class VersionMonitoring:
    """Post-deployment monitoring of one model version: overall and per day of prediction (UTC)."""

    model: str
    version: str
    total: Tally = field(default_factory=Tally)
    by_day: dict[str, Tally] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            **self.total.as_dict(),
            "by_day": {day: t.as_dict() for day, t in sorted(self.by_day.items())},
        }


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 30, version)


def monitoring(predictions: Iterable[Entry], reviews: Iterable[Entry]) -> list[VersionMonitoring]:
    """Monitoring per model version from the ledger's prediction and review rows.

    A prediction counts once, under the version that made it and the UTC day it was made; its last
    review counts (an earlier one it superseded does not). Failed predictions are not counted."""
    latest = latest_reviews(reviews)
    out: dict[tuple[str, str], VersionMonitoring] = {}
    for entry in predictions:
        record = entry.payload
        if entry.kind != PREDICTION or record.get("reason"):
            continue
        model = record.get("model") or {}
        name, version = str(model.get("name")), str(model.get("version"))
        mon = out.setdefault((name, version), VersionMonitoring(name, version))
        day = str(record.get("created_at") or entry.recorded_at)[:10]
        daily = mon.by_day.setdefault(day, Tally())
        mon.total.predictions += 1
        daily.predictions += 1
        review = latest.get(entry.subject)
        if review is not None:
            mon.total.add(review.payload)
            daily.add(review.payload)
    return sorted(out.values(), key=lambda m: (m.model, _version_key(m.version)))


_GAUGES = (
    ("predictions", "predictions made (failed inputs excluded)"),
    ("reviewed", "predictions a reviewer read"),
    ("coverage", "share of predictions reviewed"),
    ("reviewed_precision", "share of reviewed findings confirmed or corrected"),
    ("missed_lesion_rate", "share of reviewed lesions the model missed"),
    ("confirmed", "findings confirmed"),
    ("corrected", "findings corrected"),
    ("rejected", "findings rejected"),
    ("missed", "lesions added by reviewers"),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(versions: Sequence[VersionMonitoring]) -> str:
    """The monitoring as Prometheus text exposition (one gauge family per figure, labelled by model
    and version); a rate without data is left out rather than reported as 0."""
    lines = []
    for name, help_text in _GAUGES:
        metric = f"radflow_review_{name}"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
        for mon in versions:
            value = getattr(mon.total, name)
            if value is None:
                continue
            labels = f'model="{_label(mon.model)}",version="{_label(mon.version)}"'
            lines.append(f"{metric}{{{labels}}} {float(value):.6g}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The review queue


def queue(
    predictions: Sequence[Entry], reviews: Iterable[Entry], *, pending_only: bool = False
) -> list[dict[str, Any]]:
    """The predictions a reviewer may read, newest first, each with its review state."""
    latest = latest_reviews(reviews)
    rows = []
    for entry in reversed(predictions):
        record = entry.payload
        if entry.kind != PREDICTION or record.get("reason"):
            continue
        review = latest.get(entry.subject)
        if pending_only and review is not None:
            continue
        boxes = record.get("boxes") or []
        model = record.get("model") or {}
        summary = None
        if review is not None:
            verdicts = [f["verdict"] for f in review.payload.get("findings", [])]
            summary = {v: verdicts.count(v) for v in VERDICTS if v in verdicts}
            if review.payload.get("missed"):
                summary["missed"] = len(review.payload["missed"])
        rows.append(
            {
                "prediction_id": entry.subject,
                "created_at": record.get("created_at"),
                "model": model.get("name"),
                "version": str(model.get("version")),
                "findings": len(boxes),
                "top_score": max((float(b.get("score", 0.0)) for b in boxes), default=None),
                "reviewed_by": review.payload.get("reviewer") if review else None,
                "reviewed_at": review.payload.get("reviewed_at") if review else None,
                "verdicts": summary,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Labels for the next retrain


def review_labels(reviews: Iterable[Entry]) -> list[dict[str, Any]]:
    """Canonical label rows (labels.LABEL_COLUMNS, plus the review row they came from) from the
    last review of each image: confirmed findings keep their box, corrected ones take the
    reviewer's box, rejected ones are dropped, and missed lesions are added. An image read with no
    lesion gets one `no_finding` row. Images are keyed by ingestion's content id."""
    last_by_image: dict[str, Entry] = {}
    for entry in latest_reviews(reviews).values():
        key = entry.payload.get("training_membership_key")
        if key and (key not in last_by_image or entry.seq > last_by_image[key].seq):
            last_by_image[str(key)] = entry
    rows: list[dict[str, Any]] = []
    for image_id, entry in sorted(last_by_image.items()):
        review = entry.payload
        boxes: list[tuple[str, list[float]]] = []
        for finding in review.get("findings", []):
            if finding["verdict"] == CONFIRMED:
                boxes.append((finding["label"], finding["box"]))
            elif finding["verdict"] == CORRECTED:
                boxes.append((finding["label"], finding["corrected_box"]))
        boxes += [(LESION_LABEL, m["box"]) for m in review.get("missed", [])]
        source = {"review_row": entry.seq, "prediction_id": review["prediction_id"]}
        if not boxes:
            rows.append({"image_id": image_id, "label": NO_FINDING, **_no_box(), **source})
        for label, (x0, y0, x1, y1) in boxes:
            rows.append(
                {
                    "image_id": image_id,
                    "label": label,
                    "x_min": x0,
                    "y_min": y0,
                    "x_max": x1,
                    "y_max": y1,
                    **source,
                }
            )
    return rows


def _no_box() -> dict[str, float]:
    return {k: math.nan for k in ("x_min", "y_min", "x_max", "y_max")}
