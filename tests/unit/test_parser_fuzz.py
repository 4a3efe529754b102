"""Fuzzing the parameter and label-file parsers (hypothesis): whatever the bytes, the result is a
value or one of the project's documented errors (ConfigError for params.yaml, DataError for label
files), never another exception. A small, deterministic budget here (`derandomize=True`); the same
strategies run for minutes in `benchmarks/fuzz_parsers.py`.

The checks (`check_*`) and strategies are shared with that script, so they take no fixtures."""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pipeline_steps.core.config import Params, load_params
from pipeline_steps.core.errors import ConfigError, DataError
from pipeline_steps.core.labels import (
    BOX_COLUMNS,
    LABEL_COLUMNS,
    RSNA_COLUMNS,
    VINDR_COLUMNS,
    import_labels,
    read_label_file,
)

REPO = Path(__file__).resolve().parents[2]
PARAMS_TEXT = (REPO / "params.yaml").read_text()

# The test suite's budget: a few seconds in all, the same examples on every run.
SMALL = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------------------------
# params.yaml


def _field_names(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(field.alias or name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= _field_names(annotation)
    return names


KEYS = sorted(_field_names(Params))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "cpu", "dicom", "ap50", "UTC", "s3://b/p", "0 2 * * *", "1e308"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=25,
)
# Mostly the real sections and keys, so the values reach pydantic's validators.
DOCUMENTS = st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=6),
    st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5) | VALUES,
    max_size=5,
).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
YAML_NOISE = "[]{}:,&*!|>-#?'\"%@` \t\n\\0123456789.eE+~"


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    """A few cuts, insertions of YAML syntax and repeated lines in a text."""
    text = draw(base)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "repeat", "indent"]))
        if action == "insert":
            text = text[:at] + draw(st.text(YAML_NOISE, min_size=1, max_size=6)) + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)) :]
        elif action == "repeat":
            line_end = text.find("\n", at)
            line_start = text.rfind("\n", 0, at) + 1
            text = text[:line_end] + "\n" + text[line_start:line_end] + text[line_end:]
        else:
            text = text[:at] + "\n" + " " * draw(st.integers(0, 9)) + text[at:]
    return text


NESTED = st.builds(
    lambda n, kind: {
        "flow": "train: " + "[" * n + "]" * n,
        "map": "train: " + "{a: " * n + "1" + "}" * n,
        "alias": "a0: &a0 [1]\n"
        + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, n)),
    }[kind],
    st.integers(1, 400),
    st.sampled_from(["flow", "map", "alias"]),
)
PARAMS_FILES = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    DOCUMENTS.map(str.encode),
    mutated(DOCUMENTS).map(lambda t: t.encode("utf-8", "surrogatepass")),
    mutated(st.just(PARAMS_TEXT)).map(lambda t: t.encode("utf-8", "surrogatepass")),
    NESTED.map(str.encode),
)


def check_params_file(data: bytes) -> str:
    """'loaded' or 'refused' (ConfigError); any other exception escapes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_bytes(data)
        try:
            params = load_params(path)
        except ConfigError as exc:
            assert "params.yaml" in str(exc)  # the file is named
            return "refused"
    assert isinstance(params, Params)
    params.stage_hash()  # what the pipeline does with it next
    return "loaded"


# ---------------------------------------------------------------------------------------------
# label files

# Two images of known size (rows, columns) under three names; "ghost" matches no file.
STEM_IDS = {"a": {"ca"}, "b": {"cb"}, "b2": {"cb"}, "twin": {"c1", "c2"}}
SIZES = {"ca": (300, 280), "cb": (512, 512)}
KEY_CELLS = st.sampled_from(["a", "b", "b2", "twin", "ghost", " a", "a ", "", "0012"])
CELLS = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "0",
            "-0",
            "1",
            "10",
            "255.5",
            "279.99",
            "280",
            "300",
            "511",
            "512",
            "-5",
            "1e308",
            "-1e308",
            "1e309",
            "inf",
            "-inf",
            "nan",
            "NaN",
            "65535",
            "65536",
            "1e-320",
            "0x10",
            "1_000",
            "  7",
            "no_finding",
            "No finding",
            "Nodule/Mass",
            "opacity",
            "R1",
            "R2",
            '"',
            "a,b",
            "é",
            "\u2028",
            "\r",
        ]
    ),
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),  # NUL and line breaks included, now and then
)
GOOD_HEADERS = [
    RSNA_COLUMNS,
    VINDR_COLUMNS,
    ["image_id", "class_name", "class_id", "rad_id", *BOX_COLUMNS],
    LABEL_COLUMNS,
    LABEL_COLUMNS + ["extra"],
]
BAD_HEADERS = [["image_id", "x", "y"], ["patientId", "x", "x", "width", "height", "Target"]]
HEADERS = st.sampled_from(GOOD_HEADERS * 4 + BAD_HEADERS)
# Mostly what ingest reads (UTF-8, or a byte-order mark), some that it must refuse clearly.
ENCODINGS = st.sampled_from(
    ["utf-8"] * 6 + ["utf-8-sig", "utf-16", "utf-32", "utf-16-le", "cp1252", "latin-1", "shift_jis"]
)


@st.composite
def label_files(draw: st.DrawFn) -> bytes:
    header = draw(HEADERS)
    # mostly no more cells than the header has (a longer row is refused whatever else it holds)
    width = len(header) - 1 if draw(st.integers(0, 9)) else len(header)
    rows = draw(st.lists(st.tuples(KEY_CELLS, st.lists(CELLS, max_size=width)), max_size=25))
    table = [list(header)] + [[key, *cells] for key, cells in rows]
    if draw(st.booleans()):  # well-quoted CSV
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows(table)
        text = buffer.getvalue()
    else:  # cells joined as they are: stray quotes, commas and line breaks stay
        text = "\n".join(",".join(row) for row in table) + draw(st.sampled_from(["", "\n", "\n\n"]))
    if draw(st.integers(0, 4)) == 0:
        text = draw(mutated(st.just(text)))
    return text.encode(draw(ENCODINGS), "replace")


LABEL_FILES = st.one_of(label_files(), st.binary(max_size=300))
FORMATS = st.sampled_from(["auto", "auto", "rsna", "vindr", "canonical"])


def check_label_file(data: bytes, fmt: str = "auto") -> str:
    """'imported' or 'refused' (DataError); any other exception, or a box that is not finite or
    outside its image, escapes as a failure."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labels.csv"
        path.write_bytes(data)
        try:
            table = read_label_file(path)
            out = import_labels(table, STEM_IDS, fmt, image_sizes=SIZES)
        except DataError as exc:
            assert "labels" in str(exc)
            return "refused"
    boxes = out.labels.dropna(subset=BOX_COLUMNS)
    coords = boxes[BOX_COLUMNS].to_numpy(np.float64)
    assert np.isfinite(coords).all()
    assert ((coords[:, 0] < coords[:, 2]) & (coords[:, 1] < coords[:, 3])).all()
    for image_id, x_min, y_min, x_max, y_max in boxes[["image_id", *BOX_COLUMNS]].itertuples(
        index=False
    ):
        rows, columns = SIZES[image_id]
        assert x_min >= 0 and y_min >= 0 and x_max <= columns and y_max <= rows
    assert set(out.issues["source_row"]) <= set(table.index)  # issues name real lines
    assert set(out.labels["image_id"]) <= {"ca", "cb"}
    return "imported"


# ---------------------------------------------------------------------------------------------
# the test suite's small budget


@SMALL
@given(PARAMS_FILES)
def test_any_params_file_loads_or_is_a_config_error(data: bytes) -> None:
    check_params_file(data)


@SMALL
@given(LABEL_FILES, FORMATS)
def test_any_label_file_imports_or_is_a_data_error(data: bytes, fmt: str) -> None:
    check_label_file(data, fmt)


TARGETS: dict[str, tuple[Callable[..., str], tuple[st.SearchStrategy[Any], ...]]] = {
    "params": (check_params_file, (PARAMS_FILES,)),
    "labels": (check_label_file, (LABEL_FILES, FORMATS)),
}
