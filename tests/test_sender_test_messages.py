"""The sender's part of test messages (SendTestMessage), without a broker: one submission through the channel's
adapter, tokens, breaker and the hand-off fence, never retried, never sent twice, its outcome a TestMessageResult
(no message result)."""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import TopicPartition

from schemas import topics
from schemas.internal import template_digest
from services.common import ids, jsoncodec
from services.common.fence import ClaimedMessage
from services.common.settings import Settings
from services.sender import app as sender_app
from services.sender.ratelimit import TokenBucket
from tests.conftest import async_wait_until
from tests.fakes import SMS_TEMPLATE, FakeClock, RecordingAdapter, dispatcher_harness, simulated_sender


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, event_store="sqlite", sqlite_path=tmp_path / "events.db")


def relayed_test_message(fence, destination: str, *, campaign_id: str | None = None,
                         deadline_s: float = 600.0) -> dict:
    """A TestMessageWork as the sender works it (its template resolved), its fence row opened as the relay does."""
    campaign_id, command_id = campaign_id or str(uuid.uuid4()), str(uuid.uuid4())
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


# ----- the sender process's part: the work record's routing --------------------------------------

async def worked(sender, tp, offset: int, work_record: dict) -> None:
    """Hand one sender-work record to the sender, as its work loop does, and wait for its job."""
    sender.tracker.begin(tp, offset)
    sender._start_job(tp, type("Record", (), {"value": jsoncodec.dumps(work_record), "offset": offset})())
    await asyncio.wait_for(asyncio.gather(*sender.jobs), 30)


async def test_the_sender_works_a_test_message_record_apart_from_the_claims(settings):
    tp = TopicPartition(topics.SENDER_WORK, 0)
    async with simulated_sender(settings) as (sender, producer):
        campaign_id = str(uuid.uuid4())
        sender.on_campaign_event({"type": "CampaignCreated", "campaign_id": campaign_id, "channel": "sms",
                                  "template": SMS_TEMPLATE})
        work = relayed_test_message(sender.dispatcher._fence, "+12025550100", campaign_id=campaign_id)
        record = {**{k: v for k, v in work.items() if k != "template"}, "event_id": str(uuid.uuid4()),
                  "template_digest": template_digest(SMS_TEMPLATE)}
        await worked(sender, tp, 0, record)
        await async_wait_until(lambda: producer.values(topics.SENDER_RESULTS), 10)
        [result] = producer.values(topics.SENDER_RESULTS)
        assert (result["type"], result["outcome"], result["campaign_id"]) == ("TestMessageResult", "accepted",
                                                                              campaign_id)
        assert sender.book.campaigns == {} and sender.tracker.committable() == {tp: 1}


async def test_a_test_message_whose_template_never_comes_is_not_sent(settings, monkeypatch):
    monkeypatch.setattr(sender_app, "TEST_TEMPLATE_WAIT_S", 0.2)  # e.g. its campaign was deleted meanwhile
    tp = TopicPartition(topics.SENDER_WORK, 0)
    async with simulated_sender(settings) as (sender, producer):
        work = relayed_test_message(sender.dispatcher._fence, "+12025550100")
        record = {**{k: v for k, v in work.items() if k != "template"}, "event_id": str(uuid.uuid4()),
                  "template_digest": template_digest(SMS_TEMPLATE)}
        await worked(sender, tp, 0, record)
        await async_wait_until(lambda: producer.values(topics.SENDER_RESULTS), 10)
        assert [r["outcome"] for r in producer.values(topics.SENDER_RESULTS)] == ["not_sent"]
        assert sender.dispatcher._fence.row(work["message_id"])["state"] == "closed"
        assert sender.tracker.committable() == {tp: 1}
