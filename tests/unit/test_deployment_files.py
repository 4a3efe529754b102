"""The deployment files agree with params.yaml and with the code they name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline_steps.core.config import NightlyParams, load_params, parse_params
from pipeline_steps.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_prefect_yaml_schedules_the_flow_params_yaml_configures():
    from prefect.flows import load_flow_from_entrypoint

    nightly = load_params(REPO / "params.yaml").nightly
    deployment = _deployments()["radflow-nightly"]
    assert [(s["cron"], s["timezone"]) for s in deployment["schedules"]] == [
        (nightly.cron, nightly.timezone)
    ]
    assert deployment["name"] == "radflow-nightly"
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert flow.name == "nightly_retraining"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)


def _deployments() -> dict[str, dict]:
    listed = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    return {d["name"]: d for d in listed}


def test_prefect_yaml_polls_the_pacs_at_the_interval_params_yaml_configures():
    from prefect.flows import load_flow_from_entrypoint

    watch = load_params(REPO / "params.yaml").pacs.watch
    deployments = _deployments()
    assert set(deployments) == {"radflow-nightly", "radflow-pacs-watch"}
    deployment = deployments["radflow-pacs-watch"]
    assert [s["interval"] for s in deployment["schedules"]] == [watch.interval_s]
    # Off until the pool's workers are given a PACS: a watcher without one fails every poll.
    assert [s["active"] for s in deployment["schedules"]] == [False]
    assert deployment["concurrency_limit"] == 1
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert flow.name == "pacs_watch"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
    assert deployment["work_pool"] == deployments["radflow-nightly"]["work_pool"]


def test_nightly_params_are_checked_by_their_dotted_key():
    assert NightlyParams().cron == "0 2 * * *"
    for section, message in (
        ({"landing": "landing/site-a"}, "landing must be s3://bucket"),
        ({"cron": "0 2 * *"}, "five fields"),
        ({"timezone": "Mars/Olympus"}, "IANA"),
        ({"webhook_url": "hooks.example.org/x"}, "http"),
    ):
        with pytest.raises(ConfigError, match=rf"nightly[\s\S]*{message}"):
            parse_params({"nightly": section})
    assert parse_params({"nightly": {"landing": "s3://b/p", "timezone": "Europe/Berlin"}})


def _compose() -> dict:
    return yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())


def test_the_compose_file_wires_what_the_integration_tests_prove():
    import re

    compose = _compose()
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    mlflow = services["mlflow"]["command"]
    assert "--backend-store-uri postgresql+psycopg2://" in mlflow and "--serve-artifacts" in mlflow
    assert "--artifacts-destination s3://" in mlflow
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db.startswith("postgresql+asyncpg://")
    worker = services["prefect-worker"]
    deployment = _deployments()["radflow-nightly"]
    assert f"--pool {deployment['work_pool']['name']}" in worker["command"]
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert worker["volumes"] == ["workspace:${RADFLOW_WORKSPACE:-/workspace}"]
    # The PACS: Orthanc with DICOMweb and authentication, and the worker signed in to it.
    orthanc = services["orthanc"]["environment"]
    assert orthanc["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert orthanc["ORTHANC__AUTHENTICATION_ENABLED"] == "true"
    assert env["RADFLOW_PACS_URL"] == "${RADFLOW_PACS_URL:-http://orthanc:8042/dicom-web}"
    assert env["RADFLOW_PACS_USER"] == "${PACS_USER}"
    assert env["RADFLOW_PACS_PASSWORD"] == "${PACS_PASSWORD}"
    # Every variable the compose file needs without a default is in .env.example.
    text = (REPO / "infra" / "docker-compose.yml").read_text()
    needed = set(re.findall(r"\$\{(\w+)\}", text))
    example = {
        line.split("=", 1)[0]
        for line in (REPO / "infra" / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert needed <= example, needed - example


def test_the_kubernetes_files_agree_with_each_other():
    import json

    k8s = REPO / "infra" / "k8s"
    template = json.loads((k8s / "base-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pvc = yaml.safe_load((k8s / "workspace-pvc.yaml").read_text())
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/workspace"
    secrets = list(yaml.safe_load_all((k8s / "secrets.example.yaml").read_text()))
    names = {s["metadata"]["name"]: s["stringData"] for s in secrets}
    assert pod["containers"][0]["envFrom"][0]["secretRef"]["name"] in names
    mlflow = next(yaml.safe_load_all((k8s / "mlflow.yaml").read_text()))
    env = mlflow["spec"]["template"]["spec"]["containers"][0]["env"]
    for item in env:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in names[ref["name"]]
    server = yaml.safe_load((k8s / "prefect-server-values.yaml").read_text())
    assert "connection-string" in names[server["secret"]["name"]]
    worker = yaml.safe_load((k8s / "prefect-worker-values.yaml").read_text())
    assert worker["worker"]["config"]["type"] == "kubernetes"
    assert worker["worker"]["config"]["workPool"] == "radflow-k8s"
