"""The command handler's side of the hand-off fence (contract v1.1), on both event stores: a claimed message
nobody handed off is queued again at its Sending limit or when a provider hold starts, never reported
`timed_out`; one a sender took is; claims wait while a hold is on."""
from __future__ import annotations

import time
import uuid

from schemas import topics
from services.common import ids
from services.common.settings import get_settings
from services.command_handler.application import OutreachApp
from services.command_handler.domain.model import Campaign
from services.command_handler.relay import open_fence_for_claim
from tests.handler_driver import Driver, sender_result
from tests.test_handler_app import ALL_TRUE, ready_sms_campaign


class Relayed(Driver):
    """The driver, with the relay's part of the fence: every claim the application stores is opened."""

    def new_records(self) -> list[dict]:
        start = self.position
        records = super().new_records()
        for n in self.app.recorder.select_notifications(start=start + 1, limit=10_000):
            event = self.app.mapper.to_domain_event(n)
            if isinstance(event, Campaign.WorkClaimed) and event.items:
                open_fence_for_claim(self.app.fence, event, self.app.settings.sending_timeout_s)
        return records

    def claim(self, cid: str, n: int) -> tuple[str, list[str]]:
        claim_id = str(uuid.uuid4())
        self.app.claim(claim_id=claim_id, campaign_id=cid, max_messages=n)
        claimed = [r["value"]["message_id"] for r in self.new_records()
                   if r["topic"] == topics.MESSAGE_STATUS and r["value"]["status"] == "sending"]
        return claim_id, claimed

    def statuses(self) -> list[tuple[str, str, str, int | None]]:
        return [(r["value"]["message_id"], r["value"]["previous_status"], r["value"]["status"], r["value"]["attempt"])
                for r in self.new_records() if r["topic"] == topics.MESSAGE_STATUS]


def sending_expiry(app: OutreachApp, cid: str, message_id: str, row_index: int) -> None:
    block = app.repository.get(ids.block_id(cid, 0))
    app.apply_expiry(expiry_id=str(uuid.uuid4()), campaign_id=cid, message_id=message_id, kind="sending",
                     since_sequence=block.changed_at[row_index])


def test_a_message_never_handed_off_is_queued_again_at_the_sending_limit_and_one_handed_off_times_out(app):
    d = Relayed(app)
    cid = ready_sms_campaign(d, n=2)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    claim_id, [taken, untaken] = d.claim(cid, 2)
    assert app.fence.take(claim_id, [taken], time.time()) == {taken: 1}  # a sender handed this one off

    sending_expiry(app, cid, untaken, 1)
    sending_expiry(app, cid, taken, 0)
    assert sorted(d.statuses()) == sorted([(untaken, "sending", "queued", None), (taken, "sending", "failed", 1)])
    assert app.fence.take(claim_id, [untaken], time.time()) == {}  # closed under that claim for good
    view = app.campaign_view(cid)
    assert (view["counts"]["queued"], view["counts"]["failed"], view["holds_channel"]) == (1, 1, True)

    next_claim, claimed = d.claim(cid, 5)  # claiming starts again where the message went back
    assert claimed == [untaken]
    assert app.fence.take(next_claim, [untaken], time.time()) == {untaken: 1}  # no attempt was counted


def test_a_hold_returns_the_claimed_messages_nobody_took_and_claims_wait_until_it_lifts(app):
    d = Relayed(app)
    cid = ready_sms_campaign(d, n=3)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    claim_id, claimed = d.claim(cid, 3)
    taken = claimed[0]
    app.fence.take(claim_id, [taken], time.time())
    d.new_records()

    app.apply_hold(hold_id=str(uuid.uuid4()), campaign_id=cid, provider="twilio", held=True, reason="outage")
    records = d.new_records()
    returned = {(r["value"]["message_id"], r["value"]["previous_status"], r["value"]["status"])
                for r in records if r["topic"] == topics.MESSAGE_STATUS}
    assert returned == {(m, "sending", "queued") for m in claimed[1:]}
    assert "CampaignSendingHeld" in [r["value"]["type"] for r in records if r["topic"] == topics.CAMPAIGN_EVENTS]
    assert app.fence.take(claim_id, claimed[1:], time.time()) == {}  # a sender still holding them cannot send them
    assert d.claim(cid, 5)[1] == []  # claims wait while the hold is on

    app.apply_hold(hold_id=str(uuid.uuid4()), campaign_id=cid, provider="twilio", held=False, reason="probe_succeeded")
    assert sorted(d.claim(cid, 5)[1]) == sorted(claimed[1:])  # after it, they are claimed and sent
    view = app.campaign_view(cid)
    assert (view["counts"]["sending"], view["counts"]["queued"]) == (3, 0)


def test_a_stop_during_a_hold_cancels_the_messages_it_returned(app):
    d = Relayed(app)
    cid = ready_sms_campaign(d, n=2)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    d.claim(cid, 2)
    app.apply_hold(hold_id=str(uuid.uuid4()), campaign_id=cid, provider="twilio", held=True, reason="outage")
    d.new_records()
    d.send("StopCampaign", cid, confirmed=True)
    view = app.campaign_view(cid)
    assert (view["counts"]["cancelled"], view["counts"]["sending"], view["holds_channel"]) == (2, 0, False)


def test_a_relay_rewind_over_old_claims_reopens_nothing(event_store_env, monkeypatch, tmp_path):
    """The relay republishes history (a rewind after a failed page, or an emptied broker): the claims it
    publishes again open nothing, so no sender can hand their messages off a second time."""
    from services.command_handler.checkpoint import Checkpoint
    from services.command_handler.relay import Relay

    for key, value in event_store_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OUTREACH_DATA_DIR", str(tmp_path))
    relay = Relay(get_settings())
    try:
        app = relay.app
        d = Driver(app)
        cid = ready_sms_campaign(d, n=2)
        d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
        claim_id = str(uuid.uuid4())
        app.claim(claim_id=claim_id, campaign_id=cid, max_messages=2)
        relay._read_page()  # the relay's page: the claim's rows opened before its WorkClaimed goes out
        first, second = (ids.message_id(cid, row) for row in (2, 3))
        assert app.fence.take(claim_id, [first], time.time()) == {first: 1}
        sending_expiry(app, cid, second, 1)  # never handed off: queued again, closed under the claim

        relay.checkpoint = Checkpoint()  # rewound to the start
        position, records = relay._read_page()
        assert any(r.topic == topics.SENDER_WORK for r in records)  # the old claim is published again...
        assert app.fence.take(claim_id, [first, second], time.time()) == {}  # ...and grants nothing
        assert app.fence.row(first)["state"] == "handed_off" and app.fence.row(second)["state"] == "closed"
    finally:
        relay.checkpoints.close()
        relay.app.close()


def test_a_receipt_before_the_senders_result_carries_the_submission_and_a_late_one_of_an_earlier_run_is_ignored(app):
    d = Relayed(app)
    cid = ready_sms_campaign(d, n=2)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    claim_id, [first, second] = d.claim(cid, 2)
    assert app.fence.take(claim_id, [first, second], time.time()) == {first: 1, second: 1}

    # The provider's receipt overtakes the sender's own `accepted`: it still says submission 1.
    app.apply_results(result_id=str(uuid.uuid4()), campaign_id=cid,
                      results=[sender_result(first, "sent", attempt=None), sender_result(first, "delivered", None)])
    assert [(s[2], s[3]) for s in d.statuses()] == [("sent", 1), ("delivered", 1)]

    # The second times out (handed off, no answer), is retried and handed off again (submission 2)...
    sending_expiry(app, cid, second, 1)
    d.send("RetryFailedMessages", cid, message_ids=[second])
    retry_claim, [again] = d.claim(cid, 5)
    assert again == second and app.fence.take(retry_claim, [second], time.time()) == {second: 2}
    d.statuses()
    # ...when run 1's late receipt arrives: it answers submission 1, not the one in flight.
    app.apply_results(result_id=str(uuid.uuid4()), campaign_id=cid,
                      results=[sender_result(second, "delivered", attempt=1)])
    assert d.statuses() == []
    app.apply_results(result_id=str(uuid.uuid4()), campaign_id=cid,
                      results=[sender_result(second, "delivered", attempt=2)])
    assert [(s[2], s[3]) for s in d.statuses()] == [("delivered", 2)]


def test_a_message_never_handed_off_in_a_stopped_campaign_is_cancelled_not_queued_again(app):
    """Stop cancels the queued messages; one claimed but never handed off that comes back after the Stop
    (its Sending limit, a hold) is cancelled too: the stopped campaign claims no more, and must finish."""
    d = Relayed(app)
    cid = ready_sms_campaign(d, n=3)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    claim_id, [taken, untaken] = d.claim(cid, 2)
    app.fence.take(claim_id, [taken], time.time())
    d.send("StopCampaign", cid, confirmed=True)  # the third, still queued, is cancelled now
    d.new_records()
    sending_expiry(app, cid, untaken, 1)
    sending_expiry(app, cid, taken, 0)
    assert sorted(d.statuses()) == sorted([(untaken, "sending", "cancelled", None), (taken, "sending", "failed", 1)])
    view = app.campaign_view(cid)
    assert (view["counts"]["cancelled"], view["counts"]["failed"], view["counts"]["queued"]) == (2, 1, 0)
    assert view["status"] == "complete_with_errors"
