"""The Kafka command client: publish commands on `outreach.commands`, await their answers on
`outreach.campaign-events` (matched by `causation_id` == `command_id`).

Used by `outreach up --demo` (the CLI's campaign commands go through the HTTP API: outreach/api_client.py)::

    async with CommandClient(settings) as client:
        events = await create_campaign_from_rows(name="Spring", channel="sms", template={"body": "Hi"},
                                                 contacts=[{"row": 1, "destination": "+15555550100"}],
                                                 client=client)
        campaign_id = events[0]["campaign_id"]
        await run_campaign(campaign_id, client=client)

The answer consumer has no group: it is assigned every partition and positioned at the end *before* anything
is published, so no answer can be missed. Every function returns the answer event dicts; a rejection is
returned too (`rejection(events)` finds it), a missing answer raises `AnswerTimeout`.
"""
from __future__ import annotations

import asyncio
import getpass
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import topics
from schemas.commands import MAX_CONTACTS_PER_CHUNK, new_id
from schemas.commands import make_command as command_envelope
from services.common import jsoncodec, kafka
from services.common.contacts_csv import MAX_CHUNK_BYTES, add_contacts_envelope_bytes, chunk_contacts
from services.common.retry import retrying
from services.common.settings import Settings, get_settings

log = logging.getLogger("outreach.client")

DEFAULT_TIMEOUT_S = 30.0
SETTLE_S = 0.25  # after the main answer event: how long to wait for trailing ones (status changes)
FETCH_RETRY_FIRST_WAIT_S = 0.2

ALL_DISCLAIMER_FLAGS = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}

# The event that answers each command, and the full answer when everything expected arrived.
_PRIMARY = {
    "CreateCampaign": "CampaignCreated",
    "AddContacts": "ContactsAdded",
    "UpdateTemplate": "TemplateUpdated",
    "RunCampaign": "CampaignRunStarted",
    "StopCampaign": "CampaignStopped",
    "RetryFailedMessages": "RetryStarted",
    "DeleteCampaign": "CampaignDeleted",
}


def _full_answer(command: dict[str, Any]) -> frozenset[str] | None:
    kind = command.get("type")
    if kind == "CreateCampaign":
        return frozenset({"CampaignCreated"})  # the first status is not a change
    if kind == "AddContacts":
        if command.get("last_chunk"):
            return frozenset({"ContactsAdded", "CampaignReady", "CampaignStatusChanged"})
        return frozenset({"ContactsAdded"})
    if kind == "UpdateTemplate":
        return frozenset({"TemplateUpdated"})
    if kind in ("RunCampaign", "DeleteCampaign"):
        return frozenset({_PRIMARY[kind], "CampaignStatusChanged"})
    return None  # Stop, Retry: a status change may or may not follow


class AnswerTimeout(TimeoutError):
    """No answer to a command within the timeout (is the command handler running?)."""

    def __init__(self, command: dict[str, Any], timeout_s: float, partial: list[dict[str, Any]]):
        super().__init__(f"no answer to {command.get('type')} {command.get('command_id')} within {timeout_s:g} s")
        self.command = command
        self.partial = partial


def default_principal() -> str:
    """`OUTREACH_PRINCIPAL`, else the login name."""
    principal = os.environ.get("OUTREACH_PRINCIPAL")
    if principal:
        return principal
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers)
        return "operator"


def make_command(command_type: str, campaign_id: str, issued_by: str | None = None, **payload: Any) -> dict[str, Any]:
    """A command (schemas.commands.make_command: a fresh command_id, the payload fields) issued by `issued_by`,
    else by the default principal."""
    return command_envelope(command_type, campaign_id, issued_by or default_principal(), **payload)


def rejection(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The CommandRejected among answer events, if any."""
    return next((e for e in events if e.get("type") == "CommandRejected"), None)


class _Waiter:
    def __init__(self, command: dict[str, Any]):
        self.primary = _PRIMARY.get(command.get("type", ""))
        self.full = _full_answer(command)
        self.events: list[dict[str, Any]] = []
        self.seen_ids: set[str] = set()
        self.answered = asyncio.Event()  # the main event (or a rejection) is in
        self.complete = asyncio.Event()  # everything expected is in
        self.last_at = 0.0

    def add(self, event: dict[str, Any], now: float) -> None:
        if event.get("event_id") in self.seen_ids:
            return  # a republished record
        self.seen_ids.add(event.get("event_id"))
        self.events.append(event)
        self.last_at = now
        kinds = {e.get("type") for e in self.events}
        if "CommandRejected" in kinds:
            self.answered.set()
            self.complete.set()
        elif self.primary is None or self.primary in kinds:
            self.answered.set()
            if self.full is not None and self.full <= kinds:
                self.complete.set()


class CommandClient:
    """A producer for commands and a group-less consumer of every campaign-events partition."""

    def __init__(self, settings: Settings | None = None, *, settle_s: float = SETTLE_S):
        self.settings = settings or get_settings()
        self.settle_s = settle_s
        self._producer = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task | None = None
        self._waiters: dict[str, _Waiter] = {}
        self.on_event: Callable[[dict[str, Any]], None] | None = None  # every campaign event read

    async def start(self) -> CommandClient:
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> CommandClient:
        await kafka.ensure_topics(self.settings)  # a lookup of a missing topic would auto-create it wrongly
        producer = kafka.make_producer(self.settings)
        await producer.start()
        self._producer = producer  # only once started: stop() stops what was started
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        self._consumer = consumer
        await self._consumer.topics()  # all-topics metadata: creates nothing
        partitions = [TopicPartition(topics.CAMPAIGN_EVENTS, p)
                      for p in sorted(self._consumer.partitions_for_topic(topics.CAMPAIGN_EVENTS) or ())]
        if not partitions:
            raise RuntimeError(f"topic {topics.CAMPAIGN_EVENTS} has no partitions")
        self._consumer.assign(partitions)
        # Explicit offsets: seek_to_end is resolved lazily, possibly after our command is answered. (tansu may
        # report an end a little early: re-reading a few old records is harmless, they match no waiter.)
        for tp, end in (await self._consumer.end_offsets(partitions)).items():
            self._consumer.seek(tp, end)
        self._reader = asyncio.create_task(self._read(), name="outreach-answer-reader")
        return self

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
            self._reader = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> CommandClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _read(self) -> None:
        assert self._consumer is not None
        loop = asyncio.get_running_loop()
        while True:
            batches = await self._fetch_answers()
            now = loop.time()
            for records in batches.values():
                for record in records:
                    try:
                        event = jsoncodec.loads(record.value or b"")
                    except jsoncodec.JSONDecodeError:
                        continue
                    if not isinstance(event, dict):
                        continue
                    if self.on_event is not None:
                        self.on_event(event)
                    waiter = self._waiters.get(event.get("causation_id"))  # type: ignore[arg-type]
                    if waiter is not None:
                        waiter.add(event, now)

    async def _fetch_answers(self) -> dict:
        """The next records; a failed fetch (a broker restarting) is retried until it works or the client stops."""
        assert self._consumer is not None
        async for attempt in retrying(on=Exception, timeout_s=None, first_wait_s=FETCH_RETRY_FIRST_WAIT_S):
            with attempt:
                return await self._consumer.getmany(timeout_ms=100, max_records=5000)
        raise AssertionError("unreachable: retrying without limits gives up only by raising")

    async def publish(self, command: dict[str, Any]) -> None:
        """Publish one command, keyed by its campaign_id, and wait for the broker's ack."""
        if self._producer is None:
            raise RuntimeError("CommandClient not started")
        await self._producer.send_and_wait(
            topics.COMMANDS, value=jsoncodec.dumps(command), key=command["campaign_id"].encode()
        )

    async def send(self, command: dict[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[dict[str, Any]]:
        """Publish `command` and return its answer events (a CommandRejected included); AnswerTimeout if none."""
        if self._reader is not None and self._reader.done():
            self._reader.result()  # surface a crashed reader
        waiter = _Waiter(command)
        self._waiters[command["command_id"]] = waiter
        loop = asyncio.get_running_loop()
        try:
            await self.publish(command)
            try:
                await asyncio.wait_for(waiter.answered.wait(), timeout_s)
            except asyncio.TimeoutError:
                raise AnswerTimeout(command, timeout_s, list(waiter.events)) from None
            # Trailing events (a status change) come in the same relay batch: wait briefly for them.
            while not waiter.complete.is_set():
                left = self.settle_s - (loop.time() - waiter.last_at)
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(waiter.complete.wait(), left)
                except asyncio.TimeoutError:
                    pass
            return sorted(waiter.events, key=lambda e: e.get("sequence") or 0)
        finally:
            self._waiters.pop(command["command_id"], None)


# ------------------------------------------------------------------ use cases (for `up --demo`)

async def _with_client(client: CommandClient | None, settings: Settings | None, work) -> Any:
    if client is not None:
        return await work(client)
    async with CommandClient(settings) as own:
        return await work(own)


def add_contacts_commands(
    campaign_id: str,
    contacts: Iterable[dict[str, Any]],
    issued_by: str | None = None,
    max_contacts: int = MAX_CONTACTS_PER_CHUNK,
    max_bytes: int = MAX_CHUNK_BYTES,
    default_region: str | None = None,
) -> list[dict[str, Any]]:
    """AddContacts commands (chunk_no 0, 1, ...; `last_chunk` on the last) of at most `max_contacts` contacts
    and `max_bytes` encoded bytes each. Always at least one (an empty import still closes the contacts).
    `default_region` (contract v1.1) goes into each: the handler reads national numbers with it."""
    issued_by = issued_by or default_principal()
    envelope = add_contacts_envelope_bytes(campaign_id, issued_by, default_region)
    chunks = list(chunk_contacts(contacts, envelope, max_contacts, max_bytes))
    region = {} if default_region is None else {"default_region": default_region}
    return [
        make_command("AddContacts", campaign_id, issued_by, chunk_no=n, contacts=chunk, last_chunk=n == len(chunks) - 1,
                     **region)
        for n, chunk in enumerate(chunks)
    ]


async def create_campaign_from_rows(
    *,
    name: str,
    channel: str,
    template: dict[str, Any],
    contacts: Iterable[dict[str, Any]],
    description: str | None = None,
    issued_by: str | None = None,
    campaign_id: str | None = None,
    client: CommandClient | None = None,
    settings: Settings | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_chunk: Callable[[int, int, list[dict[str, Any]]], None] | None = None,
    default_region: str | None = None,
) -> list[dict[str, Any]]:
    """CreateCampaign, then AddContacts chunks (with `default_region`, if given), each awaited in turn.

    `contacts`: `{row, destination, variables}` dicts (row = a positive integer unique in the campaign).
    Returns every answer event in order; stops at the first CommandRejected (returned last).
    `on_chunk(chunk_no, chunks, answer_events)` is called after each chunk's answer.
    """
    campaign_id = campaign_id or new_id()
    issued_by = issued_by or default_principal()
    payload: dict[str, Any] = {"name": name, "channel": channel, "template": template}
    if description is not None:
        payload["description"] = description
    commands = [make_command("CreateCampaign", campaign_id, issued_by, **payload)]
    commands += add_contacts_commands(campaign_id, contacts, issued_by, default_region=default_region)

    async def work(c: CommandClient) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = []
        for command in commands:
            events = await c.send(command, timeout_s)
            answers += events
            if on_chunk is not None and command["type"] == "AddContacts":
                on_chunk(command["chunk_no"], len(commands) - 1, events)
            if rejection(events):
                break
        return answers

    return await _with_client(client, settings, work)


async def send_command(
    command_type: str,
    campaign_id: str,
    *,
    issued_by: str | None = None,
    client: CommandClient | None = None,
    settings: Settings | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **payload: Any,
) -> list[dict[str, Any]]:
    """Any command: publish and return its answer events."""
    command = make_command(command_type, campaign_id, issued_by, **payload)
    return await _with_client(client, settings, lambda c: c.send(command, timeout_s))


async def run_campaign(campaign_id: str, **options: Any) -> list[dict[str, Any]]:
    """RunCampaign with every disclaimer flag accepted (the caller has shown the summary and had it accepted)."""
    return await send_command("RunCampaign", campaign_id, disclaimer=dict(ALL_DISCLAIMER_FLAGS), **options)


async def stop_campaign(campaign_id: str, **options: Any) -> list[dict[str, Any]]:
    return await send_command("StopCampaign", campaign_id, confirmed=True, **options)


async def retry_failed(
    campaign_id: str, message_ids: list[str] | None = None, include_cancelled: bool = False, **options: Any
) -> list[dict[str, Any]]:
    payload: dict[str, Any] = {"include_cancelled": include_cancelled}
    if message_ids:
        payload["message_ids"] = list(message_ids)
    return await send_command("RetryFailedMessages", campaign_id, **payload, **options)


async def delete_campaign(campaign_id: str, **options: Any) -> list[dict[str, Any]]:
    return await send_command("DeleteCampaign", campaign_id, **options)


async def update_template(campaign_id: str, template: dict[str, Any], **options: Any) -> list[dict[str, Any]]:
    return await send_command("UpdateTemplate", campaign_id, template=template, **options)


# ------------------------------------------------------------------ reading a campaign's history from Kafka

async def campaign_events_from_kafka(
    campaign_id: str, settings: Settings | None = None, timeout_s: float = 10.0
) -> list[dict[str, Any]]:
    """Every event of one campaign on `outreach.campaign-events` (its key's partition, from the start), by
    sequence and without duplicates. The fallback when the read model has nothing (projections not running)."""
    from aiokafka.partitioner import DefaultPartitioner

    settings = settings or get_settings()
    await kafka.ensure_topics(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=50, max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        await consumer.topics()
        partitions = sorted(consumer.partitions_for_topic(topics.CAMPAIGN_EVENTS) or ())
        if not partitions:
            return []
        key = campaign_id.encode()
        tp = TopicPartition(topics.CAMPAIGN_EVENTS, DefaultPartitioner()(key, partitions, partitions))
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        found: dict[str, dict[str, Any]] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=200, max_records=10_000)
            for record in batches.get(tp, ()):
                if record.key != key:
                    continue
                try:
                    event = jsoncodec.loads(record.value or b"")
                except jsoncodec.JSONDecodeError:
                    continue
                if isinstance(event, dict) and event.get("campaign_id") == campaign_id:
                    found.setdefault(event.get("event_id"), event)
            # The fetch's high watermark is right (tansu's ListOffsets may answer a little early).
            highwater = consumer.highwater(tp)
            if highwater is not None and await consumer.position(tp) >= highwater and not batches:
                break
        return sorted(found.values(), key=lambda e: e.get("sequence") or 0)
    finally:
        await consumer.stop()
