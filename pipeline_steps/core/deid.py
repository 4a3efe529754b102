"""De-identification: keyed pseudonyms for identifiers, and the allow-list of header fields that may leave ingestion."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline_steps.core.errors import ConfigError

log = logging.getLogger(__name__)

KEY_VARIABLE = "RADFLOW_PSEUDONYM_KEY"
# Switches on the public development key, for synthetic and test data only (`make run`, the tests).
DEV_MODE_VARIABLE = "RADFLOW_PSEUDONYM_DEV_MODE"
# This key is public (it is in this file): pseudonyms under it can be reversed by hashing every
# plausible medical record number. pseudonym_key() gives it only when DEV_MODE_VARIABLE says so;
# ingest's header scan uses it directly because it discards the pseudonyms it makes.
DEV_PSEUDONYM_KEY = "radflow-development-key-not-secret"
# 32 characters: 128 bits when hex, as `secrets.token_hex(16)` or more gives; shorter keys invite
# a brute-force search of the key itself.
MIN_KEY_LENGTH = 32
# Example-file placeholders (e.g. `CHANGE-ME-long-random-key`): as public as the development key.
PLACEHOLDER_MARKERS = ("change-me", "changeme", "replace-me", "your-key")
KEY_RECIPE = 'python -c "import secrets; print(secrets.token_hex(32))"'
# The modes a pseudonymized table, report or model version records (never the key itself).
CONFIGURED = "configured"
DEVELOPMENT = "development"
_ON, _OFF = frozenset({"1", "true", "yes", "on"}), frozenset({"", "0", "false", "no", "off"})


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


@dataclass(frozen=True)
class PseudonymKey:
    """The key pseudonyms are made with, and its mode: what reports and tags record instead of it."""

    secret: str = field(repr=False)
    mode: str  # CONFIGURED | DEVELOPMENT


def _how_to_set() -> str:
    return (
        f"Generate a key once with `{KEY_RECIPE}`, keep it in the team's secret store and export "
        f"it as {KEY_VARIABLE} (for docker compose: in infra/.env). For synthetic or test data "
        f"only, set {DEV_MODE_VARIABLE}=1 to use the public development key instead."
    )


def dev_mode(environ: Mapping[str, str]) -> bool:
    """Whether the environment explicitly allows the public development key."""
    value = environ.get(DEV_MODE_VARIABLE, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ConfigError(
        f"{DEV_MODE_VARIABLE}={environ[DEV_MODE_VARIABLE]!r} is not understood: set it to 1 "
        "(synthetic or test data only) or unset it."
    )


def pseudonym_key(environ: Mapping[str, str] | None = None) -> PseudonymKey:
    """The pseudonymization key from `RADFLOW_PSEUDONYM_KEY`; fails closed.

    Unset, a placeholder, the development key or a key shorter than MIN_KEY_LENGTH is a
    ConfigError, except that with RADFLOW_PSEUDONYM_DEV_MODE=1 an unset key (or the development key
    itself) gives the development key, in mode DEVELOPMENT. A key that is set is always checked:
    development mode does not excuse a bad real key. No message ever contains the key.
    """
    env = os.environ if environ is None else environ
    allow_dev = dev_mode(env)
    key = env.get(KEY_VARIABLE, "")
    if key in ("", DEV_PSEUDONYM_KEY) and allow_dev:
        log.warning(
            "%s=1: pseudonymizing with the PUBLIC development key. Pseudonyms are NOT protected; "
            "use this for synthetic or test data only.",
            DEV_MODE_VARIABLE,
        )
        return PseudonymKey(DEV_PSEUDONYM_KEY, DEVELOPMENT)
    if not key:
        raise ConfigError(
            f"{KEY_VARIABLE} is not set, and patient identifiers are only pseudonymized with a "
            f"secret key. {_how_to_set()}"
        )
    if key == DEV_PSEUDONYM_KEY:
        raise ConfigError(
            f"{KEY_VARIABLE} holds radflow's public development key, which protects nothing. "
            + _how_to_set()
        )
    if any(marker in key.lower() for marker in PLACEHOLDER_MARKERS):
        raise ConfigError(
            f"{KEY_VARIABLE} holds the placeholder from an example file, which anyone can read. "
            + _how_to_set()
        )
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"{KEY_VARIABLE} has {len(key)} characters; at least {MIN_KEY_LENGTH} are needed to "
            f"resist a brute-force search. {_how_to_set()}"
        )
    return PseudonymKey(key, CONFIGURED)


def image_id_for(sha256: str) -> str:
    """Raw files are renamed to their content hash, so no source file name (which may carry PHI) survives."""
    return sha256[:24]
