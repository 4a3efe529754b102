"""PostgreSQL for the integration tests: the server named by RADFLOW_TEST_POSTGRES_URL, or a throwaway
cluster started with initdb and pg_ctl on a free loopback port and deleted afterwards."""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

URL_ENV = "RADFLOW_TEST_POSTGRES_URL"
SUPERUSER = "postgres"
# Debian and Ubuntu keep the server binaries off PATH, one folder per major version.
SERVER_BIN_GLOB = "/usr/lib/postgresql/*/bin"
# initdb refuses to run as root; as root, the cluster belongs to the first of these that exists.
CLUSTER_OWNERS = ("postgres", "nobody")


class PostgresUnavailable(RuntimeError):
    """Neither a configured server nor the binaries to start one."""


@dataclass(frozen=True)
class Postgres:
    """A server where `user` may create databases; `url` names its `postgres` database."""

    url: str

    def database_url(self, database: str, driver: str | None = None) -> str:
        from sqlalchemy.engine import make_url

        url = make_url(self.url).set(database=database)
        if driver:
            url = url.set(drivername=f"postgresql+{driver}")
        return url.render_as_string(hide_password=False)

    def query(self, sql: str, database: str | None = None) -> list[tuple]:
        """Run one statement outside a transaction (CREATE DATABASE needs that); return its rows."""
        import psycopg2

        dsn = self.database_url(database) if database else self.url
        conn = psycopg2.connect(dsn, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    @contextmanager
    def database(self, prefix: str) -> Iterator[str]:
        """A new, empty database; dropped (connections and all) afterwards. Yields its name."""
        name = f"radflow_{prefix}_{uuid.uuid4().hex[:8]}"
        self.query(f'CREATE DATABASE "{name}"')
        try:
            yield name
        finally:
            self.query(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """The configured server if URL_ENV is set (left as found), else a throwaway cluster."""
    configured = os.environ.get(URL_ENV, "").strip()
    if configured:
        server = Postgres(configured)
        try:
            server.query("SELECT 1")
        except Exception as exc:
            raise PostgresUnavailable(
                f"{URL_ENV}={_redacted(configured)} does not answer ({exc}); fix or unset it "
                "(unset, the tests start their own PostgreSQL)"
            ) from None
        yield server
        return
    with throwaway_cluster() as server:
        yield server


def find_server_bin(search_path: str | None = None, versioned_glob: str = SERVER_BIN_GLOB) -> Path:
    """The folder holding initdb, pg_ctl and postgres: PATH first, then the newest versioned one."""
    candidates = []
    if found := shutil.which("initdb", path=search_path):
        candidates.append(Path(found).resolve().parent)  # /usr/local/bin/initdb may be a symlink
    candidates += sorted(
        (Path(d) for d in glob.glob(versioned_glob)),
        key=lambda d: [int(p) if p.isdigit() else 0 for p in d.parent.name.split(".")],
        reverse=True,
    )
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise PostgresUnavailable(
        "The PostgreSQL tests need a server: initdb, pg_ctl and postgres were not found on PATH "
        f"or in {versioned_glob}. Install them (Debian/Ubuntu: apt-get install postgresql), or "
        f"set {URL_ENV}=postgresql://USER@HOST:PORT/postgres to a server where USER may create "
        "databases."
    )


@contextmanager
def throwaway_cluster(bin_dir: Path | None = None) -> Iterator[Postgres]:
    """A new cluster in a temporary folder, trust auth for user `postgres`, on 127.0.0.1 and a free
    port; stopped and deleted on the way out, pass or fail."""
    bin_dir = bin_dir or find_server_bin()
    owner = _cluster_owner()
    base = Path(tempfile.mkdtemp(prefix="radflow-pg-"))
    data, log = base / "data", base / "server.log"
    try:
        if owner:
            shutil.chown(base, user=owner)
        _run(owner, [str(bin_dir / "initdb"), *_initdb_args(data)], base)
        port = _free_port()
        # TCP only (no socket file, so no path-length or permission trouble); durability off.
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' "
            "-c fsync=off -c full_page_writes=off"
        )
        start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options]
        _run(owner, [*start, "-w", "-t", "60", "start"], base, log)
        server = Postgres(f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres")
        _wait_accepting(server, log)
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            stop = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
            with suppress(PostgresUnavailable):
                _run(owner, stop, base)
        shutil.rmtree(base, ignore_errors=True)


def _initdb_args(data: Path) -> list[str]:
    return ["-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-locale", "-N"]


def _cluster_owner() -> str | None:
    """Who runs initdb and the server: ourselves (None) unless we are root, which initdb refuses."""
    if os.geteuid() != 0:
        return None
    for name in CLUSTER_OWNERS:
        with suppress(KeyError):
            return pwd.getpwnam(name).pw_name
    raise PostgresUnavailable(
        "Running as root, and initdb refuses root: no unprivileged user to own the test cluster "
        f"(tried {', '.join(CLUSTER_OWNERS)}). Create one, run the tests as another user, or set "
        f"{URL_ENV}."
    )


def _run(owner: str | None, command: list[str], cwd: Path, log: Path | None = None) -> None:
    if owner and shutil.which("runuser"):
        command = ["runuser", "-u", owner, "--", *command]
    elif owner:  # su runs a shell line; -s because an owner like nobody has no login shell
        command = ["su", "-s", "/bin/sh", owner, "-c", shlex.join(command)]
    # cwd: the cluster's owner may not be allowed into the checkout.
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        raise PostgresUnavailable(
            f"{shlex.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{tail}"
        )


def _wait_accepting(server: Postgres, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.query("SELECT 1")
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise PostgresUnavailable(
                    f"the test cluster at {server.url} did not accept connections: {exc}\n{tail}"
                ) from None
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
