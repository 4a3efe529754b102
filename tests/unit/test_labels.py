import numpy as np
import pandas as pd
import pytest

from pipeline_steps.core.boxes import box_iou
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.labels import (
    AMBIGUOUS,
    BAD_VALUE,
    INVERTED,
    LABEL_COLUMNS,
    MISSING_BOX,
    NO_FINDING,
    ORPHAN,
    READER_COLUMNS,
    detect_format,
    import_labels,
    normalize_label,
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
