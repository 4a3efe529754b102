"""Streamed training studies: deterministic by seed, regenerated bit for bit from their identity,
read exactly as the same study written to and read from a DICOM file, never an image of the
embedded dataset."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline_steps.core.config import PreprocessParams, SynthParams, TrainSyntheticParams
from pipeline_steps.core.dicom_io import read_image
from pipeline_steps.core.shards import QUANT
from pipeline_steps.core.transforms import plan_geometry, preprocess_image
from pipeline_steps.synthetic.dataset import synthesize_for
from pipeline_steps.synthetic.dicom import build_dataset, encode_dicom
from pipeline_steps.synthetic.plan import plan_dataset
from pipeline_steps.synthetic.stream import (
    StudyProducer,
    params_digest,
    render_study,
    stream_study,
    stream_synth_params,
    to_model_input,
)

# Small studies keep the suite fast; the physics is the same at any matrix.
BASE = SynthParams(native_size=(384, 384), n_images=4)
STREAM = TrainSyntheticParams(fraction=0.5, native_size=256)
PREPROCESS = PreprocessParams(input_size=128, target_spacing_mm=2.8)


def test_stream_params_keep_field_of_view_and_dose_per_area() -> None:
    params = stream_synth_params(BASE, STREAM)
    assert params.native_size == (256, 256)
    assert params.field_of_view_mm == BASE.field_of_view_mm
    # Pixels of 1.5x the side collect 2.25x the photons at the same dose per mm^2.
    assert params.photons_per_pixel == pytest.approx(BASE.photons_per_pixel * (384 / 256) ** 2)
    assert params.lesions == STREAM.lesions
    assert params_digest(params) != params_digest(BASE)


def test_stream_is_deterministic_by_seed() -> None:
    params = stream_synth_params(BASE, STREAM)
    a = stream_study(params, 3, 5, PREPROCESS)
    b = stream_study(params, 3, 5, PREPROCESS)
    other_seed = stream_study(params, 4, 5, PREPROCESS)
    other_index = stream_study(params, 3, 6, PREPROCESS)
    assert a.pixel_sha256 == b.pixel_sha256
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    assert a.pixel_sha256 not in {other_seed.pixel_sha256, other_index.pixel_sha256}


def test_worker_processes_render_the_same_studies_in_order() -> None:
    params = stream_synth_params(BASE, STREAM)
    with StudyProducer(params, 9, PREPROCESS, workers=1) as producer:
        produced = list(producer.studies([4, 2, 7]))
    assert [s.index for s in produced] == [4, 2, 7]
    for study in produced:
        # The identity alone regenerates the image, bit for bit, in this process.
        stored = render_study(params, 9, study.index).stored
        assert hashlib.sha256(stored.tobytes()).hexdigest() == study.pixel_sha256
        assert np.array_equal(stream_study(params, 9, study.index, PREPROCESS).image, study.image)


def test_streamed_tensor_equals_the_study_read_from_a_dicom_file(tmp_path) -> None:
    # Seed/index chosen so that the study has a lesion; the check covers all acquisitions drawn.
    params = stream_synth_params(BASE, STREAM)
    spec = plan_dataset(params, 1, 1)[0]  # headers only: the pixels come from the stream
    checked_lesion = False
    for index in range(6):
        image = render_study(params, 11, index)
        path = tmp_path / f"{index}.dcm"
        path.write_bytes(encode_dicom(build_dataset(image, spec)))
        decoded = read_image(path, PREPROCESS.target_spacing_mm)
        geometry = plan_geometry(
            *decoded.pixels.shape,
            decoded.spacing.row_mm,
            decoded.spacing.col_mm,
            PREPROCESS.input_size,
            PREPROCESS.target_spacing_mm,
        )
        from_file = preprocess_image(decoded, geometry, PREPROCESS).astype(np.float32) / QUANT
        tensor, boxes = to_model_input(image, PREPROCESS)
        assert np.array_equal(tensor, from_file)
        assert len(boxes) == len(image.boxes)
        if len(boxes):
            checked_lesion = True
            native = np.array([[b.x, b.y, b.x + b.width, b.y + b.height] for b in image.boxes])
            assert np.allclose(boxes, geometry.forward(native), atol=1e-4)
    assert checked_lesion


def test_streamed_studies_never_repeat_a_dataset_image() -> None:
    params = BASE
    specs = plan_dataset(params, 4, 21)
    dataset = {hashlib.sha256(synthesize_for(s, params).stored.tobytes()).digest() for s in specs}
    streamed = {
        hashlib.sha256(render_study(params, 21, i).stored.tobytes()).digest() for i in range(4)
    }
    assert not dataset & streamed
