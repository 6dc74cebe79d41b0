"""The projections process: keeps the read model (services/projections/projector.py) up to date.

One aiokafka consumer (group `outreach-projections`) on the two public event topics. Each `getmany` batch
is decoded, applied in one read-model transaction (SQLite or PostgreSQL), and only then are the offsets
committed: delivery is at least once, and the apply is idempotent (event ids and positions carried in the
records, recorded in the same transaction as their effect), so the effect is exactly once.
A record that is not valid JSON, or lacks the fields the read model needs, is logged and skipped.
A read model that has never been fed (new, or rebuilt for a new schema) is fed from the beginning of the
topics, whatever offsets the group committed for an earlier one.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from schemas import topics
from services.common import kafka
from services.common.runtime import run_service
from services.common.settings import Settings
from services.projections.projector import ReadModel, apply_isolating_poison, decode_batch

log = logging.getLogger("outreach.projections")

GROUP_ID = "outreach-projections"
INPUT_TOPICS = (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS)
MAX_RECORDS = 20_000
POLL_MS = 200
RETRY_S = 1.0

async def serve(settings: Settings, stop: asyncio.Event, read_model: ReadModel | None = None,
                group_id: str = GROUP_ID) -> None:
    """Consume until `stop` is set (into `read_model`, default the one in settings.data_dir)."""
    await kafka.ensure_topics(settings)
    model = read_model or ReadModel.open(settings)
    consumer = AIOKafkaConsumer(group_id=group_id, **kafka.consumer_config(settings))
    consumer.subscribe(INPUT_TOPICS, listener=_FeedFromStartIfNew(consumer, model))
    await consumer.start()
    log.info("projections consuming %s into %s", ", ".join(INPUT_TOPICS), model.location)
    try:
        while not stop.is_set():  # a stop is noticed within POLL_MS
            try:
                batches = await consumer.getmany(timeout_ms=POLL_MS, max_records=MAX_RECORDS)
            except KafkaError:
                log.warning("fetch failed; retrying", exc_info=True)
                await asyncio.sleep(RETRY_S)
                continue
            if not batches:
                continue
            records = [record for partition_records in batches.values() for record in partition_records]
            campaign_events, statuses, _skipped = decode_batch(records)
            applied = not (campaign_events or statuses)
            while not applied and not stop.is_set():
                try:
                    await asyncio.to_thread(apply_isolating_poison, model, campaign_events, statuses)
                    applied = True
                except Exception as exc:
                    if not model.is_unavailable(exc):
                        raise
                    log.warning("read model unavailable; retrying the batch", exc_info=True)
                    await asyncio.sleep(RETRY_S)
            if not applied:
                break  # stopping: the batch is redelivered to the next consumer (offsets not committed)
            try:
                await consumer.commit()
            except KafkaError:  # e.g. a rebalance: the batch is redelivered, and applying it again changes nothing
                log.warning("offset commit failed; the batch will be redelivered", exc_info=True)
    finally:
        await consumer.stop()
        if read_model is None:
            model.close()
        log.info("projections stopped")


class _FeedFromStartIfNew(ConsumerRebalanceListener):
    """Seeks assigned partitions to their beginning while the read model has never applied a batch."""

    def __init__(self, consumer: AIOKafkaConsumer, model: ReadModel):
        self.consumer = consumer
        self.model = model

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned and not await asyncio.to_thread(lambda: self.model.fed_from_start):
            log.info("the read model is new: feeding it from the beginning of %d partitions", len(assigned))
            await self.consumer.seek_to_beginning(*assigned)


def main() -> None:
    run_service(serve)


if __name__ == "__main__":
    main()
