"""Shared set-up of the tests of pipeline_steps.synthetic: small parameters and helpers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom

from pipeline_steps.core.config import LesionParams, SynthParams
from pipeline_steps.synthetic.dataset import SynthSummary, generate_dataset, synthesize_for
from pipeline_steps.synthetic.physics import SynthImage
from pipeline_steps.synthetic.plan import ImageSpec, plan_dataset

SEED = 11
# Small images, most of them positive, and both encodings and polarities likely in six files.
SMALL = SynthParams(
    n_images=6,
    seed=SEED,
    native_size=(512, 512),
    images_per_patient=(1, 3),
    monochrome1_fraction=0.5,
    rle_fraction=0.5,
    lesions=LesionParams(positive_fraction=0.9),
)


def sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def small_dataset(out: Path) -> tuple[Path, SynthSummary]:
    """The SMALL dataset written to `out`, checking the progress callback on the way."""
    calls: list[tuple[int, int]] = []
    summary = generate_dataset(SMALL, out, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, SMALL.n_images) for i in range(1, SMALL.n_images + 1)]
    return out, summary


def small_images() -> list[tuple[ImageSpec, SynthImage]]:
    specs = plan_dataset(SMALL, 10, SEED)
    return [(spec, synthesize_for(spec, SMALL)) for spec in specs]


def read_headers(out: Path) -> dict[str, pydicom.Dataset]:
    return {p.stem: pydicom.dcmread(p) for p in sorted((out / "images").glob("*.dcm"))}
