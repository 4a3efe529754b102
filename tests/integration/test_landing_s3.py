"""The landing sync against moto's S3 server over HTTP on loopback: only unseen objects are taken (by key
and ETag, then by content hash), non-DICOM objects are quarantined, outages are retried and then fail with
nothing kept, and the data version round-trips through a DVC remote on the same S3."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows import landing, nightly, versioning, workspace
from pipeline_steps.core.deid import image_id_for
from pipeline_steps.landing import LandingError
from tests.conftest import build_dicom

pytestmark = pytest.mark.integration

BUCKET = "landing"
PREFIX = "incoming"
FAST_RETRIES = {"download_attempts": 3, "retries": 0, "retry_delay_s": 0.0}


def make_workspace(root: Path, **nightly_params: object):
    layout = workspace.init(root)
    params_file = root / "params.yaml"
    raw = yaml.safe_load(params_file.read_text())
    raw["nightly"] |= {"landing": f"s3://{BUCKET}/{PREFIX}", **FAST_RETRIES, **nightly_params}
    params_file.write_text(yaml.safe_dump(raw))
    return workspace.open_workspace(layout.root)


def dicom_bytes(tmp: Path, i: int) -> bytes:
    rng = np.random.default_rng(i)
    path = build_dicom(
        tmp / f"src-{i}.dcm",
        rng.integers(0, 4096, size=(300, 280), dtype=np.uint16),
        patient_id=f"MRN-{i}",
    )
    return path.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """Keys actually read from S3 by the sync."""
    seen: list[str] = []
    real = landing.download

    def counting(client, bucket, obj, dst, attempts):
        seen.append(obj.key)
        return real(client, bucket, obj, dst, attempts)

    monkeypatch.setattr(landing, "download", counting)
    return seen


def test_only_unseen_objects_are_taken_and_non_dicom_is_quarantined(
    moto, tmp_path, monkeypatch, downloads
):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.url)
    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    studies = [dicom_bytes(tmp_path, i) for i in range(4)]
    day1 = f"{PREFIX}/2026-11-23"
    for i in range(3):
        s3.put_object(Bucket=BUCKET, Key=f"{day1}/study{i}.dcm", Body=studies[i])
    labels = "image_id,label,x_min,y_min,x_max,y_max\nstudy0,opacity,10,20,60,80\nstudy1,no_finding,,,,\n"
    s3.put_object(Bucket=BUCKET, Key=f"{day1}/labels.csv", Body=labels.encode())
    s3.put_object(Bucket=BUCKET, Key=f"{day1}/notes.txt", Body=b"scanner maintenance on Friday")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/2026-11-24/copy.dcm", Body=studies[0])
    s3.put_object(Bucket=BUCKET, Key="elsewhere/study9.dcm", Body=studies[3])  # not our prefix

    layout, params = make_workspace(tmp_path / "ws")
    batch = landing.sync(layout, params.nightly)

    assert sorted(i.key for i in batch.images) == [f"{day1}/study{i}.dcm" for i in range(3)]
    assert [d.key for d in batch.duplicates] == [f"{PREFIX}/2026-11-24/copy.dcm"]
    assert [(q.key, q.reason) for q in batch.quarantined] == [(f"{day1}/notes.txt", "not_dicom")]
    assert [lab.key for lab in batch.labels] == [f"{day1}/labels.csv"]
    assert not layout.raw.exists(), "a sync alone must not touch data/raw"

    ingested = landing.ingest_batch(layout, params, batch)
    assert ingested.data_version == versioning.data_version(layout)
    assert sorted(p.name for p in layout.raw_images.iterdir()) == sorted(
        f"{image_id_for(sha(s))}.dcm" for s in studies[:3]
    )
    label_rows = pd.read_csv(layout.raw_labels)
    assert set(label_rows["image_id"]) == {
        image_id_for(sha(studies[0])),
        image_id_for(sha(studies[1])),
    }
    quarantine = pd.read_csv(layout.landing_quarantine_report)
    assert list(quarantine["object"]) == [f"s3://{BUCKET}/{day1}/notes.txt"]
    assert list(quarantine["reason"]) == ["not_dicom"]
    kept = layout.state / "landing" / "quarantine" / quarantine["sha256"][0]
    assert kept.read_bytes() == b"scanner maintenance on Friday"
    assert not batch.staging.exists()

    # Nothing new: every object is recognised by key and ETag without being read.
    downloads.clear()
    again = landing.sync(layout, params.nightly)
    assert downloads == []
    assert again.unchanged == 6 and again.counts()["new_images"] == 0

    # A key overwritten with new content is read again; old content under a new key is a duplicate.
    s3.put_object(Bucket=BUCKET, Key=f"{day1}/study1.dcm", Body=studies[3])
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/2026-11-25/resent.dcm", Body=studies[2])
    downloads.clear()
    third = landing.sync(layout, params.nightly)
    assert sorted(downloads) == [f"{day1}/study1.dcm", f"{PREFIX}/2026-11-25/resent.dcm"]
    assert [i.sha256 for i in third.images] == [sha(studies[3])]
    assert [d.key for d in third.duplicates] == [f"{PREFIX}/2026-11-25/resent.dcm"]
    before = versioning.data_version(layout)
    assert landing.ingest_batch(layout, params, third).data_version != before
    assert len(list(layout.raw_images.iterdir())) == 4


def test_an_outage_is_retried_then_fails_with_nothing_kept(moto, flaky_s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", flaky_s3.url)
    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    for i in range(2):
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/s{i}.dcm", Body=dicom_bytes(tmp_path, i))
    layout, params = make_workspace(tmp_path / "ws")

    flaky_s3.down()
    with pytest.raises(LandingError, match="failed after retries"):
        landing.sync(layout, params.nightly)
    assert flaky_s3.connections >= params.nightly.download_attempts  # boto3 retried
    assert not (layout.state / "landing" / "incoming").exists()
    assert not layout.raw.exists() and not layout.raw_dvc.exists()
    assert not layout.landing_seen.exists()

    # A blip shorter than the retries passes unnoticed.
    flaky_s3.up()
    flaky_s3.fail_next(params.nightly.download_attempts - 1)
    batch = landing.sync(layout, params.nightly)
    assert len(batch.images) == 2


def test_an_outage_mid_batch_leaves_nothing_half_written(
    moto, flaky_s3, tmp_path, monkeypatch, downloads
):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", flaky_s3.url)
    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    studies = [dicom_bytes(tmp_path, i) for i in range(3)]
    for i, body in enumerate(studies):
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/s{i}.dcm", Body=body)
    layout, params = make_workspace(tmp_path / "ws")
    real = landing.download

    def outage_after_first(client, bucket, obj, dst, attempts):
        if len(downloads) >= 1:  # the first object arrived; S3 goes away during the second
            flaky_s3.down()
        return real(client, bucket, obj, dst, attempts)

    monkeypatch.setattr(nightly.landing, "download", outage_after_first)
    with pytest.raises(LandingError):
        landing.sync(layout, params.nightly)
    assert len(downloads) == 2
    assert not (layout.state / "landing" / "incoming").exists()
    assert list(layout.state.rglob(".part-*")) == []
    assert not layout.raw.exists() and not layout.landing_seen.exists()

    flaky_s3.up()
    monkeypatch.setattr(nightly.landing, "download", real)
    batch = landing.sync(layout, params.nightly)
    assert sorted(i.sha256 for i in batch.images) == sorted(sha(s) for s in studies)
    for item in batch.images:
        assert hashlib.sha256(item.path.read_bytes()).hexdigest() == item.sha256


def test_data_versions_push_to_and_pull_from_a_dvc_remote_on_s3(moto, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.url)
    s3 = moto.client()
    s3.create_bucket(Bucket=BUCKET)
    s3.create_bucket(Bucket="dvc-store")
    studies = [dicom_bytes(tmp_path, i) for i in range(2)]
    for i, body in enumerate(studies):
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/s{i}.dcm", Body=body)
    layout, params = make_workspace(tmp_path / "ws")
    landing.ingest_batch(layout, params, landing.sync(layout, params.nightly))

    assert nightly.push_data(layout).startswith("no default DVC remote")
    versioning.dvc(layout.root, "remote", "add", "-d", "team", "s3://dvc-store/radflow")
    versioning.dvc(layout.root, "remote", "modify", "team", "endpointurl", moto.url)

    moto.stop()  # S3 down: the push fails and is not recorded as done
    with pytest.raises(Exception, match="push"):
        nightly.push_data(layout)
    moto.start()  # a restarted moto is empty
    s3 = moto.client()
    s3.create_bucket(Bucket="dvc-store")

    assert nightly.push_data(layout) == "pushed to team"
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket="dvc-store")["Contents"]]
    md5 = versioning.data_version(layout).removesuffix(".dir")
    assert f"radflow/files/md5/{md5[:2]}/{md5[2:]}.dir" in stored
    files = [p for p in layout.raw.rglob("*") if p.is_file()]
    assert len(files) == len(studies) + 1  # the DICOMs and labels.csv
    assert len(stored) == len(files) + 1  # each file, and the directory listing
    assert nightly.push_data(layout) == "already pushed"

    archived = {p.name: p.read_bytes() for p in layout.raw_images.iterdir()}
    shutil.rmtree(layout.raw)
    shutil.rmtree(layout.root / ".dvc" / "cache")
    versioning.dvc(layout.root, "pull", "-q", "data/raw.dvc")
    assert {p.name: p.read_bytes() for p in layout.raw_images.iterdir()} == archived
