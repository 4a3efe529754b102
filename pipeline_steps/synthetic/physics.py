"""X-ray physics and rendering: Beer-Lambert attenuation, scatter, heel effect, quantum noise,
detector blur, vendor processing and quantisation, and the whole image from anatomy to pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from pipeline_steps.core.config import SynthParams
from pipeline_steps.synthetic.acquisition import Acquisition
from pipeline_steps.synthetic.anatomy import Habitus, draw_anatomy
from pipeline_steps.synthetic.lesions import Box, Lesion, add_lesions, place_lesions
from pipeline_steps.synthetic.path_map import PathMap, render_path_map
from pipeline_steps.synthetic.raster import (
    BoolArray,
    FloatArray,
    U16Array,
    block_mean,
    upsample2,
    upsample_from,
    upsample_mask,
)

# Effective attenuation of water for a filtered 85-125 kVp chest beam (mean energy ~55-65 keV).
MU_WATER_PER_CM = 0.20


@dataclass(frozen=True)
class SynthImage:
    """One synthesized radiograph: stored pixel values, boxes and what display needs."""

    stored: U16Array  # rows x cols, values < 2**bits_stored
    boxes: tuple[Box, ...]
    lesions: tuple[Lesion, ...]
    window_center: float  # rescaled units
    window_width: float
    acquisition: Acquisition
    lung_mask_work: BoolArray  # half resolution: aerated lung where a lesion may sit
    mediastinum_mask_work: BoolArray

    def lung_mask(self) -> BoolArray:
        return upsample_mask(self.lung_mask_work, self.stored.shape)

    def mediastinum_mask(self) -> BoolArray:
        return upsample_mask(self.mediastinum_mask_work, self.stored.shape)


def _blur3(a: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    """Separable (0.2, 0.6, 0.2) kernel with edge replication: the scintillator's light spread."""
    out = 0.6 * a
    out[1:] += 0.2 * a[:-1]
    out[:1] += 0.2 * a[:1]
    out[:-1] += 0.2 * a[1:]
    out[-1:] += 0.2 * a[-1:]
    res = 0.6 * out
    res[:, 1:] += 0.2 * out[:, :-1]
    res[:, :1] += 0.2 * out[:, :1]
    res[:, :-1] += 0.2 * out[:, 1:]
    res[:, -1:] += 0.2 * out[:, -1:]
    return res


def expose(
    rng: np.random.Generator,
    path_cm: FloatArray,
    acq: Acquisition,
    work_spacing_mm: float,
) -> tuple[FloatArray, FloatArray]:
    """Beer-Lambert, scatter, heel effect, quantum noise, detector blur, log and the vendor's
    image processing.

    Returns (log signal on the native grid, its noise-free counterpart on the work grid).
    """
    shape = path_cm.shape
    mu = MU_WATER_PER_CM * (115.0 / acq.kvp) ** 0.35
    primary = np.exp(-mu * path_cm)
    heel_sign = 1.0 if rng.random() < 0.5 else -1.0
    heel = 1.0 + heel_sign * 0.05 * (np.linspace(-0.5, 0.5, shape[0])[:, None])
    coarse_spacing = 8 * work_spacing_mm
    coarse = block_mean(primary, 8)
    coarse_heel = block_mean(np.repeat(heel, 8, axis=1), 8)
    scatter = acq.scatter_to_primary * ndimage.gaussian_filter(
        coarse, 45.0 / coarse_spacing, mode="nearest"
    )
    # "For presentation" images are processed: subtracting part of the large-scale log signal
    # narrows the lung-to-mediastinum range so that vessels and ribs get display contrast.
    large_scale = ndimage.gaussian_filter(
        -np.log((coarse + scatter) * coarse_heel), 40.0 / coarse_spacing, mode="nearest"
    )
    smooth = upsample_from(
        np.stack([scatter, acq.range_compression * (large_scale - 2.5)], axis=-1), 8, shape
    )
    transmission = (primary + smooth[..., 0]) * heel
    raw = -np.log(transmission)
    # Unsharp masking at vessel scale, as vendors do; applied to the expected signal only, so
    # it sharpens anatomy without also amplifying the quantum noise.
    blurred = ndimage.gaussian_filter(block_mean(raw, 2), 3.0 / (2 * work_spacing_mm))
    offset = smooth[..., 1] - acq.edge_enhancement * (raw - upsample2(blurred, shape))
    clean = raw - offset

    # Float32 is enough for the expected counts and their noise; only +, *, sqrt are used on
    # it, which round identically on every IEEE machine, so the bytes stay reproducible.
    stack = np.stack([transmission, offset], axis=-1).astype(np.float32)
    native = upsample2(stack, (acq.rows, acq.cols))  # type: ignore[arg-type]
    expected = np.float32(acq.photons_per_pixel) * native[..., 0]
    # Counts are in the thousands (hundreds behind the heart), where a Gaussian with variance
    # equal to the mean is Poisson to within rounding; it is also ~3x faster to draw.
    # Drawn in float64: the float32 ziggurat consults libm's expf, which may differ by an ulp
    # between C libraries and so change which draws are accepted.
    noise = rng.standard_normal(expected.shape).astype(np.float32)
    counts = _blur3(expected + np.sqrt(expected) * noise)
    signal = -np.log(np.maximum(counts.astype(np.float64), 0.5) / acq.photons_per_pixel)
    return signal - native[..., 1], clean


def quantize(signal: FloatArray, acq: Acquisition) -> U16Array:
    """Map the log signal onto 0..2**BitsStored-1; MONOCHROME1 stores the inverse of MONOCHROME2.

    `log_range` is the inverse of the rescale: stored x slope + intercept is then linear in the
    log signal (in each vendor's own units, as on real devices).
    """
    lo, hi = acq.log_range
    top = acq.max_stored
    mono2 = np.clip(np.rint((signal - lo) / (hi - lo) * top), 0, top).astype(np.uint16)
    return (top - mono2).astype(np.uint16) if acq.monochrome1 else mono2


def display_window(clean: FloatArray, path: PathMap, acq: Acquisition) -> tuple[float, float]:
    """WindowCenter/Width in rescaled units: from the darkest lung to the dense mediastinum."""
    lung = clean[::2, ::2][path.lung_mask[::2, ::2]]
    dense = clean[::2, ::2][path.mediastinum_mask[::2, ::2]]
    lo_att = float(np.percentile(lung, 0.5)) if lung.size else float(clean.min())
    hi_att = float(np.percentile(dense, 98.0)) if dense.size else float(clean.max())
    span = hi_att - lo_att
    lo_att, hi_att = lo_att - 0.15 * span, hi_att + 0.02 * span
    lo, hi = acq.log_range
    top = acq.max_stored
    s_lo, s_hi = ((a - lo) / (hi - lo) * top for a in (lo_att, hi_att))
    if acq.monochrome1:
        s_lo, s_hi = top - s_hi, top - s_lo
    r_lo = acq.rescale_slope * s_lo + acq.rescale_intercept
    r_hi = acq.rescale_slope * s_hi + acq.rescale_intercept
    return round((r_lo + r_hi) / 2.0, 2), round(r_hi - r_lo, 2)


def synthesize_image(
    rng: np.random.Generator, acq: Acquisition, habitus: Habitus, params: SynthParams
) -> SynthImage:
    """One radiograph. Draws from `rng` in an order that does not depend on the encoding choices."""
    anat = draw_anatomy(rng, acq, habitus)
    work_shape = (-(-acq.rows // 2), -(-acq.cols // 2))
    work_spacing = 2.0 * acq.pixel_spacing_mm
    path = render_path_map(rng, anat, work_shape, work_spacing, params.texture)
    placed = place_lesions(
        rng, params.lesions, path.lung_mask, (acq.rows, acq.cols), acq.pixel_spacing_mm
    )
    path_cm = add_lesions(path.path_cm, placed)
    signal, clean = expose(rng, path_cm, acq, work_spacing)
    center, width = display_window(clean, path, acq)
    return SynthImage(
        stored=quantize(signal, acq),
        boxes=tuple(box for _, box in placed),
        lesions=tuple(lesion for lesion, _ in placed),
        window_center=center,
        window_width=width,
        acquisition=acq,
        lung_mask_work=path.lung_mask,
        mediastinum_mask_work=path.mediastinum_mask,
    )


def to_display(image: SynthImage) -> FloatArray:
    """Rescale, window and (for MONOCHROME1) invert: 0 = black, 1 = white, as a viewer shows it."""
    acq = image.acquisition
    rescaled = image.stored.astype(np.float64) * acq.rescale_slope + acq.rescale_intercept
    low = image.window_center - image.window_width / 2.0
    shown = np.clip((rescaled - low) / image.window_width, 0.0, 1.0)
    return 1.0 - shown if acq.monochrome1 else shown
