"""The synthetic radiograph generator: geometry, physics, encoding, PHI, labels, determinism."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    RLELossless,
)

from pipeline_steps import synth
from pipeline_steps.core.config import LesionParams, SynthParams

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


def _sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("synth")
    calls: list[tuple[int, int]] = []
    summary = synth.generate_dataset(
        SMALL, out, progress=lambda done, total: calls.append((done, total))
    )
    assert calls == [(i, SMALL.n_images) for i in range(1, SMALL.n_images + 1)]
    return out, summary


@pytest.fixture(scope="module")
def images() -> list[tuple[synth.ImageSpec, synth.SynthImage]]:
    specs = synth.plan_dataset(SMALL, 10, SEED)
    return [(spec, synth.synthesize_for(spec, SMALL)) for spec in specs]


def _headers(out: Path) -> dict[str, pydicom.Dataset]:
    return {p.stem: pydicom.dcmread(p) for p in sorted((out / "images").glob("*.dcm"))}


# ---------------------------------------------------------------------------------------------
# Geometry of the findings


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
            inside = synth.lesion_rho(lesion, rr + 0.5, cc + 0.5) < 1.0
            assert lung[rr[inside], cc[inside]].all()
            # The box is tight: the lesion touches all four sides.
            assert inside[0].any() and inside[-1].any()
            assert inside[:, 0].any() and inside[:, -1].any()
            spacing = image.acquisition.pixel_spacing_mm
            assert SMALL.lesions.diameter_mm[0] * 0.7 <= box.width * spacing
            assert box.width * spacing <= SMALL.lesions.diameter_mm[1] * 1.5
    assert n_boxes >= 3, "the fixture should contain lesions for this test to mean anything"


def test_lesion_attenuation_is_confined_to_its_box():
    lesion = synth.Lesion(
        row=101.3,
        col=87.9,
        radius_px=14.0,
        harmonics=((2, 0.12, 0.4), (3, 0.05, 1.0), (4, 0.03, 2.0)),
        margin=0.7,
        density=0.8,
        diameter_mm=10.0,
    )
    box = synth.lesion_box(lesion, (256, 256))
    assert box is not None
    extra = synth.add_lesions(np.zeros((128, 128)), [(lesion, box)])
    assert extra.max() > 0.5  # roughly density x diameter at the centre
    rows, cols = np.nonzero(extra)
    # Work pixel (i, j) covers native pixels 2i..2i+1, so compare in native coordinates.
    assert 2 * rows.min() >= box.y - 1 and 2 * rows.max() + 1 <= box.y + box.height
    assert 2 * cols.min() >= box.x - 1 and 2 * cols.max() + 1 <= box.x + box.width
    assert synth.lesion_box(replace(lesion, row=5.0), (256, 256)) is None  # would leave the image


def test_lesion_count_follows_the_requested_statistics():
    rng = np.random.default_rng(0)
    params = LesionParams(positive_fraction=0.5, max_per_image=3)
    counts = np.array([synth.draw_lesion_count(rng, params) for _ in range(4000)])
    assert 0.45 < (counts == 0).mean() < 0.55
    assert counts.max() == 3
    assert (counts == 1).sum() > (counts == 2).sum() > (counts == 3).sum()


# ---------------------------------------------------------------------------------------------
# Physics and display


def _twins(monochrome1: bool, index: int = 2) -> tuple[synth.SynthImage, synth.SynthImage]:
    spec = synth.plan_dataset(SMALL, index + 1, SEED)[index]
    base = synth.draw_acquisition(synth.image_rng(SEED, index), SMALL)
    out = []
    for flag in (monochrome1, not monochrome1):
        rng = synth.image_rng(SEED, index)
        synth.draw_acquisition(rng, SMALL)  # same draws, then override the polarity only
        out.append(
            synth.synthesize_image(
                rng, replace(base, monochrome1=flag), spec.patient.habitus, SMALL
            )
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
    np.testing.assert_allclose(synth.to_display(mono1), synth.to_display(mono2), atol=1e-3)


@pytest.mark.parametrize("monochrome1", [False, True])
def test_lungs_transmit_more_than_the_mediastinum(monochrome1):
    image, _ = _twins(monochrome1)
    shown = synth.to_display(image)  # 0 = black: MONOCHROME2 display space either way
    lung, mediastinum = image.lung_mask(), image.mediastinum_mask()
    assert lung.sum() > 1000 and mediastinum.sum() > 1000
    assert shown[lung].mean() + 0.25 < shown[mediastinum].mean()
    # Stored values follow the polarity: MONOCHROME1 stores more exposure as larger values.
    lung_stored, med_stored = image.stored[lung].mean(), image.stored[mediastinum].mean()
    assert (lung_stored > med_stored) == monochrome1


def test_more_texture_means_more_anatomical_structure():
    spec = synth.plan_dataset(SMALL, 1, SEED)[0]

    def lung_detail(texture: float) -> float:
        params = SMALL.model_copy(update={"texture": texture, "photons_per_pixel": 1e9})
        rng = synth.image_rng(SEED, 0)
        acq = replace(synth.draw_acquisition(rng, params), monochrome1=False)
        image = synth.synthesize_image(rng, acq, spec.patient.habitus, params)
        shown = synth.to_display(image)
        detail = np.abs(np.diff(shown, axis=0))[image.lung_mask()[1:]]
        return float(detail.mean())

    assert lung_detail(1.0) > 1.5 * lung_detail(0.0)


def test_fewer_photons_mean_more_noise():
    rng = np.random.default_rng(1)
    acq = synth.draw_acquisition(rng, SMALL)
    path = np.full((acq.rows // 2, acq.cols // 2), 12.0)
    spreads = []
    for photons in (1e3, 1e5):
        signal, _ = synth.expose(
            np.random.default_rng(2), path, replace(acq, photons_per_pixel=photons), 1.4
        )
        spreads.append(float(np.std(signal[100:-100, 100:-100])))
    assert spreads[0] > 5 * spreads[1]


# ---------------------------------------------------------------------------------------------
# Encoding


def test_pixel_encoding_fields_and_value_range(dataset, images):
    out, _ = dataset
    stored_by_id = {spec.image_id: image.stored for spec, image in images}
    syntaxes, polarities = set(), set()
    for stem, ds in _headers(out).items():
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0 and ds.SamplesPerPixel == 1
        assert 10 <= ds.BitsStored <= 14 and ds.HighBit == ds.BitsStored - 1
        pixels = ds.pixel_array  # decodes RLE too
        assert pixels.max() < 2**ds.BitsStored
        np.testing.assert_array_equal(pixels, stored_by_id[stem])
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        polarities.add(ds.PhotometricInterpretation)
        lut = "INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
        assert ds.PresentationLUTShape == lut
    assert syntaxes == {ExplicitVRLittleEndian, RLELossless}
    assert polarities == {"MONOCHROME1", "MONOCHROME2"}


def test_rle_round_trips_and_both_encoders_agree(images):
    spec, image = images[0]
    image = replace(image, acquisition=replace(image.acquisition, rle=True))
    ds = synth.build_dataset(image, spec)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    decoded = pydicom.dcmread(io.BytesIO(synth.encode_dicom(ds))).pixel_array
    np.testing.assert_array_equal(decoded, image.stored)
    # Byte-identical datasets across machines need every RLE encoder to agree.
    plain = synth.build_dataset(
        replace(image, acquisition=replace(image.acquisition, rle=False)), spec
    )
    encoded = {}
    for plugin in ("pydicom", "pylibjpeg"):
        copy = pydicom.dcmread(io.BytesIO(synth.encode_dicom(plain)))
        try:
            copy.compress(RLELossless, encoding_plugin=plugin, generate_instance_uid=False)
        except (RuntimeError, ValueError):  # plugin not installed here
            continue
        encoded[plugin] = copy.PixelData
    assert len(set(encoded.values())) == 1


def test_header_geometry_and_file_format(dataset):
    out, _ = dataset
    for path in sorted((out / "images").glob("*.dcm")):
        raw = path.read_bytes()
        assert raw[:128] == b"\0" * 128 and raw[128:132] == b"DICM"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition in {"PA", "AP"}
        expected_class = {
            "DX": DigitalXRayImageStorageForPresentation,
            "CR": ComputedRadiographyImageStorage,
        }[ds.Modality]
        assert ds.SOPClassUID == expected_class == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        pixel, imager = float(ds.PixelSpacing[0]), float(ds.ImagerPixelSpacing[0])
        assert 1.0 < imager / pixel <= 1.1
        assert 300 <= max(ds.Rows, ds.Columns) * imager <= 400  # a ~35 cm detector
        assert float(ds.WindowWidth) > 0 and float(ds.RescaleSlope) in {0.5, 1.0, 2.0}
        assert float(ds.RescaleIntercept) in {0.0, -1024.0}


def test_window_covers_lung_to_mediastinum_in_rescaled_units(images):
    for _, image in images[:4]:
        acq = image.acquisition
        rescaled = image.stored.astype(np.float64) * acq.rescale_slope + acq.rescale_intercept
        low = image.window_center - image.window_width / 2
        high = image.window_center + image.window_width / 2
        inside = (rescaled >= low) & (rescaled <= high)
        assert inside[image.lung_mask()].mean() > 0.95
        assert inside[image.mediastinum_mask()].mean() > 0.9


# ---------------------------------------------------------------------------------------------
# Patients and PHI


def test_phi_fields_are_present_consistent_and_collected(dataset):
    out, _ = dataset
    headers = _headers(out)
    phi = synth.collect_phi(out / "images")
    for stem, ds in headers.items():
        for keyword in synth.PHI_KEYWORDS:
            value = str(ds.get(keyword, ""))
            assert value, f"{stem}: {keyword} is empty"
            assert value in phi
        assert "^" in str(ds.PatientName) and "^" in str(ds.ReferringPhysicianName)
        assert ds.PatientSex in {"M", "F"}
        birth = datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
        study = datetime.strptime(ds.StudyDate, "%Y%m%d").date()
        age = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
        assert ds.PatientAge == f"{age:03d}Y"
        # The file name is opaque: neither a UID nor any PHI value.
        assert synth.IMAGE_ID_PATTERN.match(stem)
        assert not any(value in stem for value in phi if len(value) >= 4)
    labels = (out / "labels.csv").read_text()
    assert not [value for value in phi if len(value) >= 6 and value in labels]


def test_images_group_into_patients_with_stable_demographics():
    specs = synth.plan_dataset(SMALL.model_copy(update={"images_per_patient": (2, 4)}), 40, SEED)
    by_patient: dict[str, list[synth.ImageSpec]] = {}
    for spec in specs:
        by_patient.setdefault(spec.patient.patient_id, []).append(spec)
    sizes = [len(v) for v in by_patient.values()]
    assert max(sizes) <= 4 and min(sizes[:-1]) >= 2  # the last patient may be cut short
    assert len({s.patient.sex for s in specs}) == 2
    for group in by_patient.values():
        assert len({(s.patient.name, s.patient.birth_date) for s in group}) == 1
        dates = [s.study_date for s in group]
        assert dates == sorted(dates) and len(set(dates)) == len(dates)
    uids = [uid for s in specs for uid in (s.study_uid, s.series_uid, s.sop_uid)]
    assert len(set(uids)) == len(uids) and all(u.startswith("2.25.") for u in uids)
    assert len({s.image_id for s in specs}) == len(specs)
    assert len({s.accession for s in specs}) == len(specs)


# ---------------------------------------------------------------------------------------------
# Labels


def test_labels_csv_is_rsna_format(dataset):
    out, summary = dataset
    text = summary.labels_path.read_text()
    lines = text.splitlines()
    assert lines[0] == "patientId,x,y,width,height,Target"
    rows = list(csv.DictReader(io.StringIO(text)))
    stems = {p.stem for p in summary.images_dir.glob("*.dcm")}
    assert {r["patientId"] for r in rows} == stems
    negatives = [r for r in rows if r["Target"] == "0"]
    positives = [r for r in rows if r["Target"] == "1"]
    assert len(negatives) + len(positives) == len(rows)
    for r in negatives:
        assert [r[k] for k in ("x", "y", "width", "height")] == ["", "", "", ""]
    negative_ids = [r["patientId"] for r in negatives]
    assert len(negative_ids) == len(set(negative_ids))
    assert not set(negative_ids) & {r["patientId"] for r in positives}
    for r in positives:
        x, y, w, h = (float(r[k]) for k in ("x", "y", "width", "height"))
        assert x >= 0 and y >= 0 and w > 0 and h > 0
    assert summary.n_boxes == len(positives) and summary.n_images == len(stems) == SMALL.n_images
    assert summary.n_positive == len({r["patientId"] for r in positives})


def test_format_labels_writes_one_row_per_box_and_one_per_negative():
    text = synth.format_labels(
        [("cxr-a", [synth.Box(3, 4, 5, 6), synth.Box(1, 2, 3, 4)]), ("cxr-b", [])]
    )
    assert text == (
        "patientId,x,y,width,height,Target\n"
        "cxr-a,1.0,2.0,3.0,4.0,1\n"
        "cxr-a,3.0,4.0,5.0,6.0,1\n"
        "cxr-b,,,,,0\n"
    )


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    synth.generate_dataset(SMALL, again)
    assert _sha256_tree(again) == _sha256_tree(out)
    other = tmp_path / "other"
    synth.generate_dataset(SMALL, other, seed=SEED + 1)
    other_hashes = set(_sha256_tree(other).values())
    assert not other_hashes & set(_sha256_tree(out).values())


def test_images_do_not_depend_on_generation_order_or_dataset_size(dataset, tmp_path):
    out, _ = dataset
    small = tmp_path / "prefix"
    synth.generate_dataset(SMALL, small, n_images=3)
    prefix = _sha256_tree(small)
    full = _sha256_tree(out)
    images = {k: v for k, v in prefix.items() if k.startswith("images")}
    assert len(images) == 3 and all(full[k] == v for k, v in images.items())
    # Rerunning smaller into the same folder leaves no stale images behind.
    synth.generate_dataset(SMALL, small, n_images=2)
    assert len(list((small / "images").glob("*.dcm"))) == 2


def test_parallel_generation_writes_the_same_bytes(tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    synth.generate_dataset(SMALL, serial, n_images=3)
    synth.generate_dataset(SMALL, parallel, n_images=3, workers=2)
    assert _sha256_tree(serial) == _sha256_tree(parallel)
