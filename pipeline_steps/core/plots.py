"""Plots of detection results: FROC, precision-recall, calibration and a grid of images with boxes.
Figures are built with matplotlib's object API on the Agg canvas, so no pyplot global state and no
display are involved."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


from pipeline_steps.core.boxes import as_boxes
from pipeline_steps.core.metrics import (
    CalibrationResult,
    FrocResult,
    ap_at,
    check_inputs,
    check_iou_threshold,
    pr_curve,
    sorted_with_ious,
)

# --------------------------------------------------------------------------------------------------
# Plots (each writes its PNG)


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _new_figure() -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")


def plot_froc(
    curve: FrocResult,
    path: str | Path,
    others: Mapping[str, FrocResult] | None = None,
    label: str = "FROC",
) -> Path:
    """Draw a `froc` result (log-2 FP/image axis, marked operating rates) to a PNG at ``path``.

    ``others`` adds more detectors' curves on the same axes (e.g. the classical baseline).
    """
    fig, ax = _new_figure()
    rates = curve["fp_rates"]
    left, right = float(rates.min()) / 2, float(rates.max()) * 2
    drawn = False
    for (name, result), colour in zip(
        {label: curve, **(others or {})}.items(), _COLOURS, strict=False
    ):
        fps = result["fps_per_image"]
        sens = result["sensitivity"]
        if not (fps.size and np.isfinite(sens).all()):
            continue
        # Log axis: draw the (0, 0) start at the left edge; extend the last point to the right
        # edge, since sensitivity stays put once the predictions run out.
        x = np.concatenate([np.clip(fps, left, None), [max(right, float(fps[-1]))]])
        y = np.concatenate([sens, [sens[-1]]])
        ax.plot(
            x, y, drawstyle="steps-post", color=colour, label=f"{name} (CPM {result['cpm']:.3f})"
        )
        ax.plot(result["fp_rates"], result["sensitivity_at_rates"], "o", color=colour)
        drawn = True
    if drawn:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no ground truth", ha="center", transform=ax.transAxes)
    ax.set_xscale("log", base=2)
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set(
        xlim=(left, right),
        ylim=(0, 1.02),
        xlabel="False positives per image",
        ylabel="Lesion sensitivity",
        title=f"FROC ({curve['n_gt']} lesions, {curve['n_images']} images)",
    )
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_pr(
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    path: str | Path,
    iou: float = 0.5,
    others: Mapping[str, Sequence[ArrayLike]] | None = None,
    label: str = "model",
) -> Path:
    """Draw the precision-recall curve at IoU ``iou`` and its COCO envelope to a PNG at ``path``.

    ``others`` maps more detectors' names to their predictions on the same images; their
    interpolated curves are drawn too.
    """
    check_iou_threshold(iou)
    p, g = check_inputs(preds, gts)
    images = sorted_with_ious(p, g)
    recall, precision, _ = pr_curve(images, iou)
    ap = ap_at(images, iou)
    fig, ax = _new_figure()
    if recall.size and np.isfinite(recall).all():
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        ax.plot(recall, precision, color="tab:gray", alpha=0.6, label=f"{label} precision")
        ax.plot(
            recall,
            envelope,
            drawstyle="steps-pre",
            color=_COLOURS[0],
            label=f"{label} interpolated (AP {ap:.3f})",
        )
        for (name, extra), colour in zip((others or {}).items(), _COLOURS[1:], strict=False):
            other_images = sorted_with_ious(check_inputs(extra, g)[0], g)
            r, prec, _ = pr_curve(other_images, iou)
            if r.size:
                ax.plot(
                    r,
                    np.maximum.accumulate(prec[::-1])[::-1],
                    drawstyle="steps-pre",
                    color=colour,
                    label=f"{name} interpolated (AP {ap_at(other_images, iou):.3f})",
                )
        ax.legend(loc="upper right")
    else:
        why = "no ground truth" if not np.isfinite(ap) else "no predictions"
        ax.text(0.5, 0.5, why, ha="center", transform=ax.transAxes)
    ax.set(
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        xlabel="Recall",
        ylabel="Precision",
        title=f"Precision-recall at IoU {iou:.2f} (AP = {ap:.3f})",
    )
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


# Score labels of the detection grid: at this size, on a filled box, they stay legible when the page
# scales the figure to its column (about 1200 px for 4 images of 3.6 in at 100 dpi).
GRID_LABEL_PT = 10.0


def plot_detection_grid(
    images: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    detections: Mapping[str, Sequence[ArrayLike]],
    path: str | Path,
    titles: Sequence[str] | None = None,
    columns: int = 4,
) -> Path:
    """A grid of images with their ground truth (green) and each detector's boxes (in the order
    of ``detections``: red solid, then blue dashed, ...) with scores, to a PNG at ``path``.

    Boxes are in the images' pixels; the caller chooses which boxes to show (e.g. those above
    the served threshold) and names each detector's entry as its legend should read. Scores are
    written in white on a box of the detector's colour: above the first detector's boxes, below the
    others' (flipped at the image edge).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    n = len(images)
    if n == 0:
        raise ValueError("plot_detection_grid needs at least one image")
    styles = [("red", "-"), ("deepskyblue", "--"), ("orange", ":")]
    label_colours = {"red": "#c00000", "deepskyblue": "#0b5fa5", "orange": "#a65c00"}
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(3.6 * columns, 3.8 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        image = np.asarray(images[k])
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
        for x0, y0, x1, y1 in as_boxes(gts[k], 4, f"gts[{k}]"):
            pad = 2.0  # drawn just outside the lesion, so the lesion itself stays visible
            ax.add_patch(
                Rectangle(
                    (x0 - pad, y0 - pad), x1 - x0 + 2 * pad, y1 - y0 + 2 * pad,
                    fill=False, ec="lime", lw=1.5,
                )
            )  # fmt: skip
        for d, ((_, boxes), (colour, style)) in enumerate(
            zip(detections.items(), styles, strict=False)
        ):
            for x0, y0, x1, y1, score in as_boxes(boxes[k], 5, f"detections[{k}]"):
                ax.add_patch(
                    Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, ls=style, lw=1.5)
                )
                # The first detector's label above its box, the others' below, so two detectors'
                # labels on one lesion do not cover each other; flipped where the edge is near.
                room = 0.08 * image.shape[0]
                top = y0 > room if d == 0 else y1 > image.shape[0] - room
                ax.text(
                    x0,
                    y0 - 2 if top else y1 + 2,
                    f"{score:.2f}",
                    color="white",
                    fontsize=GRID_LABEL_PT,
                    fontweight="bold",
                    va="bottom" if top else "top",
                    bbox={"facecolor": label_colours[colour], "edgecolor": "none", "pad": 1.5},
                    clip_on=True,
                )
        if titles is not None:
            ax.set_title(titles[k], fontsize=10)
    handles = [Line2D([], [], color="lime", lw=2, label="ground truth")] + [
        Line2D([], [], color=colour, ls=style, lw=2, label=name)
        for name, (colour, style) in zip(detections, styles, strict=False)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=11)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def plot_calibration(cal: CalibrationResult, path: str | Path) -> Path:
    """Draw a `calibration_curve` result as a reliability diagram to a PNG at ``path``."""
    fig, ax = _new_figure()
    edges = cal["bin_edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    counts = ax.twinx()
    counts.bar(centers, cal["count"], width=np.diff(edges), color="tab:gray", alpha=0.25)
    counts.set_ylabel("Predictions per bin")
    counts.set_ylim(0, max(1.0, 1.1 * float(cal["count"].max())))
    # Keep the reliability line on top of the count bars drawn on the twin axis.
    ax.set_zorder(counts.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot([0, 1], [0, 1], "--", color="black", lw=1, label="perfect calibration")
    ok = cal["count"] > 0
    if not ok.any():
        ax.text(0.5, 0.5, "no predictions", ha="center", transform=ax.transAxes)
    ax.plot(
        cal["mean_score"][ok], cal["fraction_tp"][ok], "o-", color="tab:blue", label="box scores"
    )
    ax.legend(loc="upper left")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="Mean box score",
        ylabel=f"Fraction true positive (IoU >= {cal['iou_threshold']:g})",
        title=f"Box-score calibration (ECE = {cal['ece']:.3f})",
    )
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
