"""Provider callbacks -> typed internal records (pure: no I/O).

Each result is a `schemas.internal.SenderResult` (its campaign's `SenderResults` is made by the batcher),
each opt-out an `OptOutChanged`: built as their models, so a record the contract rejects fails here, where
it is made. `opt_out_id` = uuid5 of source, destination and the provider's event id, so a provider's
retry carries the same id.

Everything here takes untrusted values (signed ones, but shaped by whoever signed them): a field of the wrong
type (an object, a list, a boolean where text is expected) counts as absent, provider codes and message ids are
clipped to `MAX_CODE_CHARS`, and a destination longer than `MAX_DESTINATION_CHARS` opts nobody out. So a record
stays small (a results record carries up to 1,000 of them) and nothing is stringified deeply.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from schemas.destinations import validate_destination
from schemas.internal import OptOutChanged, SenderResult
from schemas.times import from_timestamp, utc_now
from services.common.ids import OUTREACH_NS, is_wire_uuid


def result(message_id: str, outcome: str, *, provider_code: str | None = None,
           provider_message_id: str | None = None, occurred_at: str | None = None,
           attempt: int | None = None) -> SenderResult:
    """One result; `attempt`: the submission it answers, as the sender put it in the callback (null when the
    callback does not say: the handler then takes the fence's count)."""
    return SenderResult(message_id=message_id, outcome=outcome, attempt=attempt, provider_code=provider_code,
                        provider_message_id=provider_message_id, occurred_at=occurred_at or utc_now())


def submission_number(value: Any) -> int | None:
    """The submission number (`attempt`) a callback carries back as `submission` (the Twilio status callback's
    query parameter, a SendGrid custom arg), if it is one."""
    text_value = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not (text_value.isascii() and text_value.isdigit() and len(text_value) <= 10):
        return None
    return int(text_value) if 0 < int(text_value) < 2**31 else None


def opt_out(channel: str, destination: str, opted_out: bool, source: str, event_id: str | None,
            occurred_at: str | None = None) -> OptOutChanged:
    """An opt-out (or opt-in); with the provider's event id its id is stable across provider retries."""
    opt_out_id = (uuid.uuid5(OUTREACH_NS, f"opt-out:{source}:{destination}:{event_id}") if event_id
                  else uuid.uuid4())
    return OptOutChanged(opt_out_id=str(opt_out_id), channel=channel, destination=destination,
                         opted_out=opted_out, source=source, occurred_at=occurred_at or utc_now())


MAX_CODE_CHARS = 256  # provider codes, responses and message ids as published (longer ones are clipped)
MAX_DESTINATION_CHARS = 320  # an email address is at most 254 characters, a phone number far less


def text(value: Any) -> str | None:
    """A form or JSON scalar (text or a number) as stripped text; None when absent, blank or not a scalar."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    stripped = str(value).strip()
    return stripped or None


def clipped(value: Any, limit: int = MAX_CODE_CHARS) -> str | None:
    """`text(value)` cut to `limit` characters (provider codes and ids, as published)."""
    found = text(value)
    return found[:limit] if found else None


def destination(value: Any) -> str | None:
    """A destination as given, or None when absent, not text or too long to be one."""
    found = text(value)
    return found if found and len(found) <= MAX_DESTINATION_CHARS else None


def _from_unix(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return from_timestamp(value)
    except (OverflowError, OSError, ValueError):
        return None


def normalize_email(address: str) -> str:
    """The address in the form contacts are stored in (the contract's validity rule), so opt-outs match it."""
    normalized, _ = validate_destination("email", address)
    return normalized or address.strip()


# ------------------------------------------------------------------ Twilio

TWILIO_OUTCOMES = {"sent": "sent", "delivered": "delivered", "undelivered": "undelivered", "failed": "failed"}
TWILIO_CODED = {"undelivered", "failed"}
TWILIO_OPTED_OUT_CODE = "21610"


def twilio_status_records(form: Mapping[str, str], message_id: str | None, attempt: int | None = None
                          ) -> tuple[SenderResult | None, OptOutChanged | None]:
    """(result or None, opt-out or None) for one Twilio status callback."""
    status = (text(form.get("MessageStatus")) or text(form.get("SmsStatus")) or "").lower()
    outcome = TWILIO_OUTCOMES.get(status)
    if outcome is None:  # queued / accepted / sending / scheduled / read ...: nothing changes
        return None, None
    sid = twilio_sid(form)
    code = clipped(form.get("ErrorCode")) if outcome in TWILIO_CODED else None
    record = (result(message_id, outcome, provider_code=code, provider_message_id=clipped(sid), attempt=attempt)
              if message_id else None)
    to = destination(form.get("To"))
    optout = None
    if code == TWILIO_OPTED_OUT_CODE and to:
        optout = opt_out("sms", to, True, "twilio_21610", sid)
    return record, optout


def twilio_sid(form: Mapping[str, str]) -> str | None:
    """The message's Twilio SID (`MessageSid`, else the older `SmsSid`)."""
    return text(form.get("MessageSid")) or text(form.get("SmsSid"))


STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})
STOP_REPLY = "You have been unsubscribed and will receive no more messages. Reply START to resubscribe."
START_REPLY = "You have been resubscribed and will receive messages again. Reply STOP to unsubscribe."
HELP_REPLY = "Outreach messages. Reply STOP to unsubscribe, START to resubscribe. Msg & data rates may apply."


def inbound_action(body: str | None) -> tuple[bool | None, str | None, str | None]:
    """(opted_out or None, source, TwiML reply text or None) for an inbound SMS body."""
    word = (body or "").strip().upper() if len(body or "") <= 64 else ""  # a keyword is one short word
    if word in STOP_WORDS:
        return True, "sms_stop", STOP_REPLY
    if word in START_WORDS:
        return False, "sms_start", START_REPLY
    if word in HELP_WORDS:
        return None, None, HELP_REPLY
    return None, None, None


def twiml(message: str | None) -> str:
    if message is None:
        return '<?xml version="1.0" encoding="UTF-8"?><Response/>'
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Message>{xml_escape(message)}</Message></Response>'


# ------------------------------------------------------------------ SendGrid

def _sendgrid_code(event: Mapping[str, Any]) -> str | None:
    return clipped(event.get("status")) or clipped(event.get("reason"))


def sendgrid_records(event: Mapping[str, Any]) -> tuple[str, SenderResult, OptOutChanged | None] | None:
    """(campaign_id, result, opt-out or None) for one SendGrid event; None when it is not ours or not mapped."""
    campaign_id, message_id = event.get("campaign_id"), event.get("message_id")
    if not (is_wire_uuid(campaign_id) and is_wire_uuid(message_id)):
        return None
    kind = (text(event.get("event")) or "").lower()
    optout_source = None
    code = None
    if kind == "deferred":
        outcome = "deferred"
        response = text(event.get("response"))
        code = response[:3] if response and response[:3].isdigit() else None
    elif kind == "delivered":
        outcome = "delivered"
    elif kind == "bounce":
        outcome = "blocked" if (text(event.get("type")) or "").lower() == "blocked" else "bounced"
        code = _sendgrid_code(event)
    elif kind == "dropped":
        outcome = "dropped"
        code = clipped(event.get("reason"))
    elif kind == "spamreport":
        outcome, optout_source = "spamreport", "email_spamreport"
    elif kind in ("unsubscribe", "group_unsubscribe"):
        outcome, optout_source = "unsubscribe", "email_unsubscribe"
    else:  # processed, open, click, group_resubscribe, ...
        return None
    occurred_at = _from_unix(event.get("timestamp")) or utc_now()
    record = result(message_id, outcome, provider_code=code, provider_message_id=clipped(event.get("sg_message_id")),
                    occurred_at=occurred_at, attempt=submission_number(event.get("submission")))
    optout = None
    email = destination(event.get("email"))
    if optout_source and email:
        optout = opt_out("email", normalize_email(email), True, optout_source,
                         text(event.get("sg_event_id")), occurred_at)
    return campaign_id, record, optout
