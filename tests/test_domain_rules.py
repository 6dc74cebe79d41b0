"""The pure domain rules, table-driven: every message move rules.py allows or refuses, campaign status
derivation, and every campaign command allowed or refused by state (through the application, on the
in-memory event store: no broker, no database)."""
from __future__ import annotations

import itertools
import uuid

import pytest

from schemas import topics
from schemas.commands import CHANNELS, SmsTemplate
from schemas.events import FAILURE_REASONS, MESSAGE_STATUSES
from services.common import ids
from services.common.settings import get_settings
from services.command_handler.application import OutreachApp
from services.command_handler.domain import rules
from services.command_handler.domain.model import Campaign, Rejected
from services.command_handler.domain.rules import (
    FINAL_STATUSES, MessageState, Move, acceptance_move, derive_status, expiry_move, hold_move, is_retryable,
    presend_error_move, receipt_move,
)
from tests.handler_driver import Driver, sender_result

ALL_TRUE = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}


def S(status: str, reason: str | None = None, attempt: int = 1, accepted: bool = False) -> MessageState:
    return MessageState(status, reason, attempt, accepted)


def all_states() -> list[MessageState]:
    """Every (status, reason, accepted) a message can be in, attempt 1."""
    out = []
    for status in MESSAGE_STATUSES:
        for reason in (FAILURE_REASONS if status == "failed" else (None,)):
            for accepted in (False, True):
                out.append(S(status, reason, 1, accepted))
    return out


# What receipts can say (provider_codes.classify minus the outcomes handled before it).
RECEIPT_TARGETS = [("sent", None), ("delivered", None), ("retrying", None), ("opted_out", None)] + [
    ("failed", r) for r in FAILURE_REASONS if r != "timed_out"]

# The lifecycle order the contract implies for moves between non-final states ("never backwards").
IN_FLIGHT_ORDER = {"sending": 0, "sent": 1, "retrying": 2}


def contract_allows_receipt(state: MessageState, status: str, reason: str | None) -> bool:
    """The contract's rule for a receipt, written independently of rules.py."""
    if (state.status, state.reason) == (status, reason):
        return False  # a duplicate changes nothing
    if state.status in ("waiting", "queued"):
        return False  # never claimed: not ours to believe
    if state.status in FINAL_STATUSES:
        late_target = state.status == "assumed_delivered" or (state.status == "failed" and state.reason == "timed_out")
        return late_target and status in ("delivered", "failed", "opted_out")
    if status in FINAL_STATUSES:
        return True
    return IN_FLIGHT_ORDER[status] >= IN_FLIGHT_ORDER[state.status]


# ============================================================ receipt_move

RECEIPT_TABLE = [
    # (state, receipt status, receipt reason, allowed)
    # forward moves out of sending / sent / retrying
    (S("sending"), "sent", None, True),
    (S("sending"), "delivered", None, True),
    (S("sending"), "failed", "invalid_destination", True),
    (S("sending"), "opted_out", None, True),
    (S("sending", accepted=True), "retrying", None, True),
    (S("sending", accepted=True), "failed", "bounced", True),
    (S("sent", accepted=True), "delivered", None, True),
    (S("sent", accepted=True), "failed", "undeliverable", True),
    (S("sent", accepted=True), "opted_out", None, True),
    (S("retrying", accepted=True), "delivered", None, True),
    (S("retrying", accepted=True), "failed", "bounced", True),
    # never backwards
    (S("retrying", accepted=True), "sent", None, False),
    # duplicates change nothing
    (S("sent", accepted=True), "sent", None, False),
    (S("retrying", accepted=True), "retrying", None, False),
    (S("delivered", accepted=True), "delivered", None, False),
    (S("failed", "undeliverable", accepted=True), "failed", "undeliverable", False),
    (S("failed", "timed_out"), "failed", "timed_out", False),
    (S("opted_out", accepted=True), "opted_out", None, False),
    # never claimed: nothing to believe
    (S("waiting", attempt=0), "delivered", None, False),
    (S("queued", attempt=0), "sent", None, False),
    (S("queued", attempt=0), "failed", "undeliverable", False),
    (S("cancelled", attempt=0), "delivered", None, False),
    # late receipts: from assumed_delivered ...
    (S("assumed_delivered", accepted=True), "delivered", None, True),
    (S("assumed_delivered", accepted=True), "failed", "undeliverable", True),
    (S("assumed_delivered", accepted=True), "opted_out", None, True),
    (S("assumed_delivered", accepted=True), "sent", None, False),
    (S("assumed_delivered", accepted=True), "retrying", None, False),
    # ... or from failed / timed_out, to a real outcome only (never back in flight)
    (S("failed", "timed_out"), "delivered", None, True),
    (S("failed", "timed_out"), "failed", "undeliverable", True),
    (S("failed", "timed_out"), "opted_out", None, True),
    (S("failed", "timed_out"), "sent", None, False),
    (S("failed", "timed_out"), "retrying", None, False),
    # any other final state is never left by a receipt
    (S("delivered", accepted=True), "failed", "undeliverable", False),
    (S("delivered", accepted=True), "sent", None, False),
    (S("failed", "invalid_destination", accepted=True), "delivered", None, False),
    (S("failed", "provider_error"), "delivered", None, False),
    (S("failed", "expired", accepted=True), "delivered", None, False),
    (S("failed", "undeliverable", accepted=True), "delivered", None, False),
    (S("opted_out", accepted=True), "delivered", None, False),
    (S("cancelled"), "failed", "undeliverable", False),
]


@pytest.mark.parametrize("state,status,reason,allowed", RECEIPT_TABLE,
                         ids=[f"{s.status}/{s.reason}->{st}/{r}" for s, st, r, _ in RECEIPT_TABLE])
def test_receipt_move_table(state, status, reason, allowed):
    move = receipt_move(state, status, reason, "c1", 2)
    if not allowed:
        assert move is None
        return
    assert move == Move(status=status, reason=reason, provider_code="c1", attempt=2, accepted=True, record=True)


@pytest.mark.parametrize("state", all_states(), ids=lambda s: f"{s.status}/{s.reason}/acc={s.accepted}")
def test_receipt_move_every_state_and_target_matches_the_contract(state):
    for status, reason in RECEIPT_TARGETS:
        move = receipt_move(state, status, reason, None, None)
        assert (move is not None) == contract_allows_receipt(state, status, reason), (state, status, reason)
        if move is not None:
            assert (move.status, move.reason, move.accepted, move.record) == (status, reason, True, True)
            assert move.attempt == (state.attempt or None)  # never lowers the attempt count


def test_receipt_attempt_is_the_highest_known():
    assert receipt_move(S("sending", attempt=3), "sent", None, None, 1).attempt == 3
    assert receipt_move(S("sending", attempt=1), "sent", None, None, 4).attempt == 4
    assert receipt_move(S("sending", attempt=0), "sent", None, None, None).attempt is None


# ============================================================ acceptance_move

@pytest.mark.parametrize("state", all_states(), ids=lambda s: f"{s.status}/{s.reason}/acc={s.accepted}")
def test_acceptance_move_only_for_sending_not_yet_accepted(state):
    move = acceptance_move(state, 2)
    if state.status == "sending" and not state.accepted:
        # no status record: only the accepted flag (and the attempt) change
        assert move == Move(status="sending", attempt=2, accepted=True, record=False)
    else:
        assert move is None  # includes the duplicate acceptance


def test_acceptance_keeps_the_highest_attempt():
    assert acceptance_move(S("sending", attempt=3), 1).attempt == 3


# ============================================================ presend_error_move

PRESEND_TABLE = [
    # (state, attempt, final, expected)
    (S("sending", attempt=0), 1, False, Move(status="sending", provider_code="503", attempt=1, accepted=False)),
    (S("sending", attempt=1), 2, False, Move(status="sending", provider_code="503", attempt=2, accepted=False)),
    (S("sending", attempt=3), 4, True, Move(status="failed", reason="provider_error", provider_code="503",
                                            attempt=4, accepted=False)),
    (S("sending", attempt=2), 2, False, None),  # duplicate
    (S("sending", attempt=2), 1, True, None),  # stale
    (S("sending", attempt=0, accepted=True), 1, False, None),  # the provider already took it
    (S("sent", accepted=True), 3, True, None),
    (S("queued", attempt=0), 1, False, None),
    (S("failed", "provider_error", attempt=4), 5, True, None),
    (S("cancelled", attempt=0), 1, True, None),
]


@pytest.mark.parametrize("state,attempt,final,expected", PRESEND_TABLE)
def test_presend_error_move_table(state, attempt, final, expected):
    assert presend_error_move(state, attempt, "503", final) == expected


@pytest.mark.parametrize("state", [s for s in all_states() if s.status != "sending"],
                         ids=lambda s: f"{s.status}/{s.reason}/acc={s.accepted}")
def test_presend_error_only_while_sending(state):
    assert presend_error_move(state, 9, "503", False) is None
    assert presend_error_move(state, 9, "503", True) is None


# ============================================================ expiry_move

TIMED_OUT = Move(status="failed", reason="timed_out", accepted=False)
ASSUMED_DELIVERED = Move(status="assumed_delivered")
EXPIRED = Move(status="failed", reason="expired")
BOTH = (False, True)
# (status, accepted, timer kind, channel) -> the move; every other combination changes nothing.
EXPIRY_FIRES = {
    # Sending runs from the claim until the provider accepts: SMS until `sent`, email until the 202/250.
    **{("sending", accepted, "sending", "sms"): TIMED_OUT for accepted in BOTH},
    ("sending", False, "sending", "email"): TIMED_OUT,
    **{("sent", accepted, "sent", channel): ASSUMED_DELIVERED for accepted in BOTH for channel in CHANNELS},
    # An email retrying, or accepted with no outcome yet, fails `expired` when the window closes.
    **{("retrying", accepted, "retry_window", channel): EXPIRED for accepted in BOTH for channel in CHANNELS},
    **{("sending", True, "retry_window", channel): EXPIRED for channel in CHANNELS},
}


@pytest.mark.parametrize("channel", ["sms", "email"])
@pytest.mark.parametrize("kind", ["sending", "sent", "retry_window"])
@pytest.mark.parametrize("state", all_states(), ids=lambda s: f"{s.status}/{s.reason}/acc={s.accepted}")
def test_expiry_move_applies_only_in_the_state_the_timer_was_started_for(state, kind, channel):
    assert expiry_move(state, kind, channel) == EXPIRY_FIRES.get((state.status, state.accepted, kind, channel))


def test_a_message_the_fence_never_handed_off_goes_back_to_the_queue_at_the_sending_limit():
    """Contract v1.1: never handed off, it never reached a provider: queued again (no attempt counted)."""
    for state, channel in itertools.product(all_states(), ["sms", "email"]):
        fired = expiry_move(state, "sending", channel)
        returned = expiry_move(state, "sending", channel, handed_off=False)
        assert returned == (Move(status="queued", reason=None, accepted=False) if fired is not None else None)


def test_a_timed_out_message_carries_the_hand_offs_the_fence_counted():
    sending = MessageState("sending", None, 1, False)
    assert expiry_move(sending, "sending", "sms", submissions=3).attempt == 3
    assert expiry_move(sending, "sending", "sms", submissions=1).attempt is None  # known already: unchanged


def test_a_hold_returns_only_claimed_messages_not_yet_accepted():
    for state in all_states():
        expected = Move(status="queued", reason=None, accepted=False) if (
            state.status == "sending" and not state.accepted) else None
        assert hold_move(state) == expected


def test_expiry_never_leaves_a_final_state():
    for state, kind, channel in itertools.product(all_states(), ["sending", "sent", "retry_window"], ["sms", "email"]):
        if state.status in FINAL_STATUSES:
            assert expiry_move(state, kind, channel) is None


# ============================================================ is_retryable

RETRY_TABLE = [
    # (state, named, include_cancelled, retryable)
    *[(S("failed", r), False, False, r != "timed_out") for r in FAILURE_REASONS],
    *[(S("failed", r), False, True, r != "timed_out") for r in FAILURE_REASONS],
    *[(S("failed", r), True, False, True) for r in FAILURE_REASONS],  # named: timed_out too
    (S("cancelled"), False, False, False),
    (S("cancelled"), False, True, True),
    (S("cancelled"), True, False, True),
    *[(S(s), named, inc, False)
      for s in ("waiting", "queued", "sending", "sent", "retrying", "delivered", "assumed_delivered", "opted_out")
      for named in (False, True) for inc in (False, True)],
]


@pytest.mark.parametrize("state,named,include_cancelled,retryable", RETRY_TABLE)
def test_is_retryable_table(state, named, include_cancelled, retryable):
    assert is_retryable(state, named=named, include_cancelled=include_cancelled) is retryable


# ============================================================ derive_status

def counts(**kw):
    c = rules.empty_counts()
    c.update(kw)
    return c


DERIVE_TABLE = [
    # (counts, has_run, ready, setup_failed, status)
    (counts(waiting=3), False, False, False, "created"),
    (counts(waiting=3), False, True, False, "ready"),
    (counts(), False, True, False, "ready"),
    (counts(queued=1, delivered=2), True, True, False, "in_progress"),
    (counts(sending=1, failed=2), True, True, False, "in_progress"),
    (counts(sent=1, retrying=2), True, True, False, "in_progress"),
    (counts(retrying=1, delivered=2), True, True, False, "active_retries"),
    (counts(retrying=1, failed=2), True, True, False, "active_retries"),
    (counts(delivered=1, failed=1), True, True, False, "complete_with_errors"),
    (counts(assumed_delivered=1, failed=1, cancelled=1), True, True, False, "complete_with_errors"),
    (counts(delivered=1, assumed_delivered=1, opted_out=1, cancelled=1), True, True, False, "complete"),
    (counts(cancelled=3), True, True, False, "complete"),
    (counts(failed=3), True, True, True, "failed"),
    (counts(failed=2, delivered=1), True, True, True, "failed"),
    (counts(failed=2, sending=1), True, True, True, "in_progress"),  # not decided while in flight
]


@pytest.mark.parametrize("c,has_run,ready,setup_failed,status", DERIVE_TABLE)
def test_derive_status_table(c, has_run, ready, setup_failed, status):
    assert derive_status(c, has_run=has_run, ready=ready, setup_failed=setup_failed) == status


def test_derive_status_every_single_status_campaign():
    expected = {"queued": "in_progress", "sending": "in_progress", "sent": "in_progress",
                "retrying": "active_retries", "failed": "complete_with_errors", "delivered": "complete",
                "assumed_delivered": "complete", "opted_out": "complete", "cancelled": "complete"}
    for status, campaign_status in expected.items():
        assert derive_status(counts(**{status: 2}), has_run=True, ready=True, setup_failed=False) == campaign_status


# ============================================================ campaign commands by state (application)

@pytest.fixture
def app():
    application = OutreachApp(get_settings(), env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    yield application
    application.close()


SMS_TEMPLATE = {"body": "Hi {{name}}"}
EMAIL_TEMPLATE = {"subject": "s", "html": "<p>h</p>", "from_email": "a@example.com", "from_name": "A",
                  "attachments": []}


def new_campaign(d: Driver, channel: str = "sms", n: int = 3, last_chunk: bool = True) -> str:
    cid = str(uuid.uuid4())
    d.send("CreateCampaign", cid, name="c", channel=channel,
           template=SMS_TEMPLATE if channel == "sms" else EMAIL_TEMPLATE)
    if n:
        rows = [{"row": 2 + i, "destination": f"+1202555{i:04d}" if channel == "sms" else f"u{i}@example.com",
                 "variables": {"name": f"P{i}"}} for i in range(n)]
        d.send("AddContacts", cid, chunk_no=0, contacts=rows, last_chunk=last_chunk)
    return cid


def mids(cid: str, n: int = 3) -> list[str]:
    return [ids.message_id(cid, 2 + i) for i in range(n)]


def results(app, cid, *items):
    app.apply_results(result_id=str(uuid.uuid4()), campaign_id=cid, results=[
        sender_result(m, o, provider_code=code) for m, o, code in items])


def _created(d):
    return new_campaign(d, last_chunk=False)


def _ready(d):
    return new_campaign(d)


def _running(d):
    cid = new_campaign(d)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    return cid


def _stopped_in_flight(d):
    cid = _running(d)
    d.app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=1)
    d.send("StopCampaign", cid, confirmed=True)
    return cid


def _released_awaiting_receipts(d):
    """Every message accepted, none final: in progress, but the channel is free again."""
    cid = _running(d)
    d.app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=10)
    results(d.app, cid, *[(m, "accepted", None) for m in mids(cid)], *[(m, "sent", None) for m in mids(cid)])
    return cid


def _active_retries(d):
    cid = new_campaign(d, channel="email")
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    d.app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=10)
    results(d.app, cid, *[(m, "accepted", None) for m in mids(cid)], *[(m, "deferred", "421") for m in mids(cid)])
    return cid


def _complete(d):
    cid = _running(d)
    d.app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=10)
    results(d.app, cid, *[(m, o, None) for m in mids(cid) for o in ("accepted", "sent", "delivered")])
    return cid


def _complete_with_errors(d):
    cid = _running(d)
    d.app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=10)
    first, *rest = mids(cid)
    results(d.app, cid, (first, "refused", "30003"),
            *[(m, o, None) for m in rest for o in ("accepted", "sent", "delivered")])
    return cid


def _setup_failed(d):
    """The provider refused the credentials (20003) before accepting anything: the run fails."""
    cid = _running(d)
    d.app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=1)
    results(d.app, cid, (mids(cid)[0], "refused", "20003"))
    return cid


def _deleted(d):
    cid = new_campaign(d)
    d.send("DeleteCampaign", cid)
    return cid


STATE_BUILDERS = {
    "created": (_created, "created", False),
    "ready": (_ready, "ready", False),
    "running": (_running, "in_progress", True),
    "stopped_in_flight": (_stopped_in_flight, "in_progress", False),
    "released_awaiting_receipts": (_released_awaiting_receipts, "in_progress", False),
    "active_retries": (_active_retries, "active_retries", False),
    "complete": (_complete, "complete", False),
    "complete_with_errors": (_complete_with_errors, "complete_with_errors", False),
    "failed": (_setup_failed, "failed", False),
    "deleted": (_deleted, "deleted", False),
}


def _update_template(d, cid):
    channel = d.app.campaign_view(cid)["channel"]
    return d.send("UpdateTemplate", cid, template={"body": "new"} if channel == "sms" else {**EMAIL_TEMPLATE,
                                                                                          "subject": "new"})


COMMANDS = {
    "UpdateTemplate": _update_template,
    "DeleteCampaign": lambda d, cid: d.send("DeleteCampaign", cid),
    "StopCampaign": lambda d, cid: d.send("StopCampaign", cid, confirmed=True),
    "RunCampaign": lambda d, cid: d.send("RunCampaign", cid, disclaimer=ALL_TRUE),
    "RetryFailedMessages": lambda d, cid: d.send("RetryFailedMessages", cid, include_cancelled=True),
}

OK = {"UpdateTemplate": "TemplateUpdated", "DeleteCampaign": "CampaignDeleted", "StopCampaign": "CampaignStopped",
      "RunCampaign": "CampaignRunStarted", "RetryFailedMessages": "RetryStarted"}

# state -> command -> the first answer's type (an event type) or the rejection reason
EXPECTED = {
    "created": {"UpdateTemplate": "ok", "DeleteCampaign": "ok", "StopCampaign": "campaign_not_running",
                "RunCampaign": "campaign_not_ready", "RetryFailedMessages": "not_retryable"},
    "ready": {"UpdateTemplate": "ok", "DeleteCampaign": "ok", "StopCampaign": "campaign_not_running",
              "RunCampaign": "ok", "RetryFailedMessages": "not_retryable"},
    "running": {"UpdateTemplate": "not_editable", "DeleteCampaign": "not_deletable", "StopCampaign": "ok",
                "RunCampaign": "campaign_not_ready", "RetryFailedMessages": "nothing_to_retry"},
    "stopped_in_flight": {"UpdateTemplate": "not_editable", "DeleteCampaign": "not_deletable",
                          "StopCampaign": "campaign_not_running", "RunCampaign": "campaign_not_ready",
                          "RetryFailedMessages": "ok"},
    "released_awaiting_receipts": {"UpdateTemplate": "not_editable", "DeleteCampaign": "not_deletable",
                                   "StopCampaign": "campaign_not_running", "RunCampaign": "campaign_not_ready",
                                   "RetryFailedMessages": "nothing_to_retry"},
    "active_retries": {"UpdateTemplate": "not_editable", "DeleteCampaign": "not_deletable",
                       "StopCampaign": "campaign_not_running", "RunCampaign": "campaign_not_ready",
                       "RetryFailedMessages": "nothing_to_retry"},
    "complete": {"UpdateTemplate": "not_editable", "DeleteCampaign": "ok", "StopCampaign": "campaign_not_running",
                 "RunCampaign": "campaign_not_ready", "RetryFailedMessages": "nothing_to_retry"},
    "complete_with_errors": {"UpdateTemplate": "not_editable", "DeleteCampaign": "ok",
                             "StopCampaign": "campaign_not_running", "RunCampaign": "campaign_not_ready",
                             "RetryFailedMessages": "ok"},
    "failed": {"UpdateTemplate": "not_editable", "DeleteCampaign": "ok", "StopCampaign": "campaign_not_running",
               "RunCampaign": "campaign_not_ready", "RetryFailedMessages": "ok"},
    "deleted": {c: "unknown_campaign" for c in COMMANDS},
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("state", list(STATE_BUILDERS))
def test_campaign_command_by_state(app, state, command):
    d = Driver(app)
    build, status, holds = STATE_BUILDERS[state]
    cid = build(d)
    view = app.campaign_view(cid)
    assert (view["status"], view["holds_channel"]) == (status, holds), "the state was not built as meant"
    before = view
    d.new_records()  # what building the state wrote
    answers = COMMANDS[command](d, cid)
    expected = EXPECTED[state][command]
    if expected == "ok":
        assert answers[0]["type"] == OK[command], answers
    else:
        assert [(a["type"], a["reason"]) for a in answers] == [("CommandRejected", expected)], answers
        after = app.campaign_view(cid)
        assert after == before  # a rejection changes nothing
        assert not [r for r in d.last if r["topic"] == topics.MESSAGE_STATUS]


REFUSAL_PRECEDENCE = [
    # the state reason comes before the confirmation reason
    ("created", "StopCampaign", {"confirmed": False}, "campaign_not_running"),
    ("complete", "StopCampaign", {}, "campaign_not_running"),
    ("created", "RunCampaign", {}, "campaign_not_ready"),
    ("running", "RunCampaign", {"disclaimer": {**ALL_TRUE, "consent": False}}, "campaign_not_ready"),
    ("running", "StopCampaign", {}, "stop_not_confirmed"),
    ("ready", "RunCampaign", {"disclaimer": {**ALL_TRUE, "opt_out": False}}, "disclaimer_not_accepted"),
    # not_retryable comes before the content and channel reasons
    ("ready", "RetryFailedMessages", {"message_ids": [str(uuid.uuid4())]}, "not_retryable"),
    # a retry waits for the channel, its own hold included
    ("running", "RetryFailedMessages", {"include_cancelled": False}, "nothing_to_retry"),
]


@pytest.mark.parametrize("state,command,payload,reason", REFUSAL_PRECEDENCE)
def test_refusal_precedence(app, state, command, payload, reason):
    d = Driver(app)
    cid = STATE_BUILDERS[state][0](d)
    [answer] = d.send(command, cid, **payload)
    assert (answer["type"], answer["reason"]) == ("CommandRejected", reason)


def test_retry_waits_for_the_channel_held_by_itself_or_another(app):
    d = Driver(app)
    cid = _running(d)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=10)
    first, second, third = mids(cid)
    results(app, cid, (first, "refused", "30003"))  # one failed, two still unaccepted: holds the channel
    [busy] = d.send("RetryFailedMessages", cid)
    assert busy["reason"] == "channel_busy"
    results(app, cid, (second, "accepted", None), (third, "accepted", None))
    assert not app.campaign_view(cid)["holds_channel"]
    other = _running(d)  # another SMS campaign takes the channel
    [busy] = d.send("RetryFailedMessages", cid)
    assert busy["reason"] == "channel_busy"
    d.send("StopCampaign", other, confirmed=True)
    started, *_ = d.send("RetryFailedMessages", cid)
    assert (started["type"], started["message_count"]) == ("RetryStarted", 1)


def test_named_retry_takes_timed_out_and_cancelled_default_does_not(app):
    d = Driver(app)
    cid = new_campaign(d, n=3)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=1)
    d.send("StopCampaign", cid, confirmed=True)  # two cancelled
    first, second, _ = mids(cid)
    block = app.repository.get(ids.block_id(cid, 0))
    app.apply_expiry(expiry_id="e1", campaign_id=cid, message_id=first, kind="sending",
                     since_sequence=block.changed_at[0])
    assert app.campaign_view(cid)["counts"]["failed"] == 1
    [r] = d.send("RetryFailedMessages", cid)
    assert r["reason"] == "nothing_to_retry"  # timed_out and cancelled stay out by default
    started, *_ = d.send("RetryFailedMessages", cid, message_ids=[first, second])
    assert started["message_count"] == 2
    moved = {(r["value"]["message_id"], r["value"]["previous_status"], r["value"]["status"])
             for r in d.last if r["topic"] == topics.MESSAGE_STATUS}
    assert moved == {(first, "failed", "queued"), (second, "cancelled", "queued")}


def test_failed_campaign_is_deletable_not_editable_not_runnable_not_stoppable():
    """`failed` (setup error) is not reachable through the use cases yet: the aggregate's own guards."""
    campaign = Campaign(campaign_id=uuid.uuid4(), name="c", description=None, channel="sms",
                        template=SMS_TEMPLATE, created_by="alice", causation_id="x")
    campaign.add_contacts(chunk_no=0, valid_rows=[2, 3], destinations=["+12025550000", "+12025550001"],
                          invalid_rows=[], last_chunk=True, blocks=[], causation_id="x")
    campaign.start_run(accepted_by="alice", disclaimer=ALL_TRUE, queued=2, suppressed=0, causation_id="x")
    campaign.record_claim(claim_id="c", items=[{}, {}], suppressed=0, cursor=1, causation_id="c")
    released = campaign.record_progress(delta={"sending": -2, "failed": 2}, awaiting_delta=-2, causation_id="r",
                                        setup_failed=True)
    assert released and campaign.status == "failed" and not campaign.holds_channel
    stored = len(campaign.pending_events)
    with pytest.raises(Rejected) as refused:
        campaign.update_template(SmsTemplate(body="y"), [], "x")
    assert refused.value.reason == "not_editable"
    with pytest.raises(Rejected) as refused:
        campaign.start_run(accepted_by="alice", disclaimer=ALL_TRUE, queued=0, suppressed=0, causation_id="x")
    assert refused.value.reason == "campaign_not_ready"
    with pytest.raises(Rejected) as refused:
        campaign.stop(stopped_by="alice", confirmed=True, cancelled=0, causation_id="x")
    assert refused.value.reason == "campaign_not_running"
    with pytest.raises(Rejected) as refused:
        campaign.start_retry(moved_from={}, causation_id="x")
    assert refused.value.reason == "nothing_to_retry"  # it has run: a retry is possible, of something
    assert len(campaign.pending_events) == stored  # each method checked its guards before its event
    campaign.delete("x")
    assert campaign.status == "deleted"


# ============================================================ timers through the application

def accepted_not_sent(app, channel: str):
    """A one-message campaign whose message the provider accepted and nothing more: (campaign, message, block)."""
    d = Driver(app)
    cid = new_campaign(d, channel=channel, n=1)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=1)
    [mid] = mids(cid, 1)
    results(app, cid, (mid, "accepted", None))
    return cid, mid, app.repository.get(ids.block_id(cid, 0))


def test_sending_timer_does_not_fail_an_accepted_email(app):
    """Contract: the email Sending limit ends at the 202/250; then only the retry window bounds it."""
    cid, mid, block = accepted_not_sent(app, "email")
    # the sweeper only sees status records; acceptance is none, so its Sending timer still fires
    app.apply_expiry(expiry_id="e", campaign_id=cid, message_id=mid, kind="sending",
                     since_sequence=block.changed_at[0])
    assert app.campaign_view(cid)["counts"]["sending"] == 1
    app.apply_expiry(expiry_id="e2", campaign_id=cid, message_id=mid, kind="retry_window",
                     since_sequence=block.changed_at[0])
    block = app.repository.get(ids.block_id(cid, 0))
    assert (block.status[0], block.reason[0]) == ("failed", "expired")


def test_sending_timer_fails_an_accepted_sms_still_not_sent(app):
    """Contract: the SMS Sending limit runs until `sent`, acceptance (201) or not."""
    cid, mid, block = accepted_not_sent(app, "sms")
    app.apply_expiry(expiry_id="stale", campaign_id=cid, message_id=mid, kind="sending",
                     since_sequence=block.changed_at[0] - 1)
    assert app.repository.get(ids.block_id(cid, 0)).status[0] == "sending"  # a stale timer changes nothing
    app.apply_expiry(expiry_id="e", campaign_id=cid, message_id=mid, kind="sending",
                     since_sequence=block.changed_at[0])
    block = app.repository.get(ids.block_id(cid, 0))
    assert (block.status[0], block.reason[0]) == ("failed", "timed_out")
    assert app.campaign_view(cid)["status"] == "complete_with_errors"


# ============================================================ setup failure


def test_setup_error_before_any_acceptance_fails_the_campaign(app):
    d = Driver(app)
    cid = _running(d)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=10)
    results(app, cid, *[(m, "refused", "20003") for m in mids(cid)])
    block = app.repository.get(ids.block_id(cid, 0))
    assert set(zip(block.status, block.reason)) == {("failed", "setup_error")}
    view = app.campaign_view(cid)
    assert not view["holds_channel"]
    assert view["status"] == "failed"  # contract: refused credentials before any acceptance


def test_setup_error_fails_queued_and_unaccepted_messages_but_not_accepted_ones(app):
    d = Driver(app)
    cid = new_campaign(d, n=4)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=2)
    first, second, third, fourth = mids(cid, 4)
    results(app, cid, (first, "refused", "20003"))
    block = app.repository.get(ids.block_id(cid, 0))
    assert [(s, r) for s, r in zip(block.status, block.reason)] == [("failed", "setup_error")] * 4
    assert app.campaign_view(cid)["status"] == "failed"
    assert app.repository.get(ids.channel_lock_id("sms")).holder is None
    started, *_ = d.send("RetryFailedMessages", cid)  # a new run: the setup failure is forgotten
    assert started["message_count"] == 4 and app.campaign_view(cid)["status"] == "in_progress"
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=4)
    results(app, cid, (first, "accepted", None), (second, "refused", "20003"))
    view = app.campaign_view(cid)  # something was accepted in this run: no setup failure
    assert view["status"] == "in_progress" and view["counts"]["failed"] == 1 and view["counts"]["sending"] == 3


def test_setup_error_after_a_refusal_still_fails_the_run(app):
    d = Driver(app)
    cid = _running(d)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=2)
    first, second, third = mids(cid)
    results(app, cid, (first, "refused", "21211"))  # refused at submission: not accepted
    results(app, cid, (second, "refused", "20003"))
    view = app.campaign_view(cid)
    assert view["status"] == "failed"
    block = app.repository.get(ids.block_id(cid, 0))
    assert (block.status[2], block.reason[2]) == ("failed", "setup_error")


@pytest.mark.parametrize("channel,outcome,code", [("email", "sent", None), ("sms", "deferred", "421")])
def test_an_outcome_the_channel_does_not_have_is_ignored(app, channel, outcome, code):
    d = Driver(app)
    cid = new_campaign(d, channel=channel, n=1)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=1)
    d.new_records()
    results(app, cid, (mids(cid, 1)[0], outcome, code))
    assert app.campaign_view(cid)["counts"]["sending"] == 1
    assert not [r for r in d.new_records() if r["topic"] == topics.MESSAGE_STATUS]
