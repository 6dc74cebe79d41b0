"""Provider outcomes -> message status and reason: the one documented table.

The sender reports each result as an ``outcome`` (docs/design.md, ``SenderResults``) with an optional
``provider_code``; ``rules.result_move`` calls :func:`classify` to learn the message status it leads to.
Whether a status record is written, and whether a move out of a final state is allowed, is the message
rules' decision (``rules.py``), not this table's. ``reason`` is set only with status ``failed`` (wire contract: else null).

## Outcomes

| outcome | channel | status, reason |
|---|---|---|
| `accepted` | both | `sending` (the provider took it; only the accepted flag changes) |
| `presend_error` | both | `sending` (one record per failed submission); with `final=True`: `failed` / `provider_error` |
| `no_answer` | both | `sending` (nothing changes; the Sending timer fails it `timed_out`) |
| `sent` | sms | `sent` |
| `delivered` | both | `delivered` |
| `deferred` | email | `retrying` |
| `opted_out` | both | `opted_out` (SMS STOP, email unsubscribe or spam report) |
| `refused`, `undelivered`, `failed`, `bounced` | see below | the code tables below; without a code, the default below |

Defaults when `provider_code` is null or empty:

| outcome | sms | email |
|---|---|---|
| `refused` | `failed` / `unknown` | `failed` / `unknown` |
| `undelivered` | `failed` / `undeliverable` | `failed` / `undeliverable` |
| `failed` | `failed` / `unknown` | `failed` / `unknown` |
| `bounced` | not an SMS outcome | `failed` / `bounced` |

A code that is given but not in the tables is `failed` / `unknown`, whatever the outcome.

## SMS: Twilio error codes

| code | status | reason | meaning |
|---|---|---|---|
| 21211 | failed | invalid_destination | invalid 'To' number (contract) |
| 21614 | failed | invalid_destination | 'To' is not a mobile number (contract) |
| 21612 | failed | undeliverable | cannot route to this number (contract) |
| 30003 | failed | undeliverable | unreachable handset (contract) |
| 30005 | failed | undeliverable | unknown or inactive handset (contract) |
| 21408 | failed | blocked | no permission to send to this region (contract) |
| 30004 | failed | blocked | message blocked (e.g. the recipient blocked the sender) |
| 30007 | failed | carrier_rejected | carrier filtered the message (contract) |
| 30008 | failed | unknown | Twilio's "unknown error" |
| 21610 | opted_out | | recipient replied STOP (contract; never retried) |
| 20003 | failed | setup_error | authentication failed: the channel's credentials (contract) |
| other 30xxx | failed | undeliverable | **decision**: the 30xxx range is Twilio's delivery-failure range: the carrier or handset did not take the message |
| anything else | failed | unknown | |

## Email: SMTP reply codes (leading three digits; `"550 5.1.1 ..."` works, as does a bare enhanced status `"5.1.1"`)

| code | status | reason | meaning |
|---|---|---|---|
| 530, 534, 535 | failed | setup_error | SMTP authentication required / too weak / refused: the channel's credentials |
| 401, 403 | failed | setup_error | SendGrid's HTTP answers to a bad API key / unverified sender (no SMTP code uses 40x) |
| other 4xx | retrying | | temporary: the provider tries again (contract: 4xx at RCPT or DATA) |
| other 5xx | failed | bounced | permanent (contract: 5xx at RCPT or DATA) |

## Email: SendGrid event types (`bounce` event `type`, or `dropped` with its reason after `:` or a space)

| code | status | reason | meaning |
|---|---|---|---|
| `bounce` | failed | bounced | the receiving server rejected the address |
| `blocked` | failed | blocked | the receiving server refused the message (reputation, content, policy) |
| `dropped` + `Unsubscribed Address`, `Spam Reporting Address` | opted_out | | **decision**: SendGrid suppressed it because the recipient unsubscribed or complained, as our own opt-out would |
| `dropped` + `Bounced Address` | failed | bounced | **decision**: on SendGrid's bounce list from an earlier bounce |
| `dropped` + `Invalid` | failed | invalid_destination | **decision**: SendGrid found the address invalid |
| `dropped` + `Spam Content` | failed | blocked | **decision**: the content was refused, not the recipient |
| `dropped` + anything else | failed | unknown | |

Codes are matched after trimming; SendGrid words are case-insensitive, and a drop reason's trailing
parenthetical is ignored (`Spam Content (if spam checker app enabled)` is `Spam Content`).
"""
from __future__ import annotations

import re

__all__ = [
    "OUTCOMES",
    "TWILIO_CODES",
    "SMTP_CODES",
    "SENDGRID_TYPES",
    "SENDGRID_DROP_REASONS",
    "UnknownOutcome",
    "classify",
]

Classification = tuple[str, "str | None"]

# The message statuses and failure reasons are the wire's (schemas.events); these are the pairs the
# tables below lead to.
FAILED_UNKNOWN: Classification = ("failed", "unknown")
OPTED_OUT: Classification = ("opted_out", None)
INVALID_DESTINATION: Classification = ("failed", "invalid_destination")
UNDELIVERABLE: Classification = ("failed", "undeliverable")
BLOCKED: Classification = ("failed", "blocked")
BOUNCED: Classification = ("failed", "bounced")
SETUP_ERROR: Classification = ("failed", "setup_error")

TWILIO_CODES: dict[str, Classification] = {
    "21211": INVALID_DESTINATION,
    "21614": INVALID_DESTINATION,
    "21612": UNDELIVERABLE,
    "30003": UNDELIVERABLE,
    "30005": UNDELIVERABLE,
    "21408": BLOCKED,
    "30004": BLOCKED,
    "30007": ("failed", "carrier_rejected"),
    "30008": FAILED_UNKNOWN,
    "21610": OPTED_OUT,
    "20003": SETUP_ERROR,
}
TWILIO_30XXX_DEFAULT: Classification = UNDELIVERABLE

# SMTP authentication refused (530, 534, 535) and SendGrid's HTTP 401/403: the channel's credentials.
SMTP_CODES: dict[str, Classification] = dict.fromkeys(("530", "534", "535", "401", "403"), SETUP_ERROR)
SMTP_CLASS: dict[str, Classification] = {
    "4": ("retrying", None),
    "5": BOUNCED,
}

SENDGRID_TYPES: dict[str, Classification] = {
    "bounce": BOUNCED,
    "blocked": BLOCKED,
}
SENDGRID_DROP_REASONS: dict[str, Classification] = {
    "unsubscribed address": OPTED_OUT,
    "spam reporting address": OPTED_OUT,
    "bounced address": BOUNCED,
    "invalid": INVALID_DESTINATION,
    "spam content": BLOCKED,
}

# Outcomes whose status does not depend on a code.
_FIXED: dict[str, dict[str, Classification]] = {
    "accepted": {"sms": ("sending", None), "email": ("sending", None)},
    "presend_error": {"sms": ("sending", None), "email": ("sending", None)},
    "no_answer": {"sms": ("sending", None), "email": ("sending", None)},
    "sent": {"sms": ("sent", None)},
    "delivered": {"sms": ("delivered", None), "email": ("delivered", None)},
    "deferred": {"email": ("retrying", None)},
    "opted_out": {"sms": OPTED_OUT, "email": OPTED_OUT},
}
# Outcomes decided by the code, with their default when there is no code.
_CODED_DEFAULTS: dict[str, dict[str, Classification]] = {
    "refused": {"sms": FAILED_UNKNOWN, "email": FAILED_UNKNOWN},
    "undelivered": {"sms": UNDELIVERABLE, "email": UNDELIVERABLE},
    "failed": {"sms": FAILED_UNKNOWN, "email": FAILED_UNKNOWN},
    "bounced": {"email": BOUNCED},
}
OUTCOMES = frozenset(_FIXED) | frozenset(_CODED_DEFAULTS)

_SMTP_RE = re.compile(r"([45])(?:(\d\d)(?!\d)|\.\d{1,3}\.\d{1,3}(?![\d.]))", re.ASCII)
_TWILIO_30XXX_RE = re.compile(r"30\d{3}", re.ASCII)
_PARENTHETICAL_RE = re.compile(r"\s*\([^()]*\)\s*$")


class UnknownOutcome(ValueError):
    """The outcome is not one of OUTCOMES, or not one the channel has (e.g. `sent` for email)."""


def _twilio(code: str) -> Classification:
    found = TWILIO_CODES.get(code)
    if found is not None:
        return found
    if _TWILIO_30XXX_RE.fullmatch(code):
        return TWILIO_30XXX_DEFAULT
    return FAILED_UNKNOWN


def _email(code: str) -> Classification:
    smtp = _SMTP_RE.match(code)
    if smtp is not None:
        if smtp.group(2) is not None:
            found = SMTP_CODES.get(smtp.group(1) + smtp.group(2))
            if found is not None:
                return found
        return SMTP_CLASS[smtp.group(1)]
    word = code.lower()
    found = SENDGRID_TYPES.get(word)
    if found is not None:
        return found
    if word.startswith("dropped"):
        reason = _PARENTHETICAL_RE.sub("", word[len("dropped"):].lstrip(" :")).strip()
        return SENDGRID_DROP_REASONS.get(reason, FAILED_UNKNOWN)
    return FAILED_UNKNOWN


def classify(outcome: str, provider_code: str | int | None, channel: str, *,
             final: bool = False) -> tuple[str, str | None]:
    """The (status, reason) a provider outcome leads to; reason is None unless status is `failed`.

    `final` matters only for `presend_error`: the sender's last pre-send failure of a message (no more
    retries) is `failed` / `provider_error`; earlier ones leave it `sending`.
    Raises UnknownOutcome for an outcome the channel does not have, ValueError for an unknown channel.
    """
    if channel not in ("sms", "email"):
        raise ValueError(f"unknown channel {channel!r}")
    if outcome == "presend_error" and final:
        return "failed", "provider_error"
    fixed = _FIXED.get(outcome)
    if fixed is not None:
        if channel not in fixed:
            raise UnknownOutcome(f"outcome {outcome!r} does not apply to {channel}")
        return fixed[channel]
    defaults = _CODED_DEFAULTS.get(outcome)
    if defaults is None:
        raise UnknownOutcome(f"unknown outcome {outcome!r}")
    if channel not in defaults:
        raise UnknownOutcome(f"outcome {outcome!r} does not apply to {channel}")
    code = "" if provider_code is None else str(provider_code).strip()
    if not code:
        return defaults[channel]
    return _twilio(code) if channel == "sms" else _email(code)
