"""Opt-outs, channel settings, users, the audit log, and the operational view (operations' only screen).

    GET  /console/users                       the accounts the role manages, and the form that creates one
    POST /console/users                       create one (username, role, initial password)
    POST /console/users/{username}/disable    and /enable: a disabled account's sessions end at once
    GET  /console/settings                    each channel's provider and credentials (secrets: set / not set)
    POST /console/settings/{channel}          replace them: the code of the API's PUT /settings/channels/...
    GET  /console/audit[?after=CURSOR]        account and settings changes, newest first, keyset-paged
    GET  /console/operations                  what `outreach status` reports, as tables
    GET  /console/opt-outs?channel=&q=        a channel's opt-out list (searched, Older / Newer pages), the add form
    POST /console/opt-outs                    add a destination by hand (the code of the API's POST /opt-outs)
    GET  /console/opt-outs/remove?channel=&destination=   org admin: the removal's confirmation, with its reason
    POST /console/opt-outs/remove             remove it (the code of POST /opt-outs/remove)

Every route checks the signed-in person's role itself (policy.py): a section the role may not see is refused
with the 403 page whatever link led there. Every change is made as that person (`user:NAME`) through the code
the CLI and the HTTP API use (store.py: `outreach user ...`; settings_routes.py: PUT /settings/channels;
opt_outs.py: POST /opt-outs and /opt-outs/remove), and that code writes the audit log.
"""
from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import TypeAdapter, ValidationError

from schemas.internal import MAX_OPT_OUT_REASON_CHARS
from services.api import idempotency
from services.api.channel_settings import environment_credentials
from services.api.commands import BrokerUnavailable
from services.api.console import policy
from services.api.console.routes import ConsoleRefused, ConsoleSession, SignedIn, console_router, page
from services.api.models import EmailChannelSettingsBody, SmsChannelSettingsBody
from services.api.opt_outs import change_opt_out, normalised_destination, opt_out_page, source_in_words
from services.api.passwords import MIN_PASSWORD_LENGTH, password_problem
from services.api.settings_routes import replace_channel_settings
from services.api.store import ROLES, ApiStore, CredentialsUnreadable, UserInfo
from services.common import safe_defaults
from services.common.channel_settings import CHANNELS, PROVIDERS
from services.common.settings import Settings
from services.common.stack_status import STATES, gather

router = console_router()

SECTION_NAMES = {"campaigns": "campaigns", "opt_outs": "opt-outs", "settings": "channel settings",
                 "users": "users", "audit": "the audit log", "operations": "the operations view"}
ROLE_NAMES = {"org_admin": "Org admin", "admin": "Admin", "campaigner": "Campaigner", "operations": "Operations"}


def _store(request: Request) -> ApiStore:
    return request.app.state.store


def require(session: ConsoleSession, section: policy.Section) -> None:
    """Refuse (403 page) a section the signed-in person's role may not see (policy.SECTIONS)."""
    if not policy.may_see(session.info.role, section):
        raise ConsoleRefused(403, f"Your role ({ROLE_NAMES.get(session.info.role, session.info.role)}) has no "
                                  f"access to {SECTION_NAMES[section]}.")


# ------------------------------------------------------------------ users

def managed_roles(role: str) -> list[str]:
    """The roles whose accounts `role` may see, create, disable and enable, in ROLES' order."""
    allowed = policy.MANAGED_USER_ROLES.get(role, frozenset())
    return [r for r in ROLES if r in allowed]


async def _users_page(request: Request, session: ConsoleSession, status_code: int = 200, *,
                      error: str | None = None, done: str | None = None,
                      entered: dict[str, str] | None = None) -> HTMLResponse:
    roles = managed_roles(session.info.role)
    everyone = await asyncio.to_thread(_store(request).users)
    return page(request, "users.html", status_code, users=[u for u in everyone if u.role in roles], roles=roles,
                role_names=ROLE_NAMES, min_length=MIN_PASSWORD_LENGTH, error=error, done=done,
                entered=entered or {})


@router.get("/users")
async def users(request: Request, session: SignedIn) -> Response:
    require(session, "users")
    return await _users_page(request, session)


@router.post("/users")
async def create_user(request: Request, session: SignedIn) -> Response:
    require(session, "users")
    form = await request.form()
    username, role = str(form.get("username") or "").strip(), str(form.get("role") or "")
    password, again = str(form.get("password") or ""), str(form.get("password_again") or "")
    entered = {"username": username, "role": role}

    async def page_refusal(status_code: int, error: str) -> HTMLResponse:
        return await _users_page(request, session, status_code, error=error, entered=entered)

    if role not in managed_roles(session.info.role):
        return await page_refusal(403, f"Your role may not create {ROLE_NAMES.get(role, 'such')} accounts.")
    if password != again:
        return await page_refusal(422, "The two passwords differ.")
    problem = password_problem(password)
    if problem:
        return await page_refusal(422, f"The password is refused: {problem}.")
    try:
        created = await asyncio.to_thread(_store(request).create_user, username, role, password,
                                          created_by=session.info.principal)
    except ValueError as exc:  # a malformed or taken name
        return await page_refusal(422, f"The user was not created: {exc}.")
    return await _users_page(request, session, done=f"User {created.username} ({ROLE_NAMES[created.role]}) "
                                                   "created: they sign in with the password you chose.")


async def _managed_user(request: Request, session: ConsoleSession, username: str) -> UserInfo:
    user = await asyncio.to_thread(_store(request).user, username)
    # An account the role may not manage is answered as one that does not exist: no names leak across roles.
    if user is None or user.role not in managed_roles(session.info.role):
        raise ConsoleRefused(404, "No such user among those you manage.")
    return user


async def _set_disabled(request: Request, session: ConsoleSession, username: str, disabled: bool) -> Response:
    require(session, "users")
    user = await _managed_user(request, session, username)
    if disabled and user.username == session.info.username:
        # Else the last org admin could lock everyone out of the console; another one can disable them.
        return await _users_page(request, session, 422, error="You cannot disable your own account.")
    changed = await asyncio.to_thread(_store(request).set_disabled, user.username, disabled,
                                      by=session.info.principal)
    said = "disabled: their sessions have ended" if changed.disabled_at else "enabled: they may sign in again"
    return await _users_page(request, session, done=f"User {changed.username} {said}.")


@router.post("/users/{username}/disable")
async def disable_user(request: Request, session: SignedIn, username: str) -> Response:
    return await _set_disabled(request, session, username, True)


@router.post("/users/{username}/enable")
async def enable_user(request: Request, session: SignedIn, username: str) -> Response:
    return await _set_disabled(request, session, username, False)


# ------------------------------------------------------------------ channel settings

# Credentials never shown back, only whether they are set. The others (account ids, addresses, the SendGrid
# webhook's public key) are shown and prefilled.
SECRET_FIELDS = frozenset({"auth_token", "api_key", "password"})
PROVIDER_NAMES = {"twilio": "Twilio", "sendgrid": "SendGrid", "smtp": "SMTP server",
                  "inprocess": "Built-in (no HTTP)"}  # the simulator's rules in-process: measures the engine alone
FIELD_NAMES = {
    "account_sid": "Account SID", "auth_token": "Auth token", "messaging_service_sid": "Messaging service SID",
    "base_url": "API base URL", "api_key": "API key", "webhook_public_key": "Event webhook public key (base64)",
    "host": "Host", "port": "Port", "username": "Username", "password": "Password",
    "starttls": "STARTTLS (true or false)",
}
# Secrets that still hold the simulator's public value are said to: with a real provider they are refused.
DEVELOPMENT_VALUES = {"auth_token": safe_defaults.DEFAULT_TWILIO_AUTH_TOKEN,
                      "api_key": Settings.model_fields["sendgrid_api_key"].default.get_secret_value()}
FIELD_HINTS = {"base_url": "Blank: the environment's (the simulator's unless set).",
               "webhook_public_key": "Blank: the environment's."}
_BODY_ADAPTERS = {"sms": TypeAdapter(SmsChannelSettingsBody), "email": TypeAdapter(EmailChannelSettingsBody)}


@dataclass(frozen=True)
class CredentialField:
    name: str
    label: str
    secret: bool
    required: bool
    value: str  # the current value (never a secret's: "")
    is_set: bool
    hint: str = ""
    development: bool = False  # a secret that keeps the simulator's public value


@dataclass(frozen=True)
class ProviderForm:
    provider: str
    label: str
    current: bool  # the channel uses it now
    fields: list[CredentialField]


@dataclass(frozen=True)
class ChannelView:
    channel: str
    provider: str
    source: str  # "stored" (set here or over the API), "environment", "unreadable"
    updated_by: str | None
    updated_at: str | None
    applied: bool
    fields: list[CredentialField]  # the current provider's
    forms: list[ProviderForm]


def _fields(channel: str, provider: str, values: dict[str, str]) -> list[CredentialField]:
    required, optional = PROVIDERS[channel][provider]
    return [CredentialField(name, FIELD_NAMES.get(name, name), name in SECRET_FIELDS, name in required,
                            "" if name in SECRET_FIELDS else values.get(name, ""), bool(values.get(name)),
                            FIELD_HINTS.get(name, ""),
                            name in DEVELOPMENT_VALUES and values.get(name) == DEVELOPMENT_VALUES[name])
            for name in (*required, *optional)]


def _current(request: Request, channel: str) -> tuple[str, str, dict[str, str], Any]:
    """(provider, source, credentials in clear, stored settings or None) of the channel now."""
    try:
        stored = _store(request).channel_settings(channel)
    except CredentialsUnreadable:
        return "", "unreadable", {}, None
    if stored is not None:
        return stored.provider, "stored", dict(stored.credentials), stored
    provider, values = environment_credentials(channel, request.app.state.settings)
    return provider, "environment", {k: v for k, v in values.items() if v}, None


def channel_view(request: Request, channel: str) -> ChannelView:
    provider, source, values, stored = _current(request, channel)
    forms = [ProviderForm(p, PROVIDER_NAMES.get(p, p), p == provider, _fields(channel, p, values if p == provider
                                                                               else {}))
             for p in PROVIDERS[channel]]
    applied = stored is None or stored.settings_id in request.app.state.settings_publisher.published
    return ChannelView(channel, provider, source, stored.updated_by if stored else None,
                       stored.updated_at if stored else None, applied,
                       _fields(channel, provider, values) if provider else [], forms)


async def _settings_page(request: Request, status_code: int = 200, *, channel: str | None = None,
                         error: str | None = None, done: str | None = None) -> HTMLResponse:
    views = [await asyncio.to_thread(channel_view, request, c) for c in CHANNELS]
    return page(request, "settings.html", status_code, channels=views, said_channel=channel, error=error,
                done=done, channel_names={"sms": "SMS", "email": "Email"})


@router.get("/settings")
async def settings(request: Request, session: SignedIn) -> Response:
    require(session, "settings")
    return await _settings_page(request)


def credentials_from_form(channel: str, provider: str, form: Any, current_provider: str,
                          current: dict[str, str]) -> dict[str, str]:
    """The credentials a Settings form submits: its non-empty fields; a secret left blank keeps the value in
    force when the provider stays the same (it is never shown, so the form cannot send it back)."""
    required, optional = PROVIDERS[channel][provider]
    credentials = {}
    for name in (*required, *optional):
        value = str(form.get(name) or "")
        if name not in SECRET_FIELDS:
            value = value.strip()
        elif not value and provider == current_provider:
            value = current.get(name, "")
        if value:
            credentials[name] = value
    return credentials


def _plain(error: ValidationError) -> str:
    parts = []
    for problem in error.errors():
        name = str(problem["loc"][-1]) if problem["loc"] else ""
        label = FIELD_NAMES.get(name, name)
        parts.append(f"{label}: {'required' if problem['type'] == 'missing' else problem['msg']}")
    return "; ".join(parts)


@router.post("/settings/{channel}")
async def save_settings(request: Request, session: SignedIn, channel: str) -> Response:
    require(session, "settings")
    if channel not in CHANNELS:
        raise ConsoleRefused(404, f"There is no channel {channel!r}.")
    form = await request.form()
    provider = str(form.get("provider") or "")
    if provider not in PROVIDERS[channel]:
        return await _settings_page(request, 422, channel=channel, error=f"Choose one of the {channel} providers.")
    current_provider, _, current, _ = await asyncio.to_thread(_current, request, channel)
    credentials = credentials_from_form(channel, provider, form, current_provider, current)
    try:
        body = _BODY_ADAPTERS[channel].validate_python({"provider": provider, "credentials": credentials})
    except ValidationError as exc:
        return await _settings_page(request, 422, channel=channel, error=f"Not saved: {_plain(exc)}.")
    try:
        await replace_channel_settings(request, session.principal, channel, body)
    except HTTPException as exc:
        if exc.status_code == 503:  # stored: the services get them once the broker takes them
            return await _settings_page(request, channel=channel, error=(
                "Saved, but the broker did not acknowledge them: the sender and the webhook receiver get them "
                "when the API next starts, or with the next change."))
        return await _settings_page(request, 422, channel=channel, error=f"Not saved: {exc.detail}.")
    return await _settings_page(request, channel=channel, done=(
        f"Saved: {channel} now uses {PROVIDER_NAMES.get(provider, provider)}; the sender and the webhook receiver "
        "apply it within seconds."))


# ------------------------------------------------------------------ audit log

AUDIT_PAGE = 50
ACTION_NAMES = {"user_created": "User created", "user_disabled": "User disabled", "user_enabled": "User enabled",
                "role_changed": "Role changed", "password_changed": "Password changed",
                "sign_in_locked": "Sign-in paused after failures",
                "channel_settings_changed": "Channel settings changed",
                "opt_out_added": "Opt-out added by hand", "opt_out_removed": "Opt-out removed"}


def parse_cursor(cursor: str | None) -> tuple[str, str] | None:
    """An `after` cursor (`AT|AUDIT_ID`, the last shown entry's), or None for the newest page."""
    if not cursor or "|" not in cursor:
        return None
    at, _, audit_id = cursor.partition("|")
    return at, audit_id


@router.get("/audit")
async def audit(request: Request, session: SignedIn, after: str | None = None) -> Response:
    require(session, "audit")
    # One more than shown: whether a next page exists, without counting the log.
    # An org admin sees every entry; an admin those about the accounts it manages (campaigners), as on Users.
    of_roles = None if session.info.role == "org_admin" else managed_roles(session.info.role)
    entries = await asyncio.to_thread(_store(request).audit_page, after=parse_cursor(after), limit=AUDIT_PAGE + 1,
                                      of_roles=of_roles)
    more, entries = len(entries) > AUDIT_PAGE, entries[:AUDIT_PAGE]
    next_cursor = f"{entries[-1].at}|{entries[-1].audit_id}" if more else None
    return page(request, "audit.html", entries=entries, action_names=ACTION_NAMES, next_cursor=next_cursor,
                first_page=after is None, only_managed=of_roles is not None)


# ------------------------------------------------------------------ operations

OPERATIONS_PROBE_TIMEOUT_S = 3.0


@router.get("/operations")
async def operations(request: Request, session: SignedIn) -> Response:
    require(session, "operations")
    settings = request.app.state.settings
    # The API's own data folder and broker: the instances `outreach status` would find from this host.
    report = await gather(settings.data_dir, OPERATIONS_PROBE_TIMEOUT_S, broker=settings)
    return page(request, "operations.html", report=report, states=STATES)


# ------------------------------------------------------------------ opt-outs

OPT_OUT_CHANNELS = {"sms": "SMS", "email": "Email"}
OPT_OUT_PAGE = 50


def _opt_out_channel(channel: str) -> str:
    if channel not in OPT_OUT_CHANNELS:
        raise ConsoleRefused(404, f"There is no channel {channel!r}.")
    return channel


def _form_key(form: Any) -> str | None:
    """The form's own key (made with the page): a form sent twice makes one change (the API's Idempotency-Key)."""
    key = str(form.get("form_key") or "")
    return key if re.fullmatch(idempotency.KEY_PATTERN, key) else None


async def _opt_outs_page(request: Request, session: ConsoleSession, channel: str, status_code: int = 200, *,
                         q: str = "", after: str | None = None, before: str | None = None, error: str | None = None,
                         done: str | None = None, entered: str = "") -> HTMLResponse:
    listed = await opt_out_page(request, channel, search=q or None, after=after or None, before=before or None,
                                limit=OPT_OUT_PAGE)
    return page(request, "opt_outs.html", status_code, channel=channel, channels=OPT_OUT_CHANNELS, q=q,
                listed=listed, first_page=not (after or before), in_words=source_in_words,
                may_remove=session.info.role in policy.OPT_OUT_REMOVERS, error=error, done=done, entered=entered,
                form_key=secrets.token_urlsafe(24))


@router.get("/opt-outs")
async def opt_outs(request: Request, session: SignedIn, channel: str = "sms", q: str = "", after: str | None = None,
                   before: str | None = None) -> Response:
    """The channel's opt-out list from the read model (newest change first, searched by destination, keyset-paged
    Older / Newer), the form that adds a destination, and for an org admin a Remove per row."""
    require(session, "opt_outs")

    def clean(text: str | None, most: int) -> str | None:  # as the API's parameters take them (no NUL)
        return None if text is None else text.replace("\x00", "")[:most]

    return await _opt_outs_page(request, session, _opt_out_channel(channel), q=clean(q, 320) or "",
                                after=clean(after, 400), before=clean(before, 400))


def _change_words(answer: dict[str, Any], added: bool) -> str:
    destination, entry = answer["destination"], answer.get("entry")
    if answer["state"] != "applied":
        return (f"{destination}: {'added' if added else 'removal'} sent to the opt-out list; it shows here within "
                "seconds (reload).")
    if added:
        how = source_in_words(entry) if entry else "added"
        return f"{destination} is on the opt-out list ({how}): nothing more is sent to it."
    return f"{destination} is off the opt-out list: it may be sent to again."


@router.post("/opt-outs")
async def add_opt_out(request: Request, session: SignedIn) -> Response:
    require(session, "opt_outs")
    form = await request.form()
    channel = _opt_out_channel(str(form.get("channel") or ""))
    entered = str(form.get("destination") or "").strip()
    try:
        destination = normalised_destination(channel, entered)
    except ValueError as exc:
        return await _opt_outs_page(request, session, channel, 422, entered=entered,
                                    error=f"Not added: {entered or 'an empty destination'} is {exc}.")
    try:
        _, answer = await change_opt_out(request, session.principal, channel, destination, opted_out=True,
                                         idempotency_key=_form_key(form))
    except BrokerUnavailable:
        return await _opt_outs_page(request, session, channel, 503, entered=entered, error=(
            "Not added: the message broker did not take the change. Try again in a moment."))
    return await _opt_outs_page(request, session, channel, done=_change_words(answer, True))


def _removable(session: ConsoleSession) -> None:
    require(session, "opt_outs")
    if session.info.role not in policy.OPT_OUT_REMOVERS:
        raise ConsoleRefused(403, "Only an org admin may remove an opt-out (a recipient opts back in by replying "
                                  "START).")


async def _removal_page(request: Request, channel: str, destination: str, status_code: int = 200, *,
                        error: str | None = None, reason: str = "") -> HTMLResponse:
    entry = await asyncio.to_thread(request.app.state.read_model.opt_out, channel, destination)
    if entry is None or not entry["opted_out"]:
        raise ConsoleRefused(404, f"{destination} is not on the {OPT_OUT_CHANNELS[channel]} opt-out list.")
    return page(request, "opt_out_remove.html", status_code, channel=channel, channels=OPT_OUT_CHANNELS, entry=entry,
                in_words=source_in_words, error=error, reason=reason, form_key=secrets.token_urlsafe(24))


@router.get("/opt-outs/remove")
async def confirm_removal(request: Request, session: SignedIn, channel: str = "sms", destination: str = "") -> Response:
    """The confirmation of a removal: the entry, and the reason it needs (org admins only)."""
    _removable(session)
    return await _removal_page(request, _opt_out_channel(channel), destination)


@router.post("/opt-outs/remove")
async def remove_opt_out(request: Request, session: SignedIn) -> Response:
    _removable(session)
    form = await request.form()
    channel = _opt_out_channel(str(form.get("channel") or ""))
    destination, reason = str(form.get("destination") or ""), str(form.get("reason") or "").strip()
    if not reason:
        return await _removal_page(request, channel, destination, 422,
                                   error="Say why it may be sent to again: the reason goes in the audit log.")
    if len(reason) > MAX_OPT_OUT_REASON_CHARS:
        return await _removal_page(request, channel, destination, 422, reason=reason,
                                   error=f"The reason is at most {MAX_OPT_OUT_REASON_CHARS} characters.")
    try:
        status_code, answer = await change_opt_out(request, session.principal, channel, destination, opted_out=False,
                                                   reason=reason, idempotency_key=_form_key(form))
    except BrokerUnavailable:
        return await _removal_page(request, channel, destination, 503, reason=reason, error=(
            "Not removed: the message broker did not take the change. Try again in a moment."))
    if status_code != 202:
        raise ConsoleRefused(status_code, answer["detail"])
    return await _opt_outs_page(request, session, channel, done=_change_words(answer, False))
