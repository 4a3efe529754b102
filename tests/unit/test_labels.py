import numpy as np
import pandas as pd
import pytest

from pipeline_steps.core.boxes import box_iou
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.labels import (
    AMBIGUOUS,
    BAD_VALUE,
    DUPLICATE,
    INVERTED,
    LABEL_COLUMNS,
    MISSING_BOX,
    NO_FINDING,
    ORPHAN,
    OUTSIDE,
    READER_COLUMNS,
    detect_format,
    import_labels,
    normalize_label,
    read_label_file,
    weighted_box_fusion,
)

VINDR = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
RSNA = ["patientId", "x", "y", "width", "height", "Target"]


def _table(columns, rows):
    """As ingest reads a label file: every cell text, empty cells missing."""
    frame = pd.DataFrame(rows, columns=columns)
    return frame.map(lambda v: None if v is None else str(v))


def _boxes(labels, image_id, label):
    rows = labels[(labels["image_id"] == image_id) & (labels["label"] == label)]
    return rows[["x_min", "y_min", "x_max", "y_max"]].to_numpy().tolist()


def test_format_is_detected_from_the_header():
    assert detect_format(RSNA) == "rsna"
    assert detect_format(VINDR) == "vindr"
    assert detect_format(VINDR[:2] + VINDR[3:]) == "vindr"  # class_id is optional
    assert detect_format(LABEL_COLUMNS + ["extra"]) == "canonical"
    with pytest.raises(DataError, match="--label-format"):
        detect_format(["image_id", "x", "y"])


def test_a_forced_format_names_its_missing_columns():
    with pytest.raises(DataError, match=r"vindr labels: missing column\(s\) \['image_id'"):
        import_labels(_table(RSNA, [["a", 1, 1, 2, 2, 1]]), fmt="vindr")


def test_class_names_become_snake_case():
    assert normalize_label("Nodule/Mass") == "nodule_mass"
    assert normalize_label(" No finding ") == NO_FINDING
    assert normalize_label("ILD") == "ild"


def test_box_iou_by_hand():
    # Overlap 36 x 36 = 1296; areas 1600 and 1440; union 1744.
    iou = box_iou(np.array([[10.0, 10, 50, 50]]), np.array([[14.0, 12, 54, 48], [60, 60, 70, 70]]))
    assert iou[0] == pytest.approx([1296 / 1744, 0.0])


def test_wbf_fuses_overlapping_readers_and_keeps_a_lone_box():
    boxes = np.array([[10.0, 10, 50, 50], [14, 12, 54, 48], [200, 200, 220, 220]])
    fused = weighted_box_fusion(boxes, np.ones(3), ["A", "B", "C"], iou_threshold=0.55)
    # IoU 0.743 > 0.55: equal weights, so the mean of the two; the third overlaps nothing.
    np.testing.assert_allclose(fused.boxes, [[12, 11, 52, 49], [200, 200, 220, 220]])
    np.testing.assert_allclose(fused.scores, [2 / 3, 1 / 3])  # members / readers
    assert fused.members == ((0, 1), (2,))


def test_wbf_weights_by_score_and_rescales_by_source_count():
    boxes = np.array([[0.0, 0, 10, 10], [2, 2, 12, 12]])  # IoU 64 / 136 = 0.47
    apart = weighted_box_fusion(boxes, np.array([0.9, 0.3]), ["A", "B"], iou_threshold=0.55)
    assert len(apart.boxes) == 2
    fused = weighted_box_fusion(
        boxes, np.array([0.3, 0.9]), ["A", "B"], iou_threshold=0.4, n_sources=3
    )
    # (0.9 * [2,2,12,12] + 0.3 * [0,0,10,10]) / 1.2; mean score 0.6 times 2 of 3 sources.
    np.testing.assert_allclose(fused.boxes, [[1.5, 1.5, 11.5, 11.5]])
    np.testing.assert_allclose(fused.scores, [0.6 * 2 / 3])
    assert fused.members == ((1, 0),)  # highest score first


def test_wbf_never_fuses_two_boxes_of_one_reader():
    boxes = np.array([[0.0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10]])  # first two: IoU 0.82
    fused = weighted_box_fusion(boxes, np.ones(3), ["A", "A", "B"], iou_threshold=0.55)
    # Reader A drew two findings; B's box joins the one it overlaps most (IoU 1.0).
    np.testing.assert_allclose(fused.boxes, [[0, 0, 10, 10], [1, 0, 11, 10]])
    np.testing.assert_allclose(fused.scores, [1.0, 0.5])


def test_wbf_matches_against_the_moving_fused_box():
    # B overlaps A by IoU 0.6 and C overlaps A by only 0.43, but C overlaps the fused A+B box by 0.57;
    # at threshold 0.5 C therefore joins: matching is against fused boxes, not the first member.
    boxes = np.array([[0.0, 0, 10, 10], [2.5, 0, 12.5, 10], [4, 0, 14, 10]])
    assert box_iou(boxes[:1], boxes[2:])[0] == pytest.approx([60 / 140])
    fused = weighted_box_fusion(boxes, np.ones(3), ["A", "B", "C"], iou_threshold=0.5)
    np.testing.assert_allclose(fused.boxes, [[6.5 / 3, 0, 36.5 / 3, 10]])


def test_vindr_readers_are_fused_and_kept_apart():
    table = _table(
        VINDR,
        [
            ["img1", "Nodule/Mass", 8, "R1", 10, 10, 50, 50],  # line 2
            ["img1", "Nodule/Mass", 8, "R2", 14, 12, 54, 48],
            ["img1", "No finding", 14, "R3", None, None, None, None],
            ["img1", "Aortic enlargement", 0, "R1", 100, 100, 150, 140],  # line 5
            ["img2", "No finding", 14, "R1", None, None, None, None],
            ["img2", "No finding", 14, "R2", None, None, None, None],
            ["img2", "No finding", 14, "R3", None, None, None, None],
            ["ghost", "Nodule/Mass", 8, "R1", 1, 1, 5, 5],  # line 9: no such image
            ["img3", "Nodule/Mass", 8, "R2", 30, 30, 20, 40],  # line 10: x_min > x_max
        ],
    )
    ids = {"img1": {"c1"}, "img2": {"c2"}, "img3": {"c3"}}
    out = import_labels(table, ids, iou_threshold=0.55)

    assert out.format == "vindr"
    assert list(out.labels.columns) == LABEL_COLUMNS
    assert _boxes(out.labels, "c1", "nodule_mass") == [[12, 11, 52, 49]]
    assert _boxes(out.labels, "c1", "aortic_enlargement") == [[100, 100, 150, 140]]
    # R3's "No finding" does not make img1 negative; img2 is negative once, not three times.
    assert NO_FINDING not in set(out.labels.loc[out.labels["image_id"] == "c1", "label"])
    assert out.labels.loc[out.labels["image_id"] == "c2", "label"].tolist() == [NO_FINDING]
    # img3's only finding was unusable: unlabelled, not negative.
    assert "c3" not in set(out.labels["image_id"])

    assert list(out.readers.columns) == READER_COLUMNS
    assert len(out.readers) == 7
    assert sorted(out.readers.loc[out.readers["image_id"] == "c1", "rad_id"]) == [
        "R1",
        "R1",
        "R2",
        "R3",
    ]
    issues = out.issues.set_index("source_row")
    assert issues.loc[9, "kind"] == ORPHAN and issues.loc[9, "image_id"] == ""
    assert issues.loc[10, "kind"] == INVERTED and issues.loc[10, "image_id"] == "c3"
    assert len(out.issues) == 2
    assert "ghost" not in out.issues.to_csv()  # source names may carry PHI


def test_vindr_fusion_ignores_row_order():
    # A chain: in this order all three fuse (IoU 0.6, then 0.57 with the fused box); taken in
    # reverse, the first reader's box would end up alone (IoU 0.51 < 0.55). Readers are sorted.
    rows = [
        ["a", "Nodule/Mass", 8, "R1", 0, 0, 100, 100],
        ["a", "Nodule/Mass", 8, "R2", 25, 0, 125, 100],
        ["a", "Nodule/Mass", 8, "R3", 40, 0, 140, 100],
    ]
    forward = import_labels(_table(VINDR, rows)).labels
    backward = import_labels(_table(VINDR, rows[::-1])).labels
    pd.testing.assert_frame_equal(forward, backward)
    np.testing.assert_allclose(_boxes(forward, "a", "nodule_mass"), [[65 / 3, 0, 365 / 3, 100]])


def test_rsna_rows_become_canonical_boxes():
    table = _table(
        RSNA,
        [
            ["p1", 10, 20, 30, 40, 1],  # line 2
            ["p1", 100, 100, 5, 5, 1],
            ["p2", None, None, None, None, 0],
            ["p3", None, None, None, None, 1],  # line 5: a finding without a box
            ["p4", 10, 10, 0, 5, 1],  # line 6: zero width
            ["p5", None, None, None, None, 2],  # line 7: Target must be 0/1
            ["p6", None, None, None, None, 0],  # line 8: contradicted by the next row
            ["p6", 1, 2, 3, 4, 1],
            ["gone", None, None, None, None, 0],  # line 10
        ],
    )
    ids = {f"p{i}": {f"c{i}"} for i in range(1, 7)}
    out = import_labels(table, ids)

    assert out.format == "rsna"
    assert _boxes(out.labels, "c1", "opacity") == [[10, 20, 40, 60], [100, 100, 105, 105]]
    assert out.labels.loc[out.labels["image_id"] == "c2", "label"].tolist() == [NO_FINDING]
    assert _boxes(out.labels, "c6", "opacity") == [[1, 2, 4, 6]]
    assert out.labels["image_id"].value_counts()["c6"] == 1  # positive, not also negative
    assert not {"c3", "c4", "c5"} & set(out.labels["image_id"])
    kinds = dict(zip(out.issues["source_row"], out.issues["kind"], strict=True))
    assert kinds == {5: MISSING_BOX, 6: INVERTED, 7: BAD_VALUE, 10: ORPHAN}
    assert out.readers.empty


def test_canonical_rows_are_checked_and_keys_resolved():
    table = _table(
        LABEL_COLUMNS,
        [
            ["a", "nodule", 1, 2, 3, 4],
            ["b", NO_FINDING, None, None, None, None],
            ["c", "nodule", 5, 9, 6, 9],  # line 4: y_min == y_max
            ["dup", "nodule", 1, 1, 2, 2],  # line 5: two different files share the stem
        ],
    )
    out = import_labels(table, {"a": {"ca"}, "b": {"cb"}, "c": {"cc"}, "dup": {"x1", "x2"}})
    assert out.format == "canonical"
    assert out.labels.sort_values("image_id")["image_id"].tolist() == ["ca", "cb"]
    assert _boxes(out.labels, "ca", "nodule") == [[1, 2, 3, 4]]
    assert dict(zip(out.issues["source_row"], out.issues["kind"], strict=True)) == {
        4: INVERTED,
        5: AMBIGUOUS,
    }
    assert out.count(INVERTED) == 1


# ---- boxes checked against their image, absurd values and repeated rows refused with their line


def _kinds(out):
    return dict(zip(out.issues["source_row"], out.issues["kind"], strict=True))


def _messages(out):
    return dict(zip(out.issues["source_row"], out.issues["message"], strict=True))


def test_boxes_outside_the_image_and_absurd_values_are_refused_with_line_and_reason():
    table = _table(
        RSNA,
        [
            ["p1", 10, 20, 30, 40, 1],  # line 2: inside the 280 x 300 image
            ["p1", 270, 20, 20, 40, 1],  # line 3: x_max 290 > 280 columns
            ["p1", -5, 20, 30, 40, 1],  # line 4: starts left of the image
            ["p1", 10, 280, 30, 40, 1],  # line 5: y_max 320 > 300 rows
            ["p1", "1e308", "1e308", "1e308", "1e308", 1],  # line 6: x + width overflows to inf
            ["p1", "inf", 1, 2, 3, 1],  # line 7
            ["p1", 10, 20, -30, 40, 1],  # line 8: negative width
            ["p1", "NaN", 20, 30, 40, 1],  # line 9: no coordinate
            ["p2", "1e300", 20, 30, 40, 1],  # line 10: finite, beyond any DICOM image
            ["p1", 0, 0, 280, 300, 1],  # line 11: the whole image, edges included
        ],
    )
    out = import_labels(table, {"p1": {"c1"}, "p2": {"c2"}}, image_sizes={"c1": (300, 280)})
    assert _kinds(out) == {
        3: OUTSIDE,
        4: OUTSIDE,
        5: OUTSIDE,
        6: BAD_VALUE,
        7: BAD_VALUE,
        8: INVERTED,
        9: MISSING_BOX,
        10: OUTSIDE,
    }
    messages = _messages(out)
    assert "280 columns x 300 rows" in messages[3]
    assert "not a finite number" in messages[6]
    assert "negative width or height" in messages[8]
    assert "65535" in messages[10]  # c2's size is not known: DICOM's own limit
    assert _boxes(out.labels, "c1", "opacity") == [[10, 20, 40, 60], [0, 0, 280, 300]]
    assert "c2" not in set(out.labels["image_id"])  # its only finding was refused: unlabelled
    assert np.isfinite(out.labels[["x_min", "y_min", "x_max", "y_max"]].to_numpy(float)).all()


def test_repeated_rows_are_kept_once_and_reported_with_the_line_they_repeat():
    table = _table(
        RSNA,
        [
            ["p1", 10, 20, 30, 40, 1],  # line 2
            ["p2", None, None, None, None, 0],
            ["p1", "10.0", 20, 30, 40, 1],  # line 4: the same box as line 2
            ["p2", None, None, None, None, 0],  # line 5: the same negative as line 3
            ["p1", 11, 20, 30, 40, 1],  # another box: kept
        ],
    )
    out = import_labels(table, {"p1": {"c1"}, "p2": {"c2"}})
    assert _kinds(out) == {4: DUPLICATE, 5: DUPLICATE}
    assert _messages(out)[4].startswith("repeats line 2 ")
    assert _messages(out)[5].startswith("repeats line 3 ")
    assert _boxes(out.labels, "c1", "opacity") == [[10, 20, 40, 60], [11, 20, 41, 60]]
    assert out.labels["image_id"].value_counts().to_dict() == {"c1": 2, "c2": 1}


def test_a_reader_drawing_the_same_box_twice_is_one_finding_not_two():
    rows = [
        ["a", "Nodule/Mass", 8, "R1", 10, 10, 50, 50],
        ["a", "Nodule/Mass", 8, "R1", 10, 10, 50, 50],  # line 3: repeated by the same reader
        ["a", "Nodule/Mass", 8, "R2", 10, 10, 50, 50],  # another reader: fused, not a repeat
    ]
    out = import_labels(_table(VINDR, rows))
    assert _kinds(out) == {3: DUPLICATE}
    assert _boxes(out.labels, "a", "nodule_mass") == [[10, 10, 50, 50]]
    assert len(out.readers) == 2


def test_files_with_different_names_and_one_content_repeat_each_other():
    # two stems, one image: the same box under both names is one box
    table = _table(LABEL_COLUMNS, [["x", "nodule", 1, 2, 3, 4], ["y", "nodule", 1, 2, 3, 4]])
    out = import_labels(table, {"x": {"c"}, "y": {"c"}})
    assert _kinds(out) == {3: DUPLICATE}
    assert len(out.labels) == 1


# ---- label files read within limits: size, encoding, CSV shape; errors name file and line

RSNA_TEXT = "patientId,x,y,width,height,Target\nSmith_J,10,20,30,40,1\nDoe,,,,,0\n"


def _write(tmp_path, data: bytes, name="labels.csv"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("codec", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_a_label_file_with_a_byte_order_mark_is_decoded_as_it_says(tmp_path, codec):
    data = RSNA_TEXT.encode(codec)
    if codec == "utf-16-be":  # Python writes no mark for an explicit byte order: add it
        data = b"\xfe\xff" + data
    table = read_label_file(_write(tmp_path, data))
    assert table.columns.tolist() == RSNA
    assert table.index.tolist() == [2, 3]
    assert table.loc[2].tolist() == ["Smith_J", "10", "20", "30", "40", "1"]
    assert table.loc[3, "x"] is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # UTF-16 without a byte-order mark: valid UTF-8 bytes, but full of NULs
        (RSNA_TEXT.encode("utf-16-le"), r"line 1: NUL bytes .*suggests utf_16"),
        (
            "patientId,x,y,width,height,Target\nMüller,1,2,3,4,1\n".encode("cp1252"),
            r"line 2: not UTF-8 text \(byte 0xfc\); charset detection suggests",
        ),
        (b"\xff\xfe" + "a,b\n".encode("utf-16-le") + b"\x00\xd8", r"line 2: .*says UTF-16"),
        (b"DICM\x00\x01\x02\xff\xd8", r"line 1: "),  # binary, e.g. an image given as labels
    ],
    ids=["utf16-no-bom", "cp1252", "utf16-truncated", "binary"],
)
def test_a_label_file_not_in_utf8_names_the_line_and_the_likely_encoding(tmp_path, data, message):
    with pytest.raises(DataError, match=r"labels\.csv: " + message):
        read_label_file(_write(tmp_path, data))


def test_a_label_file_over_the_size_limit_is_refused_before_reading(tmp_path):
    header, rows = RSNA_TEXT.split("\n", 1)
    path = _write(tmp_path, (header + "\n" + rows * 10).encode())
    with pytest.raises(DataError, match=r"larger than the limit of a label file \(100 bytes\)"):
        read_label_file(path, max_bytes=100)
    assert len(read_label_file(path, max_bytes=10_000)) == 20


def test_line_numbers_survive_blank_lines_and_quoted_newlines(tmp_path):
    text = 'image_id,label,x_min,y_min,x_max,y_max\n\na,"multi\nline",1,2,3,4\n\n  \nb,no_finding,,,,\n'
    table = read_label_file(_write(tmp_path, text.encode()))
    assert table.index.tolist() == [4, 7]  # the line where each row ends
    out = import_labels(table)
    assert out.issues.empty and len(out.labels) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b\n1,2\n1,2,3\n", r"line 3: 3 cells, but the header has 2"),
        ('a,b\n1,"2\n', r"line \d+: not readable CSV"),
        ("", r"empty, no header row"),
        ("\n\n", r"empty, no header row"),
        ("x,x,y\n1,2,3\n", r"line 1: column\(s\) \['x'\] appear twice"),
    ],
    ids=["too-many-cells", "open-quote", "empty", "blank", "twice"],
)
def test_a_malformed_csv_is_a_data_error_naming_file_and_line(tmp_path, text, message):
    with pytest.raises(DataError, match=r"labels\.csv: " + message):
        read_label_file(_write(tmp_path, text.encode()))


def test_short_rows_are_padded_and_a_missing_file_is_named(tmp_path):
    table = read_label_file(_write(tmp_path, b"a,b,c\n1\n"))
    assert table.loc[2].tolist() == ["1", None, None]
    with pytest.raises(DataError, match=r"nope\.csv: labels file not found"):
        read_label_file(tmp_path / "nope.csv")
