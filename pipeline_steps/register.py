"""Stage `register`: what a model version is registered with — tags, lineage, params and metrics — as plain data."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import DataError
from pipeline_steps.core.layout import Layout
from pipeline_steps.serving.serving import ServingConfig

# All of these shape the model: synth too, through the studies streamed into training
# (train.synthetic); the ingested data is identified by data_version.
MODEL_SECTIONS = (
    "synth",
    "ingest",
    "validate",
    "preprocess",
    "extract_features",
    "train",
    "test",
    "register",
)


# Also tagged on the version as metric.<name>, so `radflow models` and the MLflow UI show them.
HEADLINE_METRICS = ("ap50", "cpm", "sens_at_1fp", "auroc")
MANIFEST_COLUMNS = ("content_hash", "split")


@dataclass(frozen=True)
class Lineage:
    """Where a model came from: the data version, its git state, its validation and its images."""

    data_version: str  # DVC md5 of data/raw
    data_git_rev: str  # commit holding data/raw.dvc as it is now, or "uncommitted"
    validation_result: str  # the GX result id of this data version's validation
    validation_sha256: str  # of reports/validation.json, which is logged as an artifact
    validation_passed: bool  # it succeeded, and for this data version
    pseudonym_key: str  # configured | development (the public key) | unknown (an older report)
    manifest: pd.DataFrame  # (content_hash, split) of every image, sorted: see manifest_table
    # reports/training_stream.json: the synthetic studies streamed into training, by identity
    training_stream: bytes = b""
    training_profile: str = "unknown"  # the device profile training ran with (cpu | gpu)

    @property
    def manifest_csv(self) -> bytes:
        return manifest_csv(self.manifest)

    @property
    def train_manifest(self) -> str:
        return sha256_hex(self.manifest_csv)


@dataclass(frozen=True)
class Registration:
    model_name: str
    experiment: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    history: dict[str, list[float]]
    lineage: Lineage
    serving: ServingConfig


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def params_hash(params: Params) -> str:
    """Hash of the sections that shape the model. The gate policy decides what happens to a model
    after it exists (the `gate` section), so it is left out: the same training gives the same hash
    under any policy."""
    dumped = params.model_dump(mode="json", by_alias=True)
    chosen = {k: dumped[k] for k in MODEL_SECTIONS}
    blob = json.dumps(chosen, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """(content_hash, split) of every image the preprocess stage kept, in one canonical order."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise DataError(f"the manifest lacks column(s) {missing}; re-run the preprocess stage")
    table = manifest[list(MANIFEST_COLUMNS)].astype(str)
    return table.sort_values(list(MANIFEST_COLUMNS), kind="stable").reset_index(drop=True)


def manifest_csv(table: pd.DataFrame) -> bytes:
    """The artifact whose sha256 is the `train_manifest` tag: `sha256sum` of the file checks it."""
    lines = ["content_hash,split", *(f"{h},{s}" for h, s in table.itertuples(index=False))]
    return ("\n".join(lines) + "\n").encode("ascii")


def version_tags(
    lineage: Lineage, code_version: str, phash: str, metrics: dict[str, float]
) -> dict[str, str]:
    tags = {
        "data_version": lineage.data_version,
        "data_git_rev": lineage.data_git_rev,
        "code_version": code_version,
        "params_hash": phash,
        "validation_result": lineage.validation_result,
        "validation_report_sha256": lineage.validation_sha256,
        "validation_passed": "true" if lineage.validation_passed else "false",
        # "development": trained on pseudonyms under the public key, i.e. synthetic or test data
        "pseudonym_key": lineage.pseudonym_key,
        "train_manifest": lineage.train_manifest,
        "training_stream": stream_summary(lineage.training_stream),
        "training_profile": lineage.training_profile,
    }
    if lineage.training_stream:
        tags["training_stream_sha256"] = sha256_hex(lineage.training_stream)
    for key in HEADLINE_METRICS:
        value = metrics.get(key)
        if value is not None and value == value:  # not nan
            tags[f"metric.{key}"] = f"{value:.4f}"
    return tags


def stream_summary(blob: bytes) -> str:
    """One line naming the streamed studies: generator, seed, count and the digest of their pixels."""
    if not blob:
        return "none"
    stream = json.loads(blob)
    if not stream.get("enabled") or not stream.get("n_studies"):
        return "none"
    return (
        f"{stream['generator']} seed={stream['seed']} studies={stream['n_studies']} "
        f"sha256={str(stream['studies_sha256'])[:16]}"
    )


def build_registration(
    params: Params,
    lineage: Lineage,
    code_version: str,
    metrics: dict[str, Any],
    history: dict[str, list[float]],
) -> Registration:
    dumped = params.model_dump(mode="json", by_alias=True)
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return Registration(
        model_name=params.register_.model_name,
        experiment=params.register_.experiment,
        tags=version_tags(lineage, code_version, params_hash(params), numeric),
        params=flatten({k: dumped[k] for k in MODEL_SECTIONS}),
        metrics=numeric,
        history=history,
        lineage=lineage,
        serving=ServingConfig.from_params(params.preprocess, params.test, params.ingest),
    )


def read_lineage(layout: Layout, data_version: str, data_git_rev: str) -> Lineage:
    """The validation report and the manifest the model was trained from, as written by the stages."""
    for path, stage in ((layout.validation_report, "validate"), (layout.manifest, "preprocess")):
        if not path.exists():
            raise DataError(f"{path}: missing. Run the `{stage}` stage first.")
    blob = layout.validation_report.read_bytes()
    report = json.loads(blob)
    # A report of another data version is stale: it says nothing about this model's data.
    validated = report.get("data_version", data_version)
    return Lineage(
        data_version=data_version,
        data_git_rev=data_git_rev,
        validation_result=str(report.get("result_id") or f"sha256:{sha256_hex(blob)}"),
        validation_sha256=sha256_hex(blob),
        validation_passed=bool(report.get("success", False)) and validated == data_version,
        pseudonym_key=str(report.get("pseudonym_key") or "unknown"),
        manifest=manifest_table(pd.read_parquet(layout.manifest)),
        training_stream=(
            layout.training_stream.read_bytes() if layout.training_stream.exists() else b""
        ),
        training_profile=_training_profile(layout),
    )


def _training_profile(layout: Layout) -> str:
    if not layout.train_history.exists():
        return "unknown"
    profile = json.loads(layout.train_history.read_text()).get("profile") or {}
    return str(profile.get("profile", "unknown"))


def read_results(layout: Layout) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The test metrics and the training history written by the `test` and `train` stages."""
    metrics = json.loads(layout.metrics.read_text())
    history = json.loads(layout.train_history.read_text())["history"]
    return metrics, history
