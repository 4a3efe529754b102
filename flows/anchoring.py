"""The S3 edge of ledger anchoring: anchors as objects under S3 Object Lock in compliance mode, and
the one way radflow's commands open the ledger with the anchor store the environment names.

`RADFLOW_LEDGER_ANCHOR=s3://BUCKET/PREFIX` (a bucket created with Object Lock enabled) or a folder;
`RADFLOW_LEDGER_ANCHOR_RETENTION_DAYS` (default 183). The endpoint and credentials are boto3's own
settings, as for the landing bucket: `AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, ... or a role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline_steps.governance import ledger as ledger_module
from pipeline_steps.governance.anchors import (
    Anchor,
    AnchorConfig,
    AnchorError,
    AnchorStore,
    anchor_key,
    open_anchor_store,
    seq_of_key,
)

COMPLIANCE = "COMPLIANCE"


def s3_client(attempts: int = 3) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=5, read_timeout=30
    )
    return boto3.client("s3", config=config)


def _code(exc: Exception) -> str:
    """botocore's error code (e.g. AccessDenied), or the exception's type: never its full text,
    which may carry a signed URL."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code") or type(exc).__name__)
    return type(exc).__name__


@dataclass
class S3AnchorStore:
    """Each anchor one object, `PREFIX/anchors/<seq, 20 digits>.json`, put once (If-None-Match) under
    a compliance-mode retention that nobody, the bucket's owner included, can shorten or lift.

    Object Lock keeps versions, not names: a later put or delete of the same name adds a version or
    a delete marker. Reading therefore takes each name's oldest version (the locked original) and
    reports any later version or delete marker as a finding (`anchors altered`)."""

    bucket: str
    prefix: str
    retention_days: int
    _client: Any = None  # made on first use: opening the ledger to read it needs no boto3
    location: str = ""
    _oldest: dict[int, str] = field(default_factory=dict)  # seq -> version id
    _findings: list[str] = field(default_factory=list)
    _lock_checked: bool = False

    def __post_init__(self) -> None:
        self.location = self.location or f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @classmethod
    def from_config(cls, config: AnchorConfig) -> S3AnchorStore:
        bucket, prefix = config.bucket_and_prefix()
        return cls(bucket, prefix, config.retention_days)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _key(self, seq: int) -> str:
        return f"{self.prefix}/{anchor_key(seq)}" if self.prefix else anchor_key(seq)

    def _fail(self, what: str, exc: Exception) -> AnchorError:
        return AnchorError(
            f"anchor store {self.location}: cannot {what} ({_code(exc)}); check the bucket, "
            "AWS_ENDPOINT_URL_S3 and the credentials"
        )

    def check_lock(self) -> None:
        """Refuse a bucket without Object Lock: anchors there could be deleted by their writer."""
        if self._lock_checked:
            return
        try:
            found = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except Exception as exc:
            if _code(exc) == "ObjectLockConfigurationNotFoundError":
                raise AnchorError(
                    f"anchor store {self.location}: the bucket has no Object Lock; create it with "
                    "Object Lock enabled (anchors there could otherwise be deleted)"
                ) from None
            raise self._fail("read the bucket's Object Lock configuration", exc) from None
        if found.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            raise AnchorError(f"anchor store {self.location}: Object Lock is not enabled")
        self._lock_checked = True

    def publish(self, anchor: Anchor) -> None:
        self.check_lock()
        until = datetime.now(UTC) + timedelta(days=self.retention_days)
        key = self._key(anchor.seq)
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=anchor.to_json(),
                ContentType="application/json",
                ChecksumAlgorithm="SHA256",  # Object Lock puts need a checksum (or Content-MD5)
                ObjectLockMode=COMPLIANCE,
                ObjectLockRetainUntilDate=until,
                IfNoneMatch="*",
            )
        except Exception as exc:
            if _code(exc) not in ("PreconditionFailed", "412"):
                raise self._fail(f"write {key}", exc) from None
            # Already anchored (another writer, or a retry): fine only if it says the same.
            self._oldest.clear()
            self.seqs()
            if self.read(anchor.seq).row_hash != anchor.row_hash:
                raise AnchorError(
                    f"anchor store {self.location}: {key} already anchors row {anchor.seq} with "
                    "another hash; run `radflow audit verify`"
                ) from None

    def seqs(self) -> list[int]:
        versions: dict[int, list[tuple[datetime, int, str]]] = {}
        deleted: set[int] = set()
        root = self._key(1).rsplit("/", 1)[0] + "/"
        try:
            pages = self.client.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=root
            )
            for page in pages:
                for item in page.get("Versions", ()):
                    seq = seq_of_key(item["Key"])
                    if seq is not None:
                        # S3 lists a name's versions newest first: on equal times, later = older.
                        listed = versions.setdefault(seq, [])
                        listed.append((item["LastModified"], -len(listed), item["VersionId"]))
                for item in page.get("DeleteMarkers", ()):
                    seq = seq_of_key(item["Key"])
                    if seq is not None:
                        deleted.add(seq)
        except Exception as exc:
            raise self._fail("list the anchors", exc) from None
        self._findings = []
        for seq, found in sorted(versions.items()):
            found.sort()
            self._oldest[seq] = found[0][2]
            if len(found) > 1:
                self._findings.append(
                    f"the anchor of row {seq} was written again ({len(found)} versions; the "
                    "locked first one is used)"
                )
        for seq in sorted(deleted):
            self._findings.append(
                f"the anchor of row {seq} was deleted (a delete marker hides it"
                + ("; its locked version is used)" if seq in versions else "; nothing is left)")
            )
        return sorted(versions)

    def read(self, seq: int) -> Anchor:
        if seq not in self._oldest:
            self.seqs()
        key = self._key(seq)
        if seq not in self._oldest:
            raise AnchorError(f"anchor store {self.location}: no anchor {key}")
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=key, VersionId=self._oldest[seq])
            blob = got["Body"].read()
        except Exception as exc:
            raise self._fail(f"read {key}", exc) from None
        if got.get("ObjectLockMode") != COMPLIANCE:
            note = f"the anchor of row {seq} is not under a compliance-mode lock"
            if note not in self._findings:
                self._findings.append(note)
        anchor = Anchor.from_json(blob, f"{self.location}/{anchor_key(seq)}")
        if anchor.seq != seq:
            self._findings.append(f"{key} holds the anchor of row {anchor.seq}")
        return anchor

    def findings(self) -> list[str]:
        return list(self._findings)


def anchor_store(env: dict[str, str] | None = None) -> AnchorStore | None:
    """The store RADFLOW_LEDGER_ANCHOR names (None when unset)."""
    return open_anchor_store(AnchorConfig.from_env(env), s3=S3AnchorStore.from_config)


def open_ledger(root: Path, **options: Any) -> ledger_module.Ledger:
    """The workspace's ledger (or RADFLOW_LEDGER_URL's), anchored where RADFLOW_LEDGER_ANCHOR says."""
    return ledger_module.open_ledger(root, anchors=anchor_store(), **options)
