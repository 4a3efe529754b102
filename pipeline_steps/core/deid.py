"""De-identification: keyed pseudonyms for identifiers, and the allow-list of header fields that may leave ingestion."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

log = logging.getLogger(__name__)

# The development key makes pseudonyms reproducible in tests and demos; production sets RADFLOW_PSEUDONYM_KEY.
DEV_PSEUDONYM_KEY = "radflow-development-key-not-secret"


def pseudonym(value: str, key: str, kind: str) -> str:
    """HMAC-SHA256 pseudonym: stable for the same (key, kind, value), unlinkable without the key."""
    mac = hmac.new(key.encode(), f"{kind}:{value}".encode(), hashlib.sha256)
    return f"{kind[:3]}-{mac.hexdigest()[:20]}"


def age_in_years(patient_age: str | None, birth_date: str | None, study_date: str | None) -> float:
    """Age in whole years from PatientAge ('054Y', '006M'), else from dates; NaN when unknown.

    Only the number of years leaves ingestion (PS3.15 keeps age, removes birth date).
    """
    if patient_age:
        text = patient_age.strip().upper()
        try:
            number, unit = int(text[:-1]), text[-1]
        except (ValueError, IndexError):
            number, unit = -1, ""
        factor = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52, "D": 1 / 365}.get(unit)
        if number >= 0 and factor is not None:
            return float(int(number * factor))
    if birth_date and study_date and len(birth_date) >= 8 and len(study_date) >= 8:
        try:
            by, bm, bd = int(birth_date[:4]), int(birth_date[4:6]), int(birth_date[6:8])
            sy, sm, sd = int(study_date[:4]), int(study_date[4:6]), int(study_date[6:8])
        except ValueError:
            return float("nan")
        return float(sy - by - ((sm, sd) < (bm, bd)))
    return float("nan")


def pseudonym_key() -> str:
    """The pseudonymization key from the environment; the development default is announced loudly."""
    key = os.environ.get("RADFLOW_PSEUDONYM_KEY", "")
    if not key:
        log.warning(
            "RADFLOW_PSEUDONYM_KEY is not set: using the PUBLIC development key. "
            "Pseudonyms are NOT protected; set the variable for any real data."
        )
        return DEV_PSEUDONYM_KEY
    return key


def image_id_for(sha256: str) -> str:
    """Raw files are renamed to their content hash, so no source file name (which may carry PHI) survives."""
    return sha256[:24]
