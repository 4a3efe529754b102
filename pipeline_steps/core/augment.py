"""Training augmentation: small callables on (image, boxes) with randomness from an explicit generator,
so a resumed run sees the same augmented epochs as an uninterrupted one. Crops with positive
oversampling or at hard negatives, flips, zoom/shift, intensity, noise matched to the image's own, and
pasted small lesions."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline_steps.core.config import TrainParams

log = logging.getLogger(__name__)

Example = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------------
# Augmentation: small callables on (image, boxes), randomness from an explicit generator so a
# resumed run sees the same augmented epochs as an uninterrupted one.
# --------------------------------------------------------------------------------------------


class RandomCrop:
    """Cut a `size` x `size` window; boxes move with it.

    With probability `lesion_p`, when the image has boxes, the window is placed at random
    among the positions that hold one randomly chosen box whole (positive oversampling:
    lesions are a small share of the pixels); otherwise anywhere. Boxes whose visible part
    falls below half their area are dropped; the rest are clipped to the window.
    """

    def __init__(self, size: int, lesion_p: float = 0.5) -> None:
        self.size, self.lesion_p = size, lesion_p

    def __call__(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        rng: np.random.Generator,
        focus: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`focus` (x, y), when given, centres the window there (give or take a quarter of it),
        clamped to the image: a hard-negative crop."""
        rows, cols = image.shape
        if self.size >= rows and self.size >= cols:
            return image, boxes
        span = [cols - self.size, rows - self.size]  # largest x0, y0
        corner = [int(rng.integers(0, s + 1)) for s in span]
        if focus is not None:
            jitter = rng.uniform(-0.25, 0.25, 2) * self.size
            corner = [
                int(np.clip(round(focus[axis] + jitter[axis] - self.size / 2), 0, span[axis]))
                for axis in (0, 1)
            ]
        elif len(boxes) and rng.random() < self.lesion_p:
            box = boxes[int(rng.integers(len(boxes)))]
            for axis in (0, 1):
                lo = max(0, math.ceil(box[axis + 2]) - self.size)
                hi = min(span[axis], math.floor(box[axis]))
                if lo <= hi:  # a box larger than the window keeps the uniform corner
                    corner[axis] = int(rng.integers(lo, hi + 1))
        x0, y0 = corner
        crop = image[y0 : y0 + self.size, x0 : x0 + self.size]
        moved = boxes - np.array([x0, y0, x0, y0], np.float32)
        clipped = np.clip(moved, 0, self.size)
        area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
        visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        return crop, clipped[visible >= 0.5 * area].astype(np.float32)


class RandomHorizontalFlip:
    """Mirror left-right with probability p; box x coordinates follow."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() >= self.p:
            return image, boxes
        width = image.shape[1]
        flipped = boxes.copy()
        flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
        return image[:, ::-1], flipped


class RandomScaleShift:
    """Zoom about the centre by a factor in `scale` and shift by up to `shift` of the size.

    Boxes whose visible part falls below half their area are dropped; the rest are clipped.
    """

    def __init__(
        self, scale: tuple[float, float] = (0.9, 1.1), shift: float = 0.05, p: float = 0.5
    ) -> None:
        self.scale, self.shift, self.p = scale, shift, p

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        from scipy import ndimage

        if rng.random() >= self.p:
            return image, boxes
        size = image.shape[0]
        s = rng.uniform(*self.scale)
        tx, ty = rng.uniform(-self.shift, self.shift, 2) * size
        # Index space has pixel centres at integers; box space has them at +0.5.
        c = (size - 1) / 2
        out = ndimage.affine_transform(
            image,
            np.array([1 / s, 1 / s]),  # a diagonal given as a vector takes the fast zoom path
            offset=(c - (c + ty) / s, c - (c + tx) / s),
            order=1,
            mode="constant",
            cval=0.0,
        ).astype(np.float32)
        half = size / 2
        moved = (boxes - half) * s + half + np.array([tx, ty, tx, ty], np.float32)
        clipped = np.clip(moved, 0, size)
        area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
        visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        return out, clipped[visible >= 0.5 * area].astype(np.float32)


class RandomIntensity:
    """Gamma, contrast and brightness jitter (image stays in [0, 1]); boxes unchanged."""

    def __init__(
        self,
        gamma: tuple[float, float] = (0.8, 1.25),
        contrast: tuple[float, float] = (0.9, 1.1),
        brightness: float = 0.05,
    ) -> None:
        self.gamma, self.contrast, self.brightness = gamma, contrast, brightness

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        gamma = math.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1])))
        a = rng.uniform(*self.contrast)
        b = rng.uniform(-self.brightness, self.brightness)
        out = a * np.power(np.clip(image, 0, 1), gamma) + b
        return np.clip(out, 0, 1).astype(np.float32), boxes


def estimate_noise_std(image: np.ndarray) -> float:
    """White-noise standard deviation of an image, after Immerkaer (1996): the mean absolute
    response to a Laplacian-difference kernel that cancels planes and ramps, scaled for a
    gaussian. Edges of anatomy add to it, so it errs high on textured images, never low by more
    than rounding; letterbox padding (exactly 0) is left out."""
    a = np.asarray(image, np.float64)
    if a.ndim != 2 or min(a.shape) < 3:
        return 0.0
    # Kernel [[1,-2,1],[-2,4,-2],[1,-2,1]] as the outer product of [1,-2,1] with itself.
    rows = a[:-2] - 2 * a[1:-1] + a[2:]
    response = rows[:, :-2] - 2 * rows[:, 1:-1] + rows[:, 2:]
    inside = (a[:-2, :-2] > 0) & (a[2:, 2:] > 0) & (a[:-2, 2:] > 0) & (a[2:, :-2] > 0)
    if not inside.any():
        return 0.0
    return float(math.sqrt(math.pi / 2) / 6 * np.abs(response[inside]).mean())


class MatchedNoise:
    """Additive gaussian noise at the scale of the image's own noise: the standard deviation is
    drawn up to `scale` x `estimate_noise_std(image)` per image, so at most about doubling the
    noise variance for `scale` 1 (a fixed std would swamp the faint nodules of a clean image)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        std = rng.uniform(0, self.scale) * estimate_noise_std(image)
        noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(std)
        return np.clip(image + noise, 0, 1).astype(np.float32), boxes


class Compose:
    """Apply paired transforms in order."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        for transform in self.transforms:
            image, boxes = transform(image, boxes, rng)
        return image, boxes


@dataclass(frozen=True)
class LesionBank:
    """Lesions cut out of the training images, for `LesionPaste`.

    `patches` hold each lesion minus its local background (a plane fitted to the ring around
    its box), faded out at the box's inscribed ellipse; `sizes` their box width and height;
    `centres` every training lesion centre (x, y): where lesions occur, a prior over the lung.
    """

    patches: tuple[np.ndarray, ...]
    sizes: np.ndarray
    centres: np.ndarray


def lesion_residual(image: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """The lesion in `box` minus a plane fitted to a ring around it, zero outside its ellipse.

    The window is the box (rounded outwards); None when the ring would leave the image.
    """
    x0, y0 = math.floor(box[0]), math.floor(box[1])
    x1, y1 = math.ceil(box[2]), math.ceil(box[3])
    margin = max(2, round(0.5 * max(x1 - x0, y1 - y0)))
    rows, cols = image.shape
    if x0 - margin < 0 or y0 - margin < 0 or x1 + margin > cols or y1 + margin > rows:
        return None
    region = image[y0 - margin : y1 + margin, x0 - margin : x1 + margin].astype(np.float64)
    yy, xx = np.mgrid[: region.shape[0], : region.shape[1]] + 0.5
    cx, cy = margin + (box[0] + box[2]) / 2 - x0, margin + (box[1] + box[3]) / 2 - y0
    rho = np.hypot(
        (xx - cx) / max((box[2] - box[0]) / 2, 0.5), (yy - cy) / max((box[3] - box[1]) / 2, 0.5)
    )
    ring = rho > 1.3
    design = np.stack([np.ones_like(xx), xx, yy], axis=-1)
    coef, *_ = np.linalg.lstsq(design[ring], region[ring], rcond=None)
    residual = (region - design @ coef) * np.clip((1.1 - rho) / 0.3, 0.0, 1.0)
    return residual[margin:-margin, margin:-margin].astype(np.float32)


def build_lesion_bank(examples: Iterable[Example], min_size_px: float = 10.0) -> LesionBank:
    """Cut every lesion at least `min_size_px` across (the mean of width and height) out of
    `examples`, and note all lesion centres."""
    patches: list[np.ndarray] = []
    sizes: list[tuple[float, float]] = []
    centres: list[tuple[float, float]] = []
    for image, boxes in examples:
        for box in np.asarray(boxes, np.float32).reshape(-1, 4):
            centres.append(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            if (w + h) / 2 < min_size_px:
                continue
            residual = lesion_residual(np.asarray(image, np.float32), box)
            if residual is not None:
                patches.append(residual)
                sizes.append((w, h))
    return LesionBank(
        tuple(patches),
        np.asarray(sizes, np.float32).reshape(-1, 2),
        np.asarray(centres, np.float32),
    )


class LesionPaste:
    """With probability `p`, paste one or two bank lesions shrunk to `diameter_px` (log-uniform).

    Small nodules are the ones the detector misses, and the training set holds only a few dozen.
    A large lesion shrunk by s keeps its shape; its excess density along a ray scales with its
    thickness, so its contrast is scaled by s too (times a jitter of about +-20%). It goes near
    a lesion centre seen in training (so inside a lung) and not over another lesion; its box
    is the shrunk source box.
    """

    def __init__(
        self, bank: LesionBank, p: float, diameter_px: tuple[float, float] = (4.0, 9.0)
    ) -> None:
        self.bank, self.p, self.diameter_px = bank, p, diameter_px

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        from scipy import ndimage

        bank = self.bank
        if not bank.patches or not len(bank.centres) or rng.random() >= self.p:
            return image, boxes
        out, placed = np.array(image, np.float32), [boxes]
        for _ in range(int(rng.integers(1, 3))):
            k = int(rng.integers(len(bank.patches)))
            w, h = bank.sizes[k]
            lo, hi = self.diameter_px
            s = min(1.0, math.exp(rng.uniform(math.log(lo), math.log(hi))) / ((w + h) / 2))
            patch = ndimage.zoom(bank.patches[k], s, order=1) * np.float32(
                s * rng.uniform(0.8, 1.25)
            )
            cx, cy = bank.centres[int(rng.integers(len(bank.centres)))] + rng.normal(0, 6.0, 2)
            x0, y0 = round(cx - patch.shape[1] / 2), round(cy - patch.shape[0] / 2)
            if (
                x0 < 0
                or y0 < 0
                or x0 + patch.shape[1] > out.shape[1]
                or y0 + patch.shape[0] > out.shape[0]
            ):
                continue
            box = np.array([[x0, y0, x0 + patch.shape[1], y0 + patch.shape[0]]], np.float32)
            others = np.concatenate(placed)
            if (
                len(others)
                and (
                    (box[0, 0] < others[:, 2] + 2)
                    & (others[:, 0] < box[0, 2] + 2)
                    & (box[0, 1] < others[:, 3] + 2)
                    & (others[:, 1] < box[0, 3] + 2)
                ).any()
            ):
                continue
            region = out[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]]
            np.clip(region + patch, 0, 1, out=region)
            placed.append(box)
        return out, np.concatenate(placed).astype(np.float32)


def default_augmentation(noise_scale: float = 1.0) -> Compose:
    """Cheap on CPU (a few ms per 256^2 image): flip, mild zoom/shift, intensity, matched noise."""
    return Compose(
        [RandomHorizontalFlip(), RandomScaleShift(), RandomIntensity(), MatchedNoise(noise_scale)]
    )


class TrainingTransform:
    """What each training example goes through: pasted small lesions (with a bank and
    `params.paste_fraction`), the crop (if any), then the augmentation.

    Pasting comes before the crop, so that lesion crops are placed over pasted lesions too; the
    crop comes before the rest so that the augmentation only works on the pixels that are kept.
    `focus` (x, y) makes the crop a hard-negative crop centred there.
    """

    def __init__(self, params: TrainParams, input_size: int, bank: LesionBank | None = None):
        self.paste = (
            LesionPaste(bank, params.paste_fraction)
            if bank is not None and params.paste_fraction > 0
            else None
        )
        self.crop = (
            RandomCrop(params.crop_size, params.lesion_crop_fraction)
            if 0 < params.crop_size < input_size
            else None
        )
        self.augment = default_augmentation(params.noise_scale) if params.augment else None

    def __call__(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        rng: np.random.Generator,
        focus: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.paste is not None:
            image, boxes = self.paste(image, boxes, rng)
        if self.crop is not None:
            image, boxes = self.crop(image, boxes, rng, focus)
        if self.augment is not None:
            image, boxes = self.augment(image, boxes, rng)
        return image, boxes
