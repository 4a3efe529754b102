"""The PACS settings (flows/pacs.py): read from the environment only, and failing closed."""

from __future__ import annotations

import pytest

from flows.pacs import PacsConfigError, PacsSettings, json_value

URL = "http://127.0.0.1:8042/dicom-web"


def test_url_user_and_password_from_the_environment():
    s = PacsSettings.from_env(
        {"RADFLOW_PACS_URL": URL + "/", "RADFLOW_PACS_USER": "ml", "RADFLOW_PACS_PASSWORD": "pw"}
    )
    assert (s.url, s.user, s.password, s.token) == (URL, "ml", "pw", "")
    assert s.auth == "basic (ml)"
    assert "pw" not in repr(s)


def test_secrets_can_come_from_files(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    s = PacsSettings.from_env(
        {
            "RADFLOW_PACS_URL": URL,
            "RADFLOW_PACS_USER": "ml",
            "RADFLOW_PACS_PASSWORD_FILE": str(tmp_path / "pw"),
        }
    )
    assert s.password == "from-file"
    (tmp_path / "token").write_text("tok")
    t = PacsSettings.from_env(
        {"RADFLOW_PACS_URL": URL, "RADFLOW_PACS_TOKEN_FILE": str(tmp_path / "token")}
    )
    assert (t.token, t.auth) == ("tok", "bearer token")


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "RADFLOW_PACS_URL"),
        ({"RADFLOW_PACS_URL": "ftp://pacs/dicom-web"}, "RADFLOW_PACS_URL"),
        ({"RADFLOW_PACS_URL": "http://ml:pw@pacs/dicom-web"}, "RADFLOW_PACS_USER"),
        ({"RADFLOW_PACS_URL": URL, "RADFLOW_PACS_USER": "ml"}, "RADFLOW_PACS_PASSWORD"),
        ({"RADFLOW_PACS_URL": URL, "RADFLOW_PACS_PASSWORD": "pw"}, "RADFLOW_PACS_USER"),
        (
            {
                "RADFLOW_PACS_URL": URL,
                "RADFLOW_PACS_USER": "ml",
                "RADFLOW_PACS_PASSWORD_FILE": "/nope",
            },
            "RADFLOW_PACS_PASSWORD_FILE",
        ),
        (
            {
                "RADFLOW_PACS_URL": URL,
                "RADFLOW_PACS_USER": "ml",
                "RADFLOW_PACS_PASSWORD": "pw",
                "RADFLOW_PACS_TOKEN": "t",
            },
            "RADFLOW_PACS_TOKEN",
        ),
    ],
)
def test_missing_or_unsafe_settings_fail_closed_naming_the_variable(env, names):
    with pytest.raises(PacsConfigError) as err:
        PacsSettings.from_env(env)
    assert names in str(err.value)
    assert "pw" not in str(err.value).replace("RADFLOW_PACS_PASSWORD", "")


def test_json_value_reads_qido_attributes():
    item = {
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^J"}]},
        "00080020": {"vr": "DA"},
    }
    assert json_value(item, "0020000d") == "1.2.3"
    assert json_value(item, "00100010") == "Doe^J"
    assert json_value(item, "00080020", "none") == "none"
