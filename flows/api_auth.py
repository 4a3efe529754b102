"""Bearer tokens of `radflow serve-api`: salted hashes at rest, constant-time checks, and the rule
that a server without tokens does not start (unless told to serve loopback without authentication).

A token file holds one line per token, `NAME sha256$SALT$DIGEST` (hex; `#` starts a comment), written
by `radflow api-token add NAME`, which prints the token once. `RADFLOW_API_TOKENS` may hold the same
entries (one per line, or separated by `;`), e.g. from a Kubernetes secret. Only hashes are ever
stored: a leaked file or environment does not give a usable token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline_steps.core.errors import ConfigError
from pipeline_steps.core.files import atomic_path

TOKENS_FILE_ENV = "RADFLOW_API_TOKENS_FILE"
TOKENS_ENV = "RADFLOW_API_TOKENS"
DOCS_ENV = "RADFLOW_API_DOCS"
SCHEME = "sha256"
TOKEN_PREFIX = "rfapi_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_ENTRY = re.compile(r"^sha256\$([0-9a-f]{32})\$([0-9a-f]{64})$")
_MAX_HEADER_CHARS = 512  # a token is ~50 characters; longer headers are refused unhashed
HOW_TO_ADD = (
    f"create one with `radflow api-token add NAME --file FILE` and point {TOKENS_FILE_ENV} "
    "(or serve-api --tokens-file) at FILE"
)


@dataclass(frozen=True)
class TokenHash:
    """One accepted token, as stored: its name and the salted SHA-256 of the token."""

    name: str
    salt: bytes
    digest: bytes

    def line(self) -> str:
        return f"{self.name} {SCHEME}${self.salt.hex()}${self.digest.hex()}"


def _digest(salt: bytes, token: str) -> bytes:
    # Tokens are 256 random bits: a salted fast hash is enough (nothing to brute-force), and it
    # keeps each request's check in microseconds where a password KDF would cost ~50 ms.
    return hmac.new(salt, token.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(name: str, token: str, salt: bytes | None = None) -> TokenHash:
    check_name(name)
    salt = secrets.token_bytes(16) if salt is None else salt
    return TokenHash(name, salt, _digest(salt, token))


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(
            f"API token name {name!r} is not allowed: use 1-64 letters, digits, '.', '_', '@' or "
            "'-', starting with a letter or digit"
        )
    return name


def parse_entries(text: str, where: str) -> list[TokenHash]:
    """The entries of a token file or of RADFLOW_API_TOKENS; `where` names the source in errors.

    An error names the source and line, never the line's content (it may be a pasted token)."""
    found: list[TokenHash] = []
    lines = text.replace(";", "\n").splitlines()
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        entry = _ENTRY.match(parts[-1]) if len(parts) == 2 else None
        if entry is None or not _NAME.match(parts[0]):
            raise ConfigError(
                f"{where}, entry {number}: not `NAME sha256$SALT$DIGEST`; a token file is written "
                "by `radflow api-token add NAME --file FILE` (a plain token is never stored)"
            )
        found.append(TokenHash(parts[0], bytes.fromhex(entry[1]), bytes.fromhex(entry[2])))
    names = [t.name for t in found]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a token name appears twice; names must be unique")
    return found


def read_token_file(path: Path) -> list[TokenHash]:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"API token file {path} does not exist: {HOW_TO_ADD.split(' and ')[0]}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"API token file {path} cannot be read: {exc}") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Whoever can write it can let themselves in.
        raise ConfigError(f"API token file {path} is writable by others: run `chmod 600 {path}`")
    return parse_entries(text, str(path))


def add_token(path: Path, name: str) -> str:
    """Append a new token's hash to `path` (created owner-only); returns the token itself."""
    check_name(name)
    existing = read_token_file(path) if path.exists() else []
    if any(t.name == name for t in existing):
        raise ConfigError(
            f"API token file {path} already has a token named {name!r}: revoke it first "
            f"(`radflow api-token revoke {name} --file {path}`) or choose another name"
        )
    token = new_token()
    _write(path, [*existing, hash_token(name, token)])
    return token


def revoke_token(path: Path, name: str) -> None:
    existing = read_token_file(path)
    kept = [t for t in existing if t.name != name]
    if len(kept) == len(existing):
        raise ConfigError(f"API token file {path} has no token named {name!r}")
    _write(path, kept)


def _write(path: Path, entries: Iterable[TokenHash]) -> None:
    text = "".join(f"{t.line()}\n" for t in entries)
    header = "# radflow serve-api tokens: NAME sha256$SALT$DIGEST (radflow api-token add/revoke)\n"
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(header + text)


class TokenCheck:
    """Checks an `Authorization` header against every stored hash, in constant time per entry."""

    def __init__(self, tokens: Iterable[TokenHash]) -> None:
        self.tokens = tuple(tokens)
        if not self.tokens:
            raise ValueError("a TokenCheck needs at least one token")

    def verify(self, authorization: str | None) -> str | None:
        """The name of the token presented as `Bearer TOKEN`, or None."""
        if not authorization or len(authorization) > _MAX_HEADER_CHARS:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        matched = None
        for entry in self.tokens:  # no early exit: the time does not tell which entry matched
            if hmac.compare_digest(_digest(entry.salt, token), entry.digest):
                matched = entry.name
        return matched


@dataclass(frozen=True)
class ApiSecurity:
    """How serve-api authenticates: a token check, or none (development on loopback only)."""

    check: TokenCheck | None
    docs: bool
    source: str  # where the tokens came from, for the start-up log (never the tokens)

    @property
    def auth_disabled(self) -> bool:
        return self.check is None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def resolve_security(
    host: str,
    *,
    tokens_file: str | None,
    insecure_no_auth: bool,
    docs: bool,
    environ: Mapping[str, str] | None = None,
) -> ApiSecurity:
    """The server's authentication from its options and environment; fails closed.

    Tokens come from `tokens_file` (else RADFLOW_API_TOKENS_FILE) and RADFLOW_API_TOKENS together.
    Without any, the server does not start, unless `insecure_no_auth` on a loopback `host`."""
    env = os.environ if environ is None else environ
    docs = docs or truthy(env.get(DOCS_ENV))
    if insecure_no_auth:
        if not is_loopback(host):
            raise ConfigError(
                f"--insecure-no-auth serves without authentication and is for loopback only; "
                f"--host {host} is not a loopback address (use 127.0.0.1, or configure tokens: "
                f"{HOW_TO_ADD})"
            )
        return ApiSecurity(None, docs, "none (--insecure-no-auth)")
    tokens: list[TokenHash] = []
    sources = []
    file_name = tokens_file or env.get(TOKENS_FILE_ENV, "").strip()
    if file_name:
        tokens += read_token_file(Path(file_name))
        sources.append(f"file {file_name}")
    if env.get(TOKENS_ENV, "").strip():
        tokens += parse_entries(env[TOKENS_ENV], TOKENS_ENV)
        sources.append(TOKENS_ENV)
    if len({t.name for t in tokens}) != len(tokens):
        raise ConfigError(
            f"the same token name is in {' and '.join(sources)}; names must be unique"
        )
    if not tokens:
        where = (
            f"{' and '.join(sources)} hold none"
            if sources
            else f"neither {TOKENS_FILE_ENV} nor {TOKENS_ENV} is set"
        )
        raise ConfigError(
            f"serve-api has no API tokens ({where}) and does not serve without "
            f"authentication: {HOW_TO_ADD}; clients send `Authorization: Bearer TOKEN`. "
            "For development on this machine only, --insecure-no-auth serves loopback without it"
        )
    return ApiSecurity(TokenCheck(tokens), docs, " and ".join(sources))
