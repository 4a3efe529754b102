"""Stage `test`: the held-out split through the trained detector and the classical baseline, scored
in original DICOM pixels by the kernel's metrics; writes metrics.json, the prediction tables, the
plots and the tables behind the report."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from pipeline_steps.core.config import DetectionParams
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.files import atomic_path, write_text_atomic
from pipeline_steps.core.layout import Layout

if TYPE_CHECKING:
    import pandas as pd

    from pipeline_steps.core.transforms import Geometry

from pipeline_steps.core.bootstrap import bootstrap_cis, paired_bootstrap_ci
from pipeline_steps.core.metrics import (
    CI_METRICS,
    FrocResult,
    ap50,
    calibration_curve,
    evaluate_detections,
    froc,
)
from pipeline_steps.core.plots import plot_calibration, plot_detection_grid, plot_froc, plot_pr
from pipeline_steps.core.subgroups import (
    SIZE_BAND_LARGEST,
    SIZE_BANDS_MM,
    age_band,
    flatten_subgroups,
    lesion_sensitivity,
    metric_key_part,
    operating_threshold,
    size_band,
    subgroup_metrics,
)

FloatArray = NDArray[np.float64]
# Test images drawn in the report's grid: this many with lesions and without, in image-id order
# (ids are content hashes, so this is an arbitrary but reproducible pick, not a flattering one).
GRID_POSITIVES, GRID_NEGATIVES = 8, 4


def _finite_or_none(value: object) -> object:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _to_original(boxes: np.ndarray, geometry: Geometry) -> FloatArray:
    """(k, 5) boxes in model input pixels -> original DICOM pixels, scores kept."""
    if len(boxes) == 0:
        return np.zeros((0, 5))
    return np.column_stack([geometry.inverse(boxes[:, :4]), boxes[:, 4]])


def _prediction_rows(
    image_ids: Sequence[str], preds: Sequence[FloatArray]
) -> list[dict[str, object]]:
    return [
        {
            "image_id": image_id,
            "x_min": box[0],
            "y_min": box[1],
            "x_max": box[2],
            "y_max": box[3],
            "score": box[4],
        }
        for image_id, boxes in zip(image_ids, preds, strict=True)
        for box in boxes
    ]


def _score_detector(
    name: str,
    preds: Sequence[FloatArray],
    gts: Sequence[FloatArray],
    patients: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    lesion_bands: Sequence[Sequence[str]],
    n_boot: int,
    with_subgroup_keys: bool = True,
) -> tuple[dict[str, float], dict[str, object]]:
    """Headline metrics (flat) and the detailed tables (subgroups, lesion sizes, operating point)."""
    metrics = evaluate_detections(preds, gts, patient_ids=patients, n_boot=n_boot, seed=0)
    subgroups = subgroup_metrics(preds, gts, groups, patients, n_boot=n_boot, seed=0)
    threshold = operating_threshold(preds, gts, 1.0)
    sizes = lesion_sensitivity(preds, gts, lesion_bands, threshold)
    order = [band for band, _ in SIZE_BANDS_MM] + [SIZE_BAND_LARGEST]
    size_table = {band: list(sizes[band]) for band in order if band in sizes}
    if with_subgroup_keys:
        metrics.update(flatten_subgroups(subgroups))
    for band, (found, total) in sizes.items():
        metrics[f"lesion_size.{metric_key_part(band)}.sens_at_1fp"] = found / total
    metrics["threshold_at_1fp"] = threshold
    details = {
        "name": name,
        "subgroups": subgroups,
        "lesion_size_at_1fp": size_table,
        "threshold_at_1fp": threshold,
    }
    return metrics, details


def _write_froc_csv(curve: FrocResult, path: Path) -> None:
    """The curve as data for `dvc plots` (one row per operating point)."""
    rows = ["fps_per_image,sensitivity,threshold"]
    for x, y, t in zip(
        curve["fps_per_image"], curve["sensitivity"], curve["thresholds"], strict=True
    ):
        rows.append(f"{x:.6g},{y:.6g},{t:.6g}")
    path.write_text("\n".join(rows) + "\n")


def grid_detections(
    deep: Sequence[FloatArray],
    baseline: Sequence[FloatArray] | None,
    shown: Sequence[int],
    served_threshold: float,
    baseline_threshold: float | None,
) -> dict[str, list[FloatArray]]:
    """The boxes the report's grid draws for the images at positions `shown`, keyed by the legend
    label: the deep model at the served threshold (`test.score_threshold`, what `radflow predict`
    returns), the classical baseline (never served) at its own 1 FP/image operating point."""
    cuts: dict[str, tuple[Sequence[FloatArray], float]] = {
        f"deep model, score \u2265 {served_threshold:.2f} (served)": (deep, served_threshold)
    }
    if baseline is not None and baseline_threshold is not None:
        label = f"classical baseline, score \u2265 {baseline_threshold:.2f} (1 FP/image)"
        cuts[label] = (baseline, baseline_threshold)
    return {
        name: [boxes[k][boxes[k][:, 4] >= threshold] for k in shown]
        for name, (boxes, threshold) in cuts.items()
    }


def _write_parquet_atomic(table: pd.DataFrame, path: Path) -> None:
    # A DVC-cached out: with link-type caches the old file may be a hardlink into the cache, so it
    # is replaced, never rewritten in place.
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


def run(
    layout: Layout,
    params: DetectionParams,
    input_size: int,
    spacing_mm: float = 1.4,
    n_boot: int = 200,
) -> dict[str, float]:
    """Stage edge: model + test split -> metrics.json, predictions, plots and the report's tables.

    The deep model is scored in original DICOM pixels (boxes mapped back through the inverse
    letterbox geometry). With `params.baseline.enabled`, the classical detector is fitted on the
    train split and scored on the same test images by the same code; its metrics are the
    `baseline_*` keys, and `ap50_minus_baseline` comes with a paired patient-level bootstrap
    interval. Subgroup and lesion-size metrics are flat keys (`subgroup.<attribute>.<value>.*`,
    `lesion_size.<band>.*`) and, with display names, `reports/test_details.json`.
    """
    import keras
    import pandas as pd

    from pipeline_steps.core.baseline import finalize, fit_baseline
    from pipeline_steps.core.detector import predict_boxes
    from pipeline_steps.core.shards import load_split
    from pipeline_steps.core.transforms import geometry_of

    if not layout.model.exists():
        raise DataError(f"{layout.model}: missing. Run the `train` stage first.")
    split = load_split(layout.processed, "test")
    if len(split) == 0:
        raise DataError(
            f"{layout.manifest}: the test split is empty; ingest more labelled studies."
        )
    model = keras.models.load_model(layout.model, compile=False)
    curve_params = params.model_copy(update={"score_threshold": params.metrics_score_floor})
    labels = pd.read_parquet(layout.labels).dropna(subset=["x_min"])
    truth = {
        str(k): g[["x_min", "y_min", "x_max", "y_max"]].to_numpy(float)
        for k, g in labels.groupby("image_id")
    }
    records = split.manifest.to_dict("records")
    image_ids = [str(r["image_id"]) for r in records]
    geometries = [geometry_of(r, input_size) for r in records]
    gts = [truth.get(i, np.zeros((0, 4))) for i in image_ids]
    patients = [str(r["patient_pseudonym"]) for r in records]

    positives = sorted((i for i, g in zip(image_ids, gts, strict=True) if len(g)))[:GRID_POSITIVES]
    negatives = sorted((i for i, g in zip(image_ids, gts, strict=True) if not len(g)))
    grid_ids = positives + negatives[:GRID_NEGATIVES]
    grid_images: dict[str, np.ndarray] = {}

    deep_input: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for k, (image, _) in enumerate(split.examples()):
        batch.append(image)
        if image_ids[k] in grid_ids:
            grid_images[image_ids[k]] = image
        if len(batch) == 32 or k == len(records) - 1:
            deep_input.extend(predict_boxes(model, np.stack(batch), curve_params))
            batch.clear()
    deep = [_to_original(b, g) for b, g in zip(deep_input, geometries, strict=True)]

    metadata = pd.read_parquet(layout.metadata).set_index("image_id")
    meta = metadata.reindex(image_ids)
    groups = {
        "sex": [str(v) if isinstance(v, str) and v else "unknown" for v in meta["sex"]],
        "age_band": [age_band(float(v)) if pd.notna(v) else "unknown" for v in meta["age_years"]],
        "view_position": [
            str(v) if isinstance(v, str) and v else "unknown" for v in meta["view_position"]
        ],
        "manufacturer": [
            str(v) if isinstance(v, str) and v else "unknown" for v in meta["manufacturer"]
        ],
    }
    spacing_x = meta["spacing_col_mm"].astype(float).to_numpy()
    spacing_y = meta["spacing_row_mm"].astype(float).to_numpy()
    lesion_bands = [
        [size_band(((b[2] - b[0]) * spacing_x[i] + (b[3] - b[1]) * spacing_y[i]) / 2) for b in g]
        for i, g in enumerate(gts)
    ]

    metrics, deep_details = _score_detector(
        "deep", deep, gts, patients, groups, lesion_bands, n_boot
    )
    details: dict[str, object] = {
        "deep": deep_details,
        "n_patients": len(set(patients)),
        "grid_ids": grid_ids,
        "operating_threshold": params.score_threshold,
        "grid_thresholds": {"deep": params.score_threshold},
    }
    baseline: list[FloatArray] | None = None
    baseline_input: list[FloatArray] = []
    if params.baseline.enabled:
        detector = fit_baseline(
            load_split(layout.processed, "train").examples(), params.baseline, spacing_mm
        )
        baseline_input = [
            finalize(
                detector(image), params.metrics_score_floor, params.nms_iou, params.max_detections
            )
            for image, _ in split.examples()
        ]
        baseline = [_to_original(b, g) for b, g in zip(baseline_input, geometries, strict=True)]
        # The baseline's subgroups stay in test_details.json: in metrics.json they would double
        # the keys for a comparison the report already shows.
        base_metrics, base_details = _score_detector(
            "classical", baseline, gts, patients, groups, lesion_bands, 0, with_subgroup_keys=False
        )
        base_ci = bootstrap_cis(CI_METRICS, baseline, gts, patients, n_boot=n_boot, seed=0)
        for name, (low, high) in base_ci.items():
            base_metrics[f"{name}_ci_low"], base_metrics[f"{name}_ci_high"] = low, high
        metrics.update({f"baseline_{k}": v for k, v in base_metrics.items()})
        metrics["ap50_minus_baseline"] = metrics["ap50"] - metrics["baseline_ap50"]
        low, high = paired_bootstrap_ci(ap50, deep, baseline, gts, patients, n_boot=n_boot)
        metrics["ap50_minus_baseline_ci_low"], metrics["ap50_minus_baseline_ci_high"] = low, high
        details["baseline"] = base_details
        details["baseline_radius_per_sigma"] = detector.radius_per_sigma
        details["grid_thresholds"] = {
            "deep": params.score_threshold,
            "baseline": base_metrics["threshold_at_1fp"],
        }

    layout.reports.mkdir(parents=True, exist_ok=True)
    layout.plots.mkdir(parents=True, exist_ok=True)
    columns = ["image_id", "x_min", "y_min", "x_max", "y_max", "score"]
    _write_parquet_atomic(
        pd.DataFrame(_prediction_rows(image_ids, deep), columns=columns), layout.predictions
    )
    # Without the baseline its table is written empty: it is an out of this stage either way, and
    # a stale one from an earlier run must not pass for this run's.
    _write_parquet_atomic(
        pd.DataFrame(
            _prediction_rows(image_ids, baseline) if baseline is not None else [], columns=columns
        ),
        layout.baseline_predictions,
    )
    write_text_atomic(
        layout.metrics, json.dumps(_finite_or_none(metrics), indent=2, sort_keys=True)
    )
    write_text_atomic(layout.test_details, json.dumps(_finite_or_none(details), indent=2))

    others = {"classical baseline": baseline} if baseline is not None else {}
    deep_curve = froc(deep, gts)
    other_curves = {k: froc(v, gts) for k, v in others.items()}
    _write_froc_csv(deep_curve, layout.froc_deep_csv)
    for curve in other_curves.values():
        _write_froc_csv(curve, layout.froc_baseline_csv)
    if not other_curves:  # an earlier run's curve must not be plotted as this run's
        layout.froc_baseline_csv.unlink(missing_ok=True)
    plot_froc(deep_curve, layout.froc_plot, others=other_curves, label="deep model")
    plot_pr(deep, gts, layout.pr_plot, others=others, label="deep model")
    plot_calibration(calibration_curve(deep, gts), layout.calibration_plot)

    # The grid shows the deep model as it is served; the baseline at its 1 FP/image point.
    position = {image_id: k for k, image_id in enumerate(image_ids)}
    shown = [position[i] for i in grid_ids]
    plot_detection_grid(
        [grid_images[i] for i in grid_ids],
        [geometries[k].forward(gts[k]) if len(gts[k]) else np.zeros((0, 4)) for k in shown],
        grid_detections(
            deep_input,
            baseline_input if baseline is not None else None,
            shown,
            params.score_threshold,
            float(metrics["baseline_threshold_at_1fp"]) if baseline is not None else None,
        ),
        layout.test_grid,
        titles=[f"{i[:10]} ({len(gts[position[i]])} lesions)" for i in grid_ids],
    )
    return metrics
