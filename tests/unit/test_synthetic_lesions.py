"""Synthetic lesions: placement inside the lung, tight boxes, attenuation, count statistics."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline_steps.core.config import LesionParams
from pipeline_steps.synthetic.lesions import (
    Lesion,
    add_lesions,
    draw_lesion_count,
    lesion_box,
    lesion_rho,
)
from pipeline_steps.synthetic.physics import SynthImage
from pipeline_steps.synthetic.plan import ImageSpec
from tests.unit.synthetic_common import SMALL, small_images


@pytest.fixture(scope="module")
def images() -> list[tuple[ImageSpec, SynthImage]]:
    return small_images()


def test_boxes_lie_inside_the_image_and_every_lesion_pixel_inside_the_lung(images):
    n_boxes = 0
    for _, image in images:
        rows, cols = image.stored.shape
        lung = image.lung_mask()
        assert len(image.boxes) <= SMALL.lesions.max_per_image
        for lesion, box in zip(image.lesions, image.boxes, strict=True):
            n_boxes += 1
            assert box.x >= 0 and box.x + box.width <= cols
            assert box.y >= 0 and box.y + box.height <= rows
            rr, cc = np.mgrid[
                int(box.y) : int(box.y + box.height), int(box.x) : int(box.x + box.width)
            ]
            inside = lesion_rho(lesion, rr + 0.5, cc + 0.5) < 1.0
            assert lung[rr[inside], cc[inside]].all()
            # The box is tight: the lesion touches all four sides.
            assert inside[0].any() and inside[-1].any()
            assert inside[:, 0].any() and inside[:, -1].any()
            spacing = image.acquisition.pixel_spacing_mm
            assert SMALL.lesions.diameter_mm[0] * 0.7 <= box.width * spacing
            assert box.width * spacing <= SMALL.lesions.diameter_mm[1] * 1.5
    assert n_boxes >= 3, "the fixture should contain lesions for this test to mean anything"


def test_lesion_attenuation_is_confined_to_its_box():
    lesion = Lesion(
        row=101.3,
        col=87.9,
        radius_px=14.0,
        harmonics=((2, 0.12, 0.4), (3, 0.05, 1.0), (4, 0.03, 2.0)),
        margin=0.7,
        density=0.8,
        diameter_mm=10.0,
    )
    box = lesion_box(lesion, (256, 256))
    assert box is not None
    extra = add_lesions(np.zeros((128, 128)), [(lesion, box)])
    assert extra.max() > 0.5  # roughly density x diameter at the centre
    rows, cols = np.nonzero(extra)
    # Work pixel (i, j) covers native pixels 2i..2i+1, so compare in native coordinates.
    assert 2 * rows.min() >= box.y - 1 and 2 * rows.max() + 1 <= box.y + box.height
    assert 2 * cols.min() >= box.x - 1 and 2 * cols.max() + 1 <= box.x + box.width
    assert lesion_box(replace(lesion, row=5.0), (256, 256)) is None  # would leave the image


def test_lesion_count_follows_the_requested_statistics():
    rng = np.random.default_rng(0)
    params = LesionParams(positive_fraction=0.5, max_per_image=3)
    counts = np.array([draw_lesion_count(rng, params) for _ in range(4000)])
    assert 0.45 < (counts == 0).mean() < 0.55
    assert counts.max() == 3
    assert (counts == 1).sum() > (counts == 2).sum() > (counts == 3).sum()
