"""The deployment files agree with params.yaml and with the code they name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline_steps.config import NightlyParams, load_params, parse_params
from pipeline_steps.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_prefect_yaml_schedules_the_flow_params_yaml_configures():
    from prefect.flows import load_flow_from_entrypoint

    nightly = load_params(REPO / "params.yaml").nightly
    (deployment,) = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert [(s["cron"], s["timezone"]) for s in deployment["schedules"]] == [
        (nightly.cron, nightly.timezone)
    ]
    assert deployment["name"] == "radflow-nightly"
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert flow.name == "nightly_retraining"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)


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
