"""The console's access control (flows/console_auth.py): scrypt hashes, users and roles, failing
closed, sessions, CSRF, login throttling, and `radflow console-users`."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from flows.console_auth import (
    PROMOTER,
    REVIEWER,
    USERS_ENV,
    USERS_FILE_ENV,
    VIEWER,
    LoginThrottle,
    SessionStore,
    User,
    add_user,
    check_csrf,
    hash_secret,
    load_users,
    new_token,
    parse_users,
    read_users_file,
    remove_user,
    verify_secret,
)
from pipeline_steps.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_secret("correct horse")


def test_a_secret_verifies_against_its_own_hash_only(stored):
    assert stored.startswith("scrypt$16384$8$1$")
    assert "correct horse" not in stored
    assert verify_secret(stored, "correct horse")
    assert not verify_secret(stored, "correct hors")
    assert not verify_secret(stored, "")
    assert hash_secret("correct horse") != stored  # a fresh salt each time
    salt = bytes(range(16))
    assert hash_secret("x", salt=salt) == hash_secret("x", salt=salt)


def test_a_malformed_stored_hash_is_false_not_an_error(stored):
    scheme, n, r, p, salt, key = stored.split("$")
    for bad in (
        "",
        "plain-password",
        stored.replace("scrypt", "sha256"),
        f"{scheme}${n}${r}${p}${salt}",  # no key
        f"{scheme}$1000${r}${p}${salt}${key}",  # n not a power of two
        f"{scheme}${2**30}${r}${p}${salt}${key}",  # would take gigabytes
        f"{scheme}${n}$0${p}${salt}${key}",
        f"{scheme}${n}${r}${p}${salt}${key[:-1]}",  # odd hex
        f"{scheme}${n}${r}${p}${salt}${'zz' * 32}",
    ):
        assert verify_secret(bad, "correct horse") is False, bad


def test_parse_users_reads_names_roles_and_comments(stored):
    text = f"# the console\nann:viewer:{stored}\n\nbob:reviewer,promoter:{stored}  # lead\n"
    users = parse_users(text, "users.txt")
    assert len(users) == 2
    assert users.get("bob") == User("bob", frozenset({REVIEWER, PROMOTER}))
    ann = users.authenticate("ann", "correct horse")
    assert ann is not None and ann.can(VIEWER)
    assert not ann.can(REVIEWER) and not ann.can(PROMOTER)
    assert users.authenticate("ann", "wrong") is None
    assert users.authenticate("nobody", "correct horse") is None
    # the environment form: `;` between lines
    assert len(parse_users(f"ann:viewer:{stored};bob:promoter:{stored}", USERS_ENV)) == 2


def test_a_role_check_with_a_misspelt_role_raises():
    with pytest.raises(ValueError, match="promote"):
        User("ann", frozenset({PROMOTER})).can("promote")


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("ann:viewer", "line 2: not `NAME:ROLE"),
        ("ann:viewer:{stored}:extra", "line 2: not `NAME:ROLE"),
        ("ann:viewer:scrypt$16384$8$1$00$00", "line 2: not `NAME:ROLE"),
        ("ann bob:viewer:{stored}", "line 2: the user name is not allowed"),
        ("ann:admin:{stored}", "line 2: user 'ann' has an unknown or no role"),
        ("ann::{stored}", "line 2: user 'ann' has an unknown or no role"),
        ("ann:hunter2secret:{stored}", "unknown or no role"),
        ("carl:viewer:{stored}", "line 2: user 'carl' is already on line 1"),
    ],
)
def test_parse_errors_name_the_line_and_never_the_hash(stored, line, says):
    text = f"carl:viewer:{stored}\n{line.format(stored=stored)}\n"
    with pytest.raises(ConfigError) as err:
        parse_users(text, "users.txt")
    message = str(err.value)
    assert message.startswith("users.txt, line 2") and says in message
    key = stored.rsplit("$", 1)[1]
    assert key not in message and stored not in message and "hunter2secret" not in message


def test_load_users_fails_closed_and_names_both_variables(tmp_path, stored):
    def refusal(env):
        with pytest.raises(ConfigError) as err:
            load_users(env)
        return str(err.value)

    message = refusal({})
    assert USERS_FILE_ENV in message and USERS_ENV in message
    assert "radflow console-users add" in message
    message = refusal({USERS_FILE_ENV: "  ", USERS_ENV: ""})
    assert "neither" in message

    missing = tmp_path / "missing"
    message = refusal({USERS_FILE_ENV: str(missing)})
    assert str(missing) in message and "does not exist" in message and USERS_FILE_ENV in message

    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n")
    empty.chmod(0o600)
    message = refusal({USERS_FILE_ENV: str(empty)})
    assert "hold no user" in message and USERS_FILE_ENV in message and USERS_ENV in message

    unreadable = tmp_path / "a-folder"
    unreadable.mkdir()
    assert "cannot be read" in refusal({USERS_FILE_ENV: str(unreadable)})

    users_file = tmp_path / "users"
    users_file.write_text(f"ann:viewer:{stored}\n")
    users_file.chmod(0o600)
    both = load_users({USERS_FILE_ENV: str(users_file), USERS_ENV: f"bob:promoter:{stored}"})
    assert {u.name for u in both} == {"ann", "bob"}
    assert len(load_users({USERS_ENV: f"bob:promoter:{stored}"})) == 1
    twice = refusal({USERS_FILE_ENV: str(users_file), USERS_ENV: f"ann:promoter:{stored}"})
    assert "'ann'" in twice and "unique" in twice


def test_a_users_file_others_may_read_warns_and_one_they_may_write_is_refused(
    tmp_path, stored, caplog
):
    users_file = tmp_path / "users"
    users_file.write_text(f"ann:viewer:{stored}\n")
    users_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="radflow.console"):
        assert len(read_users_file(users_file)) == 1
    assert "readable by group or others" in caplog.text and "chmod 600" in caplog.text
    caplog.clear()
    users_file.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="radflow.console"):
        read_users_file(users_file)
    assert not caplog.text
    users_file.chmod(0o620)
    with pytest.raises(ConfigError, match="writable by others"):
        read_users_file(users_file)


def test_bearer_header_of_the_metrics_scrape(stored):
    users = parse_users(f"prometheus:viewer:{stored}\n", "env")
    scraper = users.from_bearer("Bearer prometheus:correct horse")
    assert scraper is not None and scraper.name == "prometheus"
    assert users.from_bearer("bearer  prometheus:correct horse ") == scraper
    for header in (
        None,
        "",
        "Bearer prometheus:wrong",
        "Bearer prometheus",  # no secret
        "Bearer :correct horse",
        "Basic prometheus:correct horse",
        "prometheus:correct horse",
        "Bearer nobody:correct horse",
        "Bearer prometheus:" + "x" * 5000,
    ):
        assert users.from_bearer(header) is None, header


def test_add_user_writes_an_owner_only_file_and_refuses_duplicates(tmp_path):
    path = tmp_path / "conf" / "console-users"
    old_umask = os.umask(0o022)
    try:
        add_user(path, "ann", [REVIEWER], "ann's secret")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "ann's secret" not in path.read_text()
    add_user(path, "bob", [PROMOTER, VIEWER], "bob's secret")
    with pytest.raises(ConfigError, match="already has a user 'ann'"):
        add_user(path, "ann", [VIEWER], "another")
    users = read_users_file(path)
    assert users.authenticate("ann", "ann's secret") == User("ann", frozenset({REVIEWER}))
    add_user(path, "ann", [PROMOTER], "new secret", replace=True)
    users = read_users_file(path)
    assert len(users) == 2
    assert users.authenticate("ann", "ann's secret") is None
    assert users.authenticate("ann", "new secret") == User("ann", frozenset({PROMOTER}))
    with pytest.raises(ConfigError, match="roles must be one or more"):
        add_user(path, "carl", ["admin"], "x")
    with pytest.raises(ConfigError, match="roles must be one or more"):
        add_user(path, "carl", [], "x")
    with pytest.raises(ConfigError, match="not allowed"):
        add_user(path, "carl:promoter", [VIEWER], "x")
    with pytest.raises(ConfigError, match="needs a secret"):
        add_user(path, "carl", [VIEWER], "")
    assert sorted(u.name for u in read_users_file(path)) == ["ann", "bob"]


def test_remove_user(tmp_path):
    path = tmp_path / "users"
    add_user(path, "ann", [VIEWER], "a")
    add_user(path, "bob", [VIEWER], "b")
    remove_user(path, "ann")
    users = read_users_file(path)
    assert [u.name for u in users] == ["bob"] and users.authenticate("bob", "b") is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="has no user 'ann'"):
        remove_user(path, "ann")


def test_sessions_expire_when_idle_and_at_their_maximum_age():
    clock = Clock()
    store = SessionStore(idle_s=60, max_age_s=300, clock=clock)
    ann = User("ann", frozenset({VIEWER}))
    session = store.create(ann)
    assert session.id != session.csrf and len(session.id) >= 40
    assert store.create(ann).id != session.id
    clock.now += 59
    assert store.get(session.id) is session  # touching it refreshes its idle time
    clock.now += 59
    assert store.get(session.id) is session and session.seen == clock.now
    clock.now += 61
    assert store.get(session.id) is None
    clock.now += 1
    assert store.get(session.id) is None  # removed, not only refused

    aged = store.create(ann)
    for _ in range(6):  # kept busy for max_age_s: never idle, still alive at 300 s
        clock.now += 50
        assert store.get(aged.id) is aged
    clock.now += 1
    assert store.get(aged.id) is None  # past max_age_s although it was used 1 s ago

    ended = store.create(ann)
    store.end(ended.id)
    assert store.get(ended.id) is None
    assert store.get(None) is None and store.get("") is None and store.get("forged") is None
    store.end(None)


def test_csrf_token_must_match_its_session():
    store = SessionStore()
    session = store.create(User("ann", frozenset()))
    other = store.create(User("bob", frozenset()))
    assert check_csrf(session, session.csrf)
    assert not check_csrf(session, other.csrf)
    assert not check_csrf(session, None) and not check_csrf(session, "")
    assert not check_csrf(None, session.csrf)
    assert not check_csrf(session, session.csrf + "x")
    assert not check_csrf(session, "é" * 10)


def test_the_throttle_blocks_after_five_failures_and_frees_after_the_window():
    clock = Clock()
    throttle = LoginThrottle(max_failures=5, window_s=300, clock=clock)
    for _ in range(4):
        throttle.failed("ann")
        clock.now += 10
    assert throttle.blocked("ann") == 0.0
    throttle.failed("ann")  # the fifth, at +40 s; the first was at 0
    assert throttle.blocked("ann") == 300.0 - 40
    assert throttle.blocked("bob") == 0.0  # per name
    clock.now += 250
    assert throttle.blocked("ann") == 10.0
    clock.now += 10
    assert throttle.blocked("ann") == 0.0  # the first failure left the window

    throttle.failed("bob")
    throttle.succeeded("bob")
    for _ in range(4):
        throttle.failed("bob")
    assert throttle.blocked("bob") == 0.0  # success forgot the earlier failure


def test_new_tokens_are_random_and_fit_a_bearer_header():
    a, b = new_token(), new_token()
    assert a != b and len(a) == 32 and ":" not in a


def _radflow(*args: str, stdin: str = "", env_file: Path | None = None, cwd: Path):
    env = {k: v for k, v in os.environ.items() if k not in (USERS_FILE_ENV, USERS_ENV)}
    if env_file is not None:
        env[USERS_FILE_ENV] = str(env_file)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "console-users", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_the_console_users_command_adds_lists_and_removes(tmp_path):
    users_file = tmp_path / "console-users"
    added = _radflow(
        "add", "ann", "--role", "reviewer", "--role", "promoter",
        "--users-file", str(users_file), stdin="secret\n", cwd=tmp_path,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "secret" not in added.stdout
    assert read_users_file(users_file).authenticate("ann", "secret") is not None
    stored = users_file.read_text().splitlines()[-1].rsplit(":", 1)[1]

    listed = _radflow("list", env_file=users_file, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["ann", "reviewer,promoter"]
    assert stored not in listed.stdout + listed.stderr and "scrypt" not in listed.stdout

    generated = _radflow("add", "prometheus", "--role", "viewer", "--generate", env_file=users_file, cwd=tmp_path)  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    token = generated.stdout.strip()
    assert read_users_file(users_file).from_bearer(f"Bearer prometheus:{token}") is not None

    duplicate = _radflow("add", "ann", "--role", "viewer", stdin="x\n", env_file=users_file, cwd=tmp_path)  # fmt: skip
    assert duplicate.returncode == 1 and "already has a user 'ann'" in duplicate.stderr

    removed = _radflow("remove", "ann", env_file=users_file, cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert [u.name for u in read_users_file(users_file)] == ["prometheus"]

    no_file = _radflow("list", cwd=tmp_path)
    assert no_file.returncode == 1 and USERS_FILE_ENV in no_file.stderr
    no_secret = _radflow("add", "bob", "--role", "viewer", stdin="", env_file=users_file, cwd=tmp_path)  # fmt: skip
    assert no_secret.returncode == 1 and "no secret given" in no_secret.stderr
    bad_role = _radflow("add", "bob", "--role", "admin", env_file=users_file, cwd=tmp_path)
    assert bad_role.returncode == 2  # argparse's usage error
