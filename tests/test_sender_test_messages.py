"""The sender's part of test messages (SendTestMessage), without a broker: one submission through the channel's
adapter, tokens, breaker and the hand-off fence, never retried, never sent twice, its outcome a TestMessageResult
(no message result)."""
from __future__ import annotations

import time
import uuid

import pytest

from services.common import ids
from services.common.fence import ClaimedMessage
from services.common.settings import Settings
from services.sender.ratelimit import TokenBucket
from tests.fakes import SMS_TEMPLATE, FakeClock, RecordingAdapter, dispatcher_harness


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, event_store="sqlite", sqlite_path=tmp_path / "events.db")


def relayed_test_message(fence, destination: str, *, deadline_s: float = 600.0) -> dict:
    """A TestMessageWork as the sender works it (its template resolved), its fence row opened as the relay does."""
    campaign_id, command_id = str(uuid.uuid4()), str(uuid.uuid4())
    message_id = ids.message_id_of_test_send(command_id)
    fence.open_claim(campaign_id=campaign_id, claim_id=command_id, claim_version=1,
                     deadline=time.time() + deadline_s, messages=[ClaimedMessage(message_id, 0)])
    return {"type": "TestMessageWork", "campaign_id": campaign_id, "command_id": command_id, "channel": "sms",
            "message_id": message_id, "destination": destination, "variables": {"name": "Ada"},
            "template": SMS_TEMPLATE}


async def test_one_submission_its_outcome_published_and_a_redelivery_sends_nothing(settings):
    adapter = RecordingAdapter(settings)
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock, sleep=clock.sleep)
    async with dispatcher_harness(settings, {"sms": adapter, "email": adapter},
                                  limiters={"sms": bucket, "email": bucket}) as h:
        work = relayed_test_message(h.fence, "+12025550100")
        assert await h.dispatcher.send_test(work) == "accepted"
        assert adapter.submitted == {work["message_id"]: 1} and bucket.tokens == 25 - 1  # it paid the channel's
        [result] = h.published.test_messages
        assert (result["outcome"], result["command_id"], result["message_id"]) == (
            "accepted", work["command_id"], work["message_id"])
        assert result["provider_message_id"].startswith("SM")
        assert h.published.results == []  # no message result: nothing for a message status
        # Redelivered (a crash before the offset's commit, a second sender): the fence says it went already.
        assert await h.dispatcher.send_test(work) == "no_answer"
        assert adapter.submitted == {work["message_id"]: 1}


async def test_a_presend_error_is_not_retried_and_closes_the_message(settings):
    adapter = RecordingAdapter(settings)
    async with dispatcher_harness(settings, {"sms": adapter, "email": adapter}) as h:
        work = relayed_test_message(h.fence, "+12025550105")  # the simulator answers 503 every time
        assert await h.dispatcher.send_test(work) == "presend_error"
        assert adapter.submitted == {work["message_id"]: 1}
        assert h.published.test_messages[-1]["provider_code"] == "503"
        assert h.fence.row(work["message_id"])["state"] == "closed"
        assert await h.dispatcher.send_test(work) == "no_answer"  # handed off once: never again
        assert adapter.submitted == {work["message_id"]: 1}


async def test_an_open_breaker_answers_held_at_once_and_nothing_sends_it_later(settings):
    adapter = RecordingAdapter(settings)
    async with dispatcher_harness(settings, {"sms": adapter, "email": adapter},
                                  breaker_options={"first_probe_s": 60.0}) as h:
        h.dispatcher.breaker("sms").held_elsewhere()
        work = relayed_test_message(h.fence, "+12025550100")
        assert await h.dispatcher.send_test(work) == "held"
        assert adapter.submitted == {} and h.fence.row(work["message_id"])["state"] == "closed"
        assert await h.dispatcher.send_test(work) == "held"


async def test_past_its_sending_limit_it_is_not_sent(settings):
    adapter = RecordingAdapter(settings)
    async with dispatcher_harness(settings, {"sms": adapter, "email": adapter}) as h:
        work = relayed_test_message(h.fence, "+12025550100", deadline_s=-1.0)
        assert await h.dispatcher.send_test(work) == "not_sent"
        assert adapter.submitted == {}


async def test_a_refusal_is_reported_with_its_code(settings):
    adapter = RecordingAdapter(settings)
    async with dispatcher_harness(settings, {"sms": adapter, "email": adapter}) as h:
        work = relayed_test_message(h.fence, "+15005550004")  # Twilio's test number of a recipient who replied STOP
        assert await h.dispatcher.send_test(work) == "refused"
        assert h.published.test_messages[-1]["provider_code"] == "21610"
