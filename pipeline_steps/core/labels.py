"""Label importers (RSNA Pneumonia, VinDr-CXR, canonical) to one canonical box table, with weighted box fusion."""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
BAD_VALUE = "bad_value"  # e.g. RSNA Target not 0/1, a coordinate that is not a finite number
OUTSIDE = "box_outside_image"  # the box reaches beyond the image's columns x rows
DUPLICATE = "duplicate_row"  # the same box (or no_finding) of the same image again: kept once
ALREADY_LABELLED = "already_labelled"  # the image has labels from an earlier ingest

# DICOM's Rows and Columns are 16-bit: no coordinate of any image lies beyond this, so a larger one
# (1e308, say) is refused even before the image's own size is known.
MAX_DICOM_PIXELS = 65535

# Label files are read whole into memory. 64 MiB is about a million box rows (RSNA's 30 000 rows
# are 1.5 MB, VinDr-CXR's 68 000 are 6 MB); a larger file is most likely the wrong file.
MAX_LABEL_FILE_BYTES = 64 << 20
# The row number of each label row in its file (the header is line 1), as the index of the table
# `read_label_file` returns; `import_labels` reports issues by it.
LINE = "line"
# Byte-order marks, longest first (UTF-32 LE's begins with UTF-16 LE's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


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


def _guess_encoding(data: bytes) -> str:
    """The encoding the bytes most likely are in (charset-normalizer), for the error message."""
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # pragma: no cover - installed with radflow's dependencies
        return "unknown"
    best = from_bytes(data[: 1 << 20]).best()
    return best.encoding if best is not None else "unknown (binary?)"


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode_label_bytes(data: bytes, source: str) -> str:
    """The text of a label file: UTF-8, or what its byte-order mark says (UTF-8, UTF-16, UTF-32).

    Anything else is a DataError naming the line of the first byte that does not decode and the
    encoding the file most likely is in (a guess: a file without a byte-order mark does not say)."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as exc:
                line = data[: exc.start].decode(codec, "replace").count("\n") + 1
                raise DataError(
                    f"{source}: line {line}: the byte-order mark says {codec.upper()}, but the "
                    f"bytes there are not {codec.upper()} (a truncated or mixed file); save it "
                    "again as UTF-8"
                ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{source}: line {_line_of(data, exc.start)}: not UTF-8 text (byte "
            f"0x{data[exc.start]:02x}); charset detection suggests {_guess_encoding(data)}. Save it as "
            "UTF-8 (or with a byte-order mark) and ingest again"
        ) from None
    if "\x00" in text:  # valid UTF-8, but no CSV holds NUL: UTF-16/32 without a mark, or binary
        line = _line_of(data, data.index(0))
        raise DataError(
            f"{source}: line {line}: NUL bytes in the text, so not UTF-8 CSV; charset detection "
            f"suggests {_guess_encoding(data)} (UTF-16 or UTF-32 without a byte-order mark?). "
            "Save it as UTF-8 and ingest again"
        )
    return text


def read_label_file(path: Path, max_bytes: int = MAX_LABEL_FILE_BYTES) -> pd.DataFrame:
    """A label CSV as text cells (empty cells missing), indexed by each row's line in the file.

    Every cell stays text: keys like 0012 must not become numbers, and the importers parse the
    coordinates. Blank lines are skipped; a row with more cells than the header is an error, one
    with fewer is padded with missing cells. Every problem is a DataError naming the file and,
    where there is one, the line: too large (`max_bytes`), not text in a known encoding (see
    `decode_label_bytes`), not CSV."""
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise DataError(f"{path}: labels file cannot be read ({type(exc).__name__})") from None
    if len(data) > max_bytes:
        limit = f"{max_bytes >> 20} MiB" if max_bytes >= 1 << 20 else f"{max_bytes} bytes"
        raise DataError(
            f"{path}: larger than the limit of a label file ({limit}); split it and ingest the "
            "parts one after the other"
        )
    text = decode_label_bytes(data, str(path))
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    header: list[str] | None = None
    rows: list[list[str | None]] = []
    lines: list[int] = []
    try:
        for record in reader:
            if not record or all(not cell.strip() for cell in record):
                continue
            if header is None:
                header = [cell.strip() for cell in record]
                continue
            if len(record) > len(header):
                raise DataError(
                    f"{path}: line {reader.line_num}: {len(record)} cells, but the header has "
                    f"{len(header)}; check the quoting and separators of that row"
                )
            cells: list[str | None] = [c if c.strip() else None for c in record]
            rows.append(cells + [None] * (len(header) - len(cells)))
            lines.append(reader.line_num)
    except csv.Error as exc:  # e.g. a quote left open, a field over csv's size limit
        raise DataError(
            f"{path}: line {reader.line_num}: not readable CSV ({exc}); check the file"
        ) from None
    if header is None:
        raise DataError(f"{path}: empty, no header row; expected a CSV label file")
    if len(set(header)) != len(header):
        twice = sorted({c for c in header if header.count(c) > 1})
        raise DataError(f"{path}: line 1: column(s) {twice} appear twice in the header")
    table = pd.DataFrame(rows, columns=header, dtype=object)
    table.index = pd.Index(lines, name=LINE, dtype="int64")
    return table


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


def _issue(
    rows: pd.DataFrame, mask: pd.Series, kind: str, message: str | pd.Series
) -> pd.DataFrame:
    chosen = rows[mask]
    return pd.DataFrame(
        {
            "source_row": chosen["source_row"].astype(int),
            "kind": kind,
            "image_id": chosen["image_id"].astype(str),
            "label": chosen["label"].astype(str),
            "message": message[mask] if isinstance(message, pd.Series) else message,
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


def _row_checks(
    rows: pd.DataFrame, image_sizes: Mapping[str, tuple[int, int]] | None
) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(non-finite, inverted, outside) masks over rows that have four coordinates."""
    coords = rows[BOX_COLUMNS]
    has_box = coords.notna().all(axis=1)
    finite = np.isfinite(coords.to_numpy(np.float64)).all(axis=1)
    nonfinite = has_box & ~finite
    # Beyond DICOM's 65535 pixels first: at 1e300, x + width == x, so such a box also looks inverted.
    absurd = has_box & finite & (coords.abs() > MAX_DICOM_PIXELS).any(axis=1)
    ok = has_box & finite & ~absurd
    inverted = ok & ((rows["x_min"] >= rows["x_max"]) | (rows["y_min"] >= rows["y_max"]))
    limit_x = pd.Series(float(MAX_DICOM_PIXELS), index=rows.index)
    limit_y = limit_x.copy()
    if image_sizes:
        size = rows["image_id"].map(image_sizes)
        known = size.notna()
        limit_y[known] = size[known].map(lambda s: float(s[0]))
        limit_x[known] = size[known].map(lambda s: float(s[1]))
    outside = absurd | (
        ok
        & ~inverted
        & (
            (rows[["x_min", "y_min"]].min(axis=1) < 0)
            | (rows["x_max"] > limit_x)
            | (rows["y_max"] > limit_y)
        )
    )
    return nonfinite, inverted, outside


def _outside_message(
    rows: pd.DataFrame, image_sizes: Mapping[str, tuple[int, int]] | None
) -> pd.Series:
    def one(image_id: str) -> str:
        size = (image_sizes or {}).get(image_id)
        if size is None:
            return f"the box reaches beyond any DICOM image (0..{MAX_DICOM_PIXELS} px)"
        return f"the box reaches beyond the image ({size[1]} columns x {size[0]} rows, from 0)"

    return rows["image_id"].map(one)


def import_labels(
    table: pd.DataFrame,
    stem_ids: dict[str, set[str]] | None = None,
    fmt: str = "auto",
    iou_threshold: float = 0.55,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
) -> LabelImport:
    """A label table in any supported format to canonical rows keyed by content id.

    `stem_ids` maps each ingested file's stem (the key label files use) to the content id(s) of the
    files with that stem; None keeps the keys as ids. `fmt` is auto | rsna | vindr | canonical.
    `image_sizes` maps content ids to (rows, columns): a box must lie within its image, from 0 to
    columns and rows (boxes of other images only within DICOM's 65535 pixels).
    Rows that cannot be used are returned as issues, never dropped silently: each is named by its
    line (the table's `line` index from `read_label_file`, else its position + 2) and the reason.
    A row that repeats an earlier row of the same image (same label, same box, same reader) is
    kept once and the repeats are reported as `duplicate_row`.
    """
    fmt = resolve_format(list(table.columns), fmt)
    if table.index.name == LINE:
        source_rows = table.index.to_numpy(np.int64)
    else:
        source_rows = np.arange(len(table)) + 2  # the line in the CSV; the header is line 1
    table = table.reset_index(drop=True)
    bad = pd.Series(False, index=table.index)
    if fmt == "rsna":
        rows, bad = _rsna_rows(table)
        keys = rows["patientId"]
    else:
        rows = _vindr_rows(table) if fmt == "vindr" else _canonical_rows(table)
        keys = rows["image_id"]
    rows["source_row"] = source_rows
    keys = keys.astype(str).str.strip()
    ids = keys.map(lambda k: {k} if stem_ids is None else stem_ids.get(k, set()))
    orphan, ambiguous = ids.map(len) == 0, ids.map(len) > 1
    rows["image_id"] = ids.map(lambda s: next(iter(s)) if len(s) == 1 else "")

    finding = rows["label"] != NO_FINDING
    no_box = rows[BOX_COLUMNS].isna().any(axis=1)
    nonfinite, inverted, outside = _row_checks(rows, image_sizes)
    resolved = ~orphan & ~ambiguous
    usable_finding = resolved & ~bad & finding
    refused = no_box | nonfinite | inverted | outside
    # Repeats among the rows that would be taken: the first is kept, the others reported.
    same = ["image_id", "label", *BOX_COLUMNS] + (["rad_id"] if fmt == "vindr" else [])
    candidates = resolved & ~bad & ~(finding & refused)
    key_frame = rows.loc[candidates, same].copy()
    key_frame.loc[~finding[candidates], BOX_COLUMNS] = np.nan  # a no_finding row has no box
    repeated = pd.Series(False, index=rows.index)
    repeated[candidates] = key_frame.duplicated(keep="first")
    first_line = (
        rows.loc[candidates, "source_row"]
        .groupby([key_frame[c].fillna(-1.0) if c in BOX_COLUMNS else key_frame[c] for c in same])
        .transform("min")
    )
    issues = [
        _issue(rows, orphan, ORPHAN, "no file with this row's name in the ingested folder"),
        _issue(rows, ambiguous, AMBIGUOUS, "several files with different content share this name"),
        _issue(rows, resolved & bad, BAD_VALUE, "Target must be 0 or 1"),
        _issue(
            rows,
            usable_finding & no_box,
            MISSING_BOX,
            "a finding without four numeric box coordinates",
        ),
        _issue(
            rows,
            usable_finding & nonfinite,
            BAD_VALUE,
            "a box coordinate is not a finite number (inf, or too large to add up)",
        ),
        _issue(
            rows,
            usable_finding & inverted,
            INVERTED,
            "x_min >= x_max or y_min >= y_max (a zero or negative width or height): the box "
            "has no area",
        ),
        _issue(rows, usable_finding & outside, OUTSIDE, _outside_message(rows, image_sizes)),
        _issue(
            rows,
            repeated,
            DUPLICATE,
            "repeats line "
            + first_line.reindex(rows.index).fillna(0).astype(int).astype(str)
            + " (same image, label and box): kept once",
        ),
    ]
    usable = resolved & ~bad & ~repeated
    boxes = rows[usable & finding & ~refused]
    negatives = rows[usable & ~finding]
    finding_images = set(rows.loc[resolved & ~bad & finding, "image_id"])
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
