"""The report's image grid: drawn at the served threshold, with score labels a reader can read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline_steps.core.config import load_params
from pipeline_steps.core.plots import plot_detection_grid
from pipeline_steps.test import grid_detections

REPO = Path(__file__).resolve().parents[2]
# Width of the page column the grid is scaled into (report.py's CSS: max-width 1240px, margins).
PAGE_COLUMN_PX = 1190
# The score label's fill (the darker red behind the white text), distinct from the box's pure red.
LABEL_FILL = (0xC0, 0x00, 0x00)


def test_grid_draws_the_deep_model_at_the_served_threshold() -> None:
    served = load_params(REPO / "params.yaml").test.score_threshold
    below, above = served - 0.05, served + 0.05
    deep = [np.array([[10, 10, 30, 30, above], [40, 40, 60, 60, below]], float), np.zeros((0, 5))]
    base = [np.array([[5, 5, 15, 15, 0.06], [1, 1, 4, 4, 0.04]], float), np.zeros((0, 5))]
    drawn = grid_detections(deep, base, [0, 1], served, 0.05)
    deep_label, base_label = list(drawn)
    assert f"{served:.2f} (served)" in deep_label and "0.05 (1 FP/image)" in base_label
    # Only the box at or above the served threshold; the 1 FP/image point would also keep `below`.
    assert drawn[deep_label][0][:, 4].tolist() == [above]
    assert drawn[base_label][0][:, 4].tolist() == [0.06]
    assert len(drawn[deep_label][1]) == 0
    assert list(grid_detections(deep, None, [0], served, None)) == [deep_label]


def test_score_labels_are_legible_at_the_size_the_page_shows_them(tmp_path: Path) -> None:
    images = [np.full((256, 256), 0.5) for _ in range(12)]
    gts = [np.zeros((0, 4)) for _ in images]
    boxes = [np.array([[100.0, 120.0, 140.0, 160.0, 0.87]])] + [np.zeros((0, 5))] * 11
    out = plot_detection_grid(images, gts, {"deep model": boxes}, tmp_path / "grid.png")
    pixels = np.asarray(Image.open(out).convert("RGB"))
    fill = np.all(np.abs(pixels.astype(int) - LABEL_FILL) <= 8, axis=-1)
    rows = np.flatnonzero(fill.any(axis=1))
    assert rows.size, "no score label drawn"
    # The label's box height as the reader sees it, the PNG scaled to the page column: text of
    # about 10 px or more is readable; the old 6 pt red text on grey came out near 7 px.
    shown_px = (rows.max() - rows.min() + 1) * PAGE_COLUMN_PX / pixels.shape[1]
    assert shown_px >= 13, f"score label is {shown_px:.1f} px tall on the page"
