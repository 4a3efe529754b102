"""Audit: verify and export the ledger, and trace a prediction back to the model version, its run, the
data version, the data's validation and the exact training images (`radflow audit`, `radflow trace`).

Every link is resolved against the real object (the ledger row, the MLflow version and run, the git
history of `data/raw.dvc`, the GX store, the logged artifacts) and checked by content hash where one
was recorded; `checks` says which links held.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from flows.anchoring import open_ledger
from flows.registry import stages_at
from flows.tracking import (
    MANIFEST_ARTIFACT,
    STREAM_ARTIFACT,
    mlflow_client,
    public_uri,
    tracking_uri,
)
from flows.versioning import data_version_at, dvc_cache_has
from pipeline_steps.core.config import Params
from pipeline_steps.core.deid import DEVELOPMENT
from pipeline_steps.core.errors import DataError, TrackingError
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance.anchors import NOT_ANCHORED, AnchorCheck
from pipeline_steps.governance.export import (
    ExportCheck,
    ExportError,
    check_export,
    export_lines,
)
from pipeline_steps.governance.ledger import Entry, Verification
from pipeline_steps.serving.prediction import PREDICTION, membership

VALIDATION_ARTIFACT = "reports/validation.json"


class UnknownPrediction(DataError):
    """No ledger row holds this prediction id."""


# --------------------------------------------------------------------------------------------
# Verify and export


def verify(layout: Layout) -> Verification:
    with open_ledger(layout.root) as ledger:
        return ledger.verify()


def verify_anchored(layout: Layout) -> tuple[Verification, AnchorCheck]:
    """The chain, then the chain against its anchors (`not anchored` when no store is set)."""
    with open_ledger(layout.root) as ledger:
        chain = ledger.verify()
        anchored = ledger.check_anchors()
    return chain, anchored or AnchorCheck(NOT_ANCHORED, problem=_NOT_ANCHORED)


_NOT_ANCHORED = (
    "RADFLOW_LEDGER_ANCHOR is not set: rows deleted from the end, or a chain recomputed with "
    "new hashes, cannot be detected"
)


def anchor(layout: Layout) -> Entry | None:
    """Anchor the ledger's head now (after a failed anchor, or on a schedule)."""
    with open_ledger(layout.root) as ledger:
        return ledger.anchor_head()


def export(
    layout: Layout,
    out: IO[str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    kind: str | None = None,
) -> int:
    """The rows (with their hashes, so an auditor can re-check the chain), a copy of the anchors
    and a summary, as JSON lines (`pipeline_steps.governance.export`); returns the row count."""
    with open_ledger(layout.root) as ledger:
        rows = ledger.entries(kind=kind, since=since, until=until)
        head = ledger.head()
        store = ledger.anchors
        anchors = [store.read(seq) for seq in store.seqs()] if store is not None else []
        summary = {
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "ledger": ledger.display_url,
            "ledger_last_seq": head.seq if head else 0,
            "filters": {
                "since": since.isoformat() if since else None,
                "until": until.isoformat() if until else None,
                "kind": kind,
            },
            "anchor_store": store.location if store is not None else None,
            "anchor_findings": store.findings() if store is not None else [],
            "public_keys": public_keys(layout),
        }
    for line in export_lines(rows, anchors, summary=summary):
        out.write(line + "\n")
    return len(rows)


def public_keys(layout: Layout) -> list[dict[str, Any]]:
    """The public keys that verify the ledger's signed records, for the export: the configured
    ones, else the workspace's development key if one was made (never made here)."""
    from pipeline_steps.governance import signing

    if os.environ.get(signing.KEY_VARIABLE) or os.environ.get(signing.PUBLIC_KEYS_VARIABLE):
        keys = signing.load_keys(layout.state)
        pems, development = list(keys.public_pems), False
    else:
        dev = layout.state / signing.KEYS_FOLDER / signing.DEV_PUBLIC_NAME
        pems, development = ([dev.read_bytes()] if dev.is_file() else []), True
    return [
        {"key_id": signing.key_id_of(pem), "pem": pem.decode("ascii"), "development": development}
        for pem in pems
    ]


def verify_export(path: Path) -> ExportCheck:
    """Check an export file offline: no database, no anchor store. Signed records are checked
    with RADFLOW_SIGNING_PUBLIC_KEYS when the auditor sets it, else with the export's own keys."""
    from pipeline_steps.governance import signing

    trusted = None
    if os.environ.get(signing.PUBLIC_KEYS_VARIABLE, "").strip():
        only_public = {signing.PUBLIC_KEYS_VARIABLE: os.environ[signing.PUBLIC_KEYS_VARIABLE]}
        trusted = list(signing.load_keys(path.parent, only_public).public_pems)
    try:
        with path.open(encoding="utf-8") as fh:
            return check_export(fh, str(path), trusted_keys=trusted)
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"export {path}: cannot be read ({exc})") from None


# --------------------------------------------------------------------------------------------
# Trace


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gx_results(layout: Layout, result_id: str) -> dict[str, dict[str, Any]]:
    """The GX validation results stored under run `result_id` (`<run name>/<run time>`), per suite."""
    import great_expectations as gx

    if not result_id or not layout.gx_dir.is_dir():
        return {}
    run_name, _, run_time = result_id.partition("/")
    context = gx.get_context(mode="file", project_root_dir=str(layout.root))
    store = context.validation_results_store
    found: dict[str, dict[str, Any]] = {}
    for key in store.list_keys():
        run = key.run_id
        stamp = run.run_time.strftime("%Y%m%dT%H%M%S.%fZ") if run.run_time else ""
        if run.run_name != run_name or (run_time and stamp != run_time):
            continue
        result = store.get(key)
        suite = key.expectation_suite_identifier.name
        found[suite] = {
            "success": bool(result.success),
            "evaluated": int(result.statistics.get("evaluated_expectations", 0)),
            "successful": int(result.statistics.get("successful_expectations", 0)),
            "key": "/".join(str(part) for part in key.to_tuple()),
        }
    return found


def _artifact(client: Any, run_id: str, path: str) -> bytes | None:
    with tempfile.TemporaryDirectory(prefix="radflow-trace-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:
            return None
        return Path(local).read_bytes()


def _git_commit(code_version: str) -> str | None:
    """The commit in radflow's code version (`<sha>` or `<sha>-dirty`); None for an installed
    package (`radflow==X`). Preferred to MLflow's own git tag, which names the repository around
    the entry-point script: not radflow's code when radflow is installed in a venv inside one."""
    sha = code_version.removesuffix("-dirty")
    return sha if len(sha) in (40, 64) and all(c in "0123456789abcdef" for c in sha) else None


def _manifest(blob: bytes) -> dict[str, str]:
    lines = io.StringIO(blob.decode("ascii")).read().splitlines()
    if not lines or lines[0] != "content_hash,split":
        raise DataError("the training manifest artifact has an unexpected header")
    return dict(line.split(",", 1) for line in lines[1:] if line)


def _is_uid(text: str) -> bool:
    # A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters. A ULID has letters.
    return 0 < len(text) <= 64 and all(c.isdigit() or c == "." for c in text) and "." in text


def find_prediction(layout: Layout, prediction_id: str) -> tuple[Entry, Verification]:
    """The ledger row of a prediction id, or of the SR a PACS watcher stored (its SOP Instance UID,
    recorded with the prediction before the SR was stored)."""
    wanted = prediction_id.strip()
    with open_ledger(layout.root) as ledger:
        found = ledger.entries(kind=PREDICTION, subject=wanted)
        if not found and _is_uid(wanted):
            found = [
                entry
                for entry in ledger.entries(kind=PREDICTION)
                if entry.payload.get("sr_sop_instance_uid") == wanted
            ]
        if not found:
            raise UnknownPrediction(
                f"no prediction or SR {prediction_id!r} in the ledger at "
                f"{ledger.display_url}; `radflow audit export` lists them"
            )
        return found[0], ledger.verify()


def trace(layout: Layout, params: Params, prediction_id: str) -> dict[str, Any]:
    """The chain behind one prediction, each link resolved and checked (see `checks`)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    entry, chain = find_prediction(layout, prediction_id)
    record = entry.payload
    model = record["model"]
    name, version = str(model["name"]), str(model["version"])
    with open_ledger(layout.root) as ledger:
        held = stages_at(ledger, name, entry.time)
    stages_then = sorted(stage for stage, s in held.items() if str(s["version"]) == version)

    uri = tracking_uri(layout)
    client = mlflow_client(uri)
    try:
        mv = client.get_model_version(name, version)
        run = client.get_run(mv.run_id)
    except Exception as exc:
        raise TrackingError(
            f"MLflow at {public_uri(uri)}: cannot read {name} version {version} or its run "
            f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
        ) from None
    tags = dict(mv.tags or {})
    run_tags = dict(run.data.tags)

    data_rev = tags.get("data_git_rev", "")
    md5_at_rev = data_version_at(layout, data_rev)

    validation_blob = _artifact(client, run.info.run_id, VALIDATION_ARTIFACT)
    validation = json.loads(validation_blob) if validation_blob else {}
    result_id = tags.get("validation_result", "")
    stored_results = gx_results(layout, result_id)

    manifest_blob = _artifact(client, run.info.run_id, MANIFEST_ARTIFACT)
    manifest = _manifest(manifest_blob) if manifest_blob else {}
    by_split: dict[str, int] = {}
    for split in manifest.values():
        by_split[split] = by_split.get(split, 0) + 1
    split = membership(record, manifest)
    stream_blob = _artifact(client, run.info.run_id, STREAM_ARTIFACT)
    stream = json.loads(stream_blob) if stream_blob else {}

    checks = {
        "ledger_chain_intact": chain.ok,
        "ledger_row_verified": chain.ok or (chain.first_bad or 0) > entry.seq,
        "run_matches_version": mv.run_id == model.get("run_id"),
        "data_version_matches_model": record.get("data_version") == tags.get("data_version"),
        # None: cannot be checked here (data/raw.dvc never committed, e.g. the source checkout's demo)
        "data_version_in_git": (
            None if data_rev in ("", "uncommitted") else md5_at_rev == tags.get("data_version")
        ),
        "data_version_in_dvc_cache": dvc_cache_has(layout, tags.get("data_version", "")),
        "validation_report_unaltered": validation_blob is not None
        and _sha256(validation_blob) == tags.get("validation_report_sha256"),
        "validation_of_this_data_version": validation.get("data_version")
        == tags.get("data_version"),
        "validation_in_gx_store": bool(stored_results),
        "manifest_unaltered": manifest_blob is not None
        and _sha256(manifest_blob) == tags.get("train_manifest"),
    }
    if tags.get("training_stream_sha256"):  # trained with streamed synthetic studies
        checks["training_stream_unaltered"] = stream_blob is not None and _sha256(
            stream_blob
        ) == tags.get("training_stream_sha256")
    return {
        "prediction": {
            **record,
            "ledger_row": entry.seq,
            "recorded_at": entry.recorded_at,
            "row_hash": entry.row_hash,
        },
        "ledger": {
            "intact": chain.ok,
            "rows_verified": chain.rows,
            "first_bad_row": chain.first_bad,
            "problem": chain.problem,
        },
        "model": {
            "name": name,
            "version": version,
            "stage_at_prediction": stages_then,
            "served_as": model.get("stage"),
            "stages_then": {k: v["version"] for k, v in held.items()},
            "aliases_now": sorted(mv.aliases or ()),
            "created": mv.creation_timestamp,
        },
        "run": {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            # versions registered before code_version existed: MLflow's own tag
            "git_commit": _git_commit(tags["code_version"])
            if tags.get("code_version")
            else run_tags.get("mlflow.source.git.commit"),
            "code_version": tags.get("code_version"),
            "params_hash": tags.get("params_hash"),
        },
        "data": {
            "data_version": tags.get("data_version"),
            "data_git_rev": data_rev,
            "raw_dvc_md5_at_rev": md5_at_rev,
        },
        "validation": {
            "result_id": result_id,
            "passed": tags.get("validation_passed") == "true",
            "report_sha256": tags.get("validation_report_sha256"),
            "success": validation.get("success"),
            "n_images": validation.get("n_images"),
            "gx_results": stored_results,
            # development: the model was trained on pseudonyms under the public key (test data)
            "pseudonym_key": tags.get("pseudonym_key") or "unknown",
        },
        "training_manifest": {
            "sha256": tags.get("train_manifest"),
            "artifact": MANIFEST_ARTIFACT,
            "images": len(manifest),
            "by_split": by_split,
        },
        "training_stream": {
            "summary": tags.get("training_stream", "none"),
            "artifact": STREAM_ARTIFACT if stream_blob else None,
            "generator": stream.get("generator"),
            "seed": stream.get("seed"),
            "studies": stream.get("n_studies", 0),
            "epochs": len(stream.get("epochs", [])),
            "synth_params_sha256": stream.get("synth_params_sha256"),
            "studies_sha256": stream.get("studies_sha256"),
            "profile": tags.get("training_profile", "unknown"),
        },
        "image_in_training_data": {
            "member": split is not None,
            "split": split,
            "matched_on": "file content hash (ingestion's image id)",
        },
        "checks": checks,
    }


def format_trace(t: dict[str, Any]) -> Iterator[str]:
    p, m, r, d, v, tm, member = (
        t["prediction"],
        t["model"],
        t["run"],
        t["data"],
        t["validation"],
        t["training_manifest"],
        t["image_in_training_data"],
    )
    yield f"prediction  {p['prediction_id']}  ({p['created_at']}, ledger row {p['ledger_row']})"
    if p.get("reason"):
        yield f"  failed: {p['reason']}"
    else:
        yield f"  image sha256 {p.get('image_sha256')}  boxes {len(p.get('boxes', []))}"
    if p.get("sr_sop_instance_uid"):
        yield f"  SR {p['sr_sop_instance_uid']} stored into the image's study (radflow pacs watch)"
    yield (
        f"model       {m['name']} version {m['version']}; stage then: "
        f"{', '.join(m['stage_at_prediction']) or 'none'}; aliases now: "
        f"{', '.join(m['aliases_now']) or 'none'}"
    )
    code = f"git {r['git_commit']}" if r["git_commit"] else f"code {r['code_version'] or '?'}"
    yield f"run         {r['run_id']}  {code}  params_hash {r['params_hash']}"
    headline = ", ".join(
        f"{k}={r['metrics'][k]:.3f}"
        for k in ("ap50", "sens_at_1fp", "cpm", "auroc")
        if k in r["metrics"]
    )
    yield f"            test metrics: {headline or 'none logged'}"
    yield f"data        {d['data_version']}  (data/raw.dvc at {d['data_git_rev']}: {d['raw_dvc_md5_at_rev']})"
    suites = ", ".join(
        f"{s}: {'pass' if x['success'] else 'FAIL'} {x['successful']}/{x['evaluated']}"
        for s, x in sorted(v["gx_results"].items())
    )
    yield f"validation  {v['result_id']}  passed={v['passed']}  {suites or '(not in this GX store)'}"
    public = v["pseudonym_key"] == DEVELOPMENT
    yield f"pseudonyms  {v['pseudonym_key']} key" + (
        ": trained on pseudonyms under the PUBLIC development key (synthetic or test data only)"
        if public
        else ""
    )
    splits = ", ".join(f"{k} {n}" for k, n in sorted(tm["by_split"].items()))
    yield f"training    {tm['images']} images ({splits}); manifest sha256 {tm['sha256']}"
    ts = t.get("training_stream") or {}
    if ts.get("studies"):
        yield (
            f"            + {ts['studies']} streamed synthetic studies over {ts['epochs']} epochs: "
            f"{ts['generator']} seed {ts['seed']}, params sha256 {str(ts['synth_params_sha256'])[:16]}; "
            "re-render one with `radflow trace ID --regenerate INDEX`"
        )
    yield (
        f"this image  {'in the ' + member['split'] + ' split' if member['member'] else 'not in the training data'}"
    )
    failed = [k for k, ok in t["checks"].items() if ok is False]
    unknown = [k for k, ok in t["checks"].items() if ok is None]
    yield "checks      " + ("all links verified" if not failed else "FAILED: " + ", ".join(failed))
    if unknown:
        yield "            not checkable here: " + ", ".join(unknown)


def regenerate_streamed(layout: Layout, prediction_id: str, index: int) -> dict[str, Any]:
    """Render streamed study `index` of the model behind a prediction again, from the identity its
    training recorded (generator, synth params, seed, index), and compare its stored pixels with the
    SHA-256 recorded when it was trained on. `image` holds the rendering (for `--out`)."""
    import os

    from pipeline_steps.core.config import SynthParams
    from pipeline_steps.synthetic.stream import GENERATOR_VERSION, render_study

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    entry, _ = find_prediction(layout, prediction_id)
    model = entry.payload["model"]
    name, version = str(model["name"]), str(model["version"])
    client = mlflow_client(tracking_uri(layout))
    try:
        run_id = client.get_model_version(name, version).run_id
    except Exception as exc:
        raise TrackingError(f"cannot read {name} version {version}: {type(exc).__name__}") from None
    blob = _artifact(client, run_id, STREAM_ARTIFACT)
    if blob is None:
        raise DataError(
            f"{name} version {version} was trained without streamed synthetic studies "
            f"(no {STREAM_ARTIFACT} on run {run_id})"
        )
    tags = dict(client.get_model_version(name, version).tags or {})
    if tags.get("training_stream_sha256") != _sha256(blob):
        raise DataError(f"{STREAM_ARTIFACT} of run {run_id} does not match its version's tag")
    stream = json.loads(blob)
    recorded = stream["studies"].get(str(index))
    if recorded is None:
        raise DataError(
            f"study {index} is not among the {stream['n_studies']} studies {name} version "
            f"{version} trained on (epochs drew index ranges {stream['epochs']})"
        )
    if stream["generator"] != GENERATOR_VERSION:
        raise DataError(
            f"study {index} was made by {stream['generator']}, this radflow has "
            f"{GENERATOR_VERSION}: regenerate it with the code version {tags.get('code_version')}"
        )
    params = SynthParams.model_validate(stream["synth_params"])
    image = render_study(params, int(stream["seed"]), index)
    sha = _sha256(image.stored.tobytes())
    return {
        "model": f"{name} version {version}",
        "index": index,
        "generator": stream["generator"],
        "seed": stream["seed"],
        "recorded_sha256": recorded[0],
        "regenerated_sha256": sha,
        "identical": sha == recorded[0],
        "lesion_diameters_mm": [round(lesion.diameter_mm, 2) for lesion in image.lesions],
        "image": image,
    }
