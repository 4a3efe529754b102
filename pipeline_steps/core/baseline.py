"""Classical lesion detector, the floor the deep model must beat: multi-scale Laplacian-of-Gaussian
blobs inside a lung mask, scored by gradient-boosted trees on hand-made blob features.

A classic two-step CAD design: a blob filter proposes candidates, and a classifier fitted on the
train split scores them. It works on one preprocessed image at a time (model input pixels in
[0, 1], MONOCHROME2 sense: lesions are brighter than the lung around them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipeline_steps.core.config import BaselineParams

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

# Per-blob features, in the column order of `blob_features` (shown in the report); then, per
# scale of the ladder, the LoG response and the smoothed intensity above the coarsest scale: the
# blob's profile across scales.
FEATURES = (
    "log_response",
    "relative_response",
    "log_sigma",
    "centre_surround_contrast",
    "gradient",
    "hessian_isotropy",
    "edge_distance",
    "intensity",
)
# A blob of scale sigma has radius sigma * sqrt(2) (where the LoG response of a disc peaks).
_RADIUS_PER_SIGMA = math.sqrt(2.0)


# --------------------------------------------------------------------------------------------
# Lung mask


def otsu_threshold(values: NDArray[np.floating]) -> float:
    """The threshold that best splits `values` into two classes (Otsu, 256 bins)."""
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0 or values.min() == values.max():
        return float(values.mean()) if values.size else 0.0
    hist, edges = np.histogram(values, 256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    # Well-separated classes leave a plateau of equal scores between them: take its middle.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(centres[best].mean())


def lung_mask(image: NDArray[np.floating], margin_px: float) -> BoolArray:
    """Aerated thorax: the darker (Otsu) part of the body, at least `margin_px` inside its outline.

    The body is the largest region brighter than the letterbox and the air around the patient;
    the margin cuts off the chest wall. Of the dark regions the largest (and any at least a fifth
    as large, i.e. the other lung) are kept, closed and hole-filled, so that a dense nodule inside
    the lung stays inside the mask. An image without a usable body gives the margin-eroded body.
    """
    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32), 2.0)
    body = smooth > 0.08
    labels, n = ndimage.label(body)
    if n == 0:
        return np.zeros(smooth.shape, bool)
    sizes = ndimage.sum(body, labels, range(1, n + 1))
    body = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    inner = ndimage.distance_transform_edt(body) > margin_px
    dark = (smooth < otsu_threshold(smooth[body])) & inner
    dark = ndimage.binary_opening(dark, iterations=2)
    labels, n = ndimage.label(dark)
    if n == 0:
        return np.asarray(inner, bool)
    sizes = ndimage.sum(dark, labels, range(1, n + 1))
    keep = [i + 1 for i in np.argsort(-sizes)[:2] if sizes[i] >= 0.2 * sizes.max()]
    mask = ndimage.binary_closing(np.isin(labels, keep), iterations=3)
    return np.asarray(ndimage.binary_fill_holes(mask), bool)


# --------------------------------------------------------------------------------------------
# Candidates and features


@dataclass(frozen=True)
class Blobs:
    """Candidate blobs of one image: centres in pixels (pixel centres at +0.5) and scales."""

    x: FloatArray
    y: FloatArray
    sigma: FloatArray
    response: FloatArray  # scale-normalised LoG: -sigma^2 * LoG, positive for bright blobs

    def __len__(self) -> int:
        return len(self.x)

    def boxes(self, radius_per_sigma: float = _RADIUS_PER_SIGMA) -> FloatArray:
        """(n, 4) boxes of half-side `radius_per_sigma * sigma` around the centres."""
        r = radius_per_sigma * self.sigma
        return np.stack([self.x - r, self.y - r, self.x + r, self.y + r], axis=1)


def blob_sigmas(params: BaselineParams, spacing_mm: float) -> FloatArray:
    """Geometric scale ladder, in pixels, covering `params.diameter_mm`."""
    lo, hi = params.diameter_mm
    to_sigma = 1 / (2 * _RADIUS_PER_SIGMA * spacing_mm)
    return np.geomspace(lo * to_sigma, hi * to_sigma, params.n_scales)


@dataclass(frozen=True)
class ScaleSpace:
    """An image smoothed at each sigma, with its scale-normalised derivatives, (n_scales, H, W)."""

    sigmas: FloatArray
    smooth: NDArray[np.float32]
    gradient: NDArray[np.float32]  # sigma * |grad|
    hxx: NDArray[np.float32]  # sigma^2 * second derivatives
    hyy: NDArray[np.float32]
    hxy: NDArray[np.float32]

    @property
    def response(self) -> NDArray[np.float32]:
        """-sigma^2 * LoG: positive on bright blobs, largest at the blob's own scale."""
        return -(self.hxx + self.hyy)


def scale_space(image: NDArray[np.floating], sigmas: FloatArray) -> ScaleSpace:
    """One Gaussian per scale, then central differences: a third of the cost of separate
    derivative filters, and the same to within a few per cent for sigma >= 1 pixel."""
    img = np.asarray(image, np.float32)
    parts: dict[str, list[NDArray[np.float32]]] = {k: [] for k in ("s", "g", "xx", "yy", "xy")}
    for sigma in sigmas:
        smooth = ndimage.gaussian_filter(img, float(sigma))
        gy, gx = np.gradient(smooth)
        s1, s2 = np.float32(sigma), np.float32(sigma * sigma)
        parts["s"].append(smooth)
        parts["g"].append(np.hypot(gx, gy) * s1)
        parts["xx"].append(np.gradient(gx, axis=1) * s2)
        parts["yy"].append(np.gradient(gy, axis=0) * s2)
        parts["xy"].append(np.gradient(gx, axis=0) * s2)
    stacked = {k: np.stack(v) for k, v in parts.items()}
    return ScaleSpace(
        np.asarray(sigmas, np.float64),
        stacked["s"],
        stacked["g"],
        stacked["xx"],
        stacked["yy"],
        stacked["xy"],
    )


def find_blobs(
    space: ScaleSpace, mask: BoolArray, max_candidates: int
) -> tuple[Blobs, NDArray[np.intp]]:
    """Local maxima of the LoG scale space (3x3x3, over position and scale) inside `mask`.

    Only bright blobs (positive response) count; the `max_candidates` strongest are kept.
    Also returns each blob's scale index into `space`.
    """
    stack = space.response
    peaks = (stack == ndimage.maximum_filter(stack, size=3, mode="nearest")) & (stack > 0)
    peaks &= mask[None]
    k, iy, ix = np.nonzero(peaks)
    response = stack[k, iy, ix]
    order = np.argsort(-response, kind="stable")[:max_candidates]
    blobs = Blobs(
        x=ix[order].astype(np.float64) + 0.5,
        y=iy[order].astype(np.float64) + 0.5,
        sigma=space.sigmas[k[order]],
        response=response[order].astype(np.float64),
    )
    return blobs, k[order]


def blob_features(
    mask: BoolArray, space: ScaleSpace, blobs: Blobs, scale_index: NDArray[np.intp]
) -> FloatArray:
    """(n, len(feature_names(n_scales))) descriptors of each blob, for the scorer.

    The centre-surround contrast is a difference of Gaussians (the blob's scale against about
    twice it). The Hessian isotropy (smaller over larger eigenvalue magnitude at the blob's
    scale) is near 1 for a round blob and near 0 on a rib edge or a vessel, the usual false
    positives, which also show a strong gradient across the candidate.
    """
    n = len(blobs)
    n_scales = len(space.sigmas)
    out = np.zeros((n, len(FEATURES) + 2 * n_scales))
    if n == 0:
        return out
    edge = ndimage.distance_transform_edt(mask)
    # Robust per-image scale of the responses, so a blob is judged against its own image.
    reference = max(float(np.quantile(blobs.response, 0.5)), 1e-6)
    k, iy, ix = scale_index, blobs.y.astype(int), blobs.x.astype(int)
    # The ladder is geometric: the scale about twice sigma is a fixed number of steps up.
    ratio = space.sigmas[-1] / space.sigmas[0] if len(space.sigmas) > 1 else 2.0
    steps = max(1, round(math.log(2.0) / math.log(ratio) * (len(space.sigmas) - 1)))
    surround = np.minimum(k + steps, len(space.sigmas) - 1)
    hxx, hyy, hxy = (h[k, iy, ix].astype(np.float64) for h in (space.hxx, space.hyy, space.hxy))
    half_trace, root = (hxx + hyy) / 2, np.hypot((hxx - hyy) / 2, hxy)
    big = np.maximum(np.abs(half_trace + root), np.abs(half_trace - root))
    small = np.minimum(np.abs(half_trace + root), np.abs(half_trace - root))
    inside = space.smooth[k, iy, ix].astype(np.float64)
    out[:, 0] = blobs.response
    out[:, 1] = blobs.response / reference
    out[:, 2] = np.log(blobs.sigma)
    out[:, 3] = inside - space.smooth[surround, iy, ix]
    out[:, 4] = space.gradient[k, iy, ix]
    out[:, 5] = np.divide(small, big, out=np.zeros(n), where=big > 0)
    out[:, 6] = np.minimum(edge[iy, ix] / blobs.sigma, 10.0)
    out[:, 7] = inside
    base = len(FEATURES)
    out[:, base : base + n_scales] = (space.response[:, iy, ix] / reference).T
    out[:, base + n_scales :] = (space.smooth[:, iy, ix] - space.smooth[-1, iy, ix]).T
    return out


def feature_names(n_scales: int) -> list[str]:
    """Column names of `blob_features` for a ladder of `n_scales`."""
    return [
        *FEATURES,
        *(f"response_scale_{i}" for i in range(n_scales)),
        *(f"contrast_scale_{i}" for i in range(n_scales)),
    ]


# --------------------------------------------------------------------------------------------
# The detector


def hits_lesion(boxes: FloatArray, truths: FloatArray) -> BoolArray:
    """Per box: does its centre lie inside a ground-truth box (borders included)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    truths = np.asarray(truths, np.float64).reshape(-1, 4)
    if len(boxes) == 0 or len(truths) == 0:
        return np.zeros(len(boxes), bool)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (
        (cx[:, None] >= truths[None, :, 0])
        & (cx[:, None] <= truths[None, :, 2])
        & (cy[:, None] >= truths[None, :, 1])
        & (cy[:, None] <= truths[None, :, 3])
    )
    return np.asarray(inside.any(axis=1))


def working_factor(spacing_mm: float, params: BaselineParams) -> int:
    """Integer downsampling that brings the input spacing near `params.working_spacing_mm`, so
    the baseline costs the same whatever the model's input size."""
    return max(1, round(params.working_spacing_mm / spacing_mm))


def downsample(image: NDArray[np.floating], factor: int) -> NDArray[np.float32]:
    """Block mean by an integer factor (edge rows and columns that do not fill a block dropped)."""
    img = np.asarray(image, np.float32)
    if factor == 1:
        return img
    rows, cols = (d // factor * factor for d in img.shape)
    blocks = img[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor)
    return np.asarray(blocks.mean(axis=(1, 3)), np.float32)


def _candidates(
    image: NDArray[np.floating], sigmas: FloatArray, margin_px: float, max_candidates: int
) -> tuple[Blobs, FloatArray]:
    mask = lung_mask(image, margin_px)
    space = scale_space(image, sigmas)
    blobs, scale_index = find_blobs(space, mask, max_candidates)
    return blobs, blob_features(mask, space, blobs, scale_index)


class BlobDetector:
    """A fitted classical detector: call it on one image for its (k, 5) scored boxes."""

    def __init__(
        self,
        params: BaselineParams,
        spacing_mm: float,
        radius_per_sigma: float,
        classifier: Any,
    ) -> None:
        self.params = params
        self.factor = working_factor(spacing_mm, params)
        work_mm = spacing_mm * self.factor
        self.sigmas = blob_sigmas(params, work_mm)
        self.margin_px = params.lung_margin_mm / work_mm
        self.radius_per_sigma = radius_per_sigma
        self.classifier = classifier

    def candidates(self, image: NDArray[np.floating]) -> tuple[Blobs, FloatArray]:
        """The blobs of an image, in working pixels, and their features."""
        work = downsample(image, self.factor)
        return _candidates(work, self.sigmas, self.margin_px, self.params.max_candidates)

    def __call__(self, image: NDArray[np.floating]) -> FloatArray:
        """All candidates as x_min, y_min, x_max, y_max, score (probability of a lesion) in the
        image's pixels, best first; thresholding, NMS and the per-image cap are the caller's."""
        blobs, features = self.candidates(image)
        if len(blobs) == 0 or self.classifier is None:
            return np.zeros((0, 5))
        scores = np.asarray(self.classifier.predict_proba(features)[:, 1], np.float64)
        boxes = np.clip(blobs.boxes(self.radius_per_sigma) * self.factor, 0, image.shape[1])
        out = np.column_stack([boxes, scores])
        return out[np.argsort(-scores, kind="stable")]


def fit_baseline(
    examples: Iterable[tuple[NDArray[np.floating], NDArray[np.floating]]],
    params: BaselineParams,
    spacing_mm: float,
    seed: int = 0,
) -> BlobDetector:
    """Fit the blob classifier (and the blob-sigma to box-size factor) on labelled examples.

    `examples` yields (image (S, S) in [0, 1], boxes (k, 4) in the same pixels) at `spacing_mm`
    per pixel. The box half-side per sigma is the median ratio of lesion half-size to blob sigma
    over the blobs centred inside a lesion (sqrt 2 if there are none). A candidate is a positive
    when its box so sized overlaps a lesion at IoU >= `params.positive_iou`, so the classifier
    learns to prefer blobs whose box would count as a hit for AP. Without positive and negative
    candidates the detector has no classifier and returns no boxes.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    from pipeline_steps.core.boxes import box_iou

    probe = BlobDetector(params, spacing_mm, _RADIUS_PER_SIGMA, None)
    blobs_per_image: list[tuple[Blobs, FloatArray, FloatArray]] = []
    ratios: list[float] = []
    for image, truths in examples:
        blobs, features = probe.candidates(image)
        gt = np.asarray(truths, np.float64).reshape(-1, 4) / probe.factor
        blobs_per_image.append((blobs, features, gt))
        for i in np.flatnonzero(hits_lesion(blobs.boxes(), gt)):
            # the lesions whose box holds the centre of blob i
            inside = (gt[:, 0] <= blobs.x[i]) & (blobs.x[i] <= gt[:, 2])
            inside &= (gt[:, 1] <= blobs.y[i]) & (blobs.y[i] <= gt[:, 3])
            ratios += [float((t[2] - t[0] + t[3] - t[1]) / 4 / blobs.sigma[i]) for t in gt[inside]]
    radius = float(np.median(ratios)) if ratios else _RADIUS_PER_SIGMA
    rows, labels = [], []
    for blobs, features, gt in blobs_per_image:
        if len(blobs) == 0:
            continue
        rows.append(features)
        if len(gt):
            labels.append(box_iou(blobs.boxes(radius), gt).max(axis=1) >= params.positive_iou)
        else:
            labels.append(np.zeros(len(blobs), bool))
    target = np.concatenate(labels) if labels else np.zeros(0, bool)
    classifier = None
    # Without both positive and negative candidates there is nothing to learn: the detector then
    # finds nothing (a floor of zero), rather than failing the stage on a tiny dataset.
    if target.any() and not target.all():
        classifier = HistGradientBoostingClassifier(
            max_iter=params.trees,
            learning_rate=0.05,
            max_leaf_nodes=15,
            l2_regularization=1.0,
            random_state=seed,
        ).fit(np.concatenate(rows), target)
    return BlobDetector(params, spacing_mm, radius, classifier)


def finalize(
    detections: FloatArray, score_floor: float, nms_iou: float, max_detections: int
) -> FloatArray:
    """Keep boxes scoring at least `score_floor`, then NMS and the per-image cap, as the deep
    model's decoder does, so that both detectors are scored under the same rules."""
    from pipeline_steps.core.boxes import non_max_suppression

    kept = np.asarray(detections, np.float32).reshape(-1, 5)
    kept = kept[kept[:, 4] >= score_floor]
    kept = kept[np.argsort(-kept[:, 4], kind="stable")]
    return np.asarray(non_max_suppression(kept, nms_iou, max_detections), np.float64)
