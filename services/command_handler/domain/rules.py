"""Message and campaign rules as pure functions: which moves are allowed, and what a campaign's status is.

Every rule of the wire contract's "Campaign status" and "Message status stream" sections lives here, so
the aggregates only apply what these functions decide. The wire's vocabulary (message and campaign
statuses, the final ones) is `schemas.events`; what the domain makes of it (which statuses allow an edit,
a delete, keep a channel held; how a provider's outcome moves a message) is declared here, once.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from schemas.events import FINAL_MESSAGE_STATUSES, MESSAGE_STATUSES
from schemas.internal import SenderResult
from services.command_handler.domain import provider_codes

log = logging.getLogger(__name__)

FINAL_STATUSES = frozenset(FINAL_MESSAGE_STATUSES)
# Messages in these states keep a campaign in progress.
IN_FLIGHT_STATUSES = frozenset({"queued", "sending", "sent"})
# Messages the provider never had: a result about one is not ours to believe.
NEVER_HANDED_OFF = frozenset({"waiting", "queued", "cancelled"})

# Campaign statuses that allow a change of template, and a delete (contract: not_editable, not_deletable).
EDITABLE_STATUSES = frozenset({"created", "ready"})
DELETABLE_STATUSES = frozenset({"created", "ready", "complete", "complete_with_errors", "failed"})

# The four confirmations a Run needs (contract: disclaimer_not_accepted).
DISCLAIMER_CONFIRMATIONS = ("consent", "content_compliance", "opt_out", "data_responsibility")

# How far along the lifecycle a status is; a receipt never moves a message to a lower rank.
_RANK = {
    "waiting": 0, "queued": 1, "sending": 2, "sent": 3, "retrying": 4,
    "assumed_delivered": 5, "delivered": 6, "failed": 6, "opted_out": 6, "cancelled": 6,
}


def empty_counts() -> dict[str, int]:
    return {status: 0 for status in MESSAGE_STATUSES}


def derive_status(counts: dict[str, int], *, has_run: bool, ready: bool, setup_failed: bool) -> str:
    """The campaign status the contract derives from its messages' states."""
    if not has_run:
        return "ready" if ready else "created"
    if setup_failed and not any(counts[s] for s in IN_FLIGHT_STATUSES):
        return "failed"
    if any(counts[s] for s in IN_FLIGHT_STATUSES):
        return "in_progress"
    if counts["retrying"]:
        return "active_retries"
    if counts["failed"]:
        return "complete_with_errors"
    return "complete"


def still_holds_channel(counts: dict[str, int], awaiting_acceptance: int) -> bool:
    """Contract: a running campaign holds its channel until it has no message queued or claimed-but-not-accepted."""
    return counts["queued"] > 0 or awaiting_acceptance > 0


@dataclass(frozen=True)
class MessageState:
    status: str
    reason: str | None
    attempt: int  # provider submissions known so far (0 = none yet)
    accepted: bool  # the provider accepted the current submission (Twilio 201 / SendGrid 202 / SMTP 250)


@dataclass(frozen=True)
class Move:
    """A decided change of one message. `record` is False for bookkeeping that is not a status change."""
    status: str
    reason: str | None = None
    provider_code: str | None = None
    attempt: int | None = None
    accepted: bool | None = None
    record: bool = True


def is_late_receipt_target(state: MessageState) -> bool:
    """A final state a late receipt may still amend (contract: assumed_delivered, failed/timed_out)."""
    return state.status == "assumed_delivered" or (state.status == "failed" and state.reason == "timed_out")


def receipt_move(state: MessageState, status: str, reason: str | None, code: str | None, attempt: int | None) -> Move | None:
    """A provider receipt (sent/delivered/failed/retrying/...) applied to a message, or None if it changes nothing.

    Never backwards; a final state is left only by a late receipt (contract).
    """
    if state.status == status and state.reason == reason:
        return None
    if state.status in FINAL_STATUSES and not is_late_receipt_target(state):
        return None
    if is_late_receipt_target(state):
        # A late receipt amends to a real outcome; it cannot put the message back in flight.
        if status not in ("delivered", "failed", "opted_out"):
            return None
    elif _RANK[status] < _RANK[state.status]:
        return None
    if state.status in NEVER_HANDED_OFF:
        return None  # never claimed: a receipt for it is not ours to believe
    attempt = max(state.attempt, attempt or 0) or None
    return Move(status=status, reason=reason, provider_code=code, attempt=attempt, accepted=True)


def acceptance_move(state: MessageState, attempt: int) -> Move | None:
    """The provider accepted a submission: the message stops holding the channel; no status record."""
    if state.status != "sending" or state.accepted:
        return None
    return Move(status="sending", attempt=max(state.attempt, attempt), accepted=True, record=False)


def presend_error_move(state: MessageState, attempt: int, code: str | None, final: bool) -> Move | None:
    """One failed pre-send submission: recorded with its attempt number; the last one fails the message."""
    if state.status != "sending" or state.accepted or attempt <= state.attempt:
        return None
    if final:
        return Move(status="failed", reason="provider_error", provider_code=code, attempt=attempt, accepted=False)
    return Move(status="sending", provider_code=code, attempt=attempt, accepted=False)


# Contract v1.1: a claimed message nobody handed off goes back to the queue (no attempt counted); if its
# campaign claims no more (stopped meanwhile), it is cancelled, as a Stop cancels the queued ones.
RETURN_TO_QUEUE = Move(status="queued", reason=None, accepted=False)
CANCEL_UNSENT = Move(status="cancelled", reason=None, accepted=False)


def expiry_move(state: MessageState, kind: str, channel: str = "sms", *, handed_off: bool = True,
                submissions: int | None = None, claiming: bool = True) -> Move | None:
    """A timer fired: it applies only if the message is still in the state the timer was started for.

    The Sending limit runs until the provider accepts: for SMS until `sent`, for email until the 202/250,
    after which only the retry window bounds an email. `handed_off`: whether the hand-off fence granted the
    message to a sender under its claim; one never handed off did not reach a provider, so it is not
    `timed_out` but queued again (decision: the outage hold's rule, for any reason a claim went unworked).
    `submissions`: the fence's count of hand-offs, the `attempt` of a message timed out with no answer.
    `claiming`: the campaign still claims (holds its channel); if not (stopped), such a message is cancelled.
    """
    if kind == "sending" and state.status == "sending" and (channel == "sms" or not state.accepted):
        if not handed_off:
            return RETURN_TO_QUEUE if claiming else CANCEL_UNSENT
        attempt = submissions if submissions is not None and submissions > state.attempt else None
        return Move(status="failed", reason="timed_out", accepted=False, attempt=attempt)
    if kind == "sent" and state.status == "sent":
        return Move(status="assumed_delivered")
    if kind == "retry_window" and (state.status == "retrying" or (state.status == "sending" and state.accepted)):
        return Move(status="failed", reason="expired")
    return None


def hold_move(state: MessageState, *, claiming: bool = True) -> Move | None:
    """A provider hold (contract v1.1): a claimed message not handed off returns to `queued` (`cancelled` if
    its campaign claims no more: stopped)."""
    if not awaiting_acceptance(state):
        return None
    return RETURN_TO_QUEUE if claiming else CANCEL_UNSENT


def is_retryable(state: MessageState, *, named: bool, include_cancelled: bool) -> bool:
    """Retry rule of the contract: failed ones (timed_out only when named), cancelled ones when asked or named."""
    if state.status == "failed":
        return named or state.reason != "timed_out"
    if state.status == "cancelled":
        return include_cancelled or named
    return False


def awaiting_acceptance(state: MessageState) -> bool:
    """Claimed and not yet accepted by the provider: the message keeps its campaign holding the channel."""
    return state.status == "sending" and not state.accepted


def fails_on_setup_error(status: str, accepted: bool) -> bool:
    """Contract: credentials refused before the provider accepted anything fail every message of the run
    not yet accepted (`setup_error`)."""
    return status == "queued" or (status == "sending" and not accepted)


# ----- provider results ------------------------------------------------------------------------

# Outcomes that put the destination on the channel's opt-out list (the message keeps its own status rules).
_OPT_OUT_OUTCOMES = frozenset({"spamreport", "unsubscribe", "opted_out"})
OPT_OUT_CODE = "21610"  # Twilio: the recipient replied STOP


def opts_out_destination(result: SenderResult, channel: str) -> bool:
    """The result puts the message's destination on the channel's opt-out list."""
    if result.outcome in _OPT_OUT_OUTCOMES:
        return True
    return channel == "sms" and result.outcome in ("refused", "failed", "undelivered") \
        and result.provider_code == OPT_OUT_CODE


def result_move(state: MessageState, result: SenderResult, channel: str) -> Move | None:
    """What one provider result (outcome + code, `provider_codes`) does to a message, or None if nothing."""
    outcome = result.outcome
    attempt = result.attempt or 0
    code = result.provider_code
    if outcome in ("spamreport", "unsubscribe"):
        return None  # after delivery: only the opt-out list changes
    if outcome == "resubmitted":
        # Our own SMTP re-submission of a deferred email: recorded, status stays retrying.
        if state.status != "retrying" or attempt <= state.attempt:
            return None
        return Move(status="retrying", provider_code=code, attempt=attempt)
    if outcome == "blocked":
        outcome, code = "bounced", "blocked"
    elif outcome == "dropped":
        outcome, code = "bounced", f"dropped: {code or ''}"
    if outcome == "accepted":
        return acceptance_move(state, attempt)
    if outcome == "presend_error":
        return presend_error_move(state, attempt, code, result.final)
    if outcome == "no_answer":
        return None
    try:
        status, reason = provider_codes.classify(outcome, code, channel)
    except ValueError:  # e.g. `sent` for an email, `deferred` for an SMS
        log.warning("ignoring outcome %r (code %r) that the %s channel does not have", outcome, code, channel)
        return None
    move = receipt_move(state, status, reason, code, attempt)
    if move is not None and outcome == "refused":
        # Refused at submission: the provider did not accept it (acceptance = Twilio 201 / SendGrid 202 / SMTP 250).
        move = dataclasses.replace(move, accepted=False)
    return move


# ----- test messages (SendTestMessage, our addition) -------------------------------------------

# The per-user limit: test messages one issuer (issued_by: `user:NAME`, a token's name, a producer's assertion) may
# have sent in any window of this length, over every campaign. Counted when the handler accepts one (an opted-out
# destination's answer included), so it holds however many API instances publish them.
TEST_MESSAGES_PER_HOUR = 5
TEST_MESSAGE_WINDOW_S = 3600.0
# Outcomes of a test message that end it: a no_answer (handed off, outcome unknown) may still be amended by one.
TEST_MESSAGE_DEFINITE_OUTCOMES = frozenset({"accepted", "refused", "failed", "opted_out"})
_TEST_SENDER_OUTCOMES = {
    "accepted": ("accepted", None), "presend_error": ("failed", "provider_error"),
    "held": ("failed", "provider_held"), "not_sent": ("failed", "not_sent"), "no_answer": ("no_answer", None),
    "opted_out": ("opted_out", None), "deferred": ("refused", "deferred"),
}


def outcome_of_test_message(sender_outcome: str, provider_code: str | None, channel: str) -> tuple[str, str | None]:
    """(outcome, reason) of a test message from what the sender reports of its one submission: a provider's refusal
    by the codes' table (`provider_codes`: 21610 is opted_out), a pre-send error failed (not retried), a deferral
    refused (not sent again). A receipt's outcome (delivered...) means the provider took it."""
    fixed = _TEST_SENDER_OUTCOMES.get(sender_outcome)
    if fixed is not None:
        return fixed
    if sender_outcome == "blocked":
        sender_outcome, provider_code = "bounced", "blocked"
    elif sender_outcome == "dropped":
        sender_outcome, provider_code = "bounced", f"dropped: {provider_code or ''}"
    try:
        status, reason = provider_codes.classify(sender_outcome, provider_code, channel)
    except ValueError:
        return "refused", "unknown"
    if status == "opted_out":
        return "opted_out", None
    if status == "failed":
        return "refused", reason
    return "accepted", None


def outcome_of_test_message_applies(current: str | None, new: str) -> bool:
    """Whether a test message's new outcome is recorded: the first one; a definite one after `no_answer` (a sender
    that found it handed off before answers no_answer, the one that handed it off answers what happened); nothing
    after a definite one (a redelivered work record, a second sender)."""
    if current is None:
        return True
    return current == "no_answer" and new in TEST_MESSAGE_DEFINITE_OUTCOMES
