"""Synthetic chest radiographs as DICOM with RSNA-format lesion boxes: the default dataset.

Modules, each importing only those listed before it: raster, acquisition, anatomy, lesions,
path_map, physics, plan, dicom, dataset."""

from pipeline_steps.synthetic.dataset import (
    LABEL_HEADER,
    SynthSummary,
    format_labels,
    generate_dataset,
    synthesize_for,
)
from pipeline_steps.synthetic.dicom import PHI_KEYWORDS, build_dataset, collect_phi, encode_dicom
from pipeline_steps.synthetic.lesions import Box
from pipeline_steps.synthetic.physics import SynthImage, to_display
from pipeline_steps.synthetic.plan import IMAGE_ID_PATTERN, ImageSpec, image_id_for, plan_dataset

__all__ = [
    "IMAGE_ID_PATTERN",
    "LABEL_HEADER",
    "PHI_KEYWORDS",
    "Box",
    "ImageSpec",
    "SynthImage",
    "SynthSummary",
    "build_dataset",
    "collect_phi",
    "encode_dicom",
    "format_labels",
    "generate_dataset",
    "image_id_for",
    "plan_dataset",
    "synthesize_for",
    "to_display",
]
