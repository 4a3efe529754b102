"""The PACS edge (flows/pacs.py) against a real Orthanc: sign-in, refusals and outages become clear
errors naming the setting, and secrets never appear in them."""

from __future__ import annotations

import time

import pydicom
import pytest

from flows import servers
from flows.pacs import Pacs, PacsAuthError, PacsSettings, PacsUnavailable
from tests.integration.pacs_common import synthetic_studies


def test_check_and_a_round_trip_through_stow_qido_and_wado(orthanc, tmp_path):
    pacs = Pacs.from_env(env=orthanc.env())
    pacs.check()
    (path,) = synthetic_studies(tmp_path, 1)
    ds = pydicom.dcmread(path)
    pacs.store([ds])
    studies = pacs.search_studies()
    assert [s["0020000D"]["Value"][0] for s in studies] == [ds.StudyInstanceUID]
    (instance,) = pacs.search_instances(ds.StudyInstanceUID)
    got = pacs.retrieve(ds.StudyInstanceUID, ds.SeriesInstanceUID, instance["00080018"]["Value"][0])
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.pixel_array.shape == ds.pixel_array.shape


def test_a_wrong_password_names_the_settings_and_not_the_secret(orthanc):
    pacs = Pacs.from_env(env=orthanc.env(password="not-the-password-123"))
    with pytest.raises(PacsAuthError) as err:
        pacs.check()
    message = str(err.value)
    assert "RADFLOW_PACS_USER" in message and "RADFLOW_PACS_PASSWORD" in message
    assert "401" in message and orthanc.dicomweb_url in message
    assert "not-the-password-123" not in message and orthanc.password not in message


def test_a_stopped_pacs_fails_cleanly_after_the_retries(orthanc):
    env = orthanc.env()
    orthanc.stop()
    pacs = Pacs(PacsSettings.from_env(env, attempts=3, backoff_s=0.05, timeout_s=2))
    started = time.monotonic()
    with pytest.raises(PacsUnavailable) as err:
        pacs.check()
    assert time.monotonic() - started < 20
    assert "RADFLOW_PACS_URL" in str(err.value) and "3 attempts" in str(err.value)
    assert orthanc.password not in str(err.value)


def test_fail_fast_probe_reaches_the_pacs_and_names_it_when_down(orthanc, monkeypatch):
    monkeypatch.setenv("RADFLOW_PACS_URL", orthanc.dicomweb_url)
    servers.check_reachable(pacs=True)  # a 401 without credentials still means it is there
    orthanc.stop()
    with pytest.raises(servers.ServiceUnreachable, match="RADFLOW_PACS_URL"):
        servers.check_reachable(pacs=True, timeout_s=1)
