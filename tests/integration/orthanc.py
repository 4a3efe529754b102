"""Orthanc, a real PACS, for the integration tests: started on a free loopback port from a generated
configuration (its own storage folder, the DICOMweb plugin, authentication on), waited for, and
stopped. The Debian packages `orthanc` and `orthanc-dicomweb` provide it (`make test` installs them
as root on Debian/Ubuntu); `RADFLOW_TEST_ORTHANC` may name another Orthanc binary."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import requests

from flows.pacs import ENV_PASSWORD, ENV_URL, ENV_USER
from flows.servers import stop

BINARY_ENV = "RADFLOW_TEST_ORTHANC"
BINARIES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)
INSTALL_HINT = (
    "Orthanc with its DICOMweb plugin is needed: as root on Debian/Ubuntu `make test` installs the "
    "packages orthanc and orthanc-dicomweb; elsewhere install them, or set RADFLOW_TEST_ORTHANC"
)


class OrthancUnavailable(RuntimeError):
    """No Orthanc binary or DICOMweb plugin on this machine."""


def find_orthanc() -> tuple[str, str]:
    """(binary, DICOMweb plugin) or OrthancUnavailable."""
    binary = os.environ.get(BINARY_ENV) or next(
        (found for name in BINARIES if (found := shutil.which(name))), None
    )
    plugin = next((hit for pattern in PLUGIN_GLOBS for hit in sorted(glob.glob(pattern))), None)
    if not binary or not plugin:
        raise OrthancUnavailable(INSTALL_HINT)
    return binary, plugin


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """One Orthanc. `stop()` then `start()` is an outage and a restart on the same port with the same
    storage: what was stored is still there."""

    def __init__(self, root: Path, user: str = "radflow-test") -> None:
        self.binary, self.plugin = find_orthanc()
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.user, self.password = user, secrets.token_urlsafe(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.base}/dicom-web"
        self.log = root / "orthanc.log"
        self.config = root / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "radflow-test",
                    "StorageDirectory": str(root / "storage"),
                    "IndexDirectory": str(root / "storage"),
                    "HttpPort": self.port,
                    "RemoteAccessAllowed": False,  # loopback clients only
                    "DicomServerEnabled": False,  # DICOMweb only: no DIMSE port
                    "AuthenticationEnabled": True,
                    "RegisteredUsers": {self.user: self.password},
                    "Plugins": [self.plugin],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
                    "StorageCompression": False,
                    "HttpTimeout": 60,
                },
                indent=2,
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self, password: str | None = None) -> dict[str, str]:
        """radflow's PACS settings for this server (another password: a wrong sign-in)."""
        return {
            ENV_URL: self.dicomweb_url,
            ENV_USER: self.user,
            ENV_PASSWORD: self.password if password is None else password,
        }

    def start(self, timeout: float = 60.0) -> Orthanc:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            with suppress(requests.RequestException):
                if self.get("/system", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    # -- Orthanc's own REST API, for arranging and inspecting tests ----------------------------

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return requests.get(f"{self.base}{path}", auth=(self.user, self.password), **kwargs)  # type: ignore[arg-type]

    def upload(self, files: Iterable[Path | bytes]) -> list[str]:
        """Store DICOM files through Orthanc's REST API (as a modality would send them); their
        Orthanc instance ids."""
        ids = []
        for item in files:
            data = item if isinstance(item, bytes) else Path(item).read_bytes()
            reply = requests.post(
                f"{self.base}/instances", data=data, auth=(self.user, self.password), timeout=60
            )
            reply.raise_for_status()
            ids.append(str(reply.json()["ID"]))
        return ids

    def studies(self) -> list[str]:
        return list(self.get("/studies", timeout=10).json())

    def instances(self) -> list[str]:
        return list(self.get("/instances", timeout=10).json())


@contextmanager
def orthanc_server(root: Path) -> Iterator[Orthanc]:
    server = Orthanc(root)
    try:
        yield server.start()
    finally:
        server.stop()
