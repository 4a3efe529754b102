"""Shared set-up of the PACS tests: small synthetic studies as a modality would send them."""

from __future__ import annotations

from pathlib import Path

from pipeline_steps.synthetic.dataset import generate_dataset
from tests.unit.synthetic_common import SMALL


def synthetic_studies(out: Path, n: int, seed: int = 11) -> list[Path]:
    """`n` small synthetic radiographs (512x512, with patient headers, some RLE and MONOCHROME1)
    under `out/images`, with their reference boxes in `out`'s label CSV; the DICOM paths, sorted."""
    generate_dataset(SMALL.model_copy(update={"n_images": n, "seed": seed}), out)
    return sorted((out / "images").glob("*.dcm"))
