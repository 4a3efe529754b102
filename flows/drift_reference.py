"""The default drift reference from the registry: the training images of the version in production,
from the training manifest logged with it (checked against the version's `train_manifest` tag)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from flows.tracking import (
    CHAMPION_ALIAS,
    MANIFEST_ARTIFACT,
    mlflow_client,
    public_uri,
    short_retries,
    tracking_uri,
)
from pipeline_steps.core.drift import TrainingReference
from pipeline_steps.core.layout import Layout

TRAIN_SPLIT = "train"


def parse_train_manifest(blob: bytes) -> frozenset[str]:
    """The content hashes of the train split in a `lineage/train_manifest.csv` (content_hash,split)."""
    lines = blob.decode("ascii").splitlines()
    if not lines or lines[0].strip() != "content_hash,split":
        raise ValueError(f"{MANIFEST_ARTIFACT}: unexpected header {lines[:1]}")
    rows = (line.split(",") for line in lines[1:] if line.strip())
    return frozenset(h for h, split in rows if split == TRAIN_SPLIT)


def production_training(layout: Layout, model_name: str) -> tuple[TrainingReference | None, str]:
    """The production version's training images, or None and a sentence saying why there are none
    (no store, no model, no production alias, no manifest, a manifest that does not match its tag,
    MLflow unreachable). Never raises: drift without a reference is reported, not fatal."""
    uri = tracking_uri(layout)
    shown = public_uri(uri)
    if uri == f"sqlite:///{layout.mlflow_db}" and not layout.mlflow_db.exists():
        return None, f"no model is registered yet ({layout.mlflow_db.name} does not exist)"
    try:
        with short_retries():  # MLflow's default retries take minutes against a dead server
            client = mlflow_client(uri)
            try:
                registered = client.get_registered_model(model_name)
            except Exception as exc:  # MlflowException: only flows.tracking imports mlflow
                if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                    return None, f"no model named {model_name} is registered at {shown}"
                raise
            aliases = {str(k): str(v) for k, v in dict(registered.aliases or {}).items()}
            if CHAMPION_ALIAS not in aliases:
                return None, f"no version of {model_name} holds the alias {CHAMPION_ALIAS!r}"
            mv = client.get_model_version(model_name, aliases[CHAMPION_ALIAS])
            tags = dict(mv.tags or {})
            with tempfile.TemporaryDirectory(prefix="radflow-reference-") as tmp:
                blob = Path(
                    client.download_artifacts(str(mv.run_id), MANIFEST_ARTIFACT, tmp)
                ).read_bytes()
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return None, (
            f"the production version's training manifest could not be read from MLflow at "
            f"{shown} ({type(exc).__name__}: {first})"
        )
    expected = tags.get("train_manifest", "")
    if expected and hashlib.sha256(blob).hexdigest() != expected:
        return None, (
            f"{MANIFEST_ARTIFACT} of {model_name} version {mv.version} does not match its "
            "train_manifest tag; it is not used as the drift reference"
        )
    try:
        hashes = parse_train_manifest(blob)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"{model_name} version {mv.version}: {exc}"
    return (
        TrainingReference(
            model_name=model_name,
            version=str(mv.version),
            run_id=str(mv.run_id or ""),
            data_version=tags.get("data_version", ""),
            content_hashes=hashes,
        ),
        "",
    )
