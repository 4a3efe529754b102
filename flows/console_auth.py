"""Who may use `radflow console`: users with roles and scrypt-hashed secrets, server-side sessions,
CSRF tokens and login throttling; a console without users does not start.

A users file holds one line per user, `NAME:ROLE[,ROLE...]:scrypt$N$R$P$SALT$HASH` (hex; `#` starts
a comment), written by `radflow console-users add`. `RADFLOW_CONSOLE_USERS` may hold the same lines
(one per line, or separated by `;`), e.g. from a Kubernetes secret. Only hashes are ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from flows.api_auth import check_name
from pipeline_steps.core.errors import ConfigError
from pipeline_steps.core.files import atomic_path

log = logging.getLogger("radflow.console")

VIEWER = "viewer"
REVIEWER = "reviewer"
PROMOTER = "promoter"
ROLES = (VIEWER, REVIEWER, PROMOTER)

USERS_FILE_ENV = "RADFLOW_CONSOLE_USERS_FILE"
USERS_ENV = "RADFLOW_CONSOLE_USERS"
SESSION_COOKIE = "radflow_console_session"
HOW_TO_ADD = (
    "create one with `radflow console-users add NAME --role ROLE --users-file FILE` and point "
    f"{USERS_FILE_ENV} at FILE (or put its lines in {USERS_ENV})"
)

SCHEME = "scrypt"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # ~16 MiB and ~50 ms per check: dear to brute-force
SALT_BYTES, KEY_BYTES = 16, 32
# Bounds on the parameters a stored line may name, so that an edited file cannot make each login
# allocate gigabytes; the hash's own memory need is 128 * r * n bytes.
_MAX_SCRYPT_MEMORY = 64 * 2**20
_MAX_SECRET_CHARS = 1024
_MAX_HEADER_CHARS = 2048
_MAX_SESSION_ID_CHARS = 128
_STORED = re.compile(
    r"^scrypt\$(\d{1,8})\$(\d{1,3})\$(\d{1,3})\$([0-9a-f]{16,128})\$([0-9a-f]{32,128})$"
)


# --- secrets -----------------------------------------------------------------------------------


def hash_secret(secret: str, *, salt: bytes | None = None) -> str:
    """The stored form of `secret`: `scrypt$N$R$P$SALT$HASH` with a fresh 16-byte salt."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = _scrypt(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
    return f"{SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${key.hex()}"


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        secret.encode("utf-8", "surrogatepass"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=2 * _MAX_SCRYPT_MEMORY,
        dklen=length,
    )


def _parse_stored(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    match = _STORED.match(stored)
    if match is None:
        return None
    n, r, p = int(match[1]), int(match[2]), int(match[3])
    salt, key = match[4], match[5]
    if n < 2 or n & (n - 1) or not r or not p or 128 * r * n > _MAX_SCRYPT_MEMORY:
        return None
    if len(salt) % 2 or len(key) % 2:
        return None
    return n, r, p, bytes.fromhex(salt), bytes.fromhex(key)


def verify_secret(stored: str, secret: str) -> bool:
    """Whether `secret` hashes to `stored`; a malformed `stored` is False, never an exception."""
    parsed = _parse_stored(stored) if isinstance(stored, str) else None
    if parsed is None or not isinstance(secret, str):
        return False
    n, r, p, salt, key = parsed
    try:
        candidate = _scrypt(secret, salt, n, r, p, len(key))
    except (ValueError, MemoryError):  # OpenSSL refused the parameters
        return False
    return hmac.compare_digest(candidate, key)


@cache
def _decoy() -> str:
    """A stored hash no one's secret matches, checked for unknown names so that the time a login
    takes does not tell whether the name exists."""
    return hash_secret(secrets.token_urlsafe(32))


def new_token() -> str:
    return secrets.token_urlsafe(24)


# --- users -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    roles: frozenset[str]

    def can(self, role: str) -> bool:
        """Whether the user may act as `role`; every user may view."""
        if role not in ROLES:
            # A typo in a route's check must not quietly refuse (or grant) everyone.
            raise ValueError(f"unknown console role {role!r}; roles are {', '.join(ROLES)}")
        return role == VIEWER or role in self.roles


@dataclass(frozen=True)
class _Account:
    user: User
    stored: str

    def line(self) -> str:
        return f"{self.user.name}:{','.join(sorted(self.user.roles))}:{self.stored}"


def check_user_name(name: str) -> str:
    # The API tokens' rule: it leaves out ':', which separates the fields of a line and a bearer.
    try:
        return check_name(name)
    except ConfigError:
        raise ConfigError(
            f"console user name {name!r} is not allowed: use 1-64 letters, digits, '.', '_', '@' "
            "or '-', starting with a letter or digit"
        ) from None


def check_roles(roles: Iterable[str]) -> frozenset[str]:
    found = frozenset(roles)
    unknown = sorted(found - set(ROLES))
    if unknown or not found:
        raise ConfigError(
            f"console roles must be one or more of {', '.join(ROLES)}"
            + (f"; {', '.join(map(repr, unknown))} is not one" if unknown else "")
        )
    return found


class Users:
    """The console's accounts, checked in (roughly) constant time whether a name exists or not."""

    def __init__(self, accounts: Iterable[_Account] = ()) -> None:
        self._accounts: dict[str, _Account] = {}
        for account in accounts:
            if account.user.name in self._accounts:
                raise ValueError(f"console user {account.user.name!r} is given twice")
            self._accounts[account.user.name] = account

    def __len__(self) -> int:
        return len(self._accounts)

    def __iter__(self) -> Iterator[User]:
        return (a.user for a in self._accounts.values())

    def __contains__(self, name: object) -> bool:
        return name in self._accounts

    def get(self, name: str) -> User | None:
        account = self._accounts.get(name)
        return account.user if account else None

    def authenticate(self, name: str, secret: str) -> User | None:
        account = self._accounts.get(name) if isinstance(name, str) else None
        if not isinstance(secret, str) or len(secret) > _MAX_SECRET_CHARS:
            secret = ""  # still hashed below, so a refusal takes as long as any other
        ok = verify_secret(account.stored if account else _decoy(), secret)
        return account.user if account and ok and secret else None

    def from_bearer(self, authorization_header: str | None) -> User | None:
        """The user of an `Authorization: Bearer NAME:SECRET` header (the /metrics scrape), or None."""
        header = authorization_header
        if not header or len(header) > _MAX_HEADER_CHARS:
            return None
        scheme, _, credentials = header.strip().partition(" ")
        name, colon, secret = credentials.strip().partition(":")
        if scheme.lower() != "bearer" or not colon or not name or not secret:
            return None
        return self.authenticate(name, secret)

    def _with(self, account: _Account) -> Users:
        return Users(
            [*(a for a in self._accounts.values() if a.user.name != account.user.name), account]
        )

    def _without(self, name: str) -> Users:
        return Users(a for a in self._accounts.values() if a.user.name != name)

    def _lines(self) -> list[str]:
        return [a.line() for a in self._accounts.values()]


def parse_users(text: str, where: str) -> Users:
    """The users of a users file or of RADFLOW_CONSOLE_USERS; `where` names the source in errors.

    An error names the source and line, never the line's hash or anything that may be a secret."""
    accounts: list[_Account] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.replace(";", "\n").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split(":")
        if len(fields) != 3 or _parse_stored(fields[2].strip()) is None:
            raise ConfigError(
                f"{where}, line {number}: not `NAME:ROLE[,ROLE...]:scrypt$N$R$P$SALT$HASH`; users "
                "are written by `radflow console-users add` (a plain secret is never stored)"
            )
        name, roles_field, stored = (f.strip() for f in fields)
        try:
            check_user_name(name)
        except ConfigError:
            raise ConfigError(
                f"{where}, line {number}: the user name is not allowed (1-64 letters, digits, "
                "'.', '_', '@' or '-', starting with a letter or digit)"
            ) from None
        roles = [r.strip() for r in roles_field.split(",") if r.strip()]
        if not roles or not set(roles) <= set(ROLES):
            # The unknown word is not echoed: a secret pasted into the wrong field would be.
            raise ConfigError(
                f"{where}, line {number}: user {name!r} has an unknown or no role; roles are "
                f"{', '.join(ROLES)}"
            )
        if name in seen:
            raise ConfigError(
                f"{where}, line {number}: user {name!r} is already on line {seen[name]}; "
                "names must be unique"
            )
        seen[name] = number
        accounts.append(_Account(User(name, frozenset(roles)), stored))
    return Users(accounts)


def read_users_file(path: Path) -> Users:
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"console users file {path} does not exist: {HOW_TO_ADD}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"console users file {path} cannot be read: {exc}") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Whoever can write it can let themselves in, as a promoter.
        raise ConfigError(
            f"console users file {path} is writable by others: run `chmod 600 {path}`"
        )
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        # Readable hashes can be brute-forced offline; scrypt slows that, it does not stop it.
        log.warning(
            "console users file %s is readable by group or others: run `chmod 600 %s`", path, path
        )
    return parse_users(text, str(path))


def load_users(env: Mapping[str, str] | None = None) -> Users:
    """The console's users from RADFLOW_CONSOLE_USERS_FILE and RADFLOW_CONSOLE_USERS together;
    fails closed: without a readable source holding at least one user, the console does not start."""
    env = os.environ if env is None else env
    file_name = env.get(USERS_FILE_ENV, "").strip()
    inline = env.get(USERS_ENV, "").strip()
    accounts: list[_Account] = []
    sources = []
    if file_name:
        accounts += read_users_file(Path(file_name))._accounts.values()
        sources.append(f"file {file_name}")
    if inline:
        accounts += parse_users(inline, USERS_ENV)._accounts.values()
        sources.append(USERS_ENV)
    names = [a.user.name for a in accounts]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(
            f"console user {', '.join(map(repr, twice))} is in both {' and '.join(sources)}; "
            "names must be unique"
        )
    if not accounts:
        where = (
            f"{' and '.join(sources)} hold no user"
            if sources
            else f"neither {USERS_FILE_ENV} nor {USERS_ENV} is set"
        )
        raise ConfigError(
            f"radflow console has no users ({where}) and does not serve without sign-in: "
            f"{HOW_TO_ADD}"
        )
    _decoy()  # computed now, so that the first sign-in with an unknown name is not the slow one
    return Users(accounts)


def add_user(
    path: Path, name: str, roles: Iterable[str], secret: str, *, replace: bool = False
) -> None:
    """Add `name` with `roles` and the hash of `secret` to the users file (created owner-only)."""
    path = Path(path)
    check_user_name(name)
    found = check_roles(roles)
    if not secret or len(secret) > _MAX_SECRET_CHARS:
        raise ConfigError(
            f"console user {name!r} needs a secret of 1 to {_MAX_SECRET_CHARS} characters"
        )
    users = read_users_file(path) if path.exists() else Users()
    if name in users and not replace:
        raise ConfigError(
            f"console users file {path} already has a user {name!r}: add --replace to change its "
            f"roles and secret, or `radflow console-users remove {name}` first"
        )
    _write(path, users._with(_Account(User(name, found), hash_secret(secret))))


def remove_user(path: Path, name: str) -> None:
    path = Path(path)
    users = read_users_file(path)
    if name not in users:
        raise ConfigError(f"console users file {path} has no user {name!r}")
    _write(path, users._without(name))


def _write(path: Path, users: Users) -> None:
    header = (
        "# radflow console users: NAME:ROLE[,ROLE...]:scrypt$N$R$P$SALT$HASH "
        "(radflow console-users add/remove)\n"
    )
    text = header + "".join(f"{line}\n" for line in users._lines())
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)


# --- sessions, CSRF and throttling -------------------------------------------------------------


@dataclass
class Session:
    id: str
    user: User
    csrf: str
    created: float
    seen: float


class SessionStore:
    """Server-side sessions in memory (a restart signs everyone out); the cookie holds only the id."""

    def __init__(
        self,
        idle_s: float = 1800,
        max_age_s: float = 8 * 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.seen > self.idle_s or now - session.created > self.max_age_s

    def create(self, user: User) -> Session:
        """A new session with a new id (never a reused one: no session fixation)."""
        now = self.clock()
        for stale in [s.id for s in self._sessions.values() if self._expired(s, now)]:
            del self._sessions[stale]
        session = Session(
            id=secrets.token_urlsafe(32),
            user=user,
            csrf=secrets.token_urlsafe(32),
            created=now,
            seen=now,
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > _MAX_SESSION_ID_CHARS:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock()
        if self._expired(session, now):
            del self._sessions[session_id]
            return None
        session.seen = now
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


def check_csrf(session: Session | None, token: str | None) -> bool:
    if session is None or not token or not session.csrf:
        return False
    return hmac.compare_digest(session.csrf.encode("utf-8"), token.encode("utf-8", "replace"))


class LoginThrottle:
    """Refuses sign-in for a name after `max_failures` failed ones within `window_s` seconds."""

    _MAX_NAMES = 10_000  # names tried, kept; beyond it names without recent failures are dropped

    def __init__(
        self,
        max_failures: int = 5,
        window_s: float = 300,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, name: str, now: float) -> deque[float]:
        failures = self._failures.get(name, deque())
        while failures and now - failures[0] >= self.window_s:
            failures.popleft()
        return failures

    def blocked(self, name: str) -> float:
        """Seconds until `name` may try again; 0.0 when it may now."""
        now = self.clock()
        failures = self._recent(name, now)
        if len(failures) < self.max_failures:
            return 0.0
        return max(0.0, failures[-self.max_failures] + self.window_s - now)

    def failed(self, name: str) -> None:
        now = self.clock()
        if name not in self._failures and len(self._failures) >= self._MAX_NAMES:
            for other in [n for n in self._failures if not self._recent(n, now)]:
                del self._failures[other]
            if len(self._failures) >= self._MAX_NAMES:  # a spray of names: forget the oldest
                del self._failures[next(iter(self._failures))]
        failures = self._recent(name, now)
        failures.append(now)
        self._failures[name] = failures

    def succeeded(self, name: str) -> None:
        self._failures.pop(name, None)
