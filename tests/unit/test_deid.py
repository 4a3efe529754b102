import math
from pathlib import Path

import pytest
import yaml

from pipeline_steps.core.deid import (
    CONFIGURED,
    DEV_PSEUDONYM_KEY,
    DEVELOPMENT,
    age_in_years,
    pseudonym,
    pseudonym_key,
)
from pipeline_steps.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_pseudonym_is_stable_keyed_and_typed():
    a = pseudonym("MRN-1", "k1", "patient")
    assert a == pseudonym("MRN-1", "k1", "patient")
    assert a != pseudonym("MRN-1", "k2", "patient")
    assert a != pseudonym("MRN-1", "k1", "study")
    assert "MRN" not in a and a.startswith("pat-")


def test_age_from_age_string_or_dates():
    assert age_in_years("054Y", None, None) == 54
    assert age_in_years("018M", None, None) == 1
    assert age_in_years(None, "19600615", "20260614") == 65
    assert age_in_years(None, "19600615", "20260615") == 66
    assert math.isnan(age_in_years("garbage", None, None))


# --------------------------------------------------------------------------------------------
# The key: fails closed unless development mode is switched on explicitly

GOOD_KEY = "3f9c2a7be1d04c58a6e2917f0b4d8c35e7a1f2093b6d4e8c"


def _refused(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as err:
        pseudonym_key(env)
    return str(err.value)


def test_no_key_is_an_error_that_names_the_variable_and_how_to_set_it(monkeypatch):
    message = _refused({})
    assert "RADFLOW_PSEUDONYM_KEY is not set" in message
    assert 'python -c "import secrets; print(secrets.token_hex(32))"' in message
    assert "RADFLOW_PSEUDONYM_DEV_MODE=1" in message  # the way out, for synthetic data only
    assert "not set" in _refused({"RADFLOW_PSEUDONYM_DEV_MODE": "0"})
    # The real environment, not only a mapping: the session's development mode switched off.
    monkeypatch.delenv("RADFLOW_PSEUDONYM_DEV_MODE")
    monkeypatch.delenv("RADFLOW_PSEUDONYM_KEY", raising=False)
    with pytest.raises(ConfigError, match="RADFLOW_PSEUDONYM_KEY"):
        pseudonym_key()


def _example_value(path: Path, name: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1]
    raise AssertionError(f"{name} not in {path}")


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("change-me-long-random-key", "placeholder"),  # what infra/.env.example used to ship
        ("CHANGE-ME-long-random-key-of-enough-characters", "placeholder"),
        (DEV_PSEUDONYM_KEY, "public development key"),
        (GOOD_KEY[:31], "31 characters; at least 32"),
    ],
)
def test_placeholder_development_and_short_keys_are_refused(key, says):
    message = _refused({"RADFLOW_PSEUDONYM_KEY": key})
    assert says in message and "RADFLOW_PSEUDONYM_KEY" in message
    assert key not in message  # the key itself never appears
    if key != DEV_PSEUDONYM_KEY:  # development mode does not excuse a bad real key
        _refused({"RADFLOW_PSEUDONYM_KEY": key, "RADFLOW_PSEUDONYM_DEV_MODE": "1"})


def test_the_shipped_example_files_hold_no_key_that_would_be_accepted():
    env_example = REPO / "infra" / ".env.example"
    _refused({"RADFLOW_PSEUDONYM_KEY": _example_value(env_example, "RADFLOW_PSEUDONYM_KEY")})
    (secret, *_) = yaml.safe_load_all((REPO / "infra" / "k8s" / "secrets.example.yaml").read_text())
    _refused({"RADFLOW_PSEUDONYM_KEY": secret["stringData"]["RADFLOW_PSEUDONYM_KEY"]})


def test_development_mode_gives_the_public_key_and_records_it(caplog):
    for env in (
        {"RADFLOW_PSEUDONYM_DEV_MODE": "1"},
        {"RADFLOW_PSEUDONYM_DEV_MODE": "true", "RADFLOW_PSEUDONYM_KEY": DEV_PSEUDONYM_KEY},
    ):
        key = pseudonym_key(env)
        assert key.secret == DEV_PSEUDONYM_KEY and key.mode == DEVELOPMENT == "development"
    assert "PUBLIC development key" in caplog.text


def test_a_configured_key_is_used_and_never_shown():
    for env in (
        {"RADFLOW_PSEUDONYM_KEY": GOOD_KEY},
        {"RADFLOW_PSEUDONYM_KEY": GOOD_KEY, "RADFLOW_PSEUDONYM_DEV_MODE": "1"},  # the key wins
    ):
        key = pseudonym_key(env)
        assert key.secret == GOOD_KEY and key.mode == CONFIGURED == "configured"
        assert GOOD_KEY not in repr(key)


def test_an_unclear_development_switch_is_an_error():
    message = _refused({"RADFLOW_PSEUDONYM_DEV_MODE": "maybe", "RADFLOW_PSEUDONYM_KEY": GOOD_KEY})
    assert "RADFLOW_PSEUDONYM_DEV_MODE='maybe'" in message
