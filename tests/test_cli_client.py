"""The Kafka command client (`outreach up --demo` uses it; the CLI's campaign commands go through the HTTP API:
tests/test_cli_api.py) against the session broker, with a fake command handler that
answers on outreach.campaign-events like the real one (same event types, causation ids, sequences)."""
import asyncio
import threading
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from outreach import client
from schemas import topics
from schemas.commands import parse_command
from services.common import jsoncodec
from services.common.kafka import ensure_topics, make_producer
from services.common.settings import Settings

T0 = "2024-05-01T12:00:00.000000Z"


class FakeHandler:
    """Answers commands whose name/campaign it is told to; runs in its own thread and event loop."""

    def __init__(self, bootstrap: str, campaign_ids: set[str]):
        self.settings = Settings(kafka_bootstrap_servers=bootstrap)
        self.campaign_ids = campaign_ids
        self.received: list[dict] = []
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._sequences: dict[str, int] = {}

    def __enter__(self):
        self._thread.start()
        assert self.ready.wait(30), "fake handler did not start"
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _event(self, command, type_, **body):
        seq = self._sequences.get(command["campaign_id"], 0) + 10
        self._sequences[command["campaign_id"]] = seq
        return {"type": type_, "event_id": str(uuid.uuid4()), "campaign_id": command["campaign_id"], "sequence": seq,
                "occurred_at": T0, "causation_id": command["command_id"], **body}

    def answer(self, command):
        kind = command["type"]
        if kind == "CreateCampaign":
            return [self._event(command, "CampaignCreated", name=command["name"], description=None,
                                channel=command["channel"], template=command["template"],
                                created_by=command["issued_by"])]
        if kind == "AddContacts":
            invalid = [{"row": c["row"], "reason": "invalid_e164"} for c in command["contacts"]
                       if not c["destination"].startswith("+")]
            out = [self._event(command, "ContactsAdded", chunk_no=command["chunk_no"],
                               valid=len(command["contacts"]) - len(invalid), invalid=len(invalid),
                               invalid_rows=invalid)]
            if command["last_chunk"]:
                out += [self._event(command, "CampaignReady", message_count=1, summary=None),
                        self._event(command, "CampaignStatusChanged", status="ready", previous_status="created",
                                    stopped=False, counts={"total": 1, "waiting": 1})]
            return out
        if kind == "RunCampaign":
            return [self._event(command, "CommandRejected", command_id=command["command_id"], command_type=kind,
                                reason="channel_busy", detail="another sms campaign is running")]
        if kind == "StopCampaign":
            return [self._event(command, "CampaignStopped", stopped_by=command["issued_by"], cancelled_count=3)]
        return []

    async def _run(self):
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap_servers, enable_auto_commit=False,
                                    fetch_max_wait_ms=20)
        producer = make_producer(self.settings)
        await consumer.start()
        await producer.start()
        try:
            await consumer.topics()
            tps = [TopicPartition(topics.COMMANDS, p) for p in consumer.partitions_for_topic(topics.COMMANDS)]
            consumer.assign(tps)
            for tp, end in (await consumer.end_offsets(tps)).items():
                consumer.seek(tp, end)
            self.ready.set()
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=50)
                for records in batches.values():
                    for record in records:
                        command = jsoncodec.loads(record.value)
                        if command.get("campaign_id") not in self.campaign_ids:
                            continue
                        parse_command(record.value)  # what the CLI publishes is valid on the wire
                        self.received.append(command)
                        for event in self.answer(command):
                            await producer.send(topics.CAMPAIGN_EVENTS, jsoncodec.dumps(event),
                                                key=command["campaign_id"].encode())
                        await producer.flush()
        finally:
            await producer.stop()
            await consumer.stop()


@pytest.fixture
def settings(kafka_bootstrap) -> Settings:
    s = Settings(kafka_bootstrap_servers=kafka_bootstrap)
    asyncio.run(ensure_topics(s))
    return s


def test_client_create_then_rejected_run(settings):
    cid = str(uuid.uuid4())
    contacts = [{"row": 2, "destination": "+15555550100", "variables": {"name": "Ann"}},
                {"row": 3, "destination": "12345", "variables": {}}]

    async def scenario():
        async with client.CommandClient(settings) as c:
            created = await client.create_campaign_from_rows(
                name="Spring", channel="sms", template={"body": "Hi {{name}}"}, contacts=contacts, campaign_id=cid,
                issued_by="alice", client=c, timeout_s=20)
            run = await client.run_campaign(cid, issued_by="alice", client=c, timeout_s=20)
            stop = await client.stop_campaign(cid, client=c, timeout_s=20)
            return created, run, stop

    with FakeHandler(settings.kafka_bootstrap_servers, {cid}) as handler:
        created, run, stop = asyncio.run(scenario())
    assert [e["type"] for e in created] == ["CampaignCreated", "ContactsAdded", "CampaignReady",
                                            "CampaignStatusChanged"]
    assert client.rejection(created) is None
    assert client.rejection(run)["reason"] == "channel_busy" and len(run) == 1
    assert [e["type"] for e in stop] == ["CampaignStopped"]  # answered after the settle window
    assert [c["type"] for c in handler.received] == ["CreateCampaign", "AddContacts", "RunCampaign", "StopCampaign"]
    assert handler.received[2]["disclaimer"] == client.ALL_DISCLAIMER_FLAGS
    assert handler.received[3]["confirmed"] is True
    assert all(c["issued_by"] == "alice" for c in handler.received[:3])


def test_client_times_out_without_an_answer(settings):
    async def scenario():
        async with client.CommandClient(settings) as c:
            await c.send(client.make_command("DeleteCampaign", str(uuid.uuid4()), "alice"), timeout_s=0.5)

    with pytest.raises(client.AnswerTimeout):
        asyncio.run(scenario())
