"""The console's forms: read a posted form within limits, and turn the review form's fields into
verdicts and boxes, refusing anything malformed with a message that names the field."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from fastapi import Request

from pipeline_steps.core.errors import DataError
from pipeline_steps.governance.review import MAX_MISSED, VERDICTS

MAX_FORM_BYTES = 64 * 1024  # a review of 50 findings is ~3 KB
PROMOTE_TO = ("staging", "production")
_VERDICT = re.compile(r"^verdict_(\d{1,4})$")
_BOX = re.compile(r"^box_(\d{1,4})$")


class FormError(DataError):
    """A form that is malformed or incomplete; nothing was changed."""


async def read(request: Request) -> dict[str, str]:
    """The posted urlencoded form as {field: value} (a repeated field is refused)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise FormError(f"expected a form (application/x-www-form-urlencoded), got {kind!r}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FormError(f"the form is larger than {MAX_FORM_BYTES // 1024} KiB")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise FormError("the form is not valid UTF-8 form data") from None
    data: dict[str, str] = {}
    for key, value in pairs:
        if key in data:
            raise FormError(f"field {key!r} appears twice")
        data[key] = value
    return data


def parse_box(text: str, what: str) -> list[float]:
    """`x_min, y_min, x_max, y_max` (commas or spaces) as four finite numbers."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if len(parts) != 4:
        raise FormError(f"{what}: write a box as x_min, y_min, x_max, y_max (got {text[:60]!r})")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise FormError(f"{what}: box coordinates must be numbers (got {text[:60]!r})") from None
    if not all(math.isfinite(v) for v in values):
        raise FormError(f"{what}: box coordinates must be finite numbers")
    return values


@dataclass(frozen=True)
class ReviewForm:
    verdicts: dict[int, str]
    corrections: dict[int, list[float]]
    missed: list[list[float]]


def parse_review(data: dict[str, str]) -> ReviewForm:
    """`verdict_<i>` (confirmed / rejected / corrected) for finding i (0-based), `box_<i>` with a
    corrected finding's new box, and `missed` with one lesion box per line. Whether every finding
    has a verdict, and whether a box lies inside the image, is the review rule's to say."""
    verdicts: dict[int, str] = {}
    corrections: dict[int, list[float]] = {}
    for key, value in data.items():
        if m := _VERDICT.match(key):
            if value not in VERDICTS:
                raise FormError(
                    f"finding {int(m[1]) + 1}: verdict must be one of {', '.join(VERDICTS)}"
                )
            verdicts[int(m[1])] = value
        elif (m := _BOX.match(key)) and value.strip():
            corrections[int(m[1])] = parse_box(value, f"finding {int(m[1]) + 1}'s new box")
    lines = [line for line in data.get("missed", "").splitlines() if line.strip()]
    if len(lines) > MAX_MISSED:
        raise FormError(f"{len(lines)} missed lesions in one review (at most {MAX_MISSED})")
    missed = [parse_box(line, f"missed lesion {n + 1}") for n, line in enumerate(lines)]
    return ReviewForm(verdicts, corrections, missed)
