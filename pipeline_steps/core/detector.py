"""The lesion detector: a small CenterNet-style network, its target encoding, losses and decoding.

Everything here is a plain function on arrays; Keras/TensorFlow are imported lazily so that
importing this module (e.g. for `encode_targets` or `decode_detections`) stays cheap.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline_steps.core.boxes import non_max_suppression
from pipeline_steps.core.config import DetectionParams, TrainParams

if TYPE_CHECKING:
    import keras

STRIDE = 4
# Prior probability of "lesion centre" per output cell at initialisation (CenterNet/RetinaNet).
HEATMAP_PRIOR = 0.01
# Output channels of the packed model output: heatmap (sigmoid), size w,h and offset x,y.
OUTPUT_CHANNELS = ("heatmap", "width", "height", "offset_x", "offset_y")
# Channels of the packed training target: the five above plus the regression mask.
TARGET_CHANNELS = (*OUTPUT_CHANNELS, "mask")
# Loss weights from CenterNet (sizes there are also in output-cell units).
SIZE_WEIGHT = 0.1
OFFSET_WEIGHT = 1.0
# Candidate peaks kept before NMS, per image.
_TOP_K = 100
_EPS = 1e-4


# --------------------------------------------------------------------------------------------
# Target encoding (numpy)
# --------------------------------------------------------------------------------------------


def gaussian_radius(width: float, height: float, min_overlap: float = 0.7) -> float:
    """Radius (in the same units as the box) within which a shifted box keeps IoU >= min_overlap.

    The three cases of CenterNet/CornerNet (both corners shifted, one inside, one outside);
    the smallest radius of the three wins.
    """
    w, h = float(width), float(height)
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 - math.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 - math.sqrt(b2**2 - 4 * 4 * c2)) / (2 * 4)
    a3 = 4 * min_overlap
    b3 = 2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (-b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / (2 * a3)
    return min(r1, r2, r3)


def encode_targets(
    boxes: np.ndarray, input_size: int, stride: int = STRIDE
) -> dict[str, np.ndarray]:
    """Dense CenterNet targets for one image.

    Returns `heatmap` (H, W) with a gaussian per box (value exactly 1 at the centre cell),
    `size` (H, W, 2) box width/height in output cells, `offset` (H, W, 2) sub-cell centre
    offset in [0, 1), and `mask` (H, W) = 1 at centre cells. H = W = input_size // stride.
    Boxes are `x_min, y_min, x_max, y_max` in input pixels; degenerate boxes are skipped.
    """
    if input_size % stride:
        raise ValueError(f"input_size {input_size} must be a multiple of the stride {stride}")
    n = input_size // stride
    heatmap = np.zeros((n, n), np.float32)
    size = np.zeros((n, n, 2), np.float32)
    offset = np.zeros((n, n, 2), np.float32)
    mask = np.zeros((n, n), np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    # Largest boxes first, so a small box's centre written later is not overwritten by a big one.
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for x0, y0, x1, y1 in boxes[np.argsort(-areas, kind="stable")]:
        w, h = (x1 - x0) / stride, (y1 - y0) / stride
        if w <= 0 or h <= 0:
            continue
        cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
        ix, iy = min(max(int(cx), 0), n - 1), min(max(int(cy), 0), n - 1)
        radius = max(1, int(gaussian_radius(w, h)))
        _draw_gaussian(heatmap, cx, cy, radius)
        heatmap[iy, ix] = 1.0
        size[iy, ix] = (w, h)
        offset[iy, ix] = (cx - ix, cy - iy)
        mask[iy, ix] = 1.0
    return {"heatmap": heatmap, "size": size, "offset": offset, "mask": mask}


def _draw_gaussian(heatmap: np.ndarray, cx: float, cy: float, radius: int) -> None:
    """Max-blend a gaussian (sigma from radius, CenterNet) centred on the sub-cell centre.

    Centring on (cx, cy) rather than on the centre cell means that when the true centre lies
    near a cell border, the neighbour across it gets a high target and so a small focal
    penalty, instead of the two cells competing for the peak.
    """
    sigma = (2 * radius + 1) / 6
    n_rows, n_cols = heatmap.shape
    reach = radius + 1
    x_lo, x_hi = max(int(cx) - reach, 0), min(int(cx) + reach + 1, n_cols)
    y_lo, y_hi = max(int(cy) - reach, 0), min(int(cy) + reach + 1, n_rows)
    dx = np.arange(x_lo, x_hi, dtype=np.float32) + 0.5 - cx
    dy = np.arange(y_lo, y_hi, dtype=np.float32) + 0.5 - cy
    patch = np.exp(-(dx[None, :] ** 2 + dy[:, None] ** 2) / (2 * sigma**2))
    region = heatmap[y_lo:y_hi, x_lo:x_hi]
    np.maximum(region, patch, out=region)


def pack_targets(targets: dict[str, np.ndarray]) -> np.ndarray:
    """The (H, W, 6) array the training loss expects, channels as in TARGET_CHANNELS."""
    return np.concatenate(
        [
            targets["heatmap"][..., None],
            targets["size"],
            targets["offset"],
            targets["mask"][..., None],
        ],
        axis=-1,
    ).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


def stage_channels(params: TrainParams) -> list[int]:
    """Channels of the stem and of each downsampling stage (capped at 8x width)."""
    return [params.width] + [params.width * min(2**i, 8) for i in range(1, params.depth + 1)]


def build_detector(input_size: int, params: TrainParams) -> keras.Model:
    """CenterNet-style detector: residual backbone, top-down (FPN-like) neck to stride 4, heads.

    Input (B, S, S, 1) float32 in [0, 1]; output (B, S/r, S/r, 5), r = `params.output_stride`
    (4, or 2 with one more top-down level), with channels OUTPUT_CHANNELS: heatmap probability
    (sigmoid), box width/height in output cells and the centre offset within the cell. `params.depth` downsampling stages follow a stride-2
    stem, so the deepest feature is at stride 2**(depth+1); `params.width` sets channels.
    The network is fully convolutional: it is built for `input_size` (which must be a
    multiple of that stride) but accepts any such size, so it can train on crops
    (`params.crop_size`) and predict on whole images.
    """
    import keras
    from keras import layers

    if input_size % 2 ** (params.depth + 1):
        raise ValueError(
            f"input_size {input_size} must be a multiple of {2 ** (params.depth + 1)} "
            f"for train.depth={params.depth}"
        )
    channels = stage_channels(params)
    neck = 2 * params.width

    def conv_bn(x: Any, filters: int, kernel: int = 3, strides: int = 1, relu: bool = True) -> Any:
        x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
        # Momentum 0.9: runs here are a few hundred steps, too few for the default 0.99.
        x = layers.BatchNormalization(momentum=0.9)(x)
        return layers.ReLU()(x) if relu else x

    def residual_down(x: Any, filters: int) -> Any:
        shortcut = layers.AveragePooling2D(2)(x)
        shortcut = conv_bn(shortcut, filters, kernel=1, relu=False)
        y = conv_bn(x, filters, strides=2)
        y = conv_bn(y, filters, relu=False)
        return layers.ReLU()(layers.Add()([shortcut, y]))

    inputs = keras.Input((None, None, 1), name="image")
    # A local-contrast channel (image minus a ~9 px box-blur twice, i.e. a band-pass at
    # nodule scale) makes faint blobs stand out of the smooth anatomy from the first layer;
    # BatchNormalization puts all channels on one scale.
    blur = layers.AveragePooling2D(9, strides=1, padding="same")
    local = layers.Subtract()([inputs, blur(blur(inputs))])
    channels_in = [inputs, local]
    for k, sigma in enumerate(params.hessian_sigmas):
        channels_in.append(_hessian_block(inputs, sigma, f"hessian_{k}"))
    x = layers.BatchNormalization(momentum=0.9)(layers.Concatenate()(channels_in))
    x = conv_bn(x, channels[0], strides=2)  # stride 2
    stem = x
    features = []
    for filters in channels[1:]:
        x = residual_down(x, filters)
        features.append(x)  # strides 4, 8, 16, ...

    # Top-down: fuse each level with the upsampled coarser one, down to stride 4.
    p = conv_bn(features[-1], neck, kernel=1)
    for feature in reversed(features[:-1]):
        p = layers.UpSampling2D(2, interpolation="nearest")(p)
        p = layers.Add()([p, conv_bn(feature, neck, kernel=1, relu=False)])
        p = conv_bn(p, neck)
    head_channels = neck
    if params.output_stride == 2:
        # One more top-down level, onto the stem: half the channels at four times the cells.
        head_channels = params.width
        p = layers.UpSampling2D(2, interpolation="nearest")(p)
        p = layers.Add()(
            [
                conv_bn(p, head_channels, kernel=1),
                conv_bn(stem, head_channels, kernel=1, relu=False),
            ]
        )
        p = conv_bn(p, head_channels)

    prior_bias = -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR)
    # One 3x3 head conv shared by the heatmap and box outputs: at stride 4 a head conv costs as
    # much as a backbone stage. Sharing it saved ~12% of the compute for a change in validation
    # AP within noise (README, "Experiments").
    h = layers.Conv2D(head_channels, 3, padding="same", activation="relu", name="head_conv")(p)
    # The output layers compute in float32 under a mixed-precision policy (GPU profile): a
    # sigmoid near the 0.01 prior and sizes of a few cells need more than float16 gives.
    heat = layers.Conv2D(
        1,
        1,
        activation="sigmoid",
        bias_initializer=keras.initializers.Constant(prior_bias),
        name="heatmap",
        dtype="float32",
    )(h)
    box = layers.Conv2D(4, 1, name="box", dtype="float32")(h)
    outputs = layers.Concatenate(name="detections", dtype="float32")([heat, box])
    return keras.Model(inputs, outputs, name="radflow_centernet")


def gaussian_derivative_kernels(sigma: float) -> np.ndarray:
    """1-D gaussian, first and second derivative taps (3, 2r+1), r = ceil(3 sigma).

    The second derivative is scale-normalised by sigma^2 and the first by sigma, so that blob
    responses compare across scales (Lindeberg); it sums to zero, so flat regions give 0.
    """
    radius = max(1, math.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2 * sigma**2))
    g /= g.sum()
    d1 = -t / sigma**2 * g
    d2 = (t**2 / sigma**4 - 1 / sigma**2) * g
    d2 -= d2.sum() * g  # the truncated kernel would leak a little of the plain intensity
    return np.stack([g, d1 * sigma, d2 * sigma**2]).astype(np.float32)


def _hessian_block(image: Any, sigma: float, name: str) -> Any:
    """Fixed (non-trained) separable convolutions giving L_xx, L_yy and L_xy at `sigma` pixels.

    Vessels and ribs are lines and bands (one strong Hessian eigenvalue); a nodule is a blob
    (two). Handing this second-order shape cue to a network trained for minutes was meant to
    help it with small nodules; on the validation split it did not beyond noise (README, run
    H1), so `train.hessian_sigmas` is empty by default. Plain Conv2D/DepthwiseConv2D layers
    with frozen weights: the model stays serialisable without custom objects.
    """
    from keras import layers

    g, d1, d2 = gaussian_derivative_kernels(sigma)
    taps = len(g)
    along_x = layers.Conv2D(
        3, (1, taps), padding="same", use_bias=False, trainable=False, name=f"{name}_x"
    )
    along_y = layers.DepthwiseConv2D(
        (taps, 1), padding="same", use_bias=False, trainable=False, name=f"{name}_y"
    )
    out = along_y(along_x(image))
    # Channels: x pass (d2, g, d1) then y pass (g, d2, d1): L_xx, L_yy, L_xy.
    along_x.set_weights([np.stack([d2, g, d1], axis=-1)[None, :, None, :]])
    along_y.set_weights([np.stack([g, d2, d1], axis=-1)[:, None, :, None]])
    return out


# --------------------------------------------------------------------------------------------
# Losses (keras.ops: accept numpy arrays or tensors, return scalars)
# --------------------------------------------------------------------------------------------


def focal_heatmap_loss(heat_true: Any, heat_pred: Any, positives: Any) -> Any:
    """CenterNet penalty-reduced focal loss (alpha=2, beta=4), normalised by the positive count.

    `heat_true`/`heat_pred` are probabilities of equal shape; `positives` is 1 at object centres.
    """
    from keras import ops

    p = ops.clip(ops.convert_to_tensor(heat_pred, "float32"), _EPS, 1 - _EPS)
    gt = ops.convert_to_tensor(heat_true, "float32")
    pos = ops.convert_to_tensor(positives, "float32")
    pos_term = ops.log(p) * ops.square(1 - p) * pos
    neg_term = ops.log(1 - p) * ops.square(p) * ops.power(1 - gt, 4) * (1 - pos)
    n_pos = ops.maximum(ops.sum(pos), 1.0)
    return -(ops.sum(pos_term) + ops.sum(neg_term)) / n_pos


def masked_l1_loss(true: Any, pred: Any, mask: Any) -> Any:
    """Mean absolute error over the cells where mask is 1 (summed over the last axis)."""
    from keras import ops

    m = ops.expand_dims(ops.convert_to_tensor(mask, "float32"), -1)
    diff = ops.abs(ops.convert_to_tensor(true, "float32") - ops.convert_to_tensor(pred, "float32"))
    return ops.sum(diff * m) / ops.maximum(ops.sum(m), 1.0)


def loss_components(y_true: Any, y_pred: Any) -> dict[str, Any]:
    """Total `loss` and its heatmap, size and offset parts, for a packed target (B,H,W,6)
    against the model output (B,H,W,5)."""
    mask = y_true[..., 5]
    parts = {
        "heatmap_loss": focal_heatmap_loss(y_true[..., 0], y_pred[..., 0], mask),
        "size_loss": masked_l1_loss(y_true[..., 1:3], y_pred[..., 1:3], mask),
        "offset_loss": masked_l1_loss(y_true[..., 3:5], y_pred[..., 3:5], mask),
    }
    parts["loss"] = (
        parts["heatmap_loss"]
        + SIZE_WEIGHT * parts["size_loss"]
        + OFFSET_WEIGHT * parts["offset_loss"]
    )
    return parts


def detection_loss(y_true: Any, y_pred: Any) -> Any:
    """The training objective: focal heatmap + weighted L1 size and offset losses."""
    return loss_components(y_true, y_pred)["loss"]


@functools.cache
def keras_losses() -> tuple[Any, list[Any]]:
    """The loss and per-component metrics as Keras-serialisable objects (registered once).

    Registration lets `keras.saving.load_model` restore a compiled checkpoint without
    custom_objects.
    """
    import keras

    register = functools.partial(keras.saving.register_keras_serializable, package="radflow")

    @register(name="DetectionLoss")
    class DetectionLoss(keras.losses.Loss):
        def __init__(self, name: str = "detection_loss", **kwargs: Any) -> None:
            super().__init__(name=name, **kwargs)

        def call(self, y_true: Any, y_pred: Any) -> Any:
            return detection_loss(y_true, y_pred)

    def component(key: str) -> Any:
        def metric(y_true: Any, y_pred: Any) -> Any:
            return loss_components(y_true, y_pred)[key]

        metric.__name__ = key
        return register(name=key)(metric)

    return DetectionLoss(), [component(k) for k in ("heatmap_loss", "size_loss", "offset_loss")]


# --------------------------------------------------------------------------------------------
# Decoding (numpy)
# --------------------------------------------------------------------------------------------


def _local_maxima(heat: np.ndarray) -> np.ndarray:
    """Boolean mask of cells equal to the max of their 3x3 neighbourhood (CenterNet's NMS)."""
    padded = np.pad(heat, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    n_rows, n_cols = heat.shape[1:]
    pooled = np.max(
        np.stack(
            [padded[:, dy : dy + n_rows, dx : dx + n_cols] for dy in range(3) for dx in range(3)]
        ),
        axis=0,
    )
    return heat >= pooled


def decode_detections(outputs: Any, params: DetectionParams, input_size: int) -> list[np.ndarray]:
    """Boxes per image from model outputs (N, H, W, 5): (k, 5) x_min, y_min, x_max, y_max, score.

    Peaks are 3x3 local maxima of the heatmap at or above `params.score_threshold`; their
    boxes, in input pixels and clipped to the image, go through NMS at `params.nms_iou` and
    are cut to `params.max_detections`, highest score first.
    """
    out = np.asarray(outputs, np.float32)
    if out.ndim == 3:
        out = out[None]
    stride = input_size / out.shape[1]
    heat = out[..., 0]
    peaks = _local_maxima(heat) & (heat >= params.score_threshold)
    results = []
    for i in range(out.shape[0]):
        iy, ix = np.nonzero(peaks[i])
        scores = heat[i, iy, ix]
        order = np.argsort(-scores, kind="stable")[:_TOP_K]
        iy, ix, scores = iy[order], ix[order], scores[order]
        cells = out[i, iy, ix]
        # A peak is a finding at least one output cell wide: an undertrained size head (<= 0) must
        # not turn it into a zero-area box, which no IoU can match and serving would drop.
        w = np.maximum(cells[:, 1], 1.0) * stride
        h = np.maximum(cells[:, 2], 1.0) * stride
        cx = (ix + cells[:, 3]) * stride
        cy = (iy + cells[:, 4]) * stride
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        boxes = np.clip(boxes, 0.0, float(input_size))
        dets = np.concatenate([boxes, scores[:, None]], axis=1).astype(np.float32)
        dets = dets[np.isfinite(dets).all(axis=1)]  # a diverged model must not yield NaN boxes
        results.append(non_max_suppression(dets, params.nms_iou, params.max_detections))
    return results


def fuse_flipped(outputs: np.ndarray, mirrored_outputs: np.ndarray) -> np.ndarray:
    """Fuse the outputs for images and for their left-right mirrors into one prediction.

    `mirrored_outputs` (N, H, W, 5) come from the mirrored images. Mirroring them back aligns
    them cell for cell with `outputs` (the input size is a multiple of the stride, so column
    j maps to W-1-j exactly); a centre at offset o within a mirrored cell is at 1-o in the
    original. The fused output is the mean of the two, so a peak that only one view sees is
    halved and box sizes and offsets are averaged: box fusion at the level of the dense
    maps, before peak extraction.
    """
    back = np.asarray(mirrored_outputs, np.float32)[:, :, ::-1, :].copy()
    back[..., 3] = 1.0 - back[..., 3]
    return (np.asarray(outputs, np.float32) + back) / 2


def predict_outputs(
    model: keras.Model, images: np.ndarray, flip_tta: bool = False, batch_size: int = 16
) -> np.ndarray:
    """Model outputs (N, S/4, S/4, 5) for images (N, S, S) float32 in [0, 1].

    With `flip_tta`, the images are also predicted mirrored and the two are fused
    (`fuse_flipped`), at twice the cost.
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected images of shape (N, S, S), got {images.shape}")
    outputs = _forward(model, images[..., None], batch_size)
    if flip_tta:
        outputs = fuse_flipped(outputs, _forward(model, images[:, :, ::-1, None], batch_size))
    return outputs


def _forward(model: keras.Model, batch: np.ndarray, batch_size: int) -> np.ndarray:
    """The model on (N, S, S, 1) in slices. `predict_on_batch` reuses one compiled function, where
    `predict` builds a data pipeline per call: ~100 ms of overhead per call on 2 cores, which is
    most of a single image's latency when serving."""
    return np.concatenate(
        [
            np.asarray(model.predict_on_batch(np.ascontiguousarray(batch[i : i + batch_size])))
            for i in range(0, len(batch), batch_size)
        ]
    )


def predict_boxes(
    model: keras.Model, images: np.ndarray, params: DetectionParams, batch_size: int = 16
) -> list[np.ndarray]:
    """Detections for images (N, S, S) float32 in [0, 1], one (k, 5) array per image.

    `params.flip_tta` adds the mirrored prediction (see `fuse_flipped`).
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 2:
        images = images[None]
    if len(images) == 0:
        return []
    outputs = predict_outputs(model, images, params.flip_tta, batch_size)
    return decode_detections(outputs, params, images.shape[1])
