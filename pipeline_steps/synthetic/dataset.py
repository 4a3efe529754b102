"""The whole dataset on disk: every planned image rendered and written as DICOM (optionally in
parallel processes), the RSNA-format labels CSV and a summary."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline_steps.core.config import SynthParams
from pipeline_steps.core.files import write_bytes_atomic
from pipeline_steps.synthetic.acquisition import draw_acquisition
from pipeline_steps.synthetic.dicom import build_dataset, encode_dicom
from pipeline_steps.synthetic.lesions import Box
from pipeline_steps.synthetic.physics import SynthImage, synthesize_image
from pipeline_steps.synthetic.plan import IMAGE_ID_PATTERN, ImageSpec, image_rng, plan_dataset

LABEL_HEADER = "patientId,x,y,width,height,Target"


@dataclass(frozen=True)
class SynthSummary:
    n_images: int
    n_patients: int
    n_positive: int
    n_boxes: int
    labels_path: Path
    images_dir: Path


def format_labels(results: Sequence[tuple[str, Sequence[Box]]]) -> str:
    """RSNA Pneumonia Detection CSV: one row per box, negatives as one row with Target 0."""
    lines = [LABEL_HEADER]
    for image_id, boxes in results:
        if not boxes:
            lines.append(f"{image_id},,,,,0")
        for b in sorted(boxes, key=lambda b: (b.y, b.x)):
            lines.append(f"{image_id},{b.x:.1f},{b.y:.1f},{b.width:.1f},{b.height:.1f},1")
    return "\n".join(lines) + "\n"


def synthesize_for(spec: ImageSpec, params: SynthParams) -> SynthImage:
    """The image of one planned spec; depends only on (seed, index) and the params."""
    rng = image_rng(spec.seed, spec.index)
    acq = draw_acquisition(rng, params)
    return synthesize_image(rng, acq, spec.patient.habitus, params)


def _render_and_write(
    spec: ImageSpec, params: SynthParams, images_dir: Path
) -> tuple[str, tuple[Box, ...]]:
    image = synthesize_for(spec, params)
    write_bytes_atomic(
        images_dir / f"{spec.image_id}.dcm", encode_dicom(build_dataset(image, spec))
    )
    return spec.image_id, image.boxes


def _render_and_write_packed(
    job: tuple[ImageSpec, SynthParams, Path],
) -> tuple[str, tuple[Box, ...]]:
    return _render_and_write(*job)


def generate_dataset(
    params: SynthParams,
    out_dir: Path,
    n_images: int | None = None,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> SynthSummary:
    """Write `out_dir/images/<image_id>.dcm` and `out_dir/labels.csv`.

    The bytes depend only on (params, n_images, seed): not on `workers`, the machine or the clock.
    `workers > 1` uses spawned processes, so a calling script needs the usual
    `if __name__ == "__main__":` guard.
    """
    n = params.n_images if n_images is None else n_images
    s = params.seed if seed is None else seed
    specs = plan_dataset(params, n, s)
    images_dir = Path(out_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    wanted = {f"{spec.image_id}.dcm" for spec in specs}
    # A rerun with fewer images must not leave the previous run's files in the dataset.
    for old in images_dir.glob("cxr-*.dcm"):
        if old.name not in wanted and IMAGE_ID_PATTERN.match(old.stem):
            old.unlink()

    def results() -> Iterator[tuple[str, tuple[Box, ...]]]:
        if workers <= 1:
            for spec in specs:
                yield _render_and_write(spec, params, images_dir)
            return
        context = multiprocessing.get_context("spawn")  # callers may hold threads (Prefect)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            jobs = [(spec, params, images_dir) for spec in specs]
            yield from pool.map(_render_and_write_packed, jobs, chunksize=4)

    done: list[tuple[str, tuple[Box, ...]]] = []
    for result in results():
        done.append(result)
        if progress is not None:
            progress(len(done), n)
    labels_path = Path(out_dir) / "labels.csv"
    write_bytes_atomic(labels_path, format_labels(done).encode())
    return SynthSummary(
        n_images=len(done),
        n_patients=len({spec.patient.index for spec in specs}),
        n_positive=sum(1 for _, boxes in done if boxes),
        n_boxes=sum(len(boxes) for _, boxes in done),
        labels_path=labels_path,
        images_dir=images_dir,
    )
