"""Array helpers shared by the anatomy and the physics: block means, bilinear upsampling of the
half-resolution work grid, and correlated noise fields."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
U16Array = npt.NDArray[np.uint16]


def upsample2(a: FloatArray, shape: tuple[int, int]) -> FloatArray:
    """Bilinear x2 upsampling of the first two axes, pixel-area aligned, cropped to `shape`.

    Written with in-place updates because it runs on the full native image; keeps the dtype.
    """
    h, w = a.shape[:2]
    rows = np.empty((2 * h,) + a.shape[1:], a.dtype)
    even, odd = rows[0::2], rows[1::2]
    np.multiply(a, 0.75, out=even)
    even[1:] += 0.25 * a[:-1]
    even[:1] += 0.25 * a[:1]
    np.multiply(a, 0.75, out=odd)
    odd[:-1] += 0.25 * a[1:]
    odd[-1:] += 0.25 * a[-1:]
    out = np.empty((2 * h, 2 * w) + a.shape[2:], a.dtype)
    even, odd = out[:, 0::2], out[:, 1::2]
    np.multiply(rows, 0.75, out=even)
    even[:, 1:] += 0.25 * rows[:, :-1]
    even[:, :1] += 0.25 * rows[:, :1]
    np.multiply(rows, 0.75, out=odd)
    odd[:, :-1] += 0.25 * rows[:, 1:]
    odd[:, -1:] += 0.25 * rows[:, -1:]
    return out[: shape[0], : shape[1]]


def upsample_mask(mask: BoolArray, shape: tuple[int, ...]) -> BoolArray:
    return np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)[: shape[0], : shape[1]]


def block_mean(a: FloatArray, factor: int) -> FloatArray:
    h, w = -(-a.shape[0] // factor), -(-a.shape[1] // factor)
    padded = np.pad(a, ((0, h * factor - a.shape[0]), (0, w * factor - a.shape[1])), mode="edge")
    return padded.reshape(h, factor, w, factor).mean(axis=(1, 3))


def upsample_from(a: FloatArray, factor: int, shape: tuple[int, int]) -> FloatArray:
    """Undo `block_mean(., factor)` for a power-of-two factor by repeated bilinear doubling."""
    if factor == 1:
        return a[: shape[0], : shape[1]]
    half = (-(-shape[0] // 2), -(-shape[1] // 2))
    return upsample2(upsample_from(a, factor // 2, half), shape)


def power_law_noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    spacing_mm: float,
    beta: float,
    cutoff_mm: float,
) -> FloatArray:
    """Zero-mean, unit-variance Gaussian field with a 1/f^beta power spectrum (anatomical noise)."""
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0], d=spacing_mm)[:, None]
    fx = np.fft.rfftfreq(shape[1], d=spacing_mm)[None, :]
    f2 = fy * fy + fx * fx + (1.0 / cutoff_mm) ** 2
    field = np.fft.irfft2(np.fft.rfft2(white) * f2 ** (-beta / 4.0), s=shape)
    return np.asarray((field - field.mean()) / (field.std() + 1e-12), dtype=np.float64)
