"""The command handler process: consumes commands, claims, sender results, expiries and opt-outs (all keyed
by campaign_id), runs each through the application, and commits offsets only after the effect is stored.

A FastStream app (services.common.kafka.run_consumer): one batch subscriber reads the five topics (one
group join at start-up), hands each batch's records one by one to `RecordHandler`, and commits the batch
once every record of it is stored or parked. A record that keeps failing goes to the DLQ after a few tries,
so a poison record never stops the consumer.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import ConsumerRecord
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.publisher.usecase import DefaultPublisher

from schemas import topics
from schemas.commands import COMMAND_CLASSES
from schemas.internal import ClaimRequest, Expiry, OptOutChanged, SenderResults, SendingHold, TestMessageResult
from services.common import kafka, logs
from services.common.observability import (Observability, assigned_check, broker_check, event_store_check,
                                           subscriber_consumer)
from services.common.retry import backoff_s, is_transient
from services.common.runtime import run_service
from services.common.settings import Settings
from services.command_handler.application import open_app
from services.command_handler.handlers import DeadLetter, RecordHandler

log = logging.getLogger("outreach.command_handler")

GROUP_ROLE = "command-handler"  # the group: settings.group_id(GROUP_ROLE)
INPUT_TOPICS = (topics.COMMANDS, topics.CLAIM_REQUESTS, topics.SENDER_RESULTS, topics.EXPIRIES, topics.OPT_OUTS)
MAX_RECORDS = 1000
TRIES_BEFORE_DLQ = 3
TRANSIENT_LONGEST_WAIT_S = 10.0
PARKED: collections.Counter[str] = collections.Counter()  # records parked per source topic (the alarm's count)
# What the five topics carry (RecordHandler decodes each record with its model; this documents them).
InputRecord = kafka.records_of(*COMMAND_CLASSES, ClaimRequest, SenderResults, SendingHold, TestMessageResult, Expiry,
                              OptOutChanged)


def build_broker(settings: Settings, handler: RecordHandler | None = None) -> KafkaBroker:
    """The handler's FastStream broker, its subscriber and DLQ publisher declared, not connected
    (`handler` None: for its AsyncAPI document only)."""
    broker = kafka.make_faststream_broker(settings, client_id="command-handler")
    dead_letters = broker.publisher(topics.COMMANDS_DLQ, schema=bytes, description="records that cannot be answered")

    @kafka.batch_subscriber(broker, *INPUT_TOPICS, group_id=settings.group_id(GROUP_ROLE), max_records=MAX_RECORDS, settings=settings)
    async def on_batch(values: list[InputRecord], msg: KafkaMessage) -> None:
        for record in msg.raw_message:
            with logs.context(campaign_id=logs.key_id(record.key)):  # the handler adds the command's ids
                await _process(handler, dead_letters, record, consumer=settings.group_id(GROUP_ROLE))
        await kafka.commit(msg)

    return broker


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    await kafka.ensure_topics(settings)
    app = open_app(settings)
    observability = None
    try:
        broker = build_broker(settings, RecordHandler(app))
        observability = await Observability(settings, "command-handler", {
            "broker": broker_check(settings), "event_store": event_store_check(settings),
            "partitions_assigned": assigned_check(subscriber_consumer(broker))}).start()
        log.info("command handler consuming %s", ", ".join(INPUT_TOPICS))
        await kafka.run_consumer(broker, stop)
    finally:
        if observability is not None:
            await observability.stop()
        app.close()


async def _process(handler: RecordHandler, dead_letters: DefaultPublisher, record: ConsumerRecord,
                   sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, consumer: str = GROUP_ROLE) -> None:
    """Answer one record. A transient fault (the event store or the fence unreachable or busy) is waited out
    without limit, with back-off and jitter, consumption paused: such a record is never parked. A record the
    handler refuses, or that fails TRIES_BEFORE_DLQ times for any other reason (a bug), is parked in the DLQ
    with its source and the error, counted and logged as an alarm; the partition goes on."""
    failures = transient = 0
    while True:
        try:
            outcome = await asyncio.to_thread(handler.handle, record.topic, record.value)
            break
        except Exception as exc:
            logs.bind(**logs.ids_in_json(record.value))  # for the lines below (the handler's thread had them)
            if is_transient(exc):
                transient += 1
                wait_s = backoff_s(transient, first_wait_s=0.2, longest_wait_s=TRANSIENT_LONGEST_WAIT_S)
                log.warning("record %s[%d]@%d: store unavailable (%r); waiting %.1f s (%d in a row)", record.topic,
                            record.partition, record.offset, exc, wait_s, transient)
                await sleep(wait_s)
                continue
            failures += 1
            if failures < TRIES_BEFORE_DLQ:
                log.warning("record %s[%d]@%d failed (try %d of %d)", record.topic, record.partition, record.offset,
                            failures, TRIES_BEFORE_DLQ, exc_info=True)
                await sleep(backoff_s(failures, first_wait_s=0.2))
                continue
            outcome = DeadLetter(f"{type(exc).__name__}: {exc}")
            break
    if isinstance(outcome, DeadLetter):
        logs.bind(**logs.ids_in_json(record.value))
        PARKED[record.topic] += 1
        await _dead_letter(dead_letters, record, outcome.error or "failed", consumer)


async def _dead_letter(dead_letters: DefaultPublisher, record: ConsumerRecord, error: str, consumer: str) -> None:
    value = (record.value or b"")[:kafka.DLQ_VALUE_LIMIT]
    await dead_letters.publish(value, key=record.key, headers=kafka.dead_letter_headers(record, error, consumer))
    log.error("ALARM: record %s[%d]@%d parked in the DLQ (%d from this topic since start): %s", record.topic,
              record.partition, record.offset, PARKED[record.topic], error)


def main() -> None:
    run_service(serve, "command-handler")


if __name__ == "__main__":
    main()
