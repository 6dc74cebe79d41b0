"""The campaigns list (status badges, channel, counts, progress) with its action menu, and the
confirmation modals of Run (the product page's Run Campaign modal), Stop, Retry failed, Resume and Delete.

    GET  /console/campaigns                    the list, newest first (?page=N), with a notice after a command
    GET  /console/campaigns/ID/ACTION          ACTION's confirmation (run, stop, retry, resume, delete) as a page;
                                               with the X-Console-Fragment header only the form, for the modal
    POST /console/campaigns/ID/ACTION          the command, issued as the signed-in person (user:NAME)

Reads use the read model as the API's read routes do; commands go through the API's own path (build_command,
the publisher, the handler's answer waited for, commands.rejection_status), so the campaign's history names the
person and the handler judges every rule. A refusal is said in plain words on the confirmation again, with the
status the API would answer. Each confirmation form carries a random key that fixes its command_id (as an
Idempotency-Key does): a form sent twice (a double click, a reload) is one command. The menu's other entries
are other screens' pages: Edit (new_campaign.py), Export (campaign_view.py), Test send.
"""
from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from schemas.events import FINAL_MESSAGE_STATUSES
from schemas.ids import is_wire_uuid
from services.api import idempotency
from services.api.commands import (ANSWER_POLL_S, BrokerUnavailable, InvalidCommand, build_command, rejection_of,
                                   rejection_status, wait_for_answer)
from services.api.console import policy
from services.api.console.routes import PREFIX, ConsoleRefused, ConsoleSession, SignedIn, console_router, page

router = console_router()

PAGE_SIZE = 25
FRAGMENT_HEADER = "X-Console-Fragment"  # the modal asks for the form alone, and is told where to go after
LOCATION_HEADER = "X-Console-Location"

STATUS_WORDS = {"created": "Created", "ready": "Ready", "in_progress": "In Progress",
                "active_retries": "Active Retries", "complete": "Complete",
                "complete_with_errors": "Complete (with errors)", "failed": "Failed", "deleted": "Deleted"}
CHANNEL_WORDS = {"sms": "SMS", "email": "Email"}
# The counts a row shows (those not zero), in the product's order; the total is always shown.
COUNT_WORDS = (("delivered", "Delivered"), ("assumed_delivered", "Assumed delivered"), ("sent", "Sent"),
               ("sending", "Sending"), ("queued", "Queued"), ("retrying", "Retrying"), ("failed", "Failed"),
               ("opted_out", "Opted out"), ("cancelled", "Cancelled"), ("waiting", "Waiting"))
ACTION_WORDS = {"edit": "Edit", "run": "Run", "test_send": "Test send", "stop": "Stop", "retry": "Retry failed",
                "resume": "Resume", "export": "Export CSV", "delete": "Delete"}
# The run disclaimer's four confirmations, in the product page's words (seed/running-a-campaign.txt), by the
# contract's flag names (the last is the uploaded data's: no contact who has opted out).
DISCLAIMER = (("consent", "You have obtained appropriate consent from all recipients"),
              ("content_compliance", "Your message content is lawful and appropriate for the intended audience"),
              ("opt_out", "Required opt-out or unsubscribe mechanisms are included"),
              ("data_responsibility", "You are not attempting to message contacts who have already opted out"))


@dataclass(frozen=True)
class Confirmation:
    """One action confirmed in a modal: its command, and what its title and button say."""
    action: str
    command_type: str
    title: str
    button: str


CONFIRMATIONS = {c.action: c for c in (
    Confirmation("run", "RunCampaign", "Run Campaign", "Run Campaign"),
    Confirmation("stop", "StopCampaign", "Stop campaign", "Stop campaign"),
    Confirmation("retry", "RetryFailedMessages", "Retry failed messages", "Retry failed messages"),
    Confirmation("resume", "RetryFailedMessages", "Resume campaign", "Resume campaign"),
    Confirmation("delete", "DeleteCampaign", "Delete campaign", "Delete campaign"),
)}
_UUID_IN_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# ------------------------------------------------------------------ plain words (no I/O)

def channel_word(channel: str | None) -> str:
    return CHANNEL_WORDS.get(channel or "", channel or "?")


def refusal_words(action: str, reason: str, detail: str, *, holder: str | None = None,
                  status: str | None = None) -> str:
    """What a rejected command means, for the person who issued it. `holder`: the campaign holding the channel
    (channel_busy), as named in the rejection's detail; `status`: the campaign's status as the list shows it."""
    now = f" (it is {STATUS_WORDS.get(status, status)} now)" if status else ""
    if reason == "channel_busy":
        if holder is None:
            return "This campaign still holds its channel: wait until its messages are handed over, then try again."
        return (f"The channel is busy: campaign {holder} is running on it, and one campaign per channel runs at a "
                "time. Wait until it has finished or stop it, then try again.")
    words = {
        "disclaimer_not_accepted": "All four confirmations are required to run a campaign. Nothing was queued or "
                                   "sent.",
        "campaign_not_ready": f"Only a Ready campaign can be run{now}. Nothing was queued or sent.",
        "no_valid_contacts": "The campaign has no valid contact to send to. Nothing was queued or sent.",
        "attachments_not_ready": "An attachment is not fully uploaded yet. Nothing was queued or sent.",
        "campaign_not_running": f"The campaign is not running{now}: it has no queued messages to cancel.",
        "stop_not_confirmed": "The stop was not confirmed. Nothing was cancelled.",
        "not_retryable": f"Only a campaign that has run can be retried{now}.",
        "nothing_to_retry": ("There is nothing to resume: no cancelled or failed message that may be re-queued."
                             if action == "resume" else
                             "There is nothing to retry: no failed message other than timed-out ones (retry those "
                             "one by one in the campaign view)."),
        "not_deletable": f"A running campaign cannot be deleted{now}: stop it or let it finish first.",
        "unknown_campaign": "There is no such campaign (it may have been deleted).",
    }
    return words.get(reason) or f"Refused ({reason}): {detail or 'no detail given'}."


def done_words(action: str, name: str, count: int | None, suppressed: int | None, pending: bool) -> str:
    """The notice after an accepted (or not yet answered) command."""
    if pending:
        return (f"{CONFIRMATIONS[action].title}: {name} — the command was sent; its answer has not come yet. The "
                "list shows the campaign's status as it changes.")
    n = count if count is not None else 0
    if action == "run":
        left_out = f" ({suppressed} opted-out recipients left out)" if suppressed else ""
        return f"{name} is running: {n} messages queued{left_out}."
    if action == "stop":
        return f"{name} is stopped: {n} queued messages cancelled. Messages already being sent carry on."
    if action == "retry":
        return f"{name}: {n} failed messages queued again."
    if action == "resume":
        return f"{name} resumed: {n} messages queued again."
    return f"{name} is deleted."


def progress_of(counts: dict[str, int]) -> tuple[int, int]:
    """(final messages, all messages)."""
    return sum(counts.get(s, 0) for s in FINAL_MESSAGE_STATUSES), counts.get("total", 0)


# ------------------------------------------------------------------ reads and commands

def _read_model(request: Request):
    return request.app.state.read_model


async def _read(request: Request, method: str, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(getattr(_read_model(request), method), *args, **kwargs)


async def campaign_session(session: SignedIn) -> ConsoleSession:
    if not policy.may_see(session.info.role, "campaigns"):
        raise ConsoleRefused(403, f"The {session.info.role} role has no access to campaigns.")
    return session


CampaignSession = Annotated[ConsoleSession, Depends(campaign_session)]


async def _campaign(request: Request, campaign_id: str) -> dict[str, Any]:
    campaign = await _read(request, "campaign", campaign_id) if is_wire_uuid(campaign_id) else None
    if campaign is None:
        raise ConsoleRefused(404, "There is no such campaign.")
    return campaign


async def _timed_out(request: Request, campaign: dict[str, Any]) -> int:
    """How many of the campaign's failed messages timed out (a bulk retry leaves them out)."""
    if not campaign["counts"].get("failed"):
        return 0
    return await _read(request, "count_messages", campaign["campaign_id"], status="failed", reason="timed_out")


def _row(campaign: dict[str, Any], actions: list[str]) -> dict[str, Any]:
    counts = campaign["counts"]
    final, total = progress_of(counts)
    return {**campaign, "status_words": STATUS_WORDS.get(campaign["status"], campaign["status"]),
            "channel_words": channel_word(campaign.get("channel")),
            "shown_counts": [(words, counts[s]) for s, words in COUNT_WORDS if counts.get(s)],
            "final": final, "total": total, "started": campaign["status"] not in policy.NOT_RUN_STATUSES,
            "actions": [(a, ACTION_WORDS[a]) for a in actions]}


@dataclass
class Outcome:
    """What became of a command: accepted (`events`), not answered yet (`pending`), or refused (`refusal`)."""
    events: list[dict[str, Any]] = field(default_factory=list)
    pending: bool = False
    refusal: str | None = None
    status_code: int = 200


async def issue(request: Request, session: ConsoleSession, confirmation: Confirmation, campaign: dict[str, Any],
                form_key: str | None, **payload: Any) -> Outcome:
    """Publish the confirmation's command as the signed-in person and wait (the API's answer wait) for the
    handler's answer, as the API's command routes do."""
    principal, campaign_id = session.principal.name, campaign["campaign_id"]
    key = form_key if form_key and re.fullmatch(idempotency.KEY_PATTERN, form_key) else None
    try:
        command = build_command(confirmation.command_type, campaign_id, principal, **payload,
                                command_id=idempotency.command_id(principal, confirmation.command_type, campaign_id,
                                                                  key))
        await request.app.state.publisher.publish([command])
    except InvalidCommand as exc:
        return Outcome(refusal=f"The command was malformed, nothing was sent: {exc}", status_code=422)
    except BrokerUnavailable:
        return Outcome(refusal="The message broker did not take the command, so nothing happened. Try again in a "
                               "moment.", status_code=503)
    deadline = time.monotonic() + request.app.state.answer_wait_s
    try:
        events = await wait_for_answer(_read_model(request).answers, command["command_id"], 0, deadline=deadline,
                                       poll_s=ANSWER_POLL_S)
    except Exception:  # the command is published: its answer will be in the campaign's history
        events = []
    rejected = rejection_of(events)
    if rejected is None:
        return Outcome(events=events, pending=not events)
    reason, detail = rejected.get("reason", "invalid_command"), rejected.get("detail") or ""
    holder = None
    if reason == "channel_busy" and (named := _UUID_IN_TEXT.search(detail)) and named.group() != campaign_id:
        other = await _read(request, "campaign", named.group())
        holder = f"“{other['name']}” ({channel_word(other.get('channel'))})" if other and other.get("name") \
            else named.group()
    fresh = await _read(request, "campaign", campaign_id)
    words = refusal_words(confirmation.action, reason, detail, holder=holder,
                          status=(fresh or campaign).get("status"))
    return Outcome(refusal=words, status_code=rejection_status(reason))


# ------------------------------------------------------------------ the list

@router.get("/campaigns")
async def campaigns_list(request: Request, session: CampaignSession,
                         page_no: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1,
                         done: Annotated[str | None, Query(max_length=20)] = None,
                         campaign: Annotated[str | None, Query(max_length=36)] = None,
                         n: Annotated[int | None, Query(ge=0)] = None,
                         suppressed: Annotated[int | None, Query(ge=0)] = None,
                         pending: bool = False) -> Response:
    role = session.info.role
    total = await _read(request, "count_campaigns")
    items = await _read(request, "campaigns", limit=PAGE_SIZE, offset=(page_no - 1) * PAGE_SIZE)
    timed_out = await asyncio.gather(*(_timed_out(request, c) for c in items))
    rows = [_row(c, policy.actions_for(c, role, timed_out_failed=t)) for c, t in zip(items, timed_out)]
    notice = None
    if done in CONFIRMATIONS and campaign and is_wire_uuid(campaign):
        found = await _read(request, "campaign", campaign)
        name = f"“{found['name']}”" if found and found.get("name") else "The campaign"
        notice = done_words(done, name, n, suppressed, pending)
    return page(request, "campaigns.html", rows=rows, total=total, page_no=page_no,
                pages=max(1, -(-total // PAGE_SIZE)), notice=notice)


# ------------------------------------------------------------------ confirmations

async def _confirmation_context(request: Request, session: ConsoleSession, campaign: dict[str, Any],
                                confirmation: Confirmation) -> dict[str, Any]:
    timed_out = await _timed_out(request, campaign)
    actions = policy.actions_for(campaign, session.info.role, timed_out_failed=timed_out)
    counts = campaign["counts"]
    return {"campaign": _row(campaign, actions), "confirmation": confirmation, "counts": counts,
            "allowed": confirmation.action in actions, "summary": campaign.get("summary") or {},
            "message_template": campaign.get("template") or {}, "timed_out": timed_out,
            "in_flight": counts.get("sending", 0) + counts.get("sent", 0) + counts.get("retrying", 0),
            "retried": counts.get("failed", 0) - timed_out, "disclaimer": DISCLAIMER,
            "form_key": secrets.token_urlsafe(16), "csrf_token": session.info.csrf_token}


def _confirmation_page(request: Request, context: dict[str, Any], status_code: int = 200,
                       error: str | None = None) -> HTMLResponse:
    body = f"modal_{context['confirmation'].action}.html"
    if request.headers.get(FRAGMENT_HEADER):
        return page(request, body, status_code, fragment=True, error=error, **context)
    return page(request, "campaigns_confirm.html", status_code, body_template=body, fragment=False,
                error=error, **context)


def _flag(form: Any, name: str) -> bool:
    return form.get(name) == "true"


async def confirmation_form(request: Request, session: ConsoleSession, campaign_id: str,
                            confirmation: Confirmation) -> Response:
    campaign = await _campaign(request, campaign_id)
    return _confirmation_page(request, await _confirmation_context(request, session, campaign, confirmation))


async def confirmed(request: Request, session: ConsoleSession, campaign_id: str,
                    confirmation: Confirmation) -> Response:
    action = confirmation.action
    campaign = await _campaign(request, campaign_id)
    form = await request.form()
    payload: dict[str, Any] = {}
    if action == "run":
        payload["disclaimer"] = {flag: _flag(form, flag) for flag, _ in DISCLAIMER}
    elif action == "stop":
        payload["confirmed"] = _flag(form, "confirmed")
    elif action in ("retry", "resume"):
        payload["include_cancelled"] = action == "resume"
    form_key = form.get("form_key")
    outcome = await issue(request, session, confirmation, campaign, form_key if isinstance(form_key, str) else None,
                          **payload)
    if outcome.refusal is not None:
        fresh = await _read(request, "campaign", campaign_id) or campaign
        context = await _confirmation_context(request, session, fresh, confirmation)
        return _confirmation_page(request, context, outcome.status_code, error=outcome.refusal)
    query: dict[str, Any] = {"done": action, "campaign": campaign_id}
    if outcome.pending:
        query["pending"] = "true"
    for event in outcome.events:
        if event.get("type") in ("CampaignRunStarted", "RetryStarted"):
            query["n"] = event.get("message_count", 0)
            if event.get("suppressed_count"):
                query["suppressed"] = event["suppressed_count"]
        elif event.get("type") == "CampaignStopped":
            query["n"] = event.get("cancelled_count", 0)
    location = f"{PREFIX}/campaigns?{urlencode(query)}"
    if request.headers.get(FRAGMENT_HEADER):  # the modal goes there itself (fetch cannot see a redirect's target)
        return Response(status_code=204, headers={LOCATION_HEADER: location, "Cache-Control": "no-store"})
    return RedirectResponse(location, status_code=303, headers={"Cache-Control": "no-store"})


def _confirmation_routes(confirmation: Confirmation) -> None:
    """GET and POST /campaigns/ID/ACTION: one path per action (a path parameter for the action would take the
    other screens' /campaigns/ID/... pages)."""
    async def form_page(request: Request, session: CampaignSession, campaign_id: str) -> Response:
        return await confirmation_form(request, session, campaign_id, confirmation)

    async def command(request: Request, session: CampaignSession, campaign_id: str) -> Response:
        return await confirmed(request, session, campaign_id, confirmation)

    path = f"/campaigns/{{campaign_id}}/{confirmation.action}"
    router.add_api_route(path, form_page, methods=["GET"], name=f"console_{confirmation.action}_form")
    router.add_api_route(path, command, methods=["POST"], name=f"console_{confirmation.action}")


for _confirmation in CONFIRMATIONS.values():
    _confirmation_routes(_confirmation)
