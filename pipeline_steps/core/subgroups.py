"""Metrics by subgroup (sex, age band, view, manufacturer) and lesion sensitivity by diameter band,
for the test report and the gate's evidence."""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pipeline_steps.core.bootstrap import bootstrap_cis
from pipeline_steps.core.boxes import check_inputs
from pipeline_steps.core.metrics import CI_METRICS, evaluate_detections, froc, hit_matrix

BoolArray = NDArray[np.bool_]


# --------------------------------------------------------------------------------------------------
# Subgroups and lesion strata

SUBGROUP_METRICS = ("ap50", "sens_at_1fp", "cpm", "auroc")


def age_band(age: float | None) -> str:
    """Age band for subgroup reporting: "<50", "50-64", "65+", or "unknown"."""
    if age is None or not np.isfinite(age):
        return "unknown"
    if age < 50:
        return "<50"
    return "50-64" if age < 65 else "65+"


def _group_order(value: str) -> tuple[bool, float, str]:
    """Groups in a readable order: by their first number ("<50" just before "50-64", "65+" after),
    then by name; "unknown" last."""
    found = re.search(r"\d+(\.\d+)?", value)
    number = float(found.group(0)) if found else math.inf
    if found and value.lstrip().startswith("<"):
        number -= 0.5
    return value == "unknown", number, value


def subgroup_metrics(
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    groups: Mapping[str, Sequence[str]],
    patient_ids: Sequence[Hashable] | None = None,
    n_boot: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics within each subgroup: ``{attribute: {value: metrics}}``.

    ``groups`` maps an attribute (e.g. ``"sex"``) to one value per image. Within a subgroup the
    metrics are computed as if it were the whole test set (FROC counts false positives per image
    of that subgroup). Each entry has ``n_images``, ``n_gt``, the SUBGROUP_METRICS and, with
    ``n_boot > 0``, patient-level bootstrap intervals of ap50 and sens_at_1fp.
    """
    p, g = check_inputs(preds, gts)
    ids = list(range(len(p))) if patient_ids is None else list(patient_ids)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for attribute, values in groups.items():
        if len(values) != len(p):
            raise ValueError(f"groups[{attribute!r}] has {len(values)} values for {len(p)} images")
        out[attribute] = {}
        for value in sorted(set(values), key=_group_order):
            idx = [i for i, v in enumerate(values) if v == value]
            sp, sg = [p[i] for i in idx], [g[i] for i in idx]
            full = evaluate_detections(sp, sg)
            entry = {"n_images": full["n_images"], "n_gt": full["n_gt"]}
            entry.update({k: full[k] for k in SUBGROUP_METRICS})
            if n_boot > 0:
                fns = {k: CI_METRICS[k] for k in ("ap50", "sens_at_1fp")}
                cis = bootstrap_cis(fns, sp, sg, [ids[i] for i in idx], n_boot=n_boot, seed=seed)
                for name, (low, high) in cis.items():
                    entry[f"{name}_ci_low"], entry[f"{name}_ci_high"] = low, high
            out[attribute][value] = entry
    return out


def metric_key_part(value: str) -> str:
    """A group value as part of a metric name (MLflow allows letters, digits, ``_-./`` and space):
    lower case, other characters as ``_``; "<50" becomes "lt50" and "65+" becomes "65plus"."""
    text = str(value).strip().lower().replace("<", "lt").replace(">", "gt").replace("+", "plus")
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")
    return slug or "unknown"


def flatten_subgroups(table: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """``subgroup_metrics`` output as flat ``subgroup.<attribute>.<value>.<metric>`` keys."""
    return {
        f"subgroup.{attribute}.{metric_key_part(value)}.{metric}": float(number)
        for attribute, by_value in table.items()
        for value, entry in by_value.items()
        for metric, number in entry.items()
    }


def operating_threshold(
    preds: Sequence[ArrayLike], gts: Sequence[ArrayLike], fp_rate: float
) -> float:
    """The lowest score threshold whose false positives per image stay within ``fp_rate`` (the
    FROC operating point), +inf when even the best prediction is a false positive too many."""
    curve = froc(preds, gts, fp_rates=(fp_rate,))
    if curve["fps_per_image"].size == 0:
        return float("inf")
    last = int(np.searchsorted(curve["fps_per_image"], fp_rate, side="right")) - 1
    return float(curve["thresholds"][last])


def lesion_sensitivity(
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    lesion_groups: Sequence[Sequence[str]],
    threshold: float,
    hit: str = "center_or_iou",
    iou_threshold: float = 0.3,
) -> dict[str, tuple[int, int]]:
    """Lesions found at a score ``threshold``, per lesion group: ``{group: (found, total)}``.

    ``lesion_groups[i][j]`` names the group of ground-truth box j of image i (e.g. a size band);
    a lesion is found when a prediction scoring at least ``threshold`` hits it (the FROC rule).
    """
    p, g = check_inputs(preds, gts)
    counts: dict[str, list[int]] = {}
    for pi, gi, names in zip(p, g, lesion_groups, strict=True):
        if len(names) != len(gi):
            raise ValueError(f"lesion_groups has {len(names)} names for {len(gi)} boxes")
        kept = pi[pi[:, 4] >= threshold]
        found: BoolArray = np.asarray(hit_matrix(kept, gi, hit, iou_threshold).any(axis=0))
        for name, is_found in zip(names, found.tolist(), strict=True):
            tally = counts.setdefault(name, [0, 0])
            tally[0] += int(is_found)
            tally[1] += 1
    return {name: (found, total) for name, (found, total) in counts.items()}


# Lesion diameter bands for the size breakdown (mm), smallest first.
SIZE_BANDS_MM: tuple[tuple[str, float], ...] = (("<8mm", 8.0), ("8-12mm", 12.0), ("12-20mm", 20.0))
SIZE_BAND_LARGEST = ">=20mm"
# Subgroup attributes: metadata column -> how a value becomes a group name.
SUBGROUP_COLUMNS = ("sex", "age_band", "view_position", "manufacturer")


def size_band(diameter_mm: float) -> str:
    for name, upper in SIZE_BANDS_MM:
        if diameter_mm < upper:
            return name
    return SIZE_BAND_LARGEST
