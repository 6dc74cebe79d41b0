"""Opt-out lists over HTTP (issue 14): each channel's list read from the read model, and a destination added by
hand, or removed by an org admin with a reason.

    GET  /opt-outs?channel=&q=&after=|before=&limit=   the destinations on the list now, newest change first
    POST /opt-outs          {channel, destination}           add one (campaign roles)
    POST /opt-outs/remove   {channel, destination, reason}   remove one (org_admin only; a recipient normally opts
                                                             back in by START)

The lists are the command handler's (its OptOutList aggregates, which every run, claim and test send obeys). A
change by hand goes to it as the webhook receiver's do: an `OptOutChanged` (source `manual`, `issued_by` the
principal, a removal's `reason`) on outreach.internal.opt-outs, keyed by destination, so it is applied in order
with the recipient's own STOP and START. The handler stores a change only when it changes the list, and the relay
publishes each one on outreach.internal.opt-out-list, which the projections fold into the read model's
`opt_outs`: that is what GET reads, and what a change waits for (the app's answer wait, 5 s by default) before it
is answered `applied` (else `pending`). Each change is in the audit log (`opt_out_added`, `opt_out_removed`:
actor, CHANNEL:DESTINATION, the reason), once per opt_out_id: with an Idempotency-Key the id is derived from the
principal, the change and the key, so a retried request finds its entry and publishes nothing again.

The destination is judged by the contacts' rule (schemas.destinations: E.164 for SMS, email-validator's
normalised form for email), so it matches the destinations of campaigns. The console's Opt-outs screen uses
`change_opt_out` and `opt_out_page` as these routes do.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any, Literal, Union

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from schemas import topics
from schemas.destinations import validate_destination
from schemas.internal import MANUAL_OPT_OUT, MAX_OPT_OUT_REASON_CHARS, OptOutChanged
from schemas.times import utc_now
from services.api import idempotency
from services.api.auth import CAMPAIGN_RESPONSES, CampaignUser, _role_guard
from services.api.commands import ANSWER_POLL_S
from services.api.idempotency import IdempotencyKey
from services.api.models import EMAIL_ADDRESS_SCHEMA, Problem
from services.api.store import Principal

OptOutChannel = Literal["sms", "email"]
CHANNEL_NAMES = {"sms": "SMS", "email": "email"}
E164_PATTERN = r"^\+[1-9][0-9]{1,14}$"
MAX_DESTINATION_CHARS = 320
MAX_PAGE = 200
REMOVERS = frozenset({"org_admin"})  # console policy.OPT_OUT_REMOVERS says the same for the screens
# A reason has something to read: a character other than a control character or a space (Unicode's).
_VISIBLE = r"[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
REASON_PATTERN = rf"^[^\x00]*{_VISIBLE}[^\x00]*$"
_NO_NUL = r"^[^\x00]*$"

router = APIRouter(tags=["opt-outs"], responses=CAMPAIGN_RESPONSES)
opt_out_remover = _role_guard(REMOVERS, "the removal of opt-outs")
OptOutRemover = Annotated[Principal, Depends(opt_out_remover)]


# ------------------------------------------------------------------ the destination rule

def normalised_destination(channel: str, destination: str) -> str:
    """The destination as the channel's contacts are stored (E.164; email-validator's normalised address), or
    ValueError saying what is wrong in plain words."""
    normalised, _reason = validate_destination(channel, destination)
    if normalised is None:
        raise ValueError("not a phone number in E.164 form, such as +14155550100" if channel == "sms" else
                         "not an email address (as the contacts' rule accepts them)")
    return normalised


def _email(value: str) -> str:
    return normalised_destination("email", value)


def _sms(value: str) -> str:
    return normalised_destination("sms", value)


_STRICT = ConfigDict(strict=True, extra="ignore")
SmsDestination = Annotated[str, Field(pattern=E164_PATTERN, description="A phone number in E.164 form."),
                           AfterValidator(_sms)]
EmailDestination = Annotated[str, Field(max_length=MAX_DESTINATION_CHARS), AfterValidator(_email),
                             WithJsonSchema({**EMAIL_ADDRESS_SCHEMA, "maxLength": MAX_DESTINATION_CHARS,
                                             "description": EMAIL_ADDRESS_SCHEMA["description"] + " Kept in its "
                                             "normalised form (the domain in lower case), as contacts are."})]
Reason = Annotated[str, Field(min_length=1, max_length=MAX_OPT_OUT_REASON_CHARS, pattern=REASON_PATTERN,
                              description="Why the destination may be sent to again (not blank), for the audit "
                                          "log.")]


class SmsOptOut(BaseModel):
    model_config = _STRICT
    channel: Literal["sms"]
    destination: SmsDestination


class EmailOptOut(BaseModel):
    model_config = _STRICT
    channel: Literal["email"]
    destination: EmailDestination


class SmsOptOutRemoval(SmsOptOut):
    reason: Reason


class EmailOptOutRemoval(EmailOptOut):
    reason: Reason


OptOutBody = Annotated[Union[SmsOptOut, EmailOptOut], Field(discriminator="channel")]  # noqa: UP007
OptOutRemovalBody = Annotated[Union[SmsOptOutRemoval, EmailOptOutRemoval], Field(discriminator="channel")]  # noqa: UP007


# ------------------------------------------------------------------ answers

class OptOutEntry(BaseModel):
    """A destination's latest change on its channel's opt-out list."""
    channel: OptOutChannel
    destination: str
    opted_out: bool = Field(description="On the list now (false: it left it, by START or by an org admin).")
    source: str = Field(description=(
        "How: sms_stop, sms_start, twilio_21610, email_unsubscribe, email_spamreport (the recipient, through the "
        "provider's webhook), manual (by hand: issued_by, and a removal's reason), or the provider's answer to a "
        "message: result:OUTCOME (a campaign message; result:refused on SMS is Twilio's 21610), "
        "test_message:OUTCOME (a test send)."))
    issued_by: str | None = Field(description="Who made a change by hand (user:NAME for a console user, else the "
                                              "token's principal).")
    reason: str | None = Field(description="A removal's reason.")
    changed_at: str = Field(description="When the list changed (RFC 3339, UTC).")


class OptOutPage(BaseModel):
    channel: OptOutChannel
    total: int = Field(description="Destinations on the channel's list now (whatever `q` says).")
    items: list[OptOutEntry] = Field(description="The page, newest change first.")
    newer: str | None = Field(description="The cursor of the page of newer changes (`before`), if any.")
    older: str | None = Field(description="The cursor of the page of older changes (`after`), if any.")


class OptOutChangeAccepted(BaseModel):
    opt_out_id: str = Field(description="The OptOutChanged record's id (and its audit entry's).")
    channel: OptOutChannel
    destination: str = Field(description="As the list keeps it (normalised).")
    opted_out: bool = Field(description="What was asked: true to add, false to remove.")
    state: Literal["applied", "pending"] = Field(description=(
        "applied: the list (as the read model shows it) is as asked, see `entry`; pending: published, not shown "
        "yet within the wait."))
    entry: OptOutEntry | None = Field(description="The destination's entry on the list now (null if none).")


# ------------------------------------------------------------------ the code the routes and the console share

def cursor_of(key: tuple[str, str] | None) -> str | None:
    """A page key (changed_at, destination) as a cursor: the time first (it never holds a `|`)."""
    return None if key is None else f"{key[0]}|{key[1]}"


def key_of(cursor: str | None) -> tuple[str, str] | None:
    if cursor is None:
        return None
    changed_at, _, destination = cursor.partition("|")
    return changed_at, destination


async def opt_out_page(request: Request, channel: str, *, search: str | None = None, after: str | None = None,
                       before: str | None = None, limit: int = 50) -> dict[str, Any]:
    read_model = request.app.state.read_model
    page = await asyncio.to_thread(read_model.opt_out_page, channel, search=search, after=key_of(after),
                                   before=key_of(before) if after is None else None, limit=limit)
    total = await asyncio.to_thread(read_model.count_opt_outs, channel)
    return {"channel": channel, "total": total, "items": page["items"], "newer": cursor_of(page["newer"]),
            "older": cursor_of(page["older"])}


def audit_subject(channel: str, destination: str) -> str:
    return f"{channel}:{destination}"


def opt_out_id_for(principal: Principal, opted_out: bool, channel: str, destination: str,
                   idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return str(uuid.uuid4())
    return idempotency.derived_id(principal.name, "AddOptOut" if opted_out else "RemoveOptOut", None,
                                  idempotency_key, audit_subject(channel, destination))


async def change_opt_out(request: Request, principal: Principal, channel: str, destination: str, *, opted_out: bool,
                         reason: str | None = None, idempotency_key: str | None = None) -> tuple[int, dict[str, Any]]:
    """Add (opted_out) or remove a destination (already normalised) by hand, as `principal`: (202,
    OptOutChangeAccepted), or (404, Problem) for a removal of a destination not on the list. Publishes the
    OptOutChanged, writes the audit entry, and waits (the app's answer wait) for the read model to show the list
    as asked. Raises BrokerUnavailable when the broker does not take the record (nothing audited then). The role
    rules are the callers' (routes: their guards; console: policy)."""
    read_model, store = request.app.state.read_model, request.app.state.store
    opt_out_id = opt_out_id_for(principal, opted_out, channel, destination, idempotency_key)
    answered = {"opt_out_id": opt_out_id, "channel": channel, "destination": destination, "opted_out": opted_out}
    entry = await asyncio.to_thread(read_model.opt_out, channel, destination)
    retried = await asyncio.to_thread(store.audit_entry, opt_out_id) is not None  # done once: not again
    if not retried:
        if not opted_out and not (entry and entry["opted_out"]):
            return status.HTTP_404_NOT_FOUND, {
                "detail": f"{destination} is not on the {CHANNEL_NAMES[channel]} opt-out list (as it reads now)"}
        record = OptOutChanged(opt_out_id=opt_out_id, channel=channel, destination=destination, opted_out=opted_out,
                               source=MANUAL_OPT_OUT, occurred_at=utc_now(), issued_by=principal.name,
                               reason=reason)
        await request.app.state.publisher.publish_record(topics.OPT_OUTS, destination, record)
        await asyncio.to_thread(store.record_audit, principal.name, "opt_out_added" if opted_out else "opt_out_removed",
                                audit_subject(channel, destination), reason or "", audit_id=opt_out_id)
    deadline = time.monotonic() + request.app.state.answer_wait_s
    while not _as_asked(entry, opted_out) and time.monotonic() < deadline:
        await asyncio.sleep(ANSWER_POLL_S)
        entry = await asyncio.to_thread(read_model.opt_out, channel, destination)
    return status.HTTP_202_ACCEPTED, {**answered, "state": "applied" if _as_asked(entry, opted_out) else "pending",
                                      "entry": entry}


def _as_asked(entry: dict[str, Any] | None, opted_out: bool) -> bool:
    return bool(entry and entry["opted_out"]) == opted_out


def source_in_words(entry: dict[str, Any]) -> str:
    """How a destination came on (or off) its list, as a person says it."""
    source, by = entry["source"], entry.get("issued_by")
    if source == MANUAL_OPT_OUT:
        return f"added by hand by {by}" if entry["opted_out"] else f"removed by {by}"
    words = {"sms_stop": "STOP", "sms_start": "START", "twilio_21610": "21610", "email_unsubscribe": "unsubscribe",
             "email_spamreport": "spam report"}
    if source in words:
        return words[source]
    kind, _, outcome = source.partition(":")
    said = {"spamreport": "spam report", "unsubscribe": "unsubscribe", "opted_out": "opted out at the provider"}
    said = said.get(outcome, "21610" if entry["channel"] == "sms" else outcome)
    return f"{said} (a test message)" if kind == "test_message" else said


# ------------------------------------------------------------------ routes

CHANGE_RESPONSES = {
    202: {"description": "The OptOutChanged is published and audited; `state` says whether the list (as the read "
                         "model shows it) is as asked within the wait."},
    422: {"model": Problem, "description": "A malformed body: an unknown channel, a destination the contacts' rule "
                                           "refuses for it (E.164 for SMS, an email address), a blank reason."},
    503: {"model": Problem, "description": "The broker did not take the change (nothing audited): send it again, "
                                           "with the same Idempotency-Key."},
}


def _answer(status_code: int, body: dict[str, Any]) -> Any:
    return body if status_code == status.HTTP_202_ACCEPTED else JSONResponse(body, status_code=status_code)


@router.get("/opt-outs", response_model=OptOutPage, summary="A channel's opt-out list, newest change first",
            description="The destinations on the channel's opt-out list now (every run, claim and test send leaves "
                        "them out), with how each came on it. Keyset pages: `older` and `newer` are the cursors of "
                        "the next pages (`after`, `before`).")
async def list_opt_outs(
    request: Request, _: CampaignUser,
    channel: Annotated[OptOutChannel, Query(description="The channel's list.")],
    q: Annotated[str | None, Query(max_length=MAX_DESTINATION_CHARS, pattern=_NO_NUL,
                                   description="A case-insensitive part of the destination.")] = None,
    after: Annotated[str | None, Query(max_length=400, pattern=_NO_NUL,
                                       description="A page's `older` cursor: the changes older than it.")] = None,
    before: Annotated[str | None, Query(max_length=400, pattern=_NO_NUL, description=(
        "A page's `newer` cursor: the changes newer than it (ignored with `after`)."))] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"Page size (at most {MAX_PAGE}).")] = 50,
) -> dict[str, Any]:
    return await opt_out_page(request, channel, search=q, after=after, before=before, limit=limit)


@router.post("/opt-outs", status_code=status.HTTP_202_ACCEPTED, response_model=OptOutChangeAccepted,
             responses=CHANGE_RESPONSES, summary="Add a destination to a channel's opt-out list by hand",
             description="As a STOP would: no message of any campaign, nor a test message, is sent to it until it "
                         "leaves the list (a START reply, or a removal by an org admin). Audited (opt_out_added). A "
                         "destination already on the list stays as it is (the answer shows its entry).")
async def add_opt_out(request: Request, principal: CampaignUser, body: OptOutBody,
                      idempotency_key: IdempotencyKey = None) -> Any:
    return _answer(*await change_opt_out(request, principal, body.channel, body.destination, opted_out=True,
                                         idempotency_key=idempotency_key))


@router.post("/opt-outs/remove", status_code=status.HTTP_202_ACCEPTED, response_model=OptOutChangeAccepted,
             responses={**CHANGE_RESPONSES,
                        403: {"model": Problem, "description": "Only org_admin may remove an opt-out."},
                        404: {"model": Problem, "description": "The destination is not on the list."}},
             summary="Remove a destination from a channel's opt-out list (org_admin, with a reason)",
             description="A recipient normally opts back in by replying START: this is for the exceptions, and says "
                         "why (`reason`, in the audit log as opt_out_removed).")
async def remove_opt_out(request: Request, principal: OptOutRemover, body: OptOutRemovalBody,
                         idempotency_key: IdempotencyKey = None) -> Any:
    return _answer(*await change_opt_out(request, principal, body.channel, body.destination, opted_out=False,
                                         reason=body.reason, idempotency_key=idempotency_key))


__all__ = ["change_opt_out", "normalised_destination", "opt_out_page", "router", "source_in_words"]
