"""The sender's serve() against the session broker; the test plays the command handler and the relay.

It publishes campaign events, answers the sender's ClaimRequests with WorkClaimed records from a queue of
work items, and reads the SenderResults that come back.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
import uuid
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer

from schemas import topics
from schemas.internal import ClaimRequest, SenderResults, template_digest
from services.common import jsoncodec
from services.common.embedded_broker import EmbeddedBroker, free_port
from services.common.fence import ClaimedMessage, open_fence
from services.common.kafka import consumer_config, ensure_topics, make_producer
from services.common.settings import Settings
from services.sender.app import serve
from services.sender.journal import Journal, journal_path
from tests.conftest import async_wait_until
from tests.fakes import EMAIL_TEMPLATE, SMS_TEMPLATE


@pytest.fixture(scope="module")
def kafka_bootstrap(kafka_bootstrap, request):
    """A private broker for this module: a sender reads every campaign event from the start, so campaigns
    left on the shared broker by other tests would crowd these tests' claims."""
    if os.environ.get("OUTREACH_TEST_KAFKA") in ("external", "testcontainers"):
        return kafka_bootstrap  # the session's broker (pytest hands an overriding fixture its parent)
    broker = EmbeddedBroker("127.0.0.1", free_port("127.0.0.1"))
    broker.start()
    request.addfinalizer(broker.stop)
    return broker.bootstrap


def items_for(campaign_id: str, destinations: list[str]) -> list[dict]:
    return [{"message_id": str(uuid.uuid5(uuid.UUID(campaign_id), f"message:{row}")), "row": row,
             "destination": destination, "variables": {"name": f"n{row}"}, "attempt": 0}
            for row, destination in enumerate(destinations, start=1)]


class FakeHandler:
    """Answers ClaimRequests of the campaigns given to `queue` (handler + relay), collects SenderResults."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.queued: dict[str, list[dict]] = {}
        self.channels: dict[str, str] = {}
        self.claims: dict[str, list[dict]] = defaultdict(list)  # campaign_id -> ClaimRequests seen
        self.answers: dict[str, list[int]] = defaultdict(list)  # campaign_id -> items per WorkClaimed
        self.results: dict[str, list[dict]] = defaultdict(list)  # campaign_id -> results in order
        self.answering: set[str] = set()
        self.created: set[str] = set()  # campaigns whose CampaignCreated was published
        self.lose: dict[str, int] = defaultdict(int)  # campaign_id -> how many more claims to lose
        self.producer = make_producer(settings)
        self.fence = open_fence(settings)  # the senders' (same data dir): opened per claim, as the relay does
        self.claim_versions = itertools.count(1)

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, settings: Settings):
        """A FakeHandler answering on `settings`' broker until the block ends."""
        await ensure_topics(settings)
        handler = cls(settings)
        await handler.producer.start()
        stop = asyncio.Event()
        task = asyncio.create_task(handler.run(stop))
        try:
            yield handler
        finally:
            stop.set()
            await task
            await handler.producer.stop()
            handler.fence.close_connection()

    def queue(self, campaign_id: str, channel: str, items: list[dict], answer: bool = True) -> None:
        self.queued[campaign_id] = list(items)
        self.channels[campaign_id] = channel
        if answer:
            self.answering.add(campaign_id)

    async def publish_event(self, campaign_id: str, type_: str, **fields) -> None:
        if type_ == "CampaignCreated":
            self.created.add(campaign_id)
        elif type_ == "CampaignRunStarted" and campaign_id not in self.created and campaign_id in self.channels:
            # As the handler does, a campaign's template (which work records name by digest) comes first.
            channel = self.channels[campaign_id]
            await self.publish_event(campaign_id, "CampaignCreated", name="auto", channel=channel, created_by="t",
                                     template=SMS_TEMPLATE if channel == "sms" else EMAIL_TEMPLATE)
        value = {"type": type_, "event_id": str(uuid.uuid4()), "campaign_id": campaign_id, "sequence": 1,
                 "occurred_at": "2026-01-01T00:00:00.000000Z", "causation_id": str(uuid.uuid4()), **fields}
        await self.producer.send_and_wait(topics.CAMPAIGN_EVENTS, jsoncodec.dumps(value), key=campaign_id.encode())

    async def _answer(self, request: dict) -> None:
        campaign_id = request["campaign_id"]
        take = self.queued[campaign_id][:request["max_messages"]]
        del self.queued[campaign_id][:len(take)]
        channel = self.channels[campaign_id]
        work = {"type": "WorkClaimed", "event_id": str(uuid.uuid4()), "claim_id": request["claim_id"],
                "campaign_id": campaign_id, "channel": channel, "run_no": 1,
                "template_digest": template_digest(SMS_TEMPLATE if channel == "sms" else EMAIL_TEMPLATE),
                "items": take,
                "remaining_queued": len(self.queued[campaign_id]), "holds_channel": bool(take)}
        self.answers[campaign_id].append(len(take))
        self.fence.open_claim(campaign_id=campaign_id, claim_id=request["claim_id"],
                              claim_version=next(self.claim_versions),
                              deadline=time.time() + self.settings.sending_timeout_s,
                              messages=[ClaimedMessage(item["message_id"], item["attempt"]) for item in take])
        await self.producer.send_and_wait(topics.SENDER_WORK, jsoncodec.dumps(work), key=campaign_id.encode())

    async def run(self, stop: asyncio.Event) -> None:
        group = f"test-fake-handler-{uuid.uuid4().hex[:8]}"
        consumer = AIOKafkaConsumer(topics.CLAIM_REQUESTS, topics.SENDER_RESULTS, group_id=group,
                                    **consumer_config(self.settings))
        await consumer.start()
        try:
            while not stop.is_set():
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    for record in records:
                        value = jsoncodec.loads(record.value)
                        campaign_id = value.get("campaign_id")
                        if campaign_id not in self.queued:
                            continue  # another test's campaign
                        if record.topic == topics.CLAIM_REQUESTS:
                            ClaimRequest.model_validate(value)
                            self.claims[campaign_id].append(value)
                            if self.lose[campaign_id] > 0:
                                self.lose[campaign_id] -= 1  # a request (or its answer) lost
                            elif campaign_id in self.answering:
                                await self._answer(value)
                        else:
                            SenderResults.model_validate(value)
                            self.results[campaign_id].extend(value["results"])
        finally:
            await consumer.stop()


@pytest.fixture
async def fake(kafka_bootstrap: str, tmp_path):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path, sms_provider="inprocess", email_provider="inprocess")
    async with FakeHandler.running(settings) as handler:
        yield handler


@contextlib.asynccontextmanager
async def running_sender(settings: Settings, groups: str, **options):
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, work_group=f"{groups}-work",
                                     **options))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def active_campaigns(settings: Settings) -> set[str]:
    journal = Journal(journal_path(settings))  # a second connection: WAL lets it read beside the sender
    try:
        return {a.campaign_id for a in journal.active_campaigns()}
    finally:
        journal.close()


def check_alive(sender: asyncio.Task) -> None:
    if sender.done():
        sender.result()  # raises what stopped it
        raise AssertionError("the sender stopped by itself")


def by_message(results: list[dict]) -> dict[str, list[tuple]]:
    seen = defaultdict(list)
    for r in results:
        seen[r["message_id"]].append((r["outcome"], r["attempt"]))
    return seen


async def test_sender_claims_sends_and_stops_when_nothing_is_queued(fake, kafka_bootstrap, tmp_path):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path, sms_provider="inprocess", email_provider="inprocess", sms_rate=5)  # claims of 10
    groups = f"test-sender-{uuid.uuid4().hex[:8]}"
    sms_id, email_id = str(uuid.uuid4()), str(uuid.uuid4())
    sms_items = items_for(sms_id, [f"+1202555{1000 + n:04d}" for n in range(25)])
    email_items = items_for(email_id, [f"user{n}@example.com" for n in range(5)])
    fake.queue(sms_id, "sms", sms_items)
    fake.queue(email_id, "email", email_items)

    async with running_sender(settings, groups) as sender:
        await fake.publish_event(sms_id, "CampaignCreated", name="s", channel="sms", template=SMS_TEMPLATE,
                                 created_by="t")
        await fake.publish_event(sms_id, "CampaignRunStarted", run_no=1, accepted_by="t", disclaimer={},
                                 message_count=25, suppressed_count=0)

        def sms_sent():
            check_alive(sender)
            return len(by_message(fake.results[sms_id])) == 25 and 0 in fake.answers[sms_id]

        await async_wait_until(sms_sent, 30, message="the SMS campaign was not sent")
        await fake.publish_event(sms_id, "CampaignStatusChanged", status="complete", previous_status="in_progress")

        def sms_done():
            return sms_sent() and sms_id not in active_campaigns(settings)

        await async_wait_until(sms_done, 30, message="the SMS campaign was not sent and drained")
        seen = by_message(fake.results[sms_id])
        assert set(seen) == {i["message_id"] for i in sms_items}
        assert all(v == [("accepted", 1), ("sent", 1), ("delivered", 1)] for v in seen.values()), seen
        assert {c["max_messages"] for c in fake.claims[sms_id]} == {10}  # 2 s x 5 messages/s
        assert sum(fake.answers[sms_id]) == 25
        claims_at_drain = len(fake.claims[sms_id])

        # A second campaign (channel learnt from the WorkClaimed only) runs while the first stays stopped.
        await fake.publish_event(email_id, "CampaignRunStarted", run_no=1, accepted_by="t", disclaimer={},
                                 message_count=5, suppressed_count=0)
        await fake.publish_event(sms_id, "CampaignRunStarted", run_no=1, accepted_by="t", disclaimer={},
                                 message_count=25, suppressed_count=0)  # redelivered: no new claims

        def email_sent():
            check_alive(sender)
            return len(by_message(fake.results[email_id])) == 5 and 0 in fake.answers[email_id]

        await async_wait_until(email_sent, 30, message="the email campaign was not sent")
        await fake.publish_event(email_id, "CampaignStatusChanged", status="complete", previous_status="in_progress")

        def email_done():
            return email_sent() and email_id not in active_campaigns(settings)

        await async_wait_until(email_done, 30, message="the email campaign was not sent and drained")
        assert all(v == [("accepted", 1), ("delivered", 1)] for v in by_message(fake.results[email_id]).values())
        assert len(fake.claims[sms_id]) == claims_at_drain
        assert len(fake.results[sms_id]) == 75  # nothing sent or reported twice


async def test_sender_resumes_claiming_after_a_restart(fake, kafka_bootstrap, tmp_path):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path, sms_provider="inprocess", email_provider="inprocess")
    groups = f"test-sender-{uuid.uuid4().hex[:8]}"
    campaign_id = str(uuid.uuid4())
    items = items_for(campaign_id, ["+12025551000", "+12025550102", "+15005550001"])
    fake.queue(campaign_id, "sms", items, answer=False)  # the handler is down at first

    async with running_sender(settings, groups):
        await fake.publish_event(campaign_id, "CampaignCreated", name="r", channel="sms", template=SMS_TEMPLATE,
                                 created_by="t")
        await fake.publish_event(campaign_id, "CampaignRunStarted", run_no=1, accepted_by="t", disclaimer={},
                                 message_count=3, suppressed_count=0)
        await async_wait_until(lambda: len(fake.claims[campaign_id]) >= 2, 30, message="no claims")
    first_claims = {c["claim_id"] for c in fake.claims[campaign_id]}
    assert campaign_id in active_campaigns(settings)
    assert {c["max_messages"] for c in fake.claims[campaign_id]} == {200}

    fake.answering.add(campaign_id)
    async with running_sender(settings, groups):  # same journal: claiming resumes
        await async_wait_until(lambda: len(by_message(fake.results[campaign_id])) == 3, 30,
                               message="claiming did not resume after the restart")
        await fake.publish_event(campaign_id, "CampaignStatusChanged", status="complete_with_errors",
                                 previous_status="in_progress")
        await async_wait_until(lambda: campaign_id not in active_campaigns(settings), 30,
                               message="claiming did not end with the campaign")
    assert {c["claim_id"] for c in fake.claims[campaign_id]} - first_claims
    seen = by_message(fake.results[campaign_id])
    assert [seen[i["message_id"]] for i in items] == [
        [("accepted", 1), ("sent", 1), ("delivered", 1)],
        [("accepted", 1), ("sent", 1), ("undelivered", 1)],
        [("refused", 1)],
    ]


async def test_lost_claims_are_issued_again_after_the_timeout(fake, kafka_bootstrap, tmp_path):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path, sms_provider="inprocess", email_provider="inprocess")
    campaign_id = str(uuid.uuid4())
    items = items_for(campaign_id, ["+12025551000", "+12025551001"])
    fake.queue(campaign_id, "sms", items)
    fake.lose[campaign_id] = 2  # both first claims go unanswered: without a timeout the loop would stall
    async with running_sender(settings, f"test-sender-{uuid.uuid4().hex[:8]}", claim_timeout_s=1.0) as sender:
        await fake.publish_event(campaign_id, "CampaignRunStarted", run_no=1, accepted_by="t", disclaimer={},
                                 message_count=2, suppressed_count=0)

        def done():
            check_alive(sender)
            return len(by_message(fake.results[campaign_id])) == 2 and 0 in fake.answers[campaign_id]

        await async_wait_until(done, 30, message="lost claims were not issued again")
    assert len(fake.claims[campaign_id]) >= 4
    assert all(len(v) == 3 for v in by_message(fake.results[campaign_id]).values())


async def test_python_m_services_sender_stops_on_sigterm(tmp_path):
    """The process entry point on a private broker (its default group names must not touch the shared one)."""
    with EmbeddedBroker("127.0.0.1", free_port()) as broker:
        settings = Settings(kafka_bootstrap_servers=broker.bootstrap, data_dir=tmp_path, sms_provider="inprocess", email_provider="inprocess")
        await ensure_topics(settings)
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "OUTREACH_DATA_DIR": str(tmp_path)}
        log_path = tmp_path / "sender.log"
        with open(log_path, "wb") as log_file:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.sender", env=env,
                                                        stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                                                        stderr=log_file)
        try:
            campaign_id = str(uuid.uuid4())
            async with FakeHandler.running(settings) as handler:
                handler.queue(campaign_id, "sms", [], answer=False)
                await handler.publish_event(campaign_id, "CampaignRunStarted", run_no=1, accepted_by="t",
                                            disclaimer={}, message_count=1, suppressed_count=0)
                await async_wait_until(lambda: handler.claims[campaign_id], 30, message="no ClaimRequest")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0, log_path.read_text()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert campaign_id in active_campaigns(settings)  # a restart resumes it
