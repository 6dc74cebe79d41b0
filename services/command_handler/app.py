"""The command handler process: consumes commands, claims, sender results, expiries and opt-outs (all keyed
by campaign_id), runs each through the application, and commits offsets only after the effect is stored.

A FastStream app (services.common.kafka.run_consumer): one batch subscriber reads the five topics (one
group join at start-up), hands each batch's records one by one to `RecordHandler`, and commits the batch
once every record of it is stored or parked. A record that keeps failing goes to the DLQ after a few tries,
so a poison record never stops the consumer.
"""
from __future__ import annotations

import asyncio
import logging

from aiokafka import ConsumerRecord
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.publisher.usecase import DefaultPublisher

from schemas import topics
from schemas.commands import COMMAND_CLASSES
from schemas.internal import ClaimRequest, Expiry, OptOutChanged, SenderResults, SendingHold
from services.common import kafka
from services.common.retry import retrying
from services.common.runtime import run_service
from services.common.settings import Settings
from services.command_handler.application import open_app
from services.command_handler.handlers import DLQ_VALUE_LIMIT, DeadLetter, RecordHandler

log = logging.getLogger("outreach.command_handler")

GROUP_ID = "outreach-command-handler"
INPUT_TOPICS = (topics.COMMANDS, topics.CLAIM_REQUESTS, topics.SENDER_RESULTS, topics.EXPIRIES, topics.OPT_OUTS)
MAX_RECORDS = 1000
TRIES_BEFORE_DLQ = 3
# What the five topics carry (RecordHandler decodes each record with its model; this documents them).
InputRecord = kafka.records_of(*COMMAND_CLASSES, ClaimRequest, SenderResults, SendingHold, Expiry, OptOutChanged)


def build_broker(settings: Settings, handler: RecordHandler | None = None) -> KafkaBroker:
    """The handler's FastStream broker, its subscriber and DLQ publisher declared, not connected
    (`handler` None: for its AsyncAPI document only)."""
    broker = kafka.make_faststream_broker(settings, client_id="command-handler")
    dead_letters = broker.publisher(topics.COMMANDS_DLQ, schema=bytes, description="records that cannot be answered")

    @kafka.batch_subscriber(broker, *INPUT_TOPICS, group_id=GROUP_ID, max_records=MAX_RECORDS, settings=settings)
    async def on_batch(values: list[InputRecord], msg: KafkaMessage) -> None:
        for record in msg.raw_message:
            await _process(handler, dead_letters, record)
        await kafka.commit(msg)

    return broker


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    await kafka.ensure_topics(settings)
    app = open_app(settings)
    try:
        broker = build_broker(settings, RecordHandler(app))
        log.info("command handler consuming %s", ", ".join(INPUT_TOPICS))
        await kafka.run_consumer(broker, stop)
    finally:
        app.close()


async def _process(handler: RecordHandler, dead_letters: DefaultPublisher, record: ConsumerRecord) -> None:
    """Answer one record; a record the handler refuses, or that fails TRIES_BEFORE_DLQ times (a bug, or a
    store outage outlasting the retries), goes to the DLQ."""
    try:
        try:  # the first try outside the retry policy: setting one up costs more than most records' handling
            outcome = await asyncio.to_thread(handler.handle, record.topic, record.value)
        except Exception:
            log.warning("record %s[%d]@%d failed; trying again", record.topic, record.partition, record.offset,
                        exc_info=True)
            async for attempt in retrying(on=Exception, timeout_s=None, attempts=TRIES_BEFORE_DLQ - 1,
                                          first_wait_s=0.2):
                with attempt:
                    outcome = await asyncio.to_thread(handler.handle, record.topic, record.value)
    except Exception as exc:
        log.exception("record %s[%d]@%d failed %d times", record.topic, record.partition, record.offset,
                      TRIES_BEFORE_DLQ)
        outcome = DeadLetter(f"{type(exc).__name__}: {exc}")
    if isinstance(outcome, DeadLetter):
        await _dead_letter(dead_letters, record, outcome.error or "failed")


async def _dead_letter(dead_letters: DefaultPublisher, record: ConsumerRecord, error: str) -> None:
    value = (record.value or b"")[:DLQ_VALUE_LIMIT]
    headers = {"x-error": error.encode()[:1000].decode(errors="ignore"), "x-source-topic": record.topic,
               "x-source-offset": f"{record.partition}:{record.offset}"}
    await dead_letters.publish(value, key=record.key, headers=headers)
    log.warning("record %s[%d]@%d sent to the DLQ: %s", record.topic, record.partition, record.offset, error)


def main() -> None:
    run_service(serve)


if __name__ == "__main__":
    main()
