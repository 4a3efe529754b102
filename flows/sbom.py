"""The software bill of materials of the running environment: CycloneDX JSON from `cyclonedx-py
environment` (cyclonedx-bom), made from the installed packages' metadata, without the network."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline_steps.core.errors import ConfigError

GENERATOR = "cyclonedx-py"
TIMEOUT_S = 300


def environment_sbom(out: Path, python: str | None = None) -> Path:
    """Write the CycloneDX JSON SBOM of the environment of `python` (this interpreter by default)
    to `out`; a ConfigError when the generator is missing or fails."""
    executable = python or sys.executable
    command = [
        sys.executable,
        "-m",
        "cyclonedx_py",
        "environment",
        "--output-format",
        "JSON",
        "--output-reproducible",
        # The generator's own schema validation took a minute on 2 busy cores (the SBOM itself
        # seconds); the document is the library's serialization of its model either way.
        "--no-validate",
        "--output-file",
        str(out),
        executable,
    ]
    # No index is consulted (the generator reads installed metadata); proxies are cleared anyway.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{GENERATOR} could not run ({type(exc).__name__}): {exc}") from None
    if done.returncode != 0 or not out.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(
            f"{GENERATOR} environment failed (exit {done.returncode}): {last[0][:300]}. It comes "
            "with radflow (cyclonedx-bom); reinstall radflow's dependencies."
        )
    return out


def normal_name(name: str) -> str:
    """A distribution name as PEP 503 compares them (`tensorflow_cpu` is `tensorflow-cpu`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def components(sbom: Path) -> dict[str, str]:
    """Component name (PEP 503-normalized) -> version, from a CycloneDX JSON SBOM."""
    data: dict[str, Any] = json.loads(sbom.read_text(encoding="utf-8"))
    return {
        normal_name(str(c.get("name", ""))): str(c.get("version", ""))
        for c in data.get("components") or []
    }
