"""The timeout sweeper: follows the message-status stream, keeps one durable timer per message, and
publishes an Expiry when one falls due. The command handler judges each expiry (a receipt that arrived
first wins), so a timer fired twice or late changes nothing it should not."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from schemas import topics
from services.common import ids, jsoncodec, kafka
from services.common.runtime import run_service
from services.common.settings import Settings
from services.timeout_sweeper.timers import TimeoutSettings, Timer, TimerStore

log = logging.getLogger("outreach.timeout_sweeper")

GROUP_ID = "outreach-timeout-sweeper"
TICK_S = 0.1


def expiry_record(timer: Timer) -> dict:
    return {
        "type": "Expiry",
        "expiry_id": str(uuid.uuid5(ids.OUTREACH_NS, f"expiry:{timer.message_id}:{timer.since_sequence}:{timer.kind}")),
        "campaign_id": timer.campaign_id,
        "message_id": timer.message_id,
        "kind": timer.kind,
        "since_sequence": timer.since_sequence,
    }


def _parse(value: bytes | None) -> tuple[dict, float] | None:
    """A status record and its time, or None for a record the sweeper cannot use (logged, skipped: a
    poison record never stops the sweeper)."""
    try:
        record = jsoncodec.loads(value or b"null")
        if not (isinstance(record, dict) and isinstance(record.get("message_id"), str)
                and isinstance(record.get("campaign_id"), str) and isinstance(record.get("status"), str)
                and type(record.get("sequence")) is int):
            raise ValueError("not a MessageStatusChanged record")
        return record, datetime.fromisoformat(record["occurred_at"]).timestamp()
    except Exception:
        log.warning("skipping an unreadable status record: %r", (value or b"")[:200])
        return None


async def fire_due(store: TimerStore, producer: Any, timeouts: TimeoutSettings, stop: asyncio.Event) -> None:
    """Publishes an Expiry for every due timer until `stop`; polls the due index every TICK_S when idle.

    Publish, flush, then forget: a crash in between fires the same expiry (same expiry_id) again, and the
    handler's judgement makes the repeat change nothing."""
    while not stop.is_set():
        due = await asyncio.to_thread(store.due, time.time())
        if due:
            for timer in due:
                await producer.send(topics.EXPIRIES, value=jsoncodec.dumps(expiry_record(timer)),
                                    key=timer.campaign_id.encode())
            await producer.flush()
            await asyncio.to_thread(store.fired, due, timeouts)
        else:
            await asyncio.sleep(TICK_S)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    await kafka.ensure_topics(settings)
    store = TimerStore(settings.data_dir / "timers.db")
    timeouts = TimeoutSettings(settings.sending_timeout_s, settings.sent_timeout_s, settings.retry_window_s)
    producer = kafka.make_producer(settings)
    consumer = AIOKafkaConsumer(topics.MESSAGE_STATUS, group_id=GROUP_ID, **kafka.consumer_config(settings))
    await producer.start()
    await consumer.start()
    log.info("timeout sweeper running with %d pending timers", store.pending())

    async def follow() -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            parsed = [p for records in batches.values() for r in records if (p := _parse(r.value))]
            if parsed:
                await asyncio.to_thread(store.apply, parsed, timeouts)
            if batches:
                try:
                    await consumer.commit()
                except KafkaError:  # e.g. a rebalance: the records come again, and handling them again changes nothing
                    log.warning("offset commit failed; the records will be redelivered", exc_info=True)

    try:
        await asyncio.gather(follow(), fire_due(store, producer, timeouts, stop))
    finally:
        await consumer.stop()
        await producer.stop()
        store.close()


def main() -> None:
    run_service(serve)


if __name__ == "__main__":
    main()
