"""Dataset planning: made-up patients, sites and studies, grouping of images into patients,
opaque image ids, name-based UIDs and the random stream behind each image."""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

from pipeline_steps.core.config import SynthParams
from pipeline_steps.synthetic.anatomy import Habitus, draw_habitus

IMAGE_ID_PATTERN = re.compile(r"^cxr-[0-9a-f]{16}$")

# A fixed namespace makes UIDs name-based (UUID v5 under the 2.25 root): same seed, same UID,
# on any machine. pydicom's generate_uid(prefix=None) ignores entropy_srcs and is random.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/radflow/radflow/synth")

# Made-up sites and names (any resemblance to real ones is accidental).
INSTITUTIONS = (
    ("Riverbend General Hospital", "RB"),
    ("St. Aldric Medical Center", "SA"),
    ("Northgate University Hospital", "NG"),
    ("Lakeshore Community Hospital", "LS"),
    ("Mount Calder Regional Clinic", "MC"),
)

FAMILY_NAMES = (
    "Abernathy", "Alvarez", "Bakker", "Brennan", "Castellano", "Chowdhury", "Dalton", "Delacroix",
    "Eriksen", "Fairbanks", "Fitzgerald", "Gallagher", "Grunewald", "Haddad", "Holloway",
    "Ibarra", "Jankowski", "Kaminski", "Kowalczyk", "Lindqvist", "Marchetti", "McAllister",
    "Nakamura", "Novak", "Okafor", "Oyelaran", "Pellegrini", "Quintero", "Radcliffe",
    "Saarinen", "Sandoval", "Thorsen", "Underwood", "Vasquez", "Whitfield", "Yamada",
    "Zielinski", "Ashworth", "Beaumont", "Carrington",
)  # fmt: skip
GIVEN_NAMES = {
    "M": (
        "Aaron", "Benedikt", "Carlos", "Dmitri", "Elias", "Farid", "Gavin", "Henrik", "Idris",
        "Jonah", "Kenji", "Lorenzo", "Mateo", "Nikolai", "Oscar", "Pavel", "Rafael", "Samuel",
        "Tobias", "Viktor", "Walter", "Yusuf",
    ),
    "F": (
        "Adaeze", "Beatrix", "Camille", "Dagny", "Elena", "Freya", "Greta", "Hana", "Ingrid",
        "Josephine", "Katarina", "Leonora", "Marisol", "Nadia", "Olena", "Priya", "Rosalind",
        "Sofia", "Theodora", "Ursula", "Valentina", "Yara",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Patient:
    index: int
    name: str
    patient_id: str
    sex: str
    birth_date: date
    institution: str
    institution_code: str
    habitus: Habitus


@dataclass(frozen=True)
class ImageSpec:
    """Everything that identifies one image before its pixels exist."""

    index: int
    seed: int
    image_id: str
    patient: Patient
    study_date: date
    study_time: str
    accession: str
    referring_physician: str
    study_uid: str
    series_uid: str
    sop_uid: str


def name_uid(seed: int, *parts: object) -> str:
    """A DICOM UID (2.25 root) that depends only on the seed and the parts naming it."""
    name = ":".join(str(p) for p in ("radflow-synth", seed, *parts))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def image_id_for(seed: int, index: int) -> str:
    """Opaque file stem: neither PHI nor a DICOM UID."""
    digest = hashlib.sha256(f"radflow-synth-image:{seed}:{index}".encode()).hexdigest()
    return f"cxr-{digest[:16]}"


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _person(rng: np.random.Generator, sex: str) -> str:
    family = FAMILY_NAMES[int(rng.integers(len(FAMILY_NAMES)))]
    given = GIVEN_NAMES[sex][int(rng.integers(len(GIVEN_NAMES[sex])))]
    return f"{family}^{given}"


def plan_dataset(params: SynthParams, n_images: int, seed: int) -> tuple[ImageSpec, ...]:
    """Group images into patients and give each its identifiers. Patient k's draws depend only
    on (seed, k), so a smaller dataset is a prefix of a larger one."""
    specs: list[ImageSpec] = []
    lo, hi = params.images_per_patient
    k = 0
    while len(specs) < n_images:
        rng = _rng(seed, 1, k)
        sex = "M" if rng.random() < 0.52 else "F"
        institution, code = INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))]
        first_study = date(2014, 1, 1) + timedelta(days=int(rng.integers(0, 3650)))
        age = int(np.clip(rng.normal(58.0, 15.0), 18, 92))
        birth = first_study - timedelta(days=int(365.25 * age + rng.integers(0, 365)))
        patient = Patient(
            index=k,
            name=_person(rng, sex),
            patient_id=f"{code}{10_000_000 + k * 7_919 + int(rng.integers(7_919)):08d}",
            sex=sex,
            birth_date=birth,
            institution=institution,
            institution_code=code,
            habitus=draw_habitus(rng, sex),
        )
        study_date = first_study
        for _ in range(min(int(rng.integers(lo, hi + 1)), n_images - len(specs))):
            i = len(specs)
            seconds = int(rng.integers(7 * 3600, 20 * 3600))
            serial = 1_000_000 + i * 97 + int(rng.integers(97))  # unique per image
            specs.append(
                ImageSpec(
                    index=i,
                    seed=seed,
                    image_id=image_id_for(seed, i),
                    patient=patient,
                    study_date=study_date,
                    study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
                    accession=f"A{study_date.year % 100:02d}{serial}",
                    referring_physician=_person(rng, "M" if rng.random() < 0.5 else "F"),
                    study_uid=name_uid(seed, "study", i),
                    series_uid=name_uid(seed, "series", i),
                    sop_uid=name_uid(seed, "sop", i),
                )
            )
            study_date += timedelta(days=int(rng.integers(14, 700)))
        k += 1
    return tuple(specs)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator behind image `index`: independent of every other image and of order."""
    return _rng(seed, 2, index)
