"""Synthetic radiograph physics and display: polarity, contrast, texture, noise, windowing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline_steps.synthetic.acquisition import draw_acquisition
from pipeline_steps.synthetic.physics import SynthImage, expose, synthesize_image, to_display
from pipeline_steps.synthetic.plan import ImageSpec, image_rng, plan_dataset
from tests.unit.synthetic_common import SEED, SMALL, small_images


@pytest.fixture(scope="module")
def images() -> list[tuple[ImageSpec, SynthImage]]:
    return small_images()


def _twins(monochrome1: bool, index: int = 2) -> tuple[SynthImage, SynthImage]:
    spec = plan_dataset(SMALL, index + 1, SEED)[index]
    base = draw_acquisition(image_rng(SEED, index), SMALL)
    out = []
    for flag in (monochrome1, not monochrome1):
        rng = image_rng(SEED, index)
        draw_acquisition(rng, SMALL)  # same draws, then override the polarity only
        out.append(
            synthesize_image(rng, replace(base, monochrome1=flag), spec.patient.habitus, SMALL)
        )
    return out[0], out[1]


def test_monochrome1_stores_the_inverse_and_displays_identically():
    mono1, mono2 = _twins(monochrome1=True)
    top = 2**mono1.acquisition.bits_stored - 1
    assert mono1.acquisition.monochrome1 and not mono2.acquisition.monochrome1
    np.testing.assert_array_equal(
        mono1.stored.astype(np.int64), top - mono2.stored.astype(np.int64)
    )
    assert not np.array_equal(mono1.stored, mono2.stored)
    np.testing.assert_allclose(to_display(mono1), to_display(mono2), atol=1e-3)


@pytest.mark.parametrize("monochrome1", [False, True])
def test_lungs_transmit_more_than_the_mediastinum(monochrome1):
    image, _ = _twins(monochrome1)
    shown = to_display(image)  # 0 = black: MONOCHROME2 display space either way
    lung, mediastinum = image.lung_mask(), image.mediastinum_mask()
    assert lung.sum() > 1000 and mediastinum.sum() > 1000
    assert shown[lung].mean() + 0.25 < shown[mediastinum].mean()
    # Stored values follow the polarity: MONOCHROME1 stores more exposure as larger values.
    lung_stored, med_stored = image.stored[lung].mean(), image.stored[mediastinum].mean()
    assert (lung_stored > med_stored) == monochrome1


def test_more_texture_means_more_anatomical_structure():
    spec = plan_dataset(SMALL, 1, SEED)[0]

    def lung_detail(texture: float) -> float:
        params = SMALL.model_copy(update={"texture": texture, "photons_per_pixel": 1e9})
        rng = image_rng(SEED, 0)
        acq = replace(draw_acquisition(rng, params), monochrome1=False)
        image = synthesize_image(rng, acq, spec.patient.habitus, params)
        shown = to_display(image)
        detail = np.abs(np.diff(shown, axis=0))[image.lung_mask()[1:]]
        return float(detail.mean())

    assert lung_detail(1.0) > 1.5 * lung_detail(0.0)


def test_fewer_photons_mean_more_noise():
    rng = np.random.default_rng(1)
    acq = draw_acquisition(rng, SMALL)
    path = np.full((acq.rows // 2, acq.cols // 2), 12.0)
    spreads = []
    for photons in (1e3, 1e5):
        signal, _ = expose(
            np.random.default_rng(2), path, replace(acq, photons_per_pixel=photons), 1.4
        )
        spreads.append(float(np.std(signal[100:-100, 100:-100])))
    assert spreads[0] > 5 * spreads[1]


def test_window_covers_lung_to_mediastinum_in_rescaled_units(images):
    for _, image in images[:4]:
        acq = image.acquisition
        rescaled = image.stored.astype(np.float64) * acq.rescale_slope + acq.rescale_intercept
        low = image.window_center - image.window_width / 2
        high = image.window_center + image.window_width / 2
        inside = (rescaled >= low) & (rescaled <= high)
        assert inside[image.lung_mask()].mean() > 0.95
        assert inside[image.mediastinum_mask()].mean() > 0.9
