"""Test send: the campaign's message, rendered, to one phone number or address of the user's choice.

    GET  /console/campaigns/ID/test-send   the form: where to send it, and optionally which contact's variables
    POST /console/campaigns/ID/test-send   sends it as the signed-in person and shows what became of it

The command is the API's (services.api.writes.send_test_message): a SendTestMessage issued by `user:NAME`, through
the real provider path and the hand-off fence, never retried, answered on the campaign events (never a message
status: the campaign's counts do not move), at most 5 per user per hour. Each form carries a key of its own
(Idempotency-Key), so a form sent twice (a double click, a reload) sends one message.
"""
from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from schemas.ids import is_wire_uuid
from services.api import idempotency
from services.api.commands import BrokerUnavailable, InvalidCommand
from services.api.console.campaigns import STATUS_WORDS, CampaignSession, channel_word
from services.api.console.routes import ConsoleRefused, console_router, page
from services.api.writes import send_test_message

router = console_router()

LIMIT_WORDS = "At most 5 test messages per person per hour, over every campaign."
REASON_WORDS = {
    "invalid_destination": "the number or address is not valid for it", "undeliverable": "it cannot be delivered",
    "carrier_rejected": "the carrier rejected it", "blocked": "it is blocked", "bounced": "it bounced",
    "setup_error": "the channel's provider credentials were refused (see Settings)", "unknown": "no reason given",
    "deferred": "the receiving server deferred it (test messages are not sent again)",
    "provider_error": "the provider could not be reached or answered with an error (test messages are not retried)",
    "provider_held": "the provider is unavailable now: sending is held until it answers again",
    "not_sent": "no sender took it before its sending limit",
}


def outcome_words(view: dict[str, Any] | None, channel: str | None) -> tuple[str, str]:
    """(kind, sentence) of a test message's outcome, for the person who sent it: kind `done`, `error` or `note`."""
    if view is None:
        return "note", "Sent to the command handler; its answer has not come yet. It will be in the campaign's history."
    to = view.get("destination")
    outcome, reason, code = view.get("outcome"), view.get("reason"), view.get("provider_code")
    because = REASON_WORDS.get(reason or "", reason or "")
    with_code = f" (provider code {code})" if code else ""
    if outcome is None:
        return "note", (f"Queued for {to}: the provider's answer has not come yet. It will be in the campaign's "
                        "history.")
    if outcome == "accepted":
        return "done", f"Sent: the provider accepted the test message to {to}."
    if outcome == "opted_out":
        return "error", f"Not sent: {to} has opted out of {channel_word(channel)} messages."
    if outcome == "refused":
        return "error", f"The provider refused the test message to {to}: {because}{with_code}."
    if outcome == "failed":
        return "error", f"Not sent to {to}: {because}{with_code}."
    return "note", f"Handed to the provider for {to}, with no answer: it may have arrived."


def refusal_words(reason: str, detail: str, channel: str | None) -> str:
    if reason == "test_send_limit":
        return f"You have sent as many test messages as an hour allows. {LIMIT_WORDS} ({detail})"
    if reason == "invalid_command":
        return f"Not sent: {detail}. Give a destination an {channel_word(channel)} campaign can send to."
    if reason == "unknown_campaign":
        return "There is no such campaign (it may have been deleted)."
    return f"Not sent: {reason} ({detail})."


async def _campaign(request: Request, campaign_id: str) -> dict[str, Any]:
    read_model = request.app.state.read_model
    campaign = await asyncio.to_thread(read_model.campaign, campaign_id) if is_wire_uuid(campaign_id) else None
    if campaign is None or campaign.get("status") == "deleted":
        raise ConsoleRefused(404, "There is no such campaign.")
    return campaign


def _form_page(request: Request, campaign: dict[str, Any], status_code: int = 200, **context: Any) -> Response:
    template = campaign.get("template") or {}
    what = template.get("body") if campaign.get("channel") == "sms" else template.get("subject")
    return page(request, "test_send.html", status_code, campaign=campaign, what=what,
                channel_words=channel_word(campaign.get("channel")),
                status_words=STATUS_WORDS.get(campaign.get("status"), campaign.get("status")),
                form_key=secrets.token_urlsafe(24), limit_words=LIMIT_WORDS, **context)


@router.get("/campaigns/{campaign_id}/test-send")
async def show_form(request: Request, campaign_id: str, session: CampaignSession) -> Response:
    return _form_page(request, await _campaign(request, campaign_id))


@router.post("/campaigns/{campaign_id}/test-send")
async def send_from_form(request: Request, campaign_id: str, session: CampaignSession) -> Response:
    campaign = await _campaign(request, campaign_id)
    form = await request.form()
    destination = str(form.get("destination") or "").strip()
    row_text = str(form.get("row") or "").strip()
    key = str(form.get("form_key") or "")
    kept = {"destination": destination, "row": row_text}
    if not destination:
        return _form_page(request, campaign, 422, error="Give the phone number or address to send it to.", **kept)
    if row_text and not re.fullmatch(r"[1-9][0-9]{0,9}", row_text):
        return _form_page(request, campaign, 422, error="The contact's row is a whole number, 1 or more.", **kept)
    channel = campaign.get("channel")
    try:
        status_code, answer = await send_test_message(
            request, session.principal, campaign_id, destination, row=int(row_text) if row_text else None,
            idempotency_key=key if re.fullmatch(idempotency.KEY_PATTERN, key) else None)
    except InvalidCommand:
        return _form_page(request, campaign, 422, error="That cannot be sent as a test message: check the number or "
                                                        "address and the row.", **kept)
    except BrokerUnavailable:
        return _form_page(request, campaign, 503, error="The message broker did not take the command, so nothing "
                                                        "was sent. Try again in a moment.", **kept)
    if status_code != 202:
        words = refusal_words(answer["reason"], answer.get("detail") or "", channel)
        return _form_page(request, campaign, status_code, error=words, **kept)
    kind, words = outcome_words(answer.get("test_message"), channel)
    return _form_page(request, campaign, outcome=(kind, words), sent=answer.get("test_message"),
                      command_id=answer["command_id"], **kept)
