"""The command handler process: consumes commands, claims, sender results and expiries (all keyed by
campaign_id), runs each through the application, and commits offsets only after the effect is stored.

A record that keeps failing goes to the DLQ after a few tries, so a poison record never stops the loop.
"""
from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from schemas import topics
from services.common import kafka
from services.common.runtime import run_service
from services.common.settings import Settings
from services.command_handler.application import open_app
from services.command_handler.handlers import DLQ_VALUE_LIMIT, DeadLetter, RecordHandler

log = logging.getLogger("outreach.command_handler")

GROUP_ID = "outreach-command-handler"
INPUT_TOPICS = (topics.COMMANDS, topics.CLAIM_REQUESTS, topics.SENDER_RESULTS, topics.EXPIRIES, topics.OPT_OUTS)
TRIES_BEFORE_DLQ = 3


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    await kafka.ensure_topics(settings)
    app = open_app(settings)
    handler = RecordHandler(app)
    producer = kafka.make_producer(settings)
    consumer = AIOKafkaConsumer(*INPUT_TOPICS, group_id=GROUP_ID, **kafka.consumer_config(settings))
    await producer.start()
    await consumer.start()
    log.info("command handler consuming %s", ", ".join(INPUT_TOPICS))
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            for records in batches.values():
                for record in records:
                    await _process(handler, producer, record)
            if batches:
                try:
                    await consumer.commit()
                except KafkaError:  # e.g. a rebalance: the records come again, and handling them again changes nothing
                    log.warning("offset commit failed; the records will be redelivered", exc_info=True)
    finally:
        await consumer.stop()
        await producer.stop()
        app.close()


async def _process(handler: RecordHandler, producer, record) -> None:
    error: str | None = None
    for attempt in range(1, TRIES_BEFORE_DLQ + 1):
        try:
            outcome = await asyncio.to_thread(handler.handle, record.topic, record.value)
        except Exception as exc:  # a bug or a store outage: try again, then park the record
            error = f"{type(exc).__name__}: {exc}"
            log.exception("record %s[%d]@%d failed (try %d)", record.topic, record.partition, record.offset, attempt)
            await asyncio.sleep(0.2 * attempt)
            continue
        if isinstance(outcome, DeadLetter):
            error = outcome.error
            break
        return
    await _dead_letter(producer, record, error or "failed")


async def _dead_letter(producer, record, error: str) -> None:
    value = (record.value or b"")[:DLQ_VALUE_LIMIT]
    headers = [("x-error", error.encode()[:1000]), ("x-source-topic", record.topic.encode()),
               ("x-source-offset", f"{record.partition}:{record.offset}".encode())]
    await producer.send_and_wait(topics.COMMANDS_DLQ, value=value, key=record.key, headers=headers)
    log.warning("record %s[%d]@%d sent to the DLQ: %s", record.topic, record.partition, record.offset, error)


def main() -> None:
    run_service(serve)


if __name__ == "__main__":
    main()
