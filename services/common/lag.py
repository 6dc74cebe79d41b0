"""Consumer lag and DLQ records, computed centrally from the broker (issue 13, item 1).

Every relay process runs a `LagCollector` (the active one and its standbys alike): it is no consumer group's
member, so a consumer that died, hangs or never joined shows as growing lag here, never as a silent
exporter. Each round it asks the broker for every group's committed offsets (`list_consumer_group_offsets`
with explicit partitions: tansu needs them) and for the end offsets of the same partitions (through
`kafka.end_offsets`, which corrects tansu's stale high watermark), and sets
`outreach_consumer_lag_records{group,topic,partition}` = end - committed (the whole partition when the group
committed nothing, as a new group reads from the earliest offset), and `outreach_dlq_records` = the sum of
the DLQ topic's end offsets.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas import topics
from services.common import kafka
from services.common.observability import CONSUMER_LAG, DLQ_RECORDS
from services.common.settings import Settings

log = logging.getLogger("outreach.lag")

# Every consumer group of a deployment (settings.group_id(role)) and the topics it reads. Each service's app
# declares its own topics; tests/test_observability.py checks this table against them.
CONSUMER_GROUPS: dict[str, tuple[str, ...]] = {
    "command-handler": (topics.COMMANDS, topics.CLAIM_REQUESTS, topics.SENDER_RESULTS, topics.EXPIRIES,
                        topics.OPT_OUTS),
    "sender-work": (topics.SENDER_WORK,),
    "timeout-sweeper": (topics.MESSAGE_STATUS,),
    "projections": (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS, topics.OPT_OUT_LIST),
}


def lag_of(committed: dict[TopicPartition, int], ends: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    """Per partition: end offset minus committed offset; a partition without a commit (-1 or missing) lags by
    its whole end offset. Never negative (an end offset read before a commit that came after it)."""
    return {tp: max(0, end - (committed.get(tp, -1) if committed.get(tp, -1) >= 0 else 0))
            for tp, end in ends.items()}


class LagCollector:
    def __init__(self, settings: Settings, groups: dict[str, tuple[str, ...]] | None = None):
        self.settings = settings
        self.groups = {settings.group_id(role): names for role, names in (groups or CONSUMER_GROUPS).items()}
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None:
            await kafka.ensure_topics(self.settings)  # a lookup of a missing topic would create it (tansu)
            admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap_servers,
                                        request_timeout_ms=10_000)
            await admin.start()
            self._admin = admin
        if self._consumer is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap_servers,
                                        enable_auto_commit=False, fetch_max_wait_ms=10, group_id=None,
                                        max_partition_fetch_bytes=1024, fetch_max_bytes=1024)
            await consumer.start()
            self._consumer = consumer
        return self._admin, self._consumer

    async def close(self) -> None:
        admin, consumer, self._admin, self._consumer = self._admin, self._consumer, None, None
        with contextlib.suppress(Exception):
            if consumer is not None:
                await consumer.stop()
        with contextlib.suppress(Exception):
            if admin is not None:
                await admin.close()

    async def collect(self) -> dict[str, dict[TopicPartition, int]]:
        """One round: sets the gauges and returns {group: {partition: lag}}."""
        admin, consumer = await self._clients()
        partitions = kafka.topic_partitions(self.settings)
        wanted = {tp for names in self.groups.values() for t in names for tp in _tps(t, partitions[t])}
        dlq = _tps(topics.COMMANDS_DLQ, partitions[topics.COMMANDS_DLQ])
        ends = await kafka.end_offsets(consumer, sorted(wanted | set(dlq)))
        DLQ_RECORDS.set(sum(ends[tp] for tp in dlq))
        out: dict[str, dict[TopicPartition, int]] = {}
        for group, names in self.groups.items():
            tps = [tp for t in names for tp in _tps(t, partitions[t])]
            offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
            committed = {tp: meta.offset for tp, meta in offsets.items() if meta is not None}
            lags = out[group] = lag_of(committed, {tp: ends[tp] for tp in tps})
            for tp, lag in lags.items():
                CONSUMER_LAG.labels(group, tp.topic, str(tp.partition)).set(lag)
        return out

    async def run(self, stop: asyncio.Event) -> None:
        """Collect every `metrics_lag_interval_s` until `stop`; a failed round is logged, the clients made again."""
        try:
            while not stop.is_set():
                try:
                    await self.collect()
                except Exception:
                    log.warning("consumer lag could not be read this round", exc_info=True)
                    await self.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.metrics_lag_interval_s)
        finally:  # also when cancelled mid-round (a stop does not wait for a broker that does not answer)
            await self.close()


def _tps(topic: str, count: int) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(count)]
