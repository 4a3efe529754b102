"""Training studies synthesised on demand: each one is named by (generator version, params, seed,
index), rendered by the same physics as the embedded dataset and read into the model's input by the
same reader and transforms as an ingested DICOM, so a training stream is unlimited and any image in
it can be regenerated bit for bit."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline_steps.core.config import PreprocessParams, SynthParams, TrainSyntheticParams
from pipeline_steps.core.dicom_io import decode_dataset
from pipeline_steps.core.shards import QUANT
from pipeline_steps.core.transforms import plan_geometry, preprocess_image
from pipeline_steps.synthetic.acquisition import draw_acquisition
from pipeline_steps.synthetic.anatomy import draw_habitus
from pipeline_steps.synthetic.dicom import pixel_dataset
from pipeline_steps.synthetic.physics import SynthImage, synthesize_image

# Names the renderer. Bump it with any change under synthetic/ that alters the pixels drawn for
# given params and seed: a recorded identity then says which generator made the image.
GENERATOR_VERSION = "radflow-synth/1"
# SeedSequence spawn keys of the embedded dataset are (1, patient) and (2, image); streamed
# studies use (4, index), so they never coincide with a dataset image for any seed.
_STREAM_KEY = 4


def stream_synth_params(base: SynthParams, stream: TrainSyntheticParams) -> SynthParams:
    """The synth params of streamed studies: `base` on a `stream.native_size` detector with the
    same dose per mm^2 (photons per pixel scale with pixel area), and the stream's lesions."""
    rows, cols = base.native_size
    scale = stream.native_size / max(rows, cols)
    return base.model_copy(
        update={
            "native_size": (round(rows * scale), round(cols * scale)),
            "photons_per_pixel": base.photons_per_pixel / scale**2,
            "lesions": stream.lesions,
        }
    )


def params_digest(params: SynthParams) -> str:
    """SHA-256 of the params that shape a streamed study (what its identity pins)."""
    text = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def render_study(params: SynthParams, seed: int, index: int) -> SynthImage:
    """Streamed study `index`: a patient and a radiograph drawn from (seed, index) alone."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM_KEY, index)))
    habitus = draw_habitus(rng, "M" if rng.random() < 0.52 else "F")
    return synthesize_image(rng, draw_acquisition(rng, params), habitus, params)


@dataclass(frozen=True)
class StreamedStudy:
    """One streamed study as training sees it."""

    index: int
    image: np.ndarray  # (S, S) float32 in [0, 1], exactly as preprocess would store it
    boxes: np.ndarray  # (k, 4) x_min, y_min, x_max, y_max in model-input pixels
    pixel_sha256: str  # of the stored pixels: what regeneration is checked against
    diameters_mm: tuple[float, ...]


def to_model_input(
    image: SynthImage, preprocess: PreprocessParams
) -> tuple[np.ndarray, np.ndarray]:
    """The study through the DICOM reader and the preprocess transforms: (image, boxes)."""
    decoded = decode_dataset(pixel_dataset(image), "streamed study", preprocess.target_spacing_mm)
    rows, cols = decoded.pixels.shape
    geometry = plan_geometry(
        rows,
        cols,
        decoded.spacing.row_mm,
        decoded.spacing.col_mm,
        preprocess.input_size,
        preprocess.target_spacing_mm,
    )
    tensor = preprocess_image(decoded, geometry, preprocess).astype(np.float32) / QUANT
    native = np.array(
        [[b.x, b.y, b.x + b.width, b.y + b.height] for b in image.boxes], np.float64
    ).reshape(-1, 4)
    return tensor, geometry.forward(native).astype(np.float32)


def stream_study(
    params: SynthParams, seed: int, index: int, preprocess: PreprocessParams
) -> StreamedStudy:
    synth = render_study(params, seed, index)
    image, boxes = to_model_input(synth, preprocess)
    return StreamedStudy(
        index=index,
        image=image,
        boxes=boxes,
        pixel_sha256=hashlib.sha256(synth.stored.tobytes()).hexdigest(),
        diameters_mm=tuple(round(lesion.diameter_mm, 2) for lesion in synth.lesions),
    )


def _stream_packed(job: tuple[SynthParams, int, int, PreprocessParams]) -> StreamedStudy:
    return stream_study(*job)


class StudyProducer:
    """Renders streamed studies in worker processes while the trainer works, in index order.

    `studies(indices)` yields them in the order asked, whatever the number of workers; with
    `workers=0` they are rendered in the calling process. Use as a context manager.
    """

    def __init__(self, params: SynthParams, seed: int, preprocess: PreprocessParams, workers: int):
        self.params, self.seed, self.preprocess = params, seed, preprocess
        self._pool: ProcessPoolExecutor | None = None
        if workers > 0:
            # spawn: the trainer holds TensorFlow's threads, which fork would copy mid-state.
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)

    def __enter__(self) -> StudyProducer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def studies(self, indices: Sequence[int]) -> Iterator[StreamedStudy]:
        jobs = [(self.params, self.seed, int(i), self.preprocess) for i in indices]
        if self._pool is None:
            yield from map(_stream_packed, jobs)
            return
        # All of an epoch's studies are submitted at once, so workers render ahead of the trainer.
        futures = [self._pool.submit(_stream_packed, job) for job in jobs]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
