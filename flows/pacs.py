"""The PACS edge: DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) through `dicomweb-client`.

Where the PACS is and how radflow signs in come from the environment, never from `params.yaml`:

- `RADFLOW_PACS_URL`: the DICOMweb base URL, e.g. `http://127.0.0.1:8042/dicom-web` (Orthanc).
- `RADFLOW_PACS_USER` with `RADFLOW_PACS_PASSWORD` (or `RADFLOW_PACS_PASSWORD_FILE`): HTTP basic auth.
- `RADFLOW_PACS_TOKEN` (or `RADFLOW_PACS_TOKEN_FILE`): a bearer token instead, for a PACS behind an
  OAuth proxy.

Secrets fail closed: a user without a password, credentials written into the URL, or an unreadable
secret file is an error naming the variable, before anything is asked of the PACS. Error messages
name the PACS by its URL without credentials; the password and token are never logged.

Every request has a timeout. Connection failures are retried by the HTTP session (urllib3's backoff),
and the answers a server gives when it is busy (429, 408, 503, 504) by dicomweb-client's own retries;
what still fails becomes `PacsUnavailable`, a refused sign-in `PacsAuthError`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pipeline_steps.core.errors import ConfigError, RadflowError

ENV_URL = "RADFLOW_PACS_URL"
ENV_USER = "RADFLOW_PACS_USER"
ENV_PASSWORD = "RADFLOW_PACS_PASSWORD"
ENV_TOKEN = "RADFLOW_PACS_TOKEN"
FILE_SUFFIX = "_FILE"  # RADFLOW_PACS_PASSWORD_FILE, RADFLOW_PACS_TOKEN_FILE: the secret in a file

T = TypeVar("T")
# Loggers that quote request URLs (study, series and instance UIDs) at WARNING and below.
URL_LOGGERS = ("dicomweb_client", "urllib3")


class PacsConfigError(ConfigError):
    """The PACS settings are missing or unsafe; nothing was asked of the PACS."""


class PacsAuthError(ConfigError):
    """The PACS refused radflow's credentials."""


class PacsUnavailable(RadflowError):
    """The PACS did not answer, or answered with a server error, after the retries."""


class PacsRequestError(RadflowError):
    """The PACS refused a request for a reason other than credentials (e.g. 400, 404, 409)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PacsSettings:
    url: str  # the DICOMweb base, without credentials or a trailing slash
    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    timeout_s: float = 30.0  # per request (connect and read)
    attempts: int = 4  # per request, with exponential backoff
    backoff_s: float = 0.5  # the first retry's delay; doubles

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        timeout_s: float = 30.0,
        attempts: int = 4,
        backoff_s: float = 0.5,
    ) -> PacsSettings:
        env = os.environ if env is None else env
        url = env.get(ENV_URL, "").strip().rstrip("/")
        if not url:
            raise PacsConfigError(
                f"no PACS configured: set {ENV_URL} to its DICOMweb base URL "
                "(Orthanc: http://HOST:8042/dicom-web), with "
                f"{ENV_USER} and {ENV_PASSWORD} (or {ENV_PASSWORD}{FILE_SUFFIX}) when it needs a sign-in"
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsConfigError(
                f"{ENV_URL} must be an http(s) URL, e.g. http://HOST:8042/dicom-web"
            )
        if parts.username or parts.password:
            raise PacsConfigError(
                f"{ENV_URL} holds credentials; give them in {ENV_USER} and {ENV_PASSWORD} instead, "
                "so they never appear where the URL is shown"
            )
        user = env.get(ENV_USER, "").strip()
        password = _secret(env, ENV_PASSWORD)
        token = _secret(env, ENV_TOKEN)
        if user and not password:
            raise PacsConfigError(
                f"{ENV_USER} is set but neither {ENV_PASSWORD} nor {ENV_PASSWORD}{FILE_SUFFIX}: "
                "radflow does not try a PACS sign-in without a password"
            )
        if password and not user:
            raise PacsConfigError(f"{ENV_PASSWORD} is set without {ENV_USER}")
        if token and user:
            raise PacsConfigError(f"set either {ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN}, not both")
        return cls(url, user, password, token, timeout_s, max(1, attempts), max(0.0, backoff_s))

    @property
    def auth(self) -> str:
        """How radflow signs in, without the secret (for logs and summaries)."""
        if self.user:
            return f"basic ({self.user})"
        return "bearer token" if self.token else "none"


def _secret(env: Mapping[str, str], name: str) -> str:
    direct = env.get(name, "")
    path = env.get(name + FILE_SUFFIX, "").strip()
    if direct and path:
        raise PacsConfigError(f"set {name} or {name}{FILE_SUFFIX}, not both")
    if not path:
        return direct
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PacsConfigError(
            f"{name}{FILE_SUFFIX}: cannot read the secret file ({type(exc).__name__})"
        ) from None


def _session(settings: PacsSettings) -> Any:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    # Connection-level failures only (refused, reset, DNS); HTTP statuses are dicomweb-client's.
    retry = Retry(
        total=settings.attempts - 1,
        connect=settings.attempts - 1,
        read=settings.attempts - 1,
        status=0,
        backoff_factor=settings.backoff_s,
        allowed_methods=None,  # STOW-RS too: storing the same SOP instance twice changes nothing
        raise_on_status=False,
    )
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if settings.user:
        session.auth = (settings.user, settings.password)
    elif settings.token:
        session.headers["Authorization"] = f"Bearer {settings.token}"
    session.trust_env = (
        False  # no proxy or .netrc credentials from elsewhere: loopback stays loopback
    )
    return session


class Pacs:
    """One PACS over DICOMweb. Every call raises `PacsAuthError`, `PacsUnavailable` or
    `PacsRequestError` with the PACS named by its URL, never a bare `requests` exception."""

    def __init__(self, settings: PacsSettings) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.settings = settings
        self.client = DICOMwebClient(
            settings.url, session=_session(settings), timeout=settings.timeout_s
        )
        self.client.set_http_retry_params(
            retry=settings.attempts > 1,
            max_attempts=settings.attempts,
            wait_exponential_multiplier=max(1, int(settings.backoff_s * 1000)),
        )

    @classmethod
    def from_env(cls, **kwargs: Any) -> Pacs:
        return cls(PacsSettings.from_env(**kwargs))

    @property
    def url(self) -> str:
        return self.settings.url

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one dicomweb-client call, turning its failures into radflow's errors."""
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            raise self._http_error(what, status) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PacsUnavailable(
                f"the PACS at {self.url} ({ENV_URL}) did not answer {what} after "
                f"{self.settings.attempts} attempts ({type(exc).__name__})"
            ) from None
        except requests.RequestException as exc:
            raise PacsUnavailable(
                f"{what} at the PACS {self.url} failed ({type(exc).__name__})"
            ) from None

    def _http_error(self, what: str, status: int) -> RadflowError:
        if status in (401, 403):
            settings = (
                f"{ENV_USER} and {ENV_PASSWORD}"
                if self.settings.user
                else ENV_TOKEN
                if self.settings.token
                else f"{ENV_USER} and {ENV_PASSWORD} (none are set)"
            )
            return PacsAuthError(
                f"the PACS at {self.url} refused {what} with HTTP {status}: check {settings}"
            )
        if status >= 500 or status in (408, 429):
            return PacsUnavailable(
                f"the PACS at {self.url} answered {what} with HTTP {status} after "
                f"{self.settings.attempts} attempts"
            )
        return PacsRequestError(f"the PACS at {self.url} refused {what} with HTTP {status}", status)

    def check(self) -> None:
        """One cheap QIDO-RS query: raises unless the PACS answers and accepts the credentials."""
        self.call("a study search", self.client.search_for_studies, limit=1)

    def search_studies(
        self, filters: Mapping[str, Any] | None = None, fields: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        return self._all_pages(
            "a study search",
            self.client.search_for_studies,
            search_filters=dict(filters or {}),
            fields=list(fields) or None,
        )

    def search_instances(self, study_uid: str, fields: Sequence[str] = ()) -> list[dict[str, Any]]:
        return self._all_pages(
            "an instance search",
            self.client.search_for_instances,
            study_instance_uid=study_uid,
            fields=list(fields) or None,
        )

    def _all_pages(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> list[dict[str, Any]]:
        """Every result of a QIDO-RS search, page by page (offset), until a page is empty or brings
        nothing new. dicomweb-client's own `get_remaining` stops only at an empty page, and Orthanc
        ignores the offset of a search it filters itself (ModalitiesInStudy): that loops forever."""
        results: list[dict[str, Any]] = []
        seen: set[str] = set()
        while True:
            page = self.call(what, fn, offset=len(results), **kwargs)
            fresh = []
            for item in page:
                identity = json.dumps(item, sort_keys=True)
                if identity not in seen:
                    seen.add(identity)
                    fresh.append(item)
            if not fresh:
                return results
            results.extend(fresh)

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> Any:
        """One instance, as a pydicom Dataset (WADO-RS, application/dicom)."""
        return self.call(
            "an instance retrieve", self.client.retrieve_instance, study_uid, series_uid, sop_uid
        )

    def store(self, datasets: Sequence[Any], study_uid: str | None = None) -> Any:
        """STOW-RS; returns the PACS's response dataset (Referenced/Failed SOP Sequence)."""
        return self.call(
            "a store", self.client.store_instances, list(datasets), study_instance_uid=study_uid
        )


@contextmanager
def urls_unlogged() -> Iterator[None]:
    """Silence the HTTP libraries' own loggers while DICOMweb requests run: their lines quote
    request URLs, which name studies, series and instances."""
    loggers = [logging.getLogger(name) for name in URL_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def json_value(item: Mapping[str, Any], tag: str, default: str = "") -> str:
    """The first value of a DICOM JSON attribute (QIDO-RS answers) as text; `tag` as 8 hex digits."""
    element = item.get(tag.upper()) or item.get(tag.lower()) or {}
    values = element.get("Value") or ()
    if not values:
        return default
    first = values[0]
    if isinstance(first, Mapping):  # a person name: {"Alphabetic": ...}
        return str(first.get("Alphabetic", default))
    return str(first)
