"""The tests' PostgreSQL: the configured server or a throwaway cluster that answers, holds the tests'
databases, and is gone afterwards; without either, a message that says what to install or set."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.integration.postgres import (
    URL_ENV,
    PostgresUnavailable,
    find_server_bin,
    postgres_server,
    throwaway_cluster,
)

pytestmark = pytest.mark.integration


def test_the_session_server_answers_and_holds_the_tests_databases(postgres):
    assert postgres.query("SELECT 1") == [(1,)]
    if not os.environ.get(URL_ENV):  # unconfigured: our own cluster, not a server already running
        (data_directory,) = postgres.query("SHOW data_directory")[0]
        assert Path(data_directory).parent.name.startswith("radflow-pg-")
    with postgres.database("probe") as name:
        postgres.query("CREATE TABLE t (x int); INSERT INTO t VALUES (7)", name)
        assert postgres.query("SELECT x FROM t", name) == [(7,)]
        assert make_url(postgres.database_url(name, "asyncpg")).drivername == "postgresql+asyncpg"
    assert postgres.query(f"SELECT 1 FROM pg_database WHERE datname = '{name}'") == []


def test_a_throwaway_cluster_is_stopped_and_deleted_even_when_the_test_fails():
    with pytest.raises(RuntimeError, match="test failed"), throwaway_cluster() as server:
        (data_directory,) = server.query("SHOW data_directory")[0]
        folder = Path(data_directory).parent
        port = make_url(server.url).port
        assert folder.is_dir() and port != 5432
        raise RuntimeError("test failed")
    assert not folder.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_configured_url_is_used_and_no_cluster_is_started(postgres, monkeypatch):
    monkeypatch.setenv(URL_ENV, postgres.url)
    with postgres_server() as server:
        assert server.url == postgres.url
        assert server.query("SHOW data_directory") == postgres.query("SHOW data_directory")


def test_a_configured_url_that_does_not_answer_says_so(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv(URL_ENV, f"postgresql://postgres:secret@127.0.0.1:{port}/postgres")
    expected = pytest.raises(PostgresUnavailable, match=f"{URL_ENV}=.*does not answer")
    with expected as caught, postgres_server():
        pass
    assert "secret" not in str(caught.value)


def test_missing_server_binaries_name_the_package_and_the_variable(tmp_path):
    with pytest.raises(PostgresUnavailable) as caught:
        find_server_bin(search_path=str(tmp_path), versioned_glob=str(tmp_path / "*" / "bin"))
    assert "apt-get install postgresql" in str(caught.value)
    assert URL_ENV in str(caught.value)
