"""Test messages (SendTestMessage, our addition) in the command handler, on both event stores (no broker): who may
have one and where it goes, the per-user limit, opt-outs, the sender's answers, and that the campaign itself (its
messages, counts, status, channel lock) never changes. The rules' pure tables are tested at the end."""
from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest

from schemas import topics
from schemas.events import CAMPAIGN_EVENT_ADAPTER
from schemas.internal import TestMessageWork as WorkRecord  # (renamed: pytest would take a Test* name for tests)
from schemas.internal import template_digest
from schemas.times import utc_now
from services.common import ids, jsoncodec
from services.command_handler import application
from services.command_handler.domain import rules
from services.command_handler.domain.model import Campaign
from services.command_handler.relay import open_fence_for_test_message
from tests.handler_driver import Driver, sender_result
from tests.test_handler_app import ALL_TRUE, ready_sms_campaign


class SendingDriver(Driver):
    """The driver, sending as anyone, with the relay's part of the fence for test messages."""

    def send_as(self, issued_by: str, type_: str, campaign_id: str, command_id: str | None = None,
                **payload) -> list[dict]:
        command_id = command_id or str(uuid.uuid4())
        value = {"type": type_, "command_id": command_id, "campaign_id": campaign_id, "issued_by": issued_by,
                 "issued_at": utc_now(), **payload}
        assert self.handler.handle(topics.COMMANDS, jsoncodec.dumps(value)) is None
        self.last = self.new_records()
        return [r["value"] for r in self.last if r["topic"] == topics.CAMPAIGN_EVENTS
                and r["value"]["causation_id"] == command_id]

    def test_send(self, cid: str, destination: str, issued_by: str = "user:ada", **payload) -> list[dict]:
        return self.send_as(issued_by, "SendTestMessage", cid, destination=destination, **payload)

    def new_records(self) -> list[dict]:
        start = self.position
        found = super().new_records()
        for n in self.app.recorder.select_notifications(start=start + 1, limit=10_000):
            event = self.app.mapper.to_domain_event(n)
            if isinstance(event, Campaign.TestMessageQueued):
                open_fence_for_test_message(self.app.fence, event, self.app.settings.sending_timeout_s)
        return found

    def result(self, cid: str, queued: dict, outcome: str, code: str | None = None) -> list[dict]:
        self.handler.sender_record(_result(cid, queued, outcome, code))
        self.last = self.new_records()
        return [r["value"] for r in self.last if r["topic"] == topics.CAMPAIGN_EVENTS]


def _result(cid: str, queued: dict, outcome: str, code: str | None = None):
    from schemas.internal import TestMessageResult

    return TestMessageResult(result_id=str(uuid.uuid4()), campaign_id=cid, command_id=queued["causation_id"],
                             message_id=queued["message_id"], outcome=outcome, provider_code=code,
                             provider_message_id="SM1" if outcome == "accepted" else None, occurred_at=utc_now())


def work_records(records: list[dict]) -> list[dict]:
    return [r["value"] for r in records if r["topic"] == topics.SENDER_WORK]


def test_a_test_message_is_queued_rendered_with_the_first_contact_and_changes_nothing_of_the_campaign(app):
    d = SendingDriver(app)
    cid = ready_sms_campaign(d, n=3, body="Hi {{name}}, {{code}}")
    before = app.campaign_view(cid)
    [queued] = d.test_send(cid, "+15551230001")
    CAMPAIGN_EVENT_ADAPTER.validate_python(queued)
    assert queued["type"] == "TestMessageQueued"
    assert (queued["destination"], queued["requested_by"], queued["row"]) == ("+15551230001", "user:ada", 2)
    assert queued["variables"] == {"name": "P0"} and queued["preview"] == "Hi P0, {{code}}"
    assert queued["message_id"] == ids.message_id_of_test_send(queued["causation_id"])
    # Only the answer and the sender's work: no status record (analytics must not count it), no status change.
    assert [r["topic"] for r in d.last] == [topics.CAMPAIGN_EVENTS, topics.SENDER_WORK]
    [work] = work_records(d.last)
    WorkRecord.model_validate(work)
    assert (work["command_id"], work["message_id"], work["destination"], work["variables"], work["channel"]) == (
        queued["causation_id"], queued["message_id"], "+15551230001", {"name": "P0"}, "sms")
    assert work["template_digest"] == template_digest({"body": "Hi {{name}}, {{code}}"})
    assert app.campaign_view(cid) == before
    row = app.fence.row(queued["message_id"])  # the relay opened it under the command
    assert (row["claim_id"], row["state"], row["submissions"]) == (queued["causation_id"], "open", 0)


def test_the_row_and_variables_given_render_it_and_a_wrong_destination_or_row_is_invalid(app):
    d = SendingDriver(app)
    cid = ready_sms_campaign(d, n=3, body="Hi {{name}} {{x}}")
    [queued] = d.test_send(cid, "+15551230001", row=4, variables={"x": "!"})
    assert (queued["row"], queued["variables"], queued["preview"]) == (4, {"name": "P2", "x": "!"}, "Hi P2 !")
    [bad_row] = d.test_send(cid, "+15551230001", row=99)
    assert (bad_row["type"], bad_row["reason"]) == ("CommandRejected", "invalid_command")
    assert "row 99" in bad_row["detail"]
    [email_to_sms] = d.test_send(cid, "ada@example.org")
    assert (email_to_sms["reason"], email_to_sms["detail"]) == (
        "invalid_command", "destination is invalid_e164 for an sms campaign")
    [unknown] = d.test_send(str(uuid.uuid4()), "+15551230001")
    assert unknown["reason"] == "unknown_campaign"


def test_any_status_but_deleted_and_whoever_holds_the_channel(app):
    d = SendingDriver(app)
    running = ready_sms_campaign(d, n=2)
    d.send("RunCampaign", running, disclaimer=ALL_TRUE)  # holds the SMS channel
    [during_its_run] = d.test_send(running, "+15551230001")
    assert during_its_run["type"] == "TestMessageQueued"
    other = ready_sms_campaign(d, n=1)
    [refused_run] = d.send("RunCampaign", other, disclaimer=ALL_TRUE)
    assert refused_run["reason"] == "channel_busy"
    [while_busy] = d.test_send(other, "+15551230002")  # the channel lock is not asked
    assert while_busy["type"] == "TestMessageQueued"
    created = str(uuid.uuid4())
    d.send("CreateCampaign", created, name="no contacts yet", channel="email",
           template={"subject": "Hi {{name}}", "html": "<p>x</p>", "from_email": "team@example.org"})
    [no_contacts] = d.test_send(created, "Ada@Example.ORG")
    assert (no_contacts["row"], no_contacts["variables"], no_contacts["preview"]) == (None, {}, "Hi {{name}}")
    assert no_contacts["destination"] == "Ada@example.org"  # normalised as a contact's would be
    d.send("DeleteCampaign", created)
    [deleted] = d.test_send(created, "ada@example.org")
    assert deleted["reason"] == "unknown_campaign"


def test_five_per_user_per_hour_over_every_campaign_a_repeat_counted_once(app, monkeypatch):
    d = SendingDriver(app)
    first, second = ready_sms_campaign(d, n=1), ready_sms_campaign(d, n=1)
    command_id = str(uuid.uuid4())
    [once] = d.send_as("user:ada", "SendTestMessage", first, command_id=command_id, destination="+15551230001")
    [again] = d.send_as("user:ada", "SendTestMessage", first, command_id=command_id, destination="+15551230001")
    assert again["event_id"] == once["event_id"]  # its stored answer; not counted twice, nothing sent twice
    assert work_records(d.last) == []
    for n in range(rules.TEST_MESSAGES_PER_HOUR - 1):
        [queued] = d.test_send(first if n % 2 else second, f"+1555123000{n + 2}")
        assert queued["type"] == "TestMessageQueued"
    [limited] = d.test_send(second, "+15551230009")
    assert (limited["type"], limited["reason"]) == ("CommandRejected", "test_send_limit")
    assert limited["detail"].startswith("5 test messages per hour per user: user:ada may send the next one in ")
    [someone_else] = d.test_send(second, "+15551230009", issued_by="token:ci")
    assert someone_else["type"] == "TestMessageQueued"
    later = application.now() + timedelta(seconds=rules.TEST_MESSAGE_WINDOW_S + 1)
    monkeypatch.setattr(application, "now", lambda: later)
    [an_hour_later] = d.test_send(second, "+15551230009")
    assert an_hour_later["type"] == "TestMessageQueued"


def test_an_opted_out_destination_is_answered_opted_out_and_nothing_goes_to_the_sender(app):
    d = SendingDriver(app)
    cid = ready_sms_campaign(d, n=1)
    app.apply_opt_out(opt_out_id=str(uuid.uuid4()), channel="sms", destination="+15551230001", opted_out=True,
                      source="sms_stop")
    d.new_records()
    [answer] = d.test_send(cid, "+15551230001")
    CAMPAIGN_EVENT_ADAPTER.validate_python(answer)
    assert (answer["type"], answer["outcome"], answer["reason"]) == ("TestMessageCompleted", "opted_out", None)
    assert work_records(d.last) == [] and app.fence.row(answer["message_id"]) is None


def test_the_sender_answer_is_recorded_once_a_no_answer_amended_by_a_definite_one(app):
    d = SendingDriver(app)
    cid = ready_sms_campaign(d, n=1)
    [queued] = d.test_send(cid, "+15551230001")
    [no_answer] = d.result(cid, queued, "no_answer")  # a sender that found it taken before
    assert (no_answer["type"], no_answer["outcome"], no_answer["causation_id"]) == (
        "TestMessageCompleted", "no_answer", queued["causation_id"])
    [accepted] = d.result(cid, queued, "accepted")  # the one that took it
    assert (accepted["outcome"], accepted["reason"], accepted["provider_message_id"]) == ("accepted", None, "SM1")
    assert d.result(cid, queued, "no_answer") == [] and d.result(cid, queued, "accepted") == []
    forged = queued | {"causation_id": str(uuid.uuid4())}  # its message id is not that command's
    assert d.result(cid, forged, "accepted") == []


@pytest.mark.parametrize(("outcome", "code", "expected"), [
    ("refused", "21211", ("refused", "invalid_destination")),
    ("presend_error", "503", ("failed", "provider_error")),
    ("held", None, ("failed", "provider_held")),
    ("not_sent", None, ("failed", "not_sent")),
])
def test_a_refusal_or_a_failure_before_the_provider_is_answered_with_its_reason(app, outcome, code, expected):
    d = SendingDriver(app)
    cid = ready_sms_campaign(d, n=1)
    [queued] = d.test_send(cid, "+15551230001")
    [completed] = d.result(cid, queued, outcome, code)
    CAMPAIGN_EVENT_ADAPTER.validate_python(completed)
    assert (completed["outcome"], completed["reason"], completed["provider_code"]) == (*expected, code)


def test_a_provider_opt_out_puts_the_destination_on_the_list_and_receipts_change_no_message(app):
    d = SendingDriver(app)
    cid = ready_sms_campaign(d, n=1)
    [queued] = d.test_send(cid, "+15005550004")
    [opted_out] = d.result(cid, queued, "refused", "21610")
    assert (opted_out["outcome"], opted_out["reason"]) == ("opted_out", None)
    assert "+15005550004" in app.suppressed("sms")
    [again] = d.test_send(cid, "+15005550004")
    assert again["outcome"] == "opted_out"
    # A status callback about a test message (the webhook receiver does not know it is one): no message moves,
    # no warning; one that opts the destination out is kept.
    [other] = d.test_send(cid, "+15551230002")
    before = app.campaign_view(cid)
    app.apply_results(result_id=str(uuid.uuid4()), campaign_id=cid, results=[
        sender_result(other["message_id"], "delivered"),
        sender_result(other["message_id"], "failed", provider_code="21610")])
    # No message status, no campaign event: only the opt-out list's change, on its internal topic.
    assert [r["topic"] for r in d.new_records()] == [topics.OPT_OUT_LIST]
    assert app.campaign_view(cid) == before and "+15551230002" in app.suppressed("sms")


def test_the_fence_lets_a_test_message_be_handed_off_once(app):
    d = SendingDriver(app)
    cid = ready_sms_campaign(d, n=1)
    [queued] = d.test_send(cid, "+15551230001")
    command_id, message_id = queued["causation_id"], queued["message_id"]
    assert app.fence.take(command_id, [message_id], time.time()) == {message_id: 1}
    assert app.fence.take(command_id, [message_id], time.time()) == {}  # a redelivery, another sender
    stored = [e for n in app.recorder.select_notifications(start=1, limit=10_000)
              if isinstance(e := app.mapper.to_domain_event(n), Campaign.TestMessageQueued)]
    open_fence_for_test_message(app.fence, stored[0], app.settings.sending_timeout_s)  # a relay rewind
    assert app.fence.row(message_id)["state"] == "handed_off"
    assert app.fence.take(command_id, [message_id], time.time()) == {}


# ----- the rules, pure ----------------------------------------------------------------------------

@pytest.mark.parametrize(("sender_outcome", "code", "channel", "expected"), [
    ("accepted", None, "sms", ("accepted", None)),
    ("refused", "21211", "sms", ("refused", "invalid_destination")),
    ("refused", "21610", "sms", ("opted_out", None)),
    ("refused", "20003", "sms", ("refused", "setup_error")),
    ("refused", None, "sms", ("refused", "unknown")),
    ("presend_error", "503", "email", ("failed", "provider_error")),
    ("deferred", "451", "email", ("refused", "deferred")),
    ("bounced", "550", "email", ("refused", "bounced")),
    ("blocked", None, "email", ("refused", "blocked")),
    ("no_answer", None, "email", ("no_answer", None)),
    ("held", None, "sms", ("failed", "provider_held")),
    ("not_sent", None, "sms", ("failed", "not_sent")),
    ("delivered", None, "email", ("accepted", None)),
    ("sent", None, "email", ("refused", "unknown")),  # an outcome the channel does not have
])
def test_outcome_of_a_test_message(sender_outcome, code, channel, expected):
    assert rules.outcome_of_test_message(sender_outcome, code, channel) == expected


def test_which_outcome_of_a_test_message_is_recorded():
    assert rules.outcome_of_test_message_applies(None, "no_answer")
    assert rules.outcome_of_test_message_applies("no_answer", "accepted")
    assert not rules.outcome_of_test_message_applies("no_answer", "no_answer")
    for definite in rules.TEST_MESSAGE_DEFINITE_OUTCOMES:
        assert not rules.outcome_of_test_message_applies(definite, "accepted")
        assert not rules.outcome_of_test_message_applies(definite, "no_answer")


def test_the_quota_counts_a_window(monkeypatch):
    from services.command_handler.domain.model import Rejected, TestSendQuota as Quota

    quota = Quota("user:ada")
    for n in range(rules.TEST_MESSAGES_PER_HOUR):
        quota.use(1000.0 + n)
    with pytest.raises(Rejected) as refused:
        quota.use(1000.0 + rules.TEST_MESSAGE_WINDOW_S - 1)
    assert refused.value.reason == "test_send_limit" and refused.value.detail.endswith("in 2 s")
    quota.use(1000.0 + rules.TEST_MESSAGE_WINDOW_S + 0.5)  # the first one left the window
    assert len(quota.sent_at) == rules.TEST_MESSAGES_PER_HOUR
