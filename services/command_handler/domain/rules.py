"""Message and campaign rules as pure functions: which moves are allowed, and what a campaign's status is.

Every rule of the wire contract's "Campaign status" and "Message status stream" sections lives here, so
the aggregates only apply what these functions decide.
"""
from __future__ import annotations

from dataclasses import dataclass

MESSAGE_STATUSES = (
    "waiting", "queued", "sending", "sent", "delivered", "assumed_delivered",
    "retrying", "failed", "opted_out", "cancelled",
)
FINAL_STATUSES = frozenset({"delivered", "assumed_delivered", "failed", "opted_out", "cancelled"})
# Messages in these states keep a campaign in progress.
IN_FLIGHT_STATUSES = frozenset({"queued", "sending", "sent"})

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
    if state.status in ("waiting", "queued", "cancelled"):
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


def expiry_move(state: MessageState, kind: str, channel: str = "sms") -> Move | None:
    """A timer fired: it applies only if the message is still in the state the timer was started for.

    The Sending limit runs until the provider accepts: for SMS until `sent`, for email until the 202/250,
    after which only the retry window bounds an email.
    """
    if kind == "sending" and state.status == "sending" and (channel == "sms" or not state.accepted):
        return Move(status="failed", reason="timed_out", accepted=False)
    if kind == "sent" and state.status == "sent":
        return Move(status="assumed_delivered")
    if kind == "retry_window" and (state.status == "retrying" or (state.status == "sending" and state.accepted)):
        return Move(status="failed", reason="expired")
    return None


def is_retryable(state: MessageState, *, named: bool, include_cancelled: bool) -> bool:
    """Retry rule of the contract: failed ones (timed_out only when named), cancelled ones when asked or named."""
    if state.status == "failed":
        return named or state.reason != "timed_out"
    if state.status == "cancelled":
        return include_cancelled or named
    return False
