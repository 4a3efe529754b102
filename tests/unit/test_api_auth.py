"""serve-api's tokens (flows/api_auth.py): salted hashes at rest, checks, and failing closed."""

from __future__ import annotations

import stat

import pytest

from flows.api_auth import (
    TOKENS_ENV,
    TOKENS_FILE_ENV,
    TokenCheck,
    add_token,
    hash_token,
    parse_entries,
    read_token_file,
    resolve_security,
    revoke_token,
)
from flows.cli import main
from pipeline_steps.core.errors import ConfigError


def test_a_token_matches_only_its_own_salted_hash():
    a, b = hash_token("a", "token-a"), hash_token("b", "token-b")
    assert hash_token("a", "token-a").digest != a.digest  # a fresh salt each time
    check = TokenCheck([a, b])
    assert check.verify("Bearer token-a") == "a"
    assert check.verify("bearer   token-b ") == "b"
    for header in (
        None,
        "",
        "token-a",
        "Basic token-a",
        "Bearer",
        "Bearer token-c",
        "Bearer x" * 99,
    ):
        assert check.verify(header) is None
    # the stored line holds the salt and digest, never the token
    assert "token-a" not in a.line() and a.line().startswith("a sha256$")
    assert parse_entries(a.line(), "test") == [a]


def test_add_writes_an_owner_only_file_of_hashes_and_the_token_verifies(tmp_path):
    path = tmp_path / "tokens"
    first = add_token(path, "ci")
    second = add_token(path, "ops@host")
    text = path.read_text()
    assert first not in text and second not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    check = TokenCheck(read_token_file(path))
    assert check.verify(f"Bearer {first}") == "ci"
    assert check.verify(f"Bearer {second}") == "ops@host"
    with pytest.raises(ConfigError, match="already has a token named 'ci'"):
        add_token(path, "ci")
    revoke_token(path, "ci")
    assert TokenCheck(read_token_file(path)).verify(f"Bearer {first}") is None
    with pytest.raises(ConfigError, match="no token named 'ci'"):
        revoke_token(path, "ci")
    with pytest.raises(ConfigError, match="is not allowed"):
        add_token(path, "a name with spaces")


def test_a_plain_token_pasted_into_the_file_is_an_error_that_does_not_repeat_it(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\nci rfapi_plain-secret-value\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as err:
        read_token_file(path)
    assert f"{path}, entry 2" in str(err.value) and "plain-secret" not in str(err.value)


def test_a_token_file_others_can_write_is_refused(tmp_path):
    path = tmp_path / "tokens"
    add_token(path, "ci")
    path.chmod(0o662)
    with pytest.raises(ConfigError, match="writable by others: run `chmod 600"):
        read_token_file(path)


def test_without_tokens_the_server_does_not_start(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_security(
            "127.0.0.1", tokens_file=None, insecure_no_auth=False, docs=False, environ={}
        )
    assert TOKENS_FILE_ENV in str(err.value) and TOKENS_ENV in str(err.value)
    assert "radflow api-token add" in str(err.value)
    empty = tmp_path / "empty"
    empty.write_text("# no tokens yet\n")
    with pytest.raises(ConfigError, match="hold none"):
        resolve_security(
            "127.0.0.1",
            tokens_file=None,
            insecure_no_auth=False,
            docs=False,
            environ={TOKENS_FILE_ENV: str(empty)},
        )
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_security(
            "127.0.0.1",
            tokens_file=str(tmp_path / "missing"),
            insecure_no_auth=False,
            docs=False,
            environ={},
        )


def test_tokens_from_the_file_and_the_environment_together(tmp_path):
    path = tmp_path / "tokens"
    from_file = add_token(path, "file")
    entry = hash_token("env", "env-token")
    security = resolve_security(
        "0.0.0.0",
        tokens_file=str(path),
        insecure_no_auth=False,
        docs=False,
        environ={TOKENS_ENV: entry.line(), "RADFLOW_API_DOCS": "1"},
    )
    assert security.check is not None and security.docs
    assert security.check.verify(f"Bearer {from_file}") == "file"
    assert security.check.verify("Bearer env-token") == "env"
    assert "tokens" not in security.source.replace(str(path), "")  # names sources, not values


def test_no_auth_is_for_loopback_only():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        security = resolve_security(host, tokens_file=None, insecure_no_auth=True, docs=False)
        assert security.auth_disabled
    for host in ("0.0.0.0", "10.0.0.5", "::", "example.org"):
        with pytest.raises(ConfigError, match="not a loopback address"):
            resolve_security(host, tokens_file=None, insecure_no_auth=True, docs=False)


def test_the_cli_prints_a_new_token_once_and_serve_api_fails_closed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TOKENS_FILE_ENV, raising=False)
    monkeypatch.delenv(TOKENS_ENV, raising=False)
    path = tmp_path / "tokens"
    assert main(["api-token", "add", "ci", "--file", str(path)]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("rfapi_") and token not in out.err and token not in path.read_text()
    assert main(["api-token", "list", "--file", str(path)]) == 0
    assert capsys.readouterr().out.split() == ["ci"]
    # no tokens configured: refused before any workspace or model is opened
    assert main(["--workspace", str(tmp_path / "nowhere"), "serve-api"]) == 1
    assert "serve-api has no API tokens" in capsys.readouterr().err
