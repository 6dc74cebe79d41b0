"""The console's sign-in for people: pages under /console, server-rendered (Jinja2), served by the API.

    GET  /console/sign-in    the form          POST /console/sign-in   username + password: a session
    POST /console/sign-out   ends it           GET|POST /console/password   change one's password
    GET  /console/           who is signed in, and their role

Accounts are made by `outreach user create NAME --role ROLE` (the first org admin) and live in the API's store
(store.py) with Argon2id password hashes. A session is a server-side record: its random id is only in an
HttpOnly, SameSite=Lax cookie (`Secure` with OUTREACH_CONSOLE_HTTPS), and it ends OUTREACH_CONSOLE_SESSION_HOURS
after sign-in or OUTREACH_CONSOLE_IDLE_MINUTES after its last request. Every unsafe request carries the
session's CSRF token (a hidden `csrf_token` field, or an `X-CSRF-Token` header); the sign-in form, which has no
session yet, carries a token that must match its own cookie (double submit). Sign-in throttle: LOCK_FAILURES
failures of one (username, client address) pair within LOCK_WINDOW lock that pair for LOCK_DURATION; every
refusal says the same thing, so no answer tells whether a name exists or a pair is locked. A user acts as
`user:NAME` (Principal.name: issued_by of commands, the audit log).
"""
from __future__ import annotations

import asyncio
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from services.api.console import policy
from services.api.passwords import MIN_PASSWORD_LENGTH, password_problem, verify_password
from services.api.store import ApiStore, Principal, SessionInfo
from services.common.settings import Settings

HERE = Path(__file__).parent
PREFIX = "/console"
SESSION_COOKIE = "outreach_console_session"
SIGN_IN_COOKIE = "outreach_console_sign_in"  # the sign-in form's CSRF token (no session yet)
SIGN_IN_FORM_LIFETIME = timedelta(hours=1)
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

LOCK_FAILURES = 5
LOCK_WINDOW = timedelta(minutes=15)
LOCK_DURATION = timedelta(minutes=15)
# last_seen_at is written at most this often (not on every request): the idle timeout is this much coarser.
TOUCH_EVERY = timedelta(seconds=30)

SIGN_IN_REFUSED = ("Sign-in failed: the username or password is wrong, or sign-in is paused for a while after "
                   "repeated failures.")
# Pages are the console's own: no framing, no outside resources, forms post only here, nothing cached.
PAGE_HEADERS = {"Cache-Control": "no-store",
                "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; "
                                           "base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}

templates = Jinja2Templates(directory=HERE / "templates")


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class ConsoleConfig:
    """The console's settings, and its clock (`now`: tests move time forward)."""
    session_lifetime: timedelta
    idle_timeout: timedelta
    https: bool
    now: Callable[[], datetime] = field(default=_utc_now)

    @classmethod
    def from_settings(cls, settings: Settings) -> ConsoleConfig:
        return cls(session_lifetime=timedelta(hours=settings.console_session_hours),
                   idle_timeout=timedelta(minutes=settings.console_idle_minutes), https=settings.console_https)


@dataclass(frozen=True)
class ConsoleSession:
    session_id: str
    info: SessionInfo

    @property
    def principal(self) -> Principal:
        """Who the user's commands and changes are issued by: `user:NAME`, with the account's role."""
        return Principal(name=self.info.principal, role=self.info.role, token_id="")  # type: ignore[arg-type]


class ConsoleRefused(Exception):
    """An unsafe request without a valid CSRF token or session: answered with a page, not JSON."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code, self.message = status_code, message


class SignInRequired(Exception):
    """A page that needs a session, asked without one: redirected to the sign-in form."""


def _config(request: Request) -> ConsoleConfig:
    return request.app.state.console


def _store(request: Request) -> ApiStore:
    return request.app.state.store


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


async def current_session(request: Request) -> ConsoleSession | None:
    """The request's live session, or None (no cookie, unknown, expired, idle too long, account disabled)."""
    if hasattr(request.state, "console_session"):
        return request.state.console_session
    found = None
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        store, config = _store(request), _config(request)
        info = await asyncio.to_thread(store.session, session_id)
        now = config.now()
        if info is not None:
            last_seen = _parse(info.last_seen_at)
            if now >= _parse(info.expires_at) or now - last_seen >= config.idle_timeout:
                await asyncio.to_thread(store.end_session, session_id)
            else:
                if now - last_seen >= TOUCH_EVERY:
                    await asyncio.to_thread(store.touch_session, session_id, now)
                found = ConsoleSession(session_id, info)
    request.state.console_session = found
    return found


def _token_matches(supplied: object, expected: str | None) -> bool:
    return isinstance(supplied, str) and bool(expected) and hmac.compare_digest(supplied.encode(), expected.encode())


async def csrf_guard(request: Request) -> None:
    """Every unsafe request to the console: the session's CSRF token (the sign-in form: its cookie's)."""
    if request.method not in UNSAFE_METHODS:
        return
    supplied = request.headers.get(CSRF_HEADER)
    if supplied is None:
        supplied = (await request.form()).get("csrf_token")
    if request.url.path == f"{PREFIX}/sign-in":
        if not _token_matches(supplied, request.cookies.get(SIGN_IN_COOKIE)):
            raise ConsoleRefused(403, "The sign-in form was stale or did not come from this console: sign in "
                                      "again from a fresh form.")
        return
    session = await current_session(request)
    if session is None:
        raise ConsoleRefused(403, "Your session has ended: sign in again.")
    if not _token_matches(supplied, session.info.csrf_token):
        raise ConsoleRefused(403, "The form was stale or did not come from this console: reload the page and "
                                  "try again.")


async def signed_in(request: Request) -> ConsoleSession:
    session = await current_session(request)
    if session is None:
        raise SignInRequired
    return session


SignedIn = Annotated[ConsoleSession, Depends(signed_in)]


def console_router() -> APIRouter:
    """A router for console pages: under /console, outside the OpenAPI document, every unsafe request
    CSRF-checked. Each screen module (campaigns.py, campaign_view.py, ...) has one; `mount` includes them."""
    return APIRouter(prefix=PREFIX, include_in_schema=False, dependencies=[Depends(csrf_guard)])


router = console_router()


def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    session = getattr(request.state, "console_session", None)
    return templates.TemplateResponse(request, template, {"session": session, "prefix": PREFIX,
                                                          "may_see": policy.may_see, **context},
                                      status_code=status_code, headers=PAGE_HEADERS)


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: timedelta) -> None:
    response.set_cookie(name, value, max_age=int(max_age.total_seconds()), path=PREFIX, httponly=True,
                        samesite="lax", secure=_config(request).https)


def _see_other(path: str) -> RedirectResponse:
    return RedirectResponse(PREFIX + path, status_code=303, headers={"Cache-Control": "no-store"})


def _sign_in_page(request: Request, status_code: int = 200, error: str | None = None,
                  username: str = "") -> HTMLResponse:
    form_token = request.cookies.get(SIGN_IN_COOKIE) or secrets.token_urlsafe(32)
    response = page(request, "sign_in.html", status_code, csrf_token=form_token, error=error, username=username)
    _set_cookie(request, response, SIGN_IN_COOKIE, form_token, SIGN_IN_FORM_LIFETIME)
    return response


@router.get("/sign-in")
async def sign_in_form(request: Request) -> Response:
    if await current_session(request) is not None:
        return _see_other("/")
    return _sign_in_page(request)


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    form = await request.form()
    # A name longer than any account's is cut: the throttle keeps it (for 15 minutes) at a bounded size.
    username, password = str(form.get("username") or "").strip()[:100], str(form.get("password") or "")
    store, config, client = _store(request), _config(request), _client(request)
    now = config.now()
    if not username or not password:
        return _sign_in_page(request, 403, SIGN_IN_REFUSED, username)
    if await asyncio.to_thread(store.sign_in_locked, username, client, now):
        await asyncio.to_thread(verify_password, None, password)  # as long as any other refusal
        return _sign_in_page(request, 403, SIGN_IN_REFUSED, username)
    user = await asyncio.to_thread(store.check_password, username, password)
    if user is None:
        await asyncio.to_thread(store.record_sign_in_failure, username, client, now, limit=LOCK_FAILURES,
                                window=LOCK_WINDOW, lock_for=LOCK_DURATION)
        return _sign_in_page(request, 403, SIGN_IN_REFUSED, username)
    await asyncio.to_thread(store.clear_sign_in_failures, username, client)
    previous = request.cookies.get(SESSION_COOKIE)
    if previous:  # a new id at every sign-in: a session id planted before it is worth nothing after
        await asyncio.to_thread(store.end_session, previous)
    session_id, _ = await asyncio.to_thread(store.create_session, user.username, now, config.session_lifetime)
    response = _see_other("/")
    _set_cookie(request, response, SESSION_COOKIE, session_id, config.session_lifetime)
    response.delete_cookie(SIGN_IN_COOKIE, path=PREFIX, httponly=True, samesite="lax", secure=config.https)
    return response


@router.post("/sign-out")
async def sign_out(request: Request, session: SignedIn) -> Response:
    await asyncio.to_thread(_store(request).end_session, session.session_id)
    response = _see_other("/sign-in")
    response.delete_cookie(SESSION_COOKIE, path=PREFIX, httponly=True, samesite="lax", secure=_config(request).https)
    return response


@router.get("/")
async def home(request: Request, session: SignedIn) -> Response:
    return page(request, "home.html")


@router.get("/password")
async def password_form(request: Request, session: SignedIn) -> Response:
    return page(request, "password.html", min_length=MIN_PASSWORD_LENGTH)


@router.post("/password")
async def change_password(request: Request, session: SignedIn) -> Response:
    form = await request.form()
    current, new, again = (str(form.get(name) or "") for name in ("current_password", "new_password",
                                                                   "new_password_again"))
    store = _store(request)

    def refused(status_code: int, error: str) -> HTMLResponse:
        return page(request, "password.html", status_code, min_length=MIN_PASSWORD_LENGTH, error=error)

    if await asyncio.to_thread(store.check_password, session.info.username, current) is None:
        return refused(403, "The current password is wrong.")
    if new != again:
        return refused(422, "The two new passwords differ.")
    if new == current:
        return refused(422, "The new password is the current one.")
    problem = password_problem(new)
    if problem:
        return refused(422, f"The new password is refused: {problem}.")
    await asyncio.to_thread(store.set_password, session.info.username, new, changed_by=session.info.principal,
                            keep_session=session.session_id)
    return page(request, "password.html", min_length=MIN_PASSWORD_LENGTH,
                done="Password changed. Your other sessions are signed out.")


def mount(app: FastAPI, settings: Settings) -> None:
    """The console on `app`: its routes, its static files, its two refusals answered as pages."""
    # they import this module
    from services.api.console import campaign_view, campaigns, new_campaign, people, test_send

    app.state.console = ConsoleConfig.from_settings(settings)
    app.include_router(router)
    for screens in (campaigns, new_campaign, campaign_view, people, test_send):
        app.include_router(screens.router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="console-static")

    @app.exception_handler(ConsoleRefused)
    async def refused(request: Request, exc: ConsoleRefused) -> HTMLResponse:
        return page(request, "refused.html", exc.status_code, message=exc.message)

    @app.exception_handler(SignInRequired)
    async def sign_in_required(_: Request, __: SignInRequired) -> RedirectResponse:
        return _see_other("/sign-in")
