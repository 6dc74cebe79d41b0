"""The provider simulator's rules (wire contract, "Provider simulator outcomes"): pure, no I/O.

One kernel for every simulator: the HTTP simulator (`services/simulator/`, speaking Twilio and SendGrid),
the sender's in-process adapter, and an SMTP server used in tests all answer from these functions, so the
contract's table lives in exactly one place.

Vocabulary
- A *submission* is one provider call (Twilio: one message; SendGrid: one Mail Send carrying up to 1,000
  personalizations). `attempt` counts submissions of the same message id, from 1. The answer is a
  `Submission`: `accepted` (Twilio 201 / SendGrid 202), `presend_error` (503: nothing was taken; the sender
  retries), `refused` (Twilio 400 with an error code) or `no_answer` (the request is held and never answered;
  `http_status` 0).
- A *receipt* is what the provider reports later about an accepted message: a `Receipt` due `after_s`
  seconds after the acceptance, with the provider's event name (SMS: Twilio `MessageStatus` values `sent`,
  `delivered`, `undelivered`, `failed`; email: SendGrid event names `processed`, `deferred`, `delivered`,
  `bounce`, `spamreport`) and the provider's code (Twilio `ErrorCode`, SMTP code for bounces) or None.
  Receipts are listed in the order they are due.

SMS (Twilio)
- Twilio test numbers, refused at submission: +15005550001 21211, +15005550002 21612, +15005550003 21408,
  +15005550004 21610, +15005550009 21614.
- Fictional range `+1NXX555010d` (`\\+1[2-9]\\d{2}555010(\\d)`), by the last digit d: 0 delivered; 1 `sent`
  and nothing more; 2 undelivered 30003; 3 failed 30007; 4 503 to the first two submissions, then
  delivered; 5 503 to every submission; 6 never answered; 7 `sent`, then `delivered` `late_receipt_s`
  after the `sent`; 8, 9 delivered. Any other number: delivered.
- Receipts of an accepted SMS: `sent` after `SMS_SENT_AFTER_S`, then the final one after
  `SMS_FINAL_AFTER_S` (both well within the contract's second).

Email (SendGrid / SMTP)
- Submission outcomes, for the whole call that carries the address (local part ending in): `+fail503x2`
  503 to the first two submissions; `+fail503` 503 to every submission; `+noanswer` never answered. When a
  call carries several, a 503 wins over no answer (a provider that is down answers 503 before it reads the
  request): any `+fail503`, else any `+fail503x2` while `attempt <= 2`, else any `+noanswer`, else accepted.
- Events of an accepted email: `processed`, then by address: Amazon SES simulator mailboxes on
  `simulator.amazonses.com` (a `+label` is ignored: `success+x@` is `success@`): success, ooto ->
  `delivered`; bounce, suppressionlist -> `bounce` with code "550"; complaint -> `delivered` then
  `spamreport`. A local part ending in `+defer`: `deferred` twice (`defer_interval_s` apart), then
  `delivered`; `+deferforever`: `deferred` every `defer_interval_s` until `retry_window_s` has passed since
  the first deferral, with no final event (at most `MAX_DEFERRALS` events: beyond that the interval is
  stretched so the last one still comes near the end of the window). Any other address: `delivered`.
  The `+defer` suffixes are checked before the SES mailbox names.
- SMTP view (`smtp_reply`): the reply to RCPT TO of the `attempt`-th submission of a message: `+defer` 451
  to the first two submissions then 250; `+deferforever` always 451; SES bounce / suppressionlist 550;
  anything else 250. The HTTP submission outcomes (`+fail503...`, `+noanswer`) are not SMTP replies: an SMTP
  test server that wants them can use `email_call_submission` itself (e.g. 421 at connect for a 503).

Memory: only the destinations for which `sms_counts_attempts` / `email_counts_attempts` are true have
answers that depend on `attempt`; a simulator need keep counters for those only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

# ------------------------------------------------------------------ types

SubmissionKind = Literal["accepted", "presend_error", "refused", "no_answer"]


@dataclass(frozen=True)
class Submission:
    """The answer to one provider call."""

    kind: SubmissionKind
    http_status: int  # 201 (Twilio) / 202 (SendGrid) accepted, 503 presend_error, 400 refused, 0 no_answer
    provider_code: str | None  # Twilio error code when refused, "503" for a presend_error, else None
    message: str | None = None  # the provider's error text (Twilio's `message`), when there is one


@dataclass(frozen=True)
class Receipt:
    """One status callback / webhook event, due `after_s` seconds after the provider accepted the message."""

    after_s: float
    event: str
    provider_code: str | None
    reason: str | None = None  # a human-readable reason (Twilio error text, SendGrid bounce reason)


ACCEPTED_SMS = Submission("accepted", 201, None)
ACCEPTED_EMAIL = Submission("accepted", 202, None)
PRESEND_503 = Submission("presend_error", 503, "503", "Service Unavailable")
NO_ANSWER = Submission("no_answer", 0, None)

# ------------------------------------------------------------------ SMS (Twilio)

TWILIO_TEST_NUMBERS: dict[str, str] = {  # refused at submission (Twilio's magic test numbers)
    "+15005550001": "21211",
    "+15005550002": "21612",
    "+15005550003": "21408",
    "+15005550004": "21610",
    "+15005550009": "21614",
}

TWILIO_ERROR_MESSAGES: dict[str, str] = {
    "20003": "Authenticate",
    "21211": "The 'To' number is not a valid phone number.",
    "21408": "Permission to send an SMS has not been enabled for the region indicated by the 'To' number.",
    "21610": "Attempt to send to unsubscribed recipient",
    "21612": "The 'To' phone number is not currently reachable via SMS.",
    "21614": "'To' number is not a valid mobile number",
    "30003": "Unreachable destination handset",
    "30007": "Message filtered",
}

FICTIONAL_SMS = re.compile(r"\+1[2-9]\d{2}555010(\d)", re.ASCII)  # +1NXX555010d, any area code

SMS_SENT_AFTER_S = 0.05  # `sent` this long after the acceptance
SMS_FINAL_AFTER_S = 0.15  # the final receipt this long after the acceptance (digit 7: see sms_receipts)


def sms_digit(destination: str) -> str | None:
    """The last digit d of a fictional `+1NXX555010d` number, else None."""
    match = FICTIONAL_SMS.fullmatch(destination)
    return match.group(1) if match else None


def sms_counts_attempts(destination: str) -> bool:
    """True when the answer to a submission of an SMS to `destination` depends on its attempt number."""
    return sms_digit(destination) == "4"


def sms_submission(destination: str, attempt: int) -> Submission:
    """The answer to the `attempt`-th submission (1, 2, ...) of one SMS message to `destination`."""
    code = TWILIO_TEST_NUMBERS.get(destination)
    if code is not None:
        return Submission("refused", 400, code, TWILIO_ERROR_MESSAGES[code])
    digit = sms_digit(destination)
    if (digit == "4" and attempt <= 2) or digit == "5":
        return PRESEND_503
    if digit == "6":
        return NO_ANSWER
    return ACCEPTED_SMS


def sms_receipts(destination: str, late_receipt_s: float) -> list[Receipt]:
    """The status callbacks of an accepted SMS to `destination` (empty for one never accepted)."""
    if destination in TWILIO_TEST_NUMBERS:
        return []
    digit = sms_digit(destination)
    if digit in ("5", "6"):
        return []
    sent = Receipt(SMS_SENT_AFTER_S, "sent", None)
    if digit == "1":
        return [sent]
    if digit == "7":
        return [sent, Receipt(SMS_SENT_AFTER_S + late_receipt_s, "delivered", None)]
    if digit == "2":
        return [sent, Receipt(SMS_FINAL_AFTER_S, "undelivered", "30003", TWILIO_ERROR_MESSAGES["30003"])]
    if digit == "3":
        return [sent, Receipt(SMS_FINAL_AFTER_S, "failed", "30007", TWILIO_ERROR_MESSAGES["30007"])]
    return [sent, Receipt(SMS_FINAL_AFTER_S, "delivered", None)]


# ------------------------------------------------------------------ email (SendGrid, SMTP)

SES_SIMULATOR_DOMAIN = "simulator.amazonses.com"
SES_DELIVERED = frozenset({"success", "ooto"})
SES_BOUNCED = frozenset({"bounce", "suppressionlist"})
SES_COMPLAINT = "complaint"

EMAIL_PROCESSED_AFTER_S = 0.05  # `processed` this long after the acceptance
EMAIL_OUTCOME_AFTER_S = 0.15  # the first outcome event (delivered, bounce, first deferral)
EMAIL_SPAMREPORT_AFTER_S = 0.3  # complaint: the spam report, after its delivery
MAX_DEFERRALS = 1000  # `+deferforever` never gets more deferred events than this

BOUNCE_REASON = "550 5.1.1 Recipient address rejected: user unknown (simulator)"
DEFER_REASON = "451 4.7.1 Temporary failure, try again later (simulator)"


def _split(address: str) -> tuple[str, str]:
    local, _, domain = address.lower().rpartition("@")
    return local, domain


def _ses_mailbox(local: str, domain: str) -> str | None:
    """The SES simulator mailbox an address names (`success+x@simulator.amazonses.com` -> success)."""
    if domain != SES_SIMULATOR_DOMAIN:
        return None
    return local.split("+", 1)[0]


def email_counts_attempts(destination: str) -> bool:
    """True when the answer to a call carrying `destination` (or its SMTP reply) depends on the attempt."""
    local, _ = _split(destination)
    return local.endswith(("+fail503x2", "+defer"))


def email_call_submission(destinations: list[str], attempt: int) -> Submission:
    """The answer to the `attempt`-th submission of one send call carrying `destinations` (whole call)."""
    locals_ = [_split(d)[0] for d in destinations]
    if any(local.endswith("+fail503") for local in locals_):
        return PRESEND_503
    if attempt <= 2 and any(local.endswith("+fail503x2") for local in locals_):
        return PRESEND_503
    if any(local.endswith("+noanswer") for local in locals_):
        return NO_ANSWER
    return ACCEPTED_EMAIL


def email_events(destination: str, defer_interval_s: float, retry_window_s: float) -> list[Receipt]:
    """The webhook events of an accepted email to `destination`, in the order they are due."""
    local, domain = _split(destination)
    processed = Receipt(EMAIL_PROCESSED_AFTER_S, "processed", None)
    first = EMAIL_OUTCOME_AFTER_S
    if local.endswith("+deferforever"):
        interval = max(defer_interval_s, retry_window_s / MAX_DEFERRALS)
        count = 1
        while count < MAX_DEFERRALS and count * interval < retry_window_s:
            count += 1
        return [processed] + [Receipt(first + k * interval, "deferred", None, DEFER_REASON) for k in range(count)]
    if local.endswith("+defer"):
        return [processed,
                Receipt(first, "deferred", None, DEFER_REASON),
                Receipt(first + defer_interval_s, "deferred", None, DEFER_REASON),
                Receipt(first + 2 * defer_interval_s, "delivered", None)]
    mailbox = _ses_mailbox(local, domain)
    if mailbox in SES_BOUNCED:
        return [processed, Receipt(first, "bounce", "550", BOUNCE_REASON)]
    if mailbox == SES_COMPLAINT:
        return [processed, Receipt(first, "delivered", None), Receipt(EMAIL_SPAMREPORT_AFTER_S, "spamreport", None)]
    return [processed, Receipt(first, "delivered", None)]


def smtp_reply(destination: str, attempt: int) -> tuple[int, str]:
    """The SMTP reply to RCPT TO `destination` on the `attempt`-th submission of that message.

    250 accepted; 451 (temporary: the sender re-submits while the retry window lasts) for `+defer` on its
    first two submissions and for `+deferforever` always; 550 (permanent: bounced) for the SES bounce and
    suppressionlist mailboxes; 250 for everything else.
    """
    local, domain = _split(destination)
    if local.endswith("+deferforever") or (local.endswith("+defer") and attempt <= 2):
        return 451, "4.7.1 Temporary failure, try again later (simulator)"
    if _ses_mailbox(local, domain) in SES_BOUNCED:
        return 550, "5.1.1 Recipient address rejected: user unknown (simulator)"
    return 250, "2.1.5 OK (simulator)"
