"""The console's web app: server-rendered pages (FastAPI + Jinja2, no JavaScript build) over the
registry, the runs and the audit ledger, with sign-in, roles and CSRF-checked forms.

Pages read through `views`; the two forms that change something go through the same functions as
the CLI: a review through `flows.review.submit` (one ledger row), a promotion through
`flows.registry.promote` (the same gate, change control and ledger as `radflow promote`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, Undefined, select_autoescape

from flows import console_auth as auth
from flows import review as review_edge
from flows.console import forms, views
from pipeline_steps.core.config import Params
from pipeline_steps.core.errors import (
    ConfigError,
    DataError,
    RadflowError,
    TrackingError,
)
from pipeline_steps.core.layout import Layout
from pipeline_steps.governance import review
from pipeline_steps.governance.ledger import LedgerError
from pipeline_steps.governance.lifecycle import TransitionError, UnknownVersion

log = logging.getLogger("radflow.console")
TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
LOGIN_COOKIE = "radflow_console_login"  # the sign-in form's CSRF token (before any session)
_ID = re.compile(r"^[0-9A-Za-z.]{1,64}$")  # a prediction id (ULID) or an SR's UID
SECURITY_HEADERS = {
    # Pages load only their own images, styles and the one script file; nothing may frame them.
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
# Data Docs are Great Expectations' generated pages (inline styles and handlers, data: icons), served
# from the workspace's own folder: they may run their inline code, and still load nothing remote.
DATA_DOCS_CSP = (
    "default-src 'self'; img-src 'self' data:; font-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; form-action 'none'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


class Refused(Exception):
    """A request this user may not make (403), or one without a valid session (redirect)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _status_of(exc: RadflowError) -> int:
    from flows.audit import UnknownPrediction

    if isinstance(exc, UnknownPrediction | UnknownVersion | review_edge.ImageNotKept):
        return 404
    if isinstance(exc, review.ReviewError | forms.FormError):
        return 422
    if isinstance(exc, TransitionError):
        return 409
    if isinstance(exc, TrackingError | LedgerError):
        return 503
    if isinstance(exc, DataError | ConfigError):
        return 400
    return 500


def _missing(value: Any) -> bool:
    """A figure a version did not log (absent, None, or NaN) shows as a dash."""
    if value is None or isinstance(value, Undefined):
        return True
    try:
        return float(value) != float(value)
    except (TypeError, ValueError):
        return True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def create_app(
    layout: Layout,
    params: Params,
    users: auth.Users,
    *,
    secure_cookies: bool = True,
    sessions: auth.SessionStore | None = None,
) -> FastAPI:
    """The console over one workspace. `users` signs people in; cookies are `Secure` unless
    `secure_cookies` is off (plain HTTP on a host other than loopback)."""
    sessions = sessions or auth.SessionStore()
    throttle = auth.LoginThrottle()
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v: "-" if _missing(v) else f"{100 * float(v):.1f}%"
    env.filters["num"] = lambda v, d=3: "-" if _missing(v) else f"{float(v):.{d}f}"
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="radflow console")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        session = getattr(request.state, "session", None)
        html = env.get_template(template).render(
            user=session.user if session else None,
            csrf=session.csrf if session else "",
            path=request.url.path,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def session_of(request: Request) -> auth.Session | None:
        return sessions.get(request.cookies.get(auth.SESSION_COOKIE))

    def require(request: Request, role: str = auth.VIEWER) -> auth.User:
        session = session_of(request)
        if session is None:
            raise Refused(401, "sign in first")
        request.state.session = session
        if not session.user.can(role):
            raise Refused(403, f"{session.user.name} does not hold the {role} role")
        return session.user

    async def checked_form(request: Request, role: str) -> tuple[auth.User, dict[str, str]]:
        user = require(request, role)
        data = await forms.read(request)
        if not auth.check_csrf(request.state.session, data.get("csrf")):
            raise Refused(403, "the form's CSRF token is missing or wrong: reload the page")
        return user, data

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        if request.url.path.startswith("/data-docs/"):
            response.headers.setdefault("Content-Security-Policy", DATA_DOCS_CSP)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        if exc.status == 401:
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                return RedirectResponse("/login", status_code=303)
            return PlainTextResponse("sign in first\n", status_code=401)
        log.info("refused %s %s: %s", request.method, request.url.path, exc)
        return page(request, "error.html", 403, title="Not allowed", message=str(exc))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> Response:
        where = ", ".join(str(e.get("loc", ["?"])[-1]) for e in exc.errors() if isinstance(e, dict))
        session = session_of(request)
        if session is not None:
            request.state.session = session
        message = f"malformed request: check {where or 'its parameters'}"
        return page(request, "error.html", 422, title="Cannot do that", message=message)

    @app.exception_handler(RadflowError)
    async def failed(request: Request, exc: RadflowError) -> Response:
        status = _status_of(exc)
        session = session_of(request)
        if session is not None:
            request.state.session = session
        return page(request, "error.html", status, title="Cannot do that", message=str(exc))

    # ----------------------------------------------------------------------------------------
    # Signing in

    def login_page(request: Request, status: int = 200, message: str = "") -> HTMLResponse:
        token = auth.new_token()
        response = page(request, "login.html", status, login_csrf=token, message=message)
        response.set_cookie(
            LOGIN_COOKIE, token, httponly=True, secure=secure_cookies, samesite="strict"
        )
        return response

    @app.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request) -> Response:
        return login_page(request)

    @app.post("/login")
    async def login(request: Request) -> Response:
        data = await forms.read(request)
        name, secret = data.get("name", ""), data.get("secret", "")
        cookie = request.cookies.get(LOGIN_COOKIE)
        if not cookie or not auth.check_csrf(_Csrf(cookie), data.get("csrf")):
            return login_page(request, 403, "The sign-in form expired: try again.")
        wait = throttle.blocked(name)
        if wait > 0:
            return login_page(request, 429, f"Too many failed sign-ins: wait {wait:.0f} s.")
        user = users.authenticate(name, secret)
        if user is None:
            throttle.failed(name)
            log.info("sign-in refused for a user name")  # the name may be mistyped PHI-free text
            return login_page(request, 401, "Wrong name or password.")
        throttle.succeeded(name)
        session = sessions.create(user)
        log.info("%s signed in", user.name)
        response = RedirectResponse("/models", status_code=303)
        response.set_cookie(
            auth.SESSION_COOKIE,
            session.id,
            httponly=True,
            secure=secure_cookies,
            samesite="strict",
        )
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        _, _ = await checked_form(request, auth.VIEWER)
        sessions.end(request.state.session.id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(auth.SESSION_COOKIE)
        return response

    # ----------------------------------------------------------------------------------------
    # Pages

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/")
    async def home(request: Request) -> Response:
        require(request)
        return RedirectResponse("/models", status_code=303)

    @app.get("/models", response_class=HTMLResponse)
    def models(request: Request, at: str | None = None) -> Response:
        require(request)
        moment = views.parse_time(at)
        return page(request, "models.html", **views.models_page(layout, params, moment))

    @app.get("/versions/{version}", response_class=HTMLResponse)
    def version(request: Request, version: str) -> Response:
        require(request)
        return page(request, "version.html", v=views.version_page(layout, params, version))

    @app.get("/versions/{version}/plots/{name}.png")
    def plot(request: Request, version: str, name: str) -> Response:
        require(request)
        if name not in views.PLOTS:
            return PlainTextResponse(f"no plot {name!r}\n", status_code=404)
        blob = views.version_artifact(layout, params, version, views.PLOTS[name])
        if blob is None:
            return PlainTextResponse("this version logged no such plot\n", status_code=404)
        return Response(blob, media_type="image/png")

    @app.get("/data-docs/{path:path}")
    def data_docs(request: Request, path: str) -> Response:
        """The workspace's Data Docs (generated offline-ready by the validate stage), behind the
        same sign-in as every page; only files inside their folder."""
        require(request)
        root = layout.data_docs.resolve()
        target = (root / (path or "index.html")).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            return PlainTextResponse("no such Data Docs file\n", status_code=404)
        return FileResponse(target)

    @app.get("/versions/{version}/model-card")
    def model_card(request: Request, version: str) -> Response:
        require(request)
        blob = views.version_artifact(layout, params, version, views.MODEL_CARD_HTML)
        if blob is None:
            return PlainTextResponse("this version has no model card\n", status_code=404)
        # The card is radflow's own page; sandboxed all the same, as any logged artifact.
        return HTMLResponse(
            blob,
            headers={
                "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'"
            },
        )

    @app.post("/versions/{version}/promote")
    async def promote(request: Request, version: str) -> Response:
        from flows import registry

        user, data = await checked_form(request, auth.PROMOTER)
        to_stage = data.get("to", "")
        reason = data.get("reason", "").strip()
        if to_stage not in forms.PROMOTE_TO:
            raise forms.FormError(f"promote to one of {', '.join(forms.PROMOTE_TO)}")
        if not reason:
            raise forms.FormError("a promotion needs a reason; it is kept in the audit ledger")
        with registry.governance(layout, params) as (reg, ledger):
            done = registry.promote(
                reg,
                ledger,
                version,
                to_stage,
                actor=user.name,
                reason=reason,
                allowed=forms.PROMOTE_TO,
            )
        log.info("%s promoted version %s to %s", user.name, version, to_stage)
        return RedirectResponse(f"/versions/{version}?moved={done.transition_id}", status_code=303)

    @app.get("/predictions/{prediction_id}", response_class=HTMLResponse)
    def prediction(request: Request, prediction_id: str) -> Response:
        require(request)
        _check_id(prediction_id)
        return page(request, "trace.html", p=views.trace_page(layout, params, prediction_id))

    @app.get("/predictions/{prediction_id}/image.png")
    def image(request: Request, prediction_id: str) -> Response:
        require(request)
        _check_id(prediction_id)
        with review_edge.open_ledger(layout.root) as ledger:
            entry = review_edge.prediction_entry(ledger, prediction_id)
        rendered = review_edge.render(layout, params, entry)
        return Response(rendered.png, media_type="image/png")

    @app.post("/predictions/{prediction_id}/review")
    async def submit_review(request: Request, prediction_id: str) -> Response:
        user, data = await checked_form(request, auth.REVIEWER)
        _check_id(prediction_id)
        parsed = forms.parse_review(data)
        entry = review_edge.submit(
            layout,
            params,
            prediction_id,
            reviewer=user.name,
            verdicts=parsed.verdicts,
            corrections=parsed.corrections,
            missed=parsed.missed,
            reviewed_at=_now(),
        )
        log.info("%s reviewed a prediction (ledger row %d)", user.name, entry.seq)
        after = data.get("next", "")
        target = after if after.startswith("/review") else f"/predictions/{prediction_id}"
        return RedirectResponse(target, status_code=303)

    @app.get("/ledger", response_class=HTMLResponse)
    def ledger(request: Request, kind: str | None = None, page_no: int = 0) -> Response:
        require(request)
        return page(request, "ledger.html", **views.ledger_page(layout, kind, max(0, page_no)))

    @app.get("/review", response_class=HTMLResponse)
    def review_queue(
        request: Request, page_no: int = 0, pending: int = 0, per_page: int = views.PAGE_SIZE
    ) -> Response:
        require(request)
        queue = views.queue_page(layout, max(0, page_no), bool(pending), per_page)
        return page(request, "queue.html", **queue)

    @app.get("/monitoring", response_class=HTMLResponse)
    def monitoring(request: Request) -> Response:
        require(request)
        return page(request, "monitoring.html", **views.monitoring_page(layout))

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        if users.from_bearer(request.headers.get("authorization")) is None:
            require(request)
        text = review.prometheus_text(review_edge.monitoring(layout))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


class _Csrf:
    """The sign-in form's token, shaped as auth.check_csrf expects a session."""

    def __init__(self, token: str) -> None:
        self.csrf = token


def _check_id(prediction_id: str) -> None:
    if not _ID.match(prediction_id):
        raise forms.FormError("a prediction id is letters and digits (a ULID) or an SR UID")
