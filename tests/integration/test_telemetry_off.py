"""Nothing radflow starts phones home: the CLI turns Prefect, MLflow and GX telemetry off unless a user
opts in, and the temporary Prefect server a flow starts runs with analytics off and logs no
telemetry error (offline, it logged one on every start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import TELEMETRY_OFF

pytestmark = pytest.mark.integration

SOURCE = Path(__file__).resolve().parents[2]


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=SOURCE,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment without radflow's telemetry defaults or a Prefect server to talk to."""
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF}
    env.pop("PREFECT_API_URL", None)
    return env | {"PREFECT_HOME": str(tmp_path / "prefect")} | extra


def test_the_cli_turns_telemetry_off_and_keeps_a_users_opt_in(tmp_path):
    code = (
        "import json, os\n"
        "from flows.cli import TELEMETRY_OFF, _setup_environment\n"
        "_setup_environment()\n"
        "from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY\n"
        "from prefect.settings import get_current_settings\n"
        "print(json.dumps({'env': {k: os.environ[k] for k in TELEMETRY_OFF},\n"
        "  'prefect_server_analytics': get_current_settings().server.analytics_enabled,\n"
        "  'mlflow_disabled': MLFLOW_DISABLE_TELEMETRY.get()}))\n"
    )
    seen = json.loads(_python(code, _clean_env(tmp_path)).stdout)
    assert seen == {
        "env": TELEMETRY_OFF,
        "prefect_server_analytics": False,
        "mlflow_disabled": True,
    }

    opted_in = _clean_env(tmp_path, PREFECT_SERVER_ANALYTICS_ENABLED="true")
    seen = json.loads(_python(code, opted_in).stdout)
    assert seen["prefect_server_analytics"] is True and seen["mlflow_disabled"] is True


def test_the_temporary_prefect_server_of_a_flow_has_analytics_off(tmp_path):
    code = (
        "import asyncio, json\n"
        "from flows.cli import _setup_environment\n"
        "_setup_environment()\n"
        "from prefect import flow, get_client\n"
        "@flow\n"
        "async def probe():\n"
        "    async with get_client() as client:\n"
        "        reply = await client._client.get('/admin/settings')\n"
        "    return reply.json()['server']['analytics_enabled']\n"
        "print(json.dumps({'server_analytics': asyncio.run(probe())}))\n"
    )
    done = _python(code, _clean_env(tmp_path))
    # The server's own settings, read from it: off whether or not this machine reaches the internet.
    assert json.loads(done.stdout.splitlines()[-1]) == {"server_analytics": False}
    assert "temporary server" in done.stderr.lower()  # the flow did start Prefect's own server
    assert "telemetry" not in done.stderr.lower(), done.stderr[-3000:]
