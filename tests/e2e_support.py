"""Helpers for end-to-end tests: a topic tail that collects every record, and command publishing."""
from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import datetime, timezone

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import topics
from services.common import jsoncodec, kafka
from services.common.settings import Settings
from tests.conftest import async_wait_until

ALL_TRUE = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}
FINAL_MESSAGE_STATUSES = {"delivered", "assumed_delivered", "failed", "opted_out", "cancelled"}


def occurred_at(record: dict) -> float:
    """A record's `occurred_at` as a POSIX timestamp (comparable with the simulator's log times)."""
    return datetime.fromisoformat(record["occurred_at"].replace("Z", "+00:00")).timestamp()


class Tail:
    """Reads topics from the beginning, without a group (so it sees everything, repeats included)."""

    def __init__(self, settings: Settings, *topic_names: str):
        self.settings = settings
        self.topic_names = topic_names
        self.records: dict[str, list] = defaultdict(list)
        self._task: asyncio.Task | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> "Tail":
        await kafka.ensure_topics(self.settings)
        config = kafka.consumer_config(self.settings)
        self._consumer = AIOKafkaConsumer(**config)
        await self._consumer.start()
        partitions = [TopicPartition(t, p) for t in self.topic_names
                      for p in range(kafka.topic_partitions(self.settings)[t])]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=10_000)
            for records in batches.values():
                for r in records:
                    try:
                        value = jsoncodec.loads(r.value)
                    except Exception:
                        value = r.value
                    self.records[r.topic].append((r, value))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._consumer:
            await self._consumer.stop()

    def values(self, topic: str) -> list:
        return [v for _, v in self.records[topic]]

    def answers(self, command_id: str) -> list[dict]:
        return [v for v in self.values(topics.CAMPAIGN_EVENTS)
                if isinstance(v, dict) and v.get("causation_id") == command_id]

    def campaign_events(self, campaign_id: str) -> list[dict]:
        """Distinct campaign events (first copy of each event_id), in sequence order."""
        seen: dict[str, dict] = {}
        for v in self.values(topics.CAMPAIGN_EVENTS):
            if isinstance(v, dict) and v.get("campaign_id") == campaign_id:
                seen.setdefault(v["event_id"], v)
        return sorted(seen.values(), key=lambda v: v["sequence"])

    def statuses(self, campaign_id: str | None = None) -> list[dict]:
        return [v for v in self.values(topics.MESSAGE_STATUS)  # other modules' poison records are not JSON objects
                if isinstance(v, dict) and (campaign_id is None or v.get("campaign_id") == campaign_id)]

    def latest_per_message(self, campaign_id: str) -> dict[str, dict]:
        """Each message's record with the highest sequence seen (the stream is at least once)."""
        latest: dict[str, dict] = {}
        for r in self.statuses(campaign_id):
            if r["message_id"] not in latest or r["sequence"] > latest[r["message_id"]]["sequence"]:
                latest[r["message_id"]] = r
        return latest

    def all_final(self, campaign_id: str, size: int) -> bool:
        """All `size` messages of the campaign seen, each in a final status."""
        last = self.latest_per_message(campaign_id)
        return len(last) == size and all(r["status"] in FINAL_MESSAGE_STATUSES for r in last.values())

    def latest_status(self, campaign_id: str) -> str | None:
        changes = [e for e in self.campaign_events(campaign_id) if e["type"] == "CampaignStatusChanged"]
        return changes[-1]["status"] if changes else None


def command(type_: str, campaign_id: str, command_id: str | None = None, issued_by: str = "e2e", **payload) -> dict:
    return {"type": type_, "command_id": command_id or str(uuid.uuid4()), "campaign_id": campaign_id,
            "issued_by": issued_by, "issued_at": datetime.now(timezone.utc).isoformat(), **payload}


class Commands:
    def __init__(self, settings: Settings, tail: Tail):
        self.settings = settings
        self.tail = tail
        self.producer = kafka.make_producer(settings)

    async def start(self) -> "Commands":
        await self.producer.start()
        return self

    async def stop(self) -> None:
        await self.producer.stop()

    async def publish(self, value: dict | bytes, key: str | None = None) -> None:
        raw = value if isinstance(value, bytes) else jsoncodec.dumps(value)
        key = key if key is not None else (value["campaign_id"] if isinstance(value, dict) else "")
        await self.producer.send_and_wait(topics.COMMANDS, value=raw, key=key.encode())

    async def send(self, type_: str, campaign_id: str, timeout_s: float = 15, **payload) -> list[dict]:
        """Publishes a command and waits for its answer (the events caused by it)."""
        value = command(type_, campaign_id, **payload)
        await self.publish(value)
        return await self.answer(value["command_id"], timeout_s)

    async def answer(self, command_id: str, timeout_s: float = 15) -> list[dict]:
        await async_wait_until(lambda: self.tail.answers(command_id), timeout_s,
                               message=f"no answer to command {command_id}")
        await asyncio.sleep(0)  # let the rest of the same answer arrive in the same poll
        return self.tail.answers(command_id)

    async def create_ready_campaign(self, channel: str, contacts: list[dict], template: dict | None = None,
                                    name: str = "e2e") -> str:
        campaign_id = str(uuid.uuid4())
        template = template or ({"body": "Hello {{name}}"} if channel == "sms" else
                                {"subject": "Hi {{name}}", "html": "<p>Hello {{name}}</p>",
                                 "from_email": "team@example.org", "from_name": "Team", "attachments": []})
        [created] = await self.send("CreateCampaign", campaign_id, name=name, channel=channel, template=template)
        assert created["type"] == "CampaignCreated", created
        chunks = [contacts[i:i + 1000] for i in range(0, len(contacts), 1000)] or [[]]
        for n, chunk in enumerate(chunks):
            answer = await self.send("AddContacts", campaign_id, chunk_no=n, contacts=chunk,
                                     last_chunk=n == len(chunks) - 1)
            assert answer[0]["type"] == "ContactsAdded", answer
        await async_wait_until(lambda: self.tail.latest_status(campaign_id) == "ready", 15,
                               message="campaign never became ready")
        return campaign_id


def sms_contacts(n: int, *, start_row: int = 2, last_digit: int = 0, prefix: str = "+1202") -> list[dict]:
    """Distinct numbers of the simulator's fictional range +1NXX555010d (d = outcome) when possible."""
    out = []
    for i in range(n):
        # +1 NXX 555 010 d: vary the area code (NXX) to make n distinct numbers with the same outcome digit.
        area = 200 + (i % 800)
        block = i // 800
        number = f"+1{area}555010{last_digit}" if block == 0 else f"+1{area}{555 + block:03d}{i % 10000:04d}"
        out.append({"row": start_row + i, "destination": number, "variables": {"name": f"P{i}"}})
    return out


def email_contacts(n: int, *, start_row: int = 2, local: str = "success", domain: str = "simulator.amazonses.com"):
    return [{"row": start_row + i, "destination": f"{local}+{i}@{domain}", "variables": {"name": f"P{i}"}}
            for i in range(n)]
