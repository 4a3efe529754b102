"""Label importers (RSNA Pneumonia, VinDr-CXR, canonical) to one canonical box table, with weighted box fusion."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipeline_steps.core.boxes import box_iou
from pipeline_steps.core.errors import DataError

# The canonical table: one row per box in original DICOM pixel coordinates (x to the right, y down),
# or one `no_finding` row without coordinates for an image read as negative.
LABEL_COLUMNS = ["image_id", "label", "x_min", "y_min", "x_max", "y_max"]
BOX_COLUMNS = ["x_min", "y_min", "x_max", "y_max"]
NO_FINDING = "no_finding"
# VinDr-CXR keeps every radiologist's reading; these rows are kept beside the fused table.
READER_COLUMNS = ["image_id", "rad_id", "label", *BOX_COLUMNS]
# Label rows that were not imported, and why. `source_row` is the line in the label file (the header
# is line 1): the file's keys are source file names, which may carry PHI, so they are never repeated.
ISSUE_COLUMNS = ["labels_sha256", "source_row", "kind", "image_id", "label", "message"]

RSNA_COLUMNS = ["patientId", "x", "y", "width", "height", "Target"]
RSNA_LABEL = "opacity"
VINDR_COLUMNS = ["image_id", "class_name", "rad_id", *BOX_COLUMNS]  # class_id is optional
FORMATS = ("rsna", "vindr", "canonical")

# Issue kinds: rows of the label file that did not become canonical rows.
ORPHAN = "orphan_label"  # no file of that name in the ingested folder
AMBIGUOUS = "ambiguous_image"  # several files of that name with different content
INVERTED = "inverted_box"  # x_min >= x_max or y_min >= y_max
MISSING_BOX = "missing_box"  # a finding without (numeric) coordinates
BAD_VALUE = "bad_value"  # e.g. RSNA Target not 0/1
ALREADY_LABELLED = "already_labelled"  # the image has labels from an earlier ingest


FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class FusedBoxes:
    boxes: FloatArray  # (m, 4) x_min, y_min, x_max, y_max
    scores: FloatArray  # (m,)
    members: tuple[tuple[int, ...], ...]  # indices of the input boxes fused into each box


def weighted_box_fusion(
    boxes: FloatArray,
    scores: FloatArray,
    sources: Sequence[object] | npt.NDArray[np.object_],
    iou_threshold: float,
    n_sources: int | None = None,
) -> FusedBoxes:
    """Weighted box fusion (Solovyev, Wang and Gabruseva, Image Vis. Comput. 107, 2021) of one class.

    Boxes are taken by decreasing score. Each joins the fused box it overlaps most, if that IoU exceeds
    `iou_threshold`, and the fused box becomes the score-weighted mean of its members. Unlike
    ensembling models, a fused box never takes two boxes of one source: two boxes one reader drew
    are two findings. A fused box's score is its members' mean score times
    min(members, n_sources) / n_sources, so a finding only some readers marked scores lower.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64)
    n = n_sources if n_sources is not None else len(set(sources))
    order = np.argsort(-scores, kind="stable")
    members: list[list[int]] = []
    fused = np.zeros((0, 4))
    for i in order:
        iou = box_iou(boxes[i : i + 1], fused)[0]
        for k, group in enumerate(members):  # a source's own boxes stay apart
            if any(sources[j] == sources[i] for j in group):
                iou[k] = -1.0
        best = int(np.argmax(iou)) if len(iou) else -1
        if best < 0 or iou[best] <= iou_threshold:
            members.append([int(i)])
            fused = np.vstack([fused, boxes[i]])
            continue
        members[best].append(int(i))
        weights = scores[members[best]]
        fused[best] = weights @ boxes[members[best]] / weights.sum()
    fused_scores = np.array(
        [scores[g].mean() * min(len(g), n) / n for g in members], dtype=np.float64
    )
    return FusedBoxes(fused, fused_scores, tuple(tuple(g) for g in members))


@dataclass(frozen=True)
class LabelImport:
    """A label file converted: canonical rows, per-reader rows (VinDr only) and the rows set aside."""

    format: str
    labels: pd.DataFrame  # LABEL_COLUMNS
    readers: pd.DataFrame  # READER_COLUMNS
    issues: pd.DataFrame  # ISSUE_COLUMNS without labels_sha256

    def count(self, kind: str) -> int:
        return int((self.issues["kind"] == kind).sum())


def detect_format(columns: Sequence[str]) -> str:
    """rsna | vindr | canonical from the header; a DataError lists what each format needs."""
    present = set(columns)
    if set(RSNA_COLUMNS) <= present:
        return "rsna"
    if set(VINDR_COLUMNS) <= present:  # before canonical: VinDr shares the box columns
        return "vindr"
    if set(LABEL_COLUMNS) <= present:
        return "canonical"
    raise DataError(
        f"labels: unrecognised columns {sorted(present)}; expected RSNA {RSNA_COLUMNS}, "
        f"VinDr-CXR {VINDR_COLUMNS} (+ class_id) or canonical {LABEL_COLUMNS}. "
        "Pass --label-format to name the format."
    )


def resolve_format(columns: Sequence[str], fmt: str = "auto") -> str:
    """The format of a label table with these columns: detected (`auto`) or checked against `fmt`."""
    if fmt == "auto":
        return detect_format(columns)
    needed = {"rsna": RSNA_COLUMNS, "vindr": VINDR_COLUMNS, "canonical": LABEL_COLUMNS}.get(fmt)
    if needed is None:
        raise DataError(
            f"label format {fmt!r} unknown; expected auto or one of {', '.join(FORMATS)}"
        )
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{fmt} labels: missing column(s) {missing}; expected {needed}")
    return fmt


def normalize_label(name: object) -> str:
    """Class names as snake_case identifiers: 'Nodule/Mass' -> 'nodule_mass', 'No finding' -> 'no_finding'."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")


def _numeric(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    out = frame.copy()
    for column in columns:
        out[column] = pd.to_numeric(out[column], errors="coerce").astype(float)
    return out


def _rsna_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    rows = _numeric(table, ["x", "y", "width", "height", "Target"])
    positive = rows["Target"] == 1.0
    rows["label"] = np.where(positive, RSNA_LABEL, NO_FINDING)
    rows["x_min"], rows["y_min"] = rows["x"], rows["y"]
    rows["x_max"], rows["y_max"] = rows["x"] + rows["width"], rows["y"] + rows["height"]
    return rows, ~rows["Target"].isin([0.0, 1.0])


def _vindr_rows(table: pd.DataFrame) -> pd.DataFrame:
    rows = _numeric(table, BOX_COLUMNS)
    rows["label"] = rows["class_name"].map(normalize_label)
    rows["rad_id"] = rows["rad_id"].astype(str).str.strip()
    return rows


def _canonical_rows(table: pd.DataFrame) -> pd.DataFrame:
    rows = _numeric(table, BOX_COLUMNS)
    rows["label"] = rows["label"].astype(str).str.strip()
    return rows


def _issue(rows: pd.DataFrame, mask: pd.Series, kind: str, message: str) -> pd.DataFrame:
    chosen = rows[mask]
    return pd.DataFrame(
        {
            "source_row": chosen["source_row"].astype(int),
            "kind": kind,
            "image_id": chosen["image_id"].astype(str),
            "label": chosen["label"].astype(str),
            "message": message,
        }
    )


def _with_negatives(
    findings: pd.DataFrame, negatives: pd.DataFrame, finding_images: set[str]
) -> pd.DataFrame:
    """Findings plus one no_finding row per image that no row marks with a finding.

    `finding_images` includes images whose finding rows were all set aside: those stay unlabelled
    rather than being called negative.
    """
    negative = negatives[~negatives["image_id"].isin(finding_images)].drop_duplicates("image_id")
    negative = negative.assign(
        label=NO_FINDING, x_min=np.nan, y_min=np.nan, x_max=np.nan, y_max=np.nan
    )
    out = pd.concat([findings[LABEL_COLUMNS], negative[LABEL_COLUMNS]], ignore_index=True)
    return out.astype({c: float for c in BOX_COLUMNS})


def _fuse_readers(boxes: pd.DataFrame, readers: pd.DataFrame, iou_threshold: float) -> pd.DataFrame:
    """One canonical box per finding: each (image, label) group of reader boxes fused by WBF."""
    readers_per_image = readers.groupby("image_id")["rad_id"].nunique()
    fused: list[dict[str, object]] = []
    for (image_id, label), group in boxes.groupby(["image_id", "label"], sort=True):
        # Sorted, so equal-score fusion does not depend on the order of the file's rows.
        group = group.sort_values(["rad_id", *BOX_COLUMNS], kind="stable")
        result = weighted_box_fusion(
            group[BOX_COLUMNS].to_numpy(np.float64),
            np.ones(len(group)),  # readers carry no confidence: all weigh the same
            group["rad_id"].to_numpy(),
            iou_threshold,
            n_sources=int(readers_per_image[image_id]),
        )
        for box in result.boxes:
            fused.append(
                {"image_id": image_id, "label": label}
                | dict(zip(BOX_COLUMNS, box.tolist(), strict=True))
            )
    return pd.DataFrame(fused, columns=LABEL_COLUMNS)


def import_labels(
    table: pd.DataFrame,
    stem_ids: dict[str, set[str]] | None = None,
    fmt: str = "auto",
    iou_threshold: float = 0.55,
) -> LabelImport:
    """A label table in any supported format to canonical rows keyed by content id.

    `stem_ids` maps each ingested file's stem (the key label files use) to the content id(s) of the
    files with that stem; None keeps the keys as ids. `fmt` is auto | rsna | vindr | canonical.
    Rows that cannot be used are returned as issues, never dropped silently.
    """
    fmt = resolve_format(list(table.columns), fmt)
    table = table.reset_index(drop=True)
    bad = pd.Series(False, index=table.index)
    if fmt == "rsna":
        rows, bad = _rsna_rows(table)
        keys = rows["patientId"]
    else:
        rows = _vindr_rows(table) if fmt == "vindr" else _canonical_rows(table)
        keys = rows["image_id"]
    rows["source_row"] = np.arange(len(rows)) + 2  # the line in the CSV; the header is line 1
    keys = keys.astype(str).str.strip()
    ids = keys.map(lambda k: {k} if stem_ids is None else stem_ids.get(k, set()))
    orphan, ambiguous = ids.map(len) == 0, ids.map(len) > 1
    rows["image_id"] = ids.map(lambda s: next(iter(s)) if len(s) == 1 else "")

    finding = rows["label"] != NO_FINDING
    coords = rows[BOX_COLUMNS]
    no_box = coords.isna().any(axis=1)
    inverted = ~no_box & ((rows["x_min"] >= rows["x_max"]) | (rows["y_min"] >= rows["y_max"]))
    resolved = ~orphan & ~ambiguous
    issues = [
        _issue(rows, orphan, ORPHAN, "no file with this row's name in the ingested folder"),
        _issue(rows, ambiguous, AMBIGUOUS, "several files with different content share this name"),
        _issue(rows, resolved & bad, BAD_VALUE, "Target must be 0 or 1"),
        _issue(
            rows,
            resolved & ~bad & finding & no_box,
            MISSING_BOX,
            "a finding without four numeric box coordinates",
        ),
        _issue(
            rows,
            resolved & ~bad & finding & inverted,
            INVERTED,
            "x_min >= x_max or y_min >= y_max: the box has no area",
        ),
    ]
    usable = resolved & ~bad
    boxes = rows[usable & finding & ~no_box & ~inverted]
    negatives = rows[usable & ~finding]
    finding_images = set(rows.loc[usable & finding, "image_id"])
    if fmt == "vindr":
        readers = pd.concat(
            [boxes, negatives.assign(x_min=np.nan, y_min=np.nan, x_max=np.nan, y_max=np.nan)]
        )
        readers = readers.sort_values("source_row")[READER_COLUMNS].reset_index(drop=True)
        findings = _fuse_readers(boxes, readers, iou_threshold)
    else:
        readers = pd.DataFrame(columns=READER_COLUMNS)
        findings = boxes
    labels = _with_negatives(findings, negatives, finding_images)
    reported = [i for i in issues if len(i)]
    issue_table = (
        pd.concat(reported, ignore_index=True).sort_values("source_row", kind="stable")
        if reported
        else pd.DataFrame(columns=ISSUE_COLUMNS[1:])
    )
    return LabelImport(
        fmt, labels.reset_index(drop=True), readers, issue_table.reset_index(drop=True)
    )
