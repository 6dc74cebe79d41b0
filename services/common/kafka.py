"""Kafka helpers shared by every service: topic provisioning, producer/consumer factories, the FastStream broker.

Works against real Kafka and against tansu (the embedded broker). tansu quirks that shape this module:
- no idempotent producer and no transactions (UnknownError): exactly-once comes from idempotent consumers;
- a metadata request for a missing topic (describe_topics, a producer's send, a consumer's end_offsets,
  subscribe) auto-creates it with 4 partitions: call `ensure_topics` before any of them, and look a topic
  up with `list_topics` (all-topics metadata, creates nothing);
- `max.message.bytes` is accepted and stored but not enforced: the producer's `max_request_size` is the
  record size limit that holds on both brokers.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from faststream.kafka import KafkaBroker

from schemas.topics import ALL_TOPICS, MAX_RECORD_BYTES, SINGLE_PARTITION_TOPICS
from services.common.settings import Settings, get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Largest record a producer sends and a topic accepts: the contract's 1 MiB value plus key/headers/batch overhead.
MAX_REQUEST_BYTES = MAX_RECORD_BYTES + 64 * 1024
TOPIC_CONFIG = {"max.message.bytes": str(MAX_REQUEST_BYTES)}
BROKER_TIMEOUT_S = 30.0


def topic_partitions(settings: Settings | None = None) -> dict[str, int]:
    settings = settings or get_settings()
    return {t: 1 if t in SINGLE_PARTITION_TOPICS else settings.partitions for t in ALL_TOPICS}


def _retriable(exc: BaseException) -> bool:
    # Connection refused / broker still electing a controller: both end by themselves while it starts.
    return isinstance(exc, OSError) or (isinstance(exc, KafkaError) and exc.retriable)


async def _retry(op: Callable[[], Awaitable[T]], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return await op()
        except Exception as exc:
            if not _retriable(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"{what}: no answer within {timeout_s} s ({exc!r})") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def _with_admin(bootstrap: str, timeout_s: float, work: Callable[[AIOKafkaAdminClient], Awaitable[T]]) -> T:
    """Run `work` with a fresh admin client, retrying the whole attempt while the broker is starting."""

    async def attempt() -> T:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        try:
            await admin.start()
            return await work(admin)
        finally:
            await admin.close()

    return await _retry(attempt, timeout_s, f"Kafka at {bootstrap}")


async def wait_for_broker(bootstrap: str, timeout_s: float = BROKER_TIMEOUT_S) -> None:
    """Return once the broker at `bootstrap` answers a metadata request; TimeoutError after `timeout_s`."""
    await _with_admin(bootstrap, timeout_s, lambda admin: admin.list_topics())


async def _create(admin: AIOKafkaAdminClient, wanted: dict[str, int], config: dict[str, str]) -> dict[str, Exception]:
    """Create topics; return the per-topic errors other than 'already exists' (a racing creator is fine)."""
    response = await admin.create_topics(
        [NewTopic(name, n, replication_factor=1, topic_configs=config) for name, n in wanted.items()]
    )
    errors: dict[str, Exception] = {}
    for item in response.to_object()["topic_errors"]:
        if item["error_code"]:
            error = for_code(item["error_code"])(item.get("error_message") or "")
            if not isinstance(error, TopicAlreadyExistsError):
                errors[item["topic"]] = error
    return errors


async def ensure_topics(settings: Settings | None = None, timeout_s: float = BROKER_TIMEOUT_S) -> list[str]:
    """Create the missing topics of `topic_partitions` (waiting for a starting broker); return their names.

    Existing topics are left alone, even with another partition count (Kafka cannot shrink them).
    tansu 0.6 accepts `max.message.bytes` (describe_configs returns it) but does not enforce it; the
    fallback without config is for brokers whose policy refuses topic configs.
    """
    settings = settings or get_settings()
    wanted = topic_partitions(settings)

    async def create_missing(admin: AIOKafkaAdminClient) -> list[str]:
        existing = set(await admin.list_topics())
        missing = {t: n for t, n in wanted.items() if t not in existing}
        if not missing:
            return []
        errors = await _create(admin, missing, TOPIC_CONFIG)
        if errors:
            log.warning("broker refused topic config %s (%s); creating without it", TOPIC_CONFIG, errors)
            errors = await _create(admin, {t: missing[t] for t in errors}, {})
        if errors:
            raise next(iter(errors.values()))  # retried by _with_admin if retriable
        return sorted(missing)

    created = await _with_admin(settings.kafka_bootstrap_servers, timeout_s, create_missing)
    if created:
        log.info("created topics %s", created)
    return created


def make_producer(settings: Settings | None = None, **overrides: Any) -> AIOKafkaProducer:
    """An aiokafka producer (not started: `await p.start()` / `await p.stop()`)."""
    settings = settings or get_settings()
    options: dict[str, Any] = dict(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=False,  # tansu answers UnknownError to InitProducerId
        linger_ms=5,
        max_batch_size=1024 * 1024,
        # The record size limit that holds everywhere (tansu does not enforce max.message.bytes).
        max_request_size=MAX_REQUEST_BYTES,
        compression_type=None,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer_config(settings: Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for `AIOKafkaConsumer(*topics, group_id=..., **consumer_config(s))`."""
    settings = settings or get_settings()
    return dict(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024,  # room for a few maximal records per fetch
        fetch_max_bytes=64 * 1024 * 1024,
        auto_offset_reset="earliest",  # a new group must see everything already published
        enable_auto_commit=False,  # commit after the effect is durable (at least once)
    )


def subscriber_config(settings: Settings | None = None) -> dict[str, Any]:
    """`consumer_config` as `broker.subscriber(...)` keywords: FastStream takes the servers from the broker
    and derives auto-commit from `ack_policy`."""
    config = consumer_config(settings)
    del config["bootstrap_servers"], config["enable_auto_commit"]
    return config


async def raw_values(msg: Any) -> bytes | list[bytes]:
    """FastStream decoder: the record value(s) as bytes. FastStream's own guesses JSON for records without a
    content-type header (dicts, strings and raw bytes mixed in one batch); we decode with our codec."""
    raw = msg.raw_message
    return [record.value for record in raw] if isinstance(raw, tuple) else raw.value


def make_faststream_broker(settings: Settings | None = None, client_id: str = "outreach") -> KafkaBroker:
    """A FastStream KafkaBroker for these servers, publishing like `make_producer`.

    Handlers get the raw value bytes (`raw_values`). Topics come from `ensure_topics` only: FastStream's
    own creation would make missing topics with one partition, so it is off (it logs a warning per
    subscriber saying so). Declare subscribers like this (copy it)::

        from faststream import AckPolicy
        from faststream.kafka import KafkaMessage

        from schemas import topics
        from services.common.kafka import ensure_topics, make_faststream_broker, subscriber_config

        settings = get_settings()
        broker = make_faststream_broker(settings, client_id="command-handler")

        @broker.subscriber(
            topics.COMMANDS,
            group_id="outreach.command-handler",
            batch=True,
            max_records=500,
            batch_timeout_ms=20,
            ack_policy=AckPolicy.MANUAL,  # the default acks before handling: at most once
            **subscriber_config(settings),
        )
        async def handle(values: list[bytes], msg: KafkaMessage) -> None:
            records = msg.raw_message  # tuple of aiokafka ConsumerRecord: key, partition, offset, headers
            ...  # jsoncodec.loads each value; make the effect durable first
            await msg.ack()  # then commit the offsets (msg.nack() rewinds to redeliver the batch)

        await ensure_topics(settings)
        await broker.start()  # joins each subscriber's group in turn: ~session_timeout_ms / 2 each on tansu
        ...
        await broker.stop()
    """
    settings = settings or get_settings()
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        client_id=client_id,
        allow_auto_create_topics=False,
        decoder=raw_values,
        acks="all",
        enable_idempotence=False,
        linger_ms=5,
        max_batch_size=1024 * 1024,
        max_request_size=MAX_REQUEST_BYTES,
    )


async def _fetched_high_watermarks(
    consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int], timeout_s: float = 5.0
) -> dict[TopicPartition, int]:
    """Correct `end_offsets` with the high watermark of a fetch from there.

    tansu 0.6 answers ListOffsets(latest) with the last record batch's base offset + 1: after a batch of 5
    records at offsets 3..7 it says 4, not 8, until the next batch arrives. A fetch from that offset
    returns the right high watermark (on Kafka the fetch is empty and changes nothing).
    """
    consumer.assign(list(ends))
    for tp, end in ends.items():
        consumer.seek(tp, end)
    result = dict(ends)
    pending = {tp for tp, end in ends.items() if end}  # an empty partition has no batch to misreport
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        await consumer.getmany(*pending, timeout_ms=50)
        for tp in list(pending):
            if (highwater := consumer.highwater(tp)) is not None:
                result[tp] = max(result[tp], highwater)
                pending.discard(tp)
    return result


async def end_offsets(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The end offset of each partition, right on tansu too (see `_fetched_high_watermarks`). Leaves the
    consumer assigned to `partitions`, at their ends."""
    return await _fetched_high_watermarks(consumer, await consumer.end_offsets(partitions))


async def end_offsets_total(settings: Settings | None, topic: str) -> int | None:
    """Sum of the end offsets of `topic` over its partitions; None if the topic does not exist.

    The relay compares it with what it published to notice a new, empty (memory-only) broker.
    """
    settings = settings or get_settings()

    async def attempt() -> int | None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False, fetch_max_wait_ms=10
        )
        try:
            await consumer.start()
            # topics() fetches all-topics metadata: unlike a lookup by name, it auto-creates nothing.
            if topic not in await consumer.topics():
                return None
            tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            return sum((await end_offsets(consumer, tps)).values())
        finally:
            await consumer.stop()

    return await _retry(attempt, BROKER_TIMEOUT_S, f"Kafka at {settings.kafka_bootstrap_servers}")
