"""The projections process: keeps the read model (services/projections/projector.py) up to date.

A FastStream app (services.common.kafka.run_consumer) with one batch subscriber (group
`outreach-projections`) on the two public event topics and the opt-out lists' changes (internal). Each batch is
decoded, applied in read-model transactions (SQLite or PostgreSQL), and only then are the offsets committed:
delivery is at least once, and the apply is idempotent (event ids and positions carried in the records, recorded
in the same transaction as their effect), so the effect is exactly once.
A record that is not valid JSON, or lacks the fields the read model needs, is logged and skipped.
A read model that has never been fed (new, or rebuilt for a new schema) is fed from the beginning of the
topics, whatever offsets the group committed for an earlier one (a rebalance listener on the subscriber).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import ConsumerRebalanceListener
from faststream.kafka import KafkaBroker, KafkaMessage

from schemas import topics
from schemas.events import CAMPAIGN_EVENT_CLASSES, MessageStatusChanged
from schemas.internal import OptOutListChanged
from services.common import kafka
from services.common.observability import Observability, assigned_check, broker_check, read_model_check, subscriber_consumer
from services.common.retry import retrying
from services.common.runtime import run_service
from services.common.settings import Settings
from services.projections.projector import (
    ReadModel, apply_isolating_poison, apply_opt_outs_isolating_poison, decode_batch, decode_opt_out_list,
)

log = logging.getLogger("outreach.projections")

GROUP_ROLE = "projections"  # the group: settings.group_id(GROUP_ROLE)
# The opt-out lists' changes (relay, from the handler's OptOutList) feed the opt_outs table.
INPUT_TOPICS = (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS, topics.OPT_OUT_LIST)
# A batch decoded in memory at once: bounds what a lagging projections process holds (with 5,000 it peaked
# 30 MB higher behind the backlog of a 300,000-message run than a 30,000 one ever did).
MAX_RECORDS = 2000
RETRY_S = 1.0  # longest wait between tries while the read model is unavailable
EventValue = kafka.records_of(*CAMPAIGN_EVENT_CLASSES, MessageStatusChanged, OptOutListChanged, mode="serialization")


def build_broker(settings: Settings, model: ReadModel | None = None, stop: asyncio.Event | None = None,
                 failed: asyncio.Future[None] | None = None, group_id: str | None = None) -> KafkaBroker:
    """The projections' FastStream broker, its subscriber declared, not connected (`model` None: for its
    AsyncAPI document only). A batch that cannot be applied for another reason than an unavailable read
    model sets `stop` and `failed`: the process ends, as a bug must not be skipped over."""
    broker = kafka.make_faststream_broker(settings, client_id="projections")
    feed = _FeedFromStartIfNew(model)
    subscriber = kafka.batch_subscriber(broker, *INPUT_TOPICS, group_id=group_id or settings.group_id(GROUP_ROLE),
                                        max_records=MAX_RECORDS, settings=settings, listener=feed)
    feed.subscriber = subscriber

    @subscriber
    async def on_batch(values: list[EventValue], msg: KafkaMessage) -> None:
        if stop.is_set():
            return  # stopping, or a batch failed: not committed, so redelivered to the next consumer
        campaign_events, statuses, _skipped = decode_batch(msg.raw_message)
        opt_out_changes, _skipped = decode_opt_out_list(msg.raw_message)
        if campaign_events or statuses or opt_out_changes:
            try:
                async for attempt in retrying(on=model.is_unavailable, timeout_s=None, longest_wait_s=RETRY_S):
                    if stop.is_set():
                        return
                    with attempt:
                        if campaign_events or statuses:
                            await asyncio.to_thread(apply_isolating_poison, model, campaign_events, statuses)
                        if opt_out_changes:
                            await asyncio.to_thread(apply_opt_outs_isolating_poison, model, opt_out_changes)
            except Exception as exc:
                log.exception("a batch could not be applied; stopping")
                stop.set()  # first: no later batch is committed past this one
                failed.set_exception(exc)
                return
        await kafka.commit(msg)

    return broker


async def serve(settings: Settings, stop: asyncio.Event, read_model: ReadModel | None = None,
                group_id: str | None = None) -> None:
    """Consume until `stop` is set (into `read_model`, default the one in settings.data_dir)."""
    await kafka.ensure_topics(settings)
    model = read_model or ReadModel.open(settings)
    failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    observability = None
    try:
        broker = build_broker(settings, model, stop, failed, group_id)
        observability = await Observability(settings, "projections", {
            "broker": broker_check(settings), "read_model": read_model_check(settings),
            "partitions_assigned": assigned_check(subscriber_consumer(broker))}).start()
        log.info("projections consuming %s into %s", ", ".join(INPUT_TOPICS), model.location)
        await kafka.run_consumer(broker, stop, failed=failed)
    finally:
        if observability is not None:
            await observability.stop()
        if read_model is None:
            model.close()
        log.info("projections stopped")


class _FeedFromStartIfNew(ConsumerRebalanceListener):
    """Seeks assigned partitions to their beginning while the read model has never applied a batch.

    FastStream makes the subscriber's aiokafka consumer when it starts (`subscriber.consumer`) and calls
    this listener from that consumer's group coordinator, as aiokafka would."""

    def __init__(self, model: ReadModel | None):
        self.model = model
        self.subscriber: Any = None  # set once the subscriber is declared

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned and not await asyncio.to_thread(lambda: self.model.fed_from_start):
            log.info("the read model is new: feeding it from the beginning of %d partitions", len(assigned))
            await self.subscriber.consumer.seek_to_beginning(*assigned)


def main() -> None:
    run_service(serve, "projections")


if __name__ == "__main__":
    main()
