"""One campaign: live counts (streamed), the messages table (filters, search, keyset paging), one
message's history, CSV export, the campaign's history and the campaign as of a chosen time.

    GET  /console/campaigns/ID                      the campaign, its counts by status and failure reason, and
                                                    its messages (?status= &reason= &q= &after=ROW | &before=ROW)
    GET  /console/campaigns/ID/progress             the live counts as Server-Sent Events (campaign_view.js)
    GET  /console/campaigns/ID/messages/export.csv  the messages of the table's filter as CSV (the API's export)
    GET  /console/campaigns/ID/messages/MID         one message and its status records
    GET|POST /console/campaigns/ID/messages/MID/retry   retry one failed message (a timed-out one: only so)
    GET  /console/campaigns/ID/history              the campaign's events, and who issued each
    GET  /console/campaigns/ID/as-of?at=TIME        the campaign and its messages as they stood at TIME (UTC)

Reads come from the read model as the API's read routes have them; the table's pages are keyset pages
(ReadViews.message_page: after or before a row, never an OFFSET), so a late page of 300,000 messages costs what
the first does. The search is the recipient's (a part of the destination): the API's `q` also reads every
message's variables, which a 300,000-message campaign cannot afford within a page's second. Run, Stop, Retry
failed and Resume are campaigns.py's confirmations: this page links to them.
"""
from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Query, Request
from fastapi.responses import Response, StreamingResponse
from sse_starlette import EventSourceResponse

from schemas.events import FAILURE_REASONS, MESSAGE_STATUSES
from schemas.ids import is_wire_uuid
from services.api import export, idempotency
from services.api.commands import (ANSWER_POLL_S, BrokerUnavailable, InvalidCommand, build_command, rejection_of,
                                   rejection_status, wait_for_answer)
from services.api.console import policy
from services.api.console.campaigns import ACTION_WORDS, STATUS_WORDS, CampaignSession, channel_word, progress_of
from services.api.console.routes import PREFIX, ConsoleRefused, ConsoleSession, console_router, page
from services.api.reads import PROGRESS_PING_S, PROGRESS_POLL_S, as_of_text
from services.common import jsoncodec
from services.projections.views import settled

router = console_router()

PAGE_SIZE = 50
MAX_SEARCH = 200
MESSAGE_STATUS_WORDS = {"waiting": "Waiting", "queued": "Queued", "sending": "Sending", "sent": "Sent",
                        "delivered": "Delivered", "assumed_delivered": "Assumed delivered", "retrying": "Retrying",
                        "failed": "Failed", "opted_out": "Opted out", "cancelled": "Cancelled"}
REASON_WORDS = {"timed_out": "Timed out", "invalid_destination": "Invalid destination",
                "carrier_rejected": "Carrier rejected", "undeliverable": "Undeliverable", "bounced": "Bounced",
                "blocked": "Blocked", "expired": "Expired", "provider_error": "Provider error",
                "setup_error": "Setup error", "unknown": "Unknown"}
EVENT_WORDS = {"CampaignCreated": "Created", "ContactsAdded": "Contacts added", "CampaignReady": "Ready",
               "TemplateUpdated": "Template updated", "CampaignRunStarted": "Run started",
               "CampaignStopped": "Stopped", "RetryStarted": "Retry started", "CampaignDeleted": "Deleted",
               "CampaignStatusChanged": "Status changed", "CommandRejected": "Command refused",
               "CampaignSendingHeld": "Sending held", "CampaignSendingResumed": "Sending resumed"}
# Who acted, by the field the contract gives each event (a later `issued_by` on every answer is read first).
ISSUER_FIELDS = ("issued_by", "created_by", "accepted_by", "stopped_by")
# A datetime-local input's value: minutes, or seconds with an optional fraction; taken as UTC.
_LOCAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?")

StatusQuery = Annotated[str | None, Query(alias="status", max_length=40)]
ReasonQuery = Annotated[str | None, Query(max_length=40)]
SearchQuery = Annotated[str | None, Query(max_length=MAX_SEARCH)]
RowQuery = Annotated[int | None, Query(ge=0, le=2**62)]


# ------------------------------------------------------------------ the table's filter and pages (no I/O)

@dataclass(frozen=True)
class Filter:
    """The messages table's filter: a status, a failure reason, a part of the recipient (each optional)."""
    status: str | None = None
    reason: str | None = None
    recipient: str | None = None

    @classmethod
    def parse(cls, status: str | None, reason: str | None, q: str | None) -> Filter:
        """From the form's fields (an empty select is "all"); ConsoleRefused(422) for a value no select offers."""
        status, reason, recipient = (status or "").strip() or None, (reason or "").strip() or None, \
            (q or "").strip() or None
        if status is not None and status not in MESSAGE_STATUSES:
            raise ConsoleRefused(422, f"There is no message status {status!r}.")
        if reason is not None and reason not in FAILURE_REASONS:
            raise ConsoleRefused(422, f"There is no failure reason {reason!r}.")
        return cls(status, reason, recipient)

    @property
    def active(self) -> bool:
        return bool(self.status or self.reason or self.recipient)

    def query(self, **more: Any) -> dict[str, Any]:
        """The filter as query parameters (those set), with `more` (a cursor, a time) added."""
        fields = {"status": self.status, "reason": self.reason, "q": self.recipient, **more}
        return {k: v for k, v in fields.items() if v is not None}


def url(path: str, query: dict[str, Any]) -> str:
    return f"{path}?{urlencode(query)}" if query else path


def page_links(path: str, filter_: Filter, page: dict[str, Any], **keep: Any) -> dict[str, str | None]:
    """The first, previous and next page's addresses of a `message_page` result (None where there is none)."""
    return {"first": url(path, filter_.query(**keep)) if page["previous"] is not None else None,
            "previous": url(path, filter_.query(before=page["previous"], **keep))
            if page["previous"] is not None else None,
            "next": url(path, filter_.query(after=page["next"], **keep)) if page["next"] is not None else None}


def matching_count(filter_: Filter, counts: dict[str, int], reasons: dict[str, int]) -> int | None:
    """How many messages the filter matches, when the counts already shown tell it (None: a search, or a status
    and a reason together, would cost a count of their own)."""
    if filter_.recipient:
        return None
    if filter_.reason:
        if filter_.status not in (None, "failed"):
            return 0  # a reason is set on failed messages only
        return reasons.get(filter_.reason, 0)
    return counts.get(filter_.status or "total", 0)


def as_of_moment(local: str) -> str:
    """A datetime-local input's value (UTC) as the read model's time text; ConsoleRefused(422) if it is none."""
    text = local.strip()
    if not _LOCAL_TIME.fullmatch(text):
        raise ConsoleRefused(422, "Give the time as a date and a time, like 2026-01-05T09:00 (UTC).")
    if text.count(":") == 1:
        text += ":00"
    try:
        return as_of_text(text + "Z")
    except ValueError:
        raise ConsoleRefused(422, f"{local} is not a date and time.") from None


def shown_time(moment: str | None) -> str:
    """A read model time (RFC 3339, UTC) as the console shows it: to the second, `UTC`."""
    return f"{moment[:19].replace('T', ' ')} UTC" if moment else ""


def progress_event(campaign: dict[str, Any], reasons: dict[str, int]) -> dict[str, Any]:
    """What the live counts stream sends (and the page renders at load): the status in words, the stopped mark,
    the counts by status and by failure reason, whether the campaign is final and its counts caught up."""
    done, total = progress_of(campaign["counts"])
    return {"status": campaign["status"], "status_words": STATUS_WORDS.get(campaign["status"], campaign["status"]),
            "stopped": bool(campaign.get("stopped")), "stopped_words": stopped_words(campaign),
            "final": settled(campaign), "counts": campaign["counts"], "reasons": reasons, "done": done,
            "total": total}


def stopped_words(campaign: dict[str, Any]) -> str:
    if not campaign.get("stopped"):
        return ""
    by = f" by {campaign['stopped_by']}" if campaign.get("stopped_by") else ""
    when = f" at {shown_time(campaign['stopped_at'])}" if campaign.get("stopped_at") else ""
    return f"Stopped{by}{when}"


def issued_by(event: dict[str, Any]) -> str | None:
    """The principal an event names as having acted (user:NAME for a console user), if the event says."""
    return next((event[name] for name in ISSUER_FIELDS if event.get(name)), None)


def event_words(event: dict[str, Any]) -> str:
    """What a campaign event says, in a line."""
    kind = event.get("type")
    if kind == "CampaignStatusChanged":
        before = STATUS_WORDS.get(event.get("previous_status"), event.get("previous_status") or "none")
        counts = event.get("counts") or {}
        shown = ", ".join(f"{MESSAGE_STATUS_WORDS[s]} {counts[s]}" for s in MESSAGE_STATUSES if counts.get(s))
        return (f"{before} → {STATUS_WORDS.get(event.get('status'), event.get('status'))}"
                f"{' (stopped)' if event.get('stopped') else ''}; {shown or 'no messages'}")
    if kind == "CommandRejected":
        detail = f": {event['detail']}" if event.get("detail") else ""
        return f"{event.get('command_type')} refused, {event.get('reason')}{detail}"
    if kind == "ContactsAdded":
        return f"chunk {event.get('chunk_no')}: {event.get('valid')} valid, {event.get('invalid')} invalid"
    if kind == "CampaignReady":
        return f"{event.get('message_count')} messages"
    if kind == "CampaignRunStarted":
        suppressed = event.get("suppressed_count")
        return f"run {event.get('run_no')}: {event.get('message_count')} queued" + \
            (f", {suppressed} opted out left out" if suppressed else "")
    if kind == "RetryStarted":
        return f"run {event.get('run_no')}: {event.get('message_count')} queued again"
    if kind == "CampaignStopped":
        return f"{event.get('cancelled_count')} queued messages cancelled"
    if kind == "CampaignCreated":
        return f"{event.get('name')} ({channel_word(event.get('channel'))})"
    if kind in ("CampaignSendingHeld", "CampaignSendingResumed"):
        return f"provider {event.get('provider')}" + (f": {event['reason']}" if event.get("reason") else "")
    return ""


def retry_refusal_words(reason: str, detail: str) -> str:
    """A refused retry of one message, in plain words."""
    words = {
        "nothing_to_retry": "There is nothing to retry: the message is no longer failed, or it failed because its "
                            "recipient opted out (those are never retried).",
        "not_retryable": "The campaign cannot be retried in its present status.",
        "channel_busy": f"The channel is busy: {detail or 'another campaign is running on it'}. Try again once it "
                        "is free.",
        "unknown_campaign": "There is no such campaign (it may have been deleted).",
    }
    return words.get(reason) or f"Refused ({reason}): {detail or 'no detail given'}."


# ------------------------------------------------------------------ reads

def _read_model(request: Request):
    return request.app.state.read_model


async def _read(request: Request, method: str, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(getattr(_read_model(request), method), *args, **kwargs)


async def _campaign(request: Request, campaign_id: str, *, with_counts: bool = True) -> dict[str, Any]:
    """The campaign, 404 if unknown; `with_counts=False` where no count is shown (they count every message)."""
    campaign = await _read(request, "campaign", campaign_id, with_counts=with_counts) \
        if is_wire_uuid(campaign_id) else None
    if campaign is None:
        raise ConsoleRefused(404, "There is no such campaign.")
    return campaign


async def _message(request: Request, campaign_id: str, message_id: str) -> dict[str, Any]:
    message = await _read(request, "message", message_id) if is_wire_uuid(message_id) else None
    if message is None or message["campaign_id"] != campaign_id:
        raise ConsoleRefused(404, "There is no such message in this campaign.")
    return message


def _cursor(after: int | None, before: int | None) -> dict[str, int]:
    if after is not None and before is not None:
        raise ConsoleRefused(422, "A page is after a row or before one, not both.")
    return {"after": after} if after is not None else {"before": before} if before is not None else {}


def _table_context(path: str, filter_: Filter, found: dict[str, Any], **keep: Any) -> dict[str, Any]:
    return {"filter": filter_, "messages": found["items"], "links": page_links(path, filter_, found, **keep),
            "path": path, "keep": keep, "reasons_words": REASON_WORDS}


# ------------------------------------------------------------------ the campaign view

@router.get("/campaigns/{campaign_id}")
async def campaign_view(request: Request, session: CampaignSession, campaign_id: str,
                        status: StatusQuery = None, reason: ReasonQuery = None, q: SearchQuery = None,
                        after: RowQuery = None, before: RowQuery = None) -> Response:
    filter_ = Filter.parse(status, reason, q)
    cursor = _cursor(after, before)
    campaign, reasons, found = await asyncio.gather(  # at once: the counts, the reasons and the page
        _campaign(request, campaign_id), _read(request, "failure_reasons", campaign_id),
        _read(request, "message_page", campaign_id, status=filter_.status, reason=filter_.reason,
              recipient=filter_.recipient, limit=PAGE_SIZE, **cursor))
    timed_out = reasons.get("timed_out", 0)
    actions = policy.actions_for(campaign, session.info.role, timed_out_failed=timed_out)
    path = f"{PREFIX}/campaigns/{campaign_id}"
    buttons = [(a, ACTION_WORDS[a]) for a in actions if a in ("run", "stop", "retry", "resume")]
    return page(request, "campaign_view.html", campaign=campaign, statuses=MESSAGE_STATUS_WORDS,
                channel_words=channel_word(campaign["channel"]), live=progress_event(campaign, reasons),
                buttons=buttons, summary=campaign.get("summary") or {},
                matching=matching_count(filter_, campaign["counts"], reasons),
                export_url=url(f"{path}/messages/export.csv", filter_.query()),
                export_all_url=f"{path}/messages/export.csv", shown_time=shown_time,
                **_table_context(path, filter_, found))


@router.get("/campaigns/{campaign_id}/progress")
async def campaign_progress(request: Request, _: CampaignSession, campaign_id: str) -> EventSourceResponse:
    """The live counts: a `progress` event (progress_event as JSON) at once and whenever something in it changes,
    checked every PROGRESS_POLL_S (the API's /progress rhythm); the stream ends after the final one."""
    first = await _campaign(request, campaign_id)

    async def events():
        campaign: dict[str, Any] | None = first
        reasons = await _read(request, "failure_reasons", campaign_id)
        last = None
        while campaign is not None:
            snapshot = progress_event(campaign, reasons)
            if snapshot != last:
                yield {"event": "progress", "data": jsoncodec.dumps(snapshot).decode()}
                last = snapshot
            if snapshot["final"]:
                return
            await asyncio.sleep(PROGRESS_POLL_S)
            campaign, reasons = await asyncio.gather(_read(request, "campaign", campaign_id),
                                                     _read(request, "failure_reasons", campaign_id))

    return EventSourceResponse(events(), ping=PROGRESS_PING_S, headers={"Cache-Control": "no-store"})


@router.get("/campaigns/{campaign_id}/messages/export.csv")
async def export_view(request: Request, _: CampaignSession, campaign_id: str, status: StatusQuery = None,
                      reason: ReasonQuery = None, q: SearchQuery = None) -> StreamingResponse:
    """The messages of the table's filter (its recipient search included) as the API's CSV export."""
    filter_ = Filter.parse(status, reason, q)
    await _campaign(request, campaign_id, with_counts=False)
    read_model = _read_model(request)

    def messages():
        return read_model.iter_messages(campaign_id, status=filter_.status, reason=filter_.reason,
                                        recipient=filter_.recipient)

    name = "-".join(["campaign", campaign_id, "messages", *(v for v in (filter_.status, filter_.reason) if v)])
    return StreamingResponse(export.csv_blocks(messages), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{name}.csv"',
                                      "Cache-Control": "no-store"})


# ------------------------------------------------------------------ one message

@router.get("/campaigns/{campaign_id}/messages/{message_id}")
async def message_view(request: Request, _: CampaignSession, campaign_id: str, message_id: str) -> Response:
    campaign = await _campaign(request, campaign_id, with_counts=False)
    message = await _message(request, campaign_id, message_id)
    records = [r for r in await _read(request, "message_history", message_id) if r.get("campaign_id") == campaign_id]
    return page(request, "message.html", campaign=campaign, message=message, records=records,
                statuses=MESSAGE_STATUS_WORDS, reasons_words=REASON_WORDS, shown_time=shown_time)


def _retry_page(request: Request, session: ConsoleSession, campaign: dict[str, Any], message: dict[str, Any],
                status_code: int = 200, **outcome: Any) -> Response:
    return page(request, "message_retry.html", status_code, campaign=campaign, message=message,
                statuses=MESSAGE_STATUS_WORDS, reasons_words=REASON_WORDS, csrf_token=session.info.csrf_token,
                form_key=secrets.token_urlsafe(16), **outcome)


@router.get("/campaigns/{campaign_id}/messages/{message_id}/retry")
async def retry_message_form(request: Request, session: CampaignSession, campaign_id: str,
                             message_id: str) -> Response:
    campaign = await _campaign(request, campaign_id, with_counts=False)
    return _retry_page(request, session, campaign, await _message(request, campaign_id, message_id))


@router.post("/campaigns/{campaign_id}/messages/{message_id}/retry")
async def retry_message(request: Request, session: CampaignSession, campaign_id: str, message_id: str) -> Response:
    """RetryFailedMessages naming this one message, issued as the signed-in person through the API's command path
    (the handler's answer awaited as the API's routes await it). The form's random key fixes the command_id, so a
    form sent twice is one command."""
    campaign = await _campaign(request, campaign_id, with_counts=False)
    message = await _message(request, campaign_id, message_id)
    form_key = (await request.form()).get("form_key")
    key = form_key if isinstance(form_key, str) and re.fullmatch(idempotency.KEY_PATTERN, form_key) else None
    principal = session.principal.name
    try:
        command = build_command("RetryFailedMessages", campaign_id, principal, message_ids=[message_id],
                                include_cancelled=False,
                                command_id=idempotency.command_id(principal, "RetryFailedMessages", campaign_id,
                                                                  key))
        await request.app.state.publisher.publish([command])
    except (InvalidCommand, BrokerUnavailable) as exc:
        refusal = ("The message broker did not take the command, so nothing happened. Try again in a moment."
                   if isinstance(exc, BrokerUnavailable) else f"The command was malformed, nothing was sent: {exc}")
        return _retry_page(request, session, campaign, message, 503 if isinstance(exc, BrokerUnavailable) else 422,
                           refusal=refusal)
    deadline = time.monotonic() + request.app.state.answer_wait_s
    try:
        events = await wait_for_answer(_read_model(request).answers, command["command_id"], 0, deadline=deadline,
                                       poll_s=ANSWER_POLL_S)
    except Exception:  # published: its answer will be in the campaign's history
        events = []
    rejected = rejection_of(events)
    if rejected is not None:
        reason = rejected.get("reason", "invalid_command")
        return _retry_page(request, session, campaign, message, rejection_status(reason),
                           refusal=retry_refusal_words(reason, rejected.get("detail") or ""))
    return _retry_page(request, session, campaign, await _message(request, campaign_id, message_id),
                       done=True, pending=not events, command_id=command["command_id"])


# ------------------------------------------------------------------ audit

@router.get("/campaigns/{campaign_id}/history")
async def campaign_history(request: Request, _: CampaignSession, campaign_id: str) -> Response:
    campaign = await _campaign(request, campaign_id, with_counts=False)
    events = await _read(request, "events", campaign_id)
    rows = [{"event": e, "words": EVENT_WORDS.get(e.get("type"), e.get("type")), "what": event_words(e),
             "who": issued_by(e)} for e in events]
    return page(request, "campaign_view_history.html", campaign=campaign, rows=rows, shown_time=shown_time)


@router.get("/campaigns/{campaign_id}/as-of")
async def campaign_as_of(request: Request, _: CampaignSession, campaign_id: str,
                         at: Annotated[str | None, Query(max_length=40)] = None, status: StatusQuery = None,
                         reason: ReasonQuery = None, q: SearchQuery = None, after: RowQuery = None,
                         before: RowQuery = None) -> Response:
    """The campaign as it stood at `at` (a datetime-local value, UTC): its status, counts and messages then (the
    API's as_of), the messages in keyset pages as the live table."""
    current = await _campaign(request, campaign_id, with_counts=False)
    filter_, cursor = Filter.parse(status, reason, q), _cursor(after, before)
    context: dict[str, Any] = {"campaign": current, "at": (at or "").strip(), "shown_time": shown_time,
                               "status_words": STATUS_WORDS, "statuses": MESSAGE_STATUS_WORDS}
    if not context["at"]:
        return page(request, "campaign_view_as_of.html", then=None, **context)
    try:
        moment = as_of_moment(context["at"])
    except ConsoleRefused as refused:
        return page(request, "campaign_view_as_of.html", 422, then=None, error=refused.message, **context)
    then = await _read(request, "as_of_campaign", campaign_id, moment)
    if then is None:
        return page(request, "campaign_view_as_of.html", then=None, moment=moment, before_start=True, **context)
    found = await _read(request, "message_page", campaign_id, status=filter_.status, reason=filter_.reason,
                        recipient=filter_.recipient, limit=PAGE_SIZE, as_of=moment, **cursor)
    path = f"{PREFIX}/campaigns/{campaign_id}/as-of"
    return page(request, "campaign_view_as_of.html", then=then, moment=moment,
                stopped_then=stopped_words(then), **context,
                **_table_context(path, filter_, found, at=context["at"]))
