"""Kafka helpers shared by every service: topic provisioning, producer/consumer factories, and how a consumer
runs on FastStream (the broker, its one batch subscriber, the commit after the effect, the app).

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
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar, Union

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.message import StreamMessage
from pydantic import TypeAdapter, WithJsonSchema
from pydantic.json_schema import JsonSchemaMode

from schemas import topics
from schemas.topics import ALL_TOPICS, HEARTBEAT_RETENTION_MS, HEARTBEATS, MAX_RECORD_BYTES, SINGLE_PARTITION_TOPICS
from services.common.retry import backoff_s, retrying
from services.common.settings import Settings, get_settings
from services.common.undecodable import undecodable_error  # importing it installs the tolerant fetch

log = logging.getLogger(__name__)
T = TypeVar("T")

# Largest record a producer sends and a topic accepts: the contract's 1 MiB value plus key/headers/batch overhead.
MAX_REQUEST_BYTES = MAX_RECORD_BYTES + 64 * 1024
DLQ_VALUE_LIMIT = 64 * 1024  # the contract: a parked value is cut to 64 KiB
TOPIC_CONFIG = {"max.message.bytes": str(MAX_REQUEST_BYTES)}
# The heartbeats are deleted after an hour; Kafka deletes whole segments only, so they roll every 10 minutes.
HEARTBEAT_TOPIC_CONFIG = {**TOPIC_CONFIG, "retention.ms": str(HEARTBEAT_RETENTION_MS),
                          "segment.ms": str(HEARTBEAT_RETENTION_MS // 6)}
BROKER_TIMEOUT_S = 30.0


def topic_partitions(settings: Settings | None = None) -> dict[str, int]:
    settings = settings or get_settings()
    return {t: 1 if t in SINGLE_PARTITION_TOPICS else settings.partitions for t in ALL_TOPICS}


def _retriable(exc: BaseException) -> bool:
    # Connection refused / broker still electing a controller: both end by themselves while it starts.
    return isinstance(exc, OSError) or (isinstance(exc, KafkaError) and exc.retriable)


async def _retry(op: Callable[[], Awaitable[T]], timeout_s: float, what: str) -> T:
    """`op()`, retried while the broker is starting (the kernel's retry policy, waits of at most 1 s);
    TimeoutError once `timeout_s` has passed."""
    try:
        async for attempt in retrying(on=_retriable, timeout_s=timeout_s, longest_wait_s=1.0):
            with attempt:
                return await op()
    except Exception as exc:
        if _retriable(exc):  # the retries ran out of time
            raise TimeoutError(f"{what}: no answer within {timeout_s} s ({exc!r})") from exc
        raise
    raise AssertionError("unreachable: retrying() ends by returning or raising")


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


def topic_config(topic: str) -> dict[str, str]:
    """The configuration a topic is created with."""
    return HEARTBEAT_TOPIC_CONFIG if topic == HEARTBEATS else TOPIC_CONFIG


async def _create(admin: AIOKafkaAdminClient, wanted: dict[str, int], with_config: bool) -> dict[str, Exception]:
    """Create topics (`with_config`: each with its `topic_config`); return the per-topic errors other than
    'already exists' (a racing creator is fine)."""
    response = await admin.create_topics(
        [NewTopic(name, n, replication_factor=1, topic_configs=topic_config(name) if with_config else {})
         for name, n in wanted.items()]
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
    fallback without config is for brokers whose policy refuses topic configs. The heartbeat topic also
    gets a retention of an hour (HEARTBEAT_TOPIC_CONFIG; tansu accepts it, and forgets everything when it stops).
    """
    settings = settings or get_settings()
    wanted = topic_partitions(settings)

    async def create_missing(admin: AIOKafkaAdminClient) -> list[str]:
        existing = set(await admin.list_topics())
        missing = {t: n for t, n in wanted.items() if t not in existing}
        if not missing:
            return []
        errors = await _create(admin, missing, with_config=True)
        if errors:
            log.warning("broker refused topic configs %s (%s); creating without them",
                        {t: topic_config(t) for t in errors}, errors)
            errors = await _create(admin, {t: missing[t] for t in errors}, with_config=False)
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


FETCH_PARTITION_BYTES = 1024 * 1024
FETCH_TOTAL_BYTES = 1024 * 1024


def consumer_config(settings: Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for `AIOKafkaConsumer(*topics, group_id=..., **consumer_config(s))`."""
    settings = settings or get_settings()
    return dict(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_ms,
        # What a lagging consumer holds fetched and not yet handled: these bound it (whatever the backlog),
        # so a consumer's memory does not grow with the campaign. A record batch bigger than the limit still
        # comes, whole and alone (Kafka's rule since KIP-74; tansu keeps it too), so a maximal record passes.
        # tansu caps each partition's part of a fetch by fetch_max_bytes, not by max_partition_fetch_bytes
        # (measured: 1 MiB / 8 MiB returned 5 MB per partition), so both are 1 MiB: with 64 MiB a sweeper
        # behind a 300,000-message backlog held 40 MB of fetched bytes and 100,000 decoded records.
        max_partition_fetch_bytes=FETCH_PARTITION_BYTES,
        fetch_max_bytes=FETCH_TOTAL_BYTES,
        auto_offset_reset="earliest",  # a new group must see everything already published
        enable_auto_commit=False,  # commit after the effect is durable (at least once)
    )


def subscriber_config(settings: Settings | None = None) -> dict[str, Any]:
    """`consumer_config` as `broker.subscriber(...)` keywords: FastStream takes the servers from the broker
    and derives auto-commit from `ack_policy`."""
    config = consumer_config(settings)
    del config["bootstrap_servers"], config["enable_auto_commit"]
    return config


# --- FastStream: how the consumers run ---------------------------------------------------------------
# One FastStream app per consumer process, one batch subscriber per app reading all its topics (a group
# join costs about session_timeout_ms / 2 on tansu, and `broker.start()` joins subscribers one by one),
# acknowledged by hand after the batch's effect is durable.

# A subscriber's fetch waits this long for records, and FastStream sleeps as long after an empty fetch before
# the next: so it is short (an idle consumer wakes 25 times a second), or each request-answer hop (a claim,
# then its work) would wait up to this long for a consumer that just found nothing.
POLL_MS = 20
# A stop lets the batch in hand finish (its effect stored, its offsets committed) before the consumer
# leaves; a batch cut short would be redelivered anyway, but its worker thread would outlive the store.
GRACEFUL_STOP_S = 60.0


async def raw_values(msg: Any) -> bytes | list[bytes]:
    """FastStream decoder: the record value(s) as bytes (b"" for a null value). FastStream's own guesses
    JSON for records without a content-type header (dicts, strings and raw bytes mixed in one batch); the
    handlers decode each record with its model, so one poison record is handled alone."""
    raw = msg.raw_message
    return [record.value or b"" for record in raw] if isinstance(raw, tuple) else raw.value or b""


async def tolerant_parser(raw: Any, parse: Callable[[Any], Awaitable[Any]]) -> Any:
    """FastStream parser: FastStream's own, lighter on batches and tolerant of header bytes.

    Lighter: for a batch FastStream decodes every record's headers into a dict (about 0.6 us a record, a
    third of what consuming a record costs here) that nothing here reads: handlers read `msg.raw_message`.
    So only the batch's first and last records are parsed (the message's id, headers and path come from
    them), and the message then carries the whole batch as its `raw_message` and `body`; `batch_headers`
    stays empty.
    Tolerant: FastStream decodes each header value as UTF-8, so a record with other header bytes (or a
    null header) would fail its whole batch before the handler saw it, and the next batch's commit would
    skip it. Nothing here reads headers: such values are replaced, the records kept.
    """
    if isinstance(raw, tuple) and len(raw) > 2:
        msg = await _parse_tolerantly((raw[0], raw[-1]), parse)
        msg.raw_message = raw  # what ack/nack (the partitions' offsets) and the handlers read
        msg.body = [record.value or b"" for record in raw]
        msg.batch_headers = []
        return msg
    return await _parse_tolerantly(raw, parse)


async def _parse_tolerantly(raw: Any, parse: Callable[[Any], Awaitable[Any]]) -> Any:
    try:
        return await parse(raw)
    except (UnicodeDecodeError, AttributeError):
        def clean(record: Any) -> Any:
            headers = tuple((k, (v or b"").decode("utf-8", "replace").encode()) for k, v in record.headers)
            return dataclasses.replace(record, headers=headers)

        return await parse(tuple(clean(r) for r in raw) if isinstance(raw, tuple) else clean(raw))


def make_faststream_broker(settings: Settings | None = None, client_id: str = "outreach") -> KafkaBroker:
    """A FastStream KafkaBroker for these servers, publishing like `make_producer` (not connected).

    Handlers get the raw value bytes (`raw_values`). Topics come from `ensure_topics` only: FastStream's
    own creation would make missing topics with one partition, so it is off (it logs a warning per
    subscriber saying so). Declare a consumer's subscriber with `batch_subscriber`.
    """
    settings = settings or get_settings()
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        client_id=client_id,
        allow_auto_create_topics=False,
        decoder=raw_values,
        parser=tolerant_parser,
        graceful_timeout=GRACEFUL_STOP_S,
        logger=logging.getLogger("outreach.faststream"),  # the process's log format, not FastStream's coloured one
        log_level=logging.DEBUG,  # FastStream's per-batch "Received"/"Processed" lines
        acks="all",
        enable_idempotence=False,
        linger_ms=5,
        max_batch_size=1024 * 1024,
        max_request_size=MAX_REQUEST_BYTES,
    )


def batch_subscriber(
    broker: KafkaBroker,
    *topic_names: str,
    group_id: str,
    max_records: int,
    settings: Settings | None = None,
    listener: ConsumerRebalanceListener | None = None,
) -> BatchSubscriber:
    """Declare the consumer's one subscriber: `topic_names` in group `group_id`, handed batches of up to
    `max_records` records, committed only by the handler (`commit(msg)` once the batch's effect is durable;
    the default policy would commit before handling: at most once). Decorate the handler with the result::

        @kafka.batch_subscriber(broker, topics.COMMANDS, group_id="outreach-x", max_records=1000)
        async def on_batch(values: list[kafka.records_of(Command)], msg: KafkaMessage) -> None:
            for record in msg.raw_message:  # aiokafka ConsumerRecords: topic, partition, offset, key, value
                ...  # make the effect durable first
            await kafka.commit(msg)

    A handler that raises has its batch rewound and delivered again after a back-off (see `BatchSubscriber`).
    """
    return BatchSubscriber(broker, group_id, broker.subscriber(
        *topic_names,
        group_id=group_id,
        batch=True,
        max_records=max_records,
        batch_timeout_ms=POLL_MS,
        ack_policy=AckPolicy.MANUAL,
        listener=listener,
        **subscriber_config(settings),
    ))


class BatchSubscriber:
    """A FastStream batch subscriber (its attributes, e.g. `.consumer`, pass through) whose handler's errors
    never let a batch be skipped.

    With manual acknowledgement FastStream only logs a handler's exception and fetches on: the next batch's
    commit would then commit past the failed one, which is lost. Here the failed batch is rewound (`nack`:
    each partition seeks back to the batch's first record) and delivered again after the retry policy's
    back-off (`retry.backoff_s`, up to REWIND_LONGEST_WAIT_S): a transient fault (a store or the broker
    down) is waited out, and a bug shows as a repeated, logged failure rather than as lost records.
    """

    def __init__(self, broker: KafkaBroker, group_id: str, subscriber: Any):
        self.broker = broker
        self.group_id = group_id
        self.subscriber = subscriber
        self.failures_in_a_row = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.subscriber, name)

    def __call__(self, handler: Callable[..., Awaitable[None]]) -> Any:
        @functools.wraps(handler)  # FastStream reads the handler's signature (payload type, KafkaMessage)
        async def rewinding_on_error(*args: Any, **kwargs: Any) -> None:
            msg = next(a for a in (*args, *kwargs.values()) if isinstance(a, StreamMessage))
            try:
                if any(undecodable_error(r) for r in msg.raw_message):
                    args, kwargs = await self._park_undecodable(msg, args, kwargs)
                await handler(*args, **kwargs)
            except Exception:
                self.failures_in_a_row += 1
                wait_s = backoff_s(self.failures_in_a_row, first_wait_s=REWIND_FIRST_WAIT_S,
                                   longest_wait_s=REWIND_LONGEST_WAIT_S)
                log.exception("a batch of %d records failed (%d in a row); it is delivered again in %.1f s",
                              len(msg.raw_message), self.failures_in_a_row, wait_s)
                try:
                    await msg.nack()
                except Exception:  # e.g. its partitions were revoked meanwhile: the new owner reads them
                    log.warning("could not rewind the failed batch", exc_info=True)
                await asyncio.sleep(wait_s)
            else:
                self.failures_in_a_row = 0
            finally:
                release_records(msg)

        return self.subscriber(rewinding_on_error)

    async def _park_undecodable(self, msg: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Park the batch's undecodable record batches (`services.common.undecodable`), then hand the handler
        the rest: the message's records and values, and the handler's values argument, without them."""
        kept = []
        for record in msg.raw_message:
            if (error := undecodable_error(record)) is None:
                kept.append(record)
            else:
                await park(self.broker, record, error, consumer=self.group_id)
        msg.raw_message = tuple(kept)
        msg.body = [record.value or b"" for record in kept]
        return (tuple(msg.body if isinstance(a, list) else a for a in args),
                {k: msg.body if isinstance(v, list) else v for k, v in kwargs.items()})


REWIND_FIRST_WAIT_S = 0.2
REWIND_LONGEST_WAIT_S = 10.0


def release_records(msg: Any) -> None:
    """Let a handled batch's records go while the message object lives on (keeping its first record, which
    FastStream's logging reads). FastStream puts the message in a context variable, and every timer started
    while handling (an offset commit's 40 s request timeout, a publish's) keeps a copy of that context in the
    event loop until its time comes, cancelled or not: a consumer behind a backlog held the last 40 seconds
    of batches, some 80,000 records, and its memory grew with the campaign."""
    raw = msg.raw_message
    if isinstance(raw, tuple) and len(raw) > 1:
        msg.raw_message = raw[:1]
        msg.body = []


def records_of(*models: Any, mode: JsonSchemaMode = "validation") -> Any:
    """The type of a subscriber's record values: bytes (each handler decodes its records with its model, one
    by one, so a poison record is skipped or parked alone), documented in the app's AsyncAPI as the JSON
    Schema of `models` (pydantic models or unions; `mode` as the public document's channel uses it)."""
    schema = TypeAdapter(models[0] if len(models) == 1 else Union[models]).json_schema(mode=mode)  # noqa: UP007
    return Annotated[bytes, WithJsonSchema(_inline_refs(schema))]


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    # FastStream files a handler's payload schema under its own name: references into `$defs` would dangle.
    defs = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def dead_letter_headers(record: Any, error: str, consumer: str) -> dict[str, str]:
    """What a parked record carries besides its value: why, where it came from, and who parked it."""
    return {"x-error": error.encode()[:1000].decode(errors="ignore"), "x-source-topic": record.topic,
            "x-source-offset": f"{record.partition}:{record.offset}", "x-consumer": consumer}


async def park(target: KafkaBroker | AIOKafkaProducer, record: Any, error: str, *, consumer: str) -> None:
    """Put `record` in the DLQ (value cut to DLQ_VALUE_LIMIT, error and source in headers) through `target`
    (a FastStream broker or an aiokafka producer), and log it as an alarm. Raises if the broker does not take
    it, so the caller does not commit past a record that was neither handled nor parked."""
    value = (record.value or b"")[:DLQ_VALUE_LIMIT]
    headers = dead_letter_headers(record, error, consumer)
    if isinstance(target, AIOKafkaProducer):
        await target.send_and_wait(topics.COMMANDS_DLQ, value, key=record.key,
                                   headers=[(k, v.encode()) for k, v in headers.items()])
    else:
        await target.publish(value, topic=topics.COMMANDS_DLQ, key=record.key, headers=headers)
    log.error("ALARM: record %s[%d]@%d parked in %s by %s: %s", record.topic, record.partition, record.offset,
              topics.COMMANDS_DLQ, consumer, error)


async def commit(msg: KafkaMessage) -> None:
    """Commit a handled batch's offsets. A failed commit (e.g. a rebalance took the partitions) is logged:
    the records come again, and handling them again changes nothing (every consumer is idempotent)."""
    try:
        await msg.ack()
    except KafkaError:
        log.warning("offset commit failed; the records will be redelivered", exc_info=True)


async def run_consumer(
    broker: KafkaBroker,
    stop: asyncio.Event,
    *,
    alongside: Callable[[], Awaitable[None]] | None = None,
    failed: asyncio.Future[None] | None = None,
) -> None:
    """Run `broker` in a FastStream app until `stop` is set; the batch in hand finishes first (a handler
    that waits on something checks `stop`).

    `alongside()` (e.g. the sweeper's timer loop, publishing through the broker) runs once the app has
    started, until `stop`; if it fails, the consumer stops and its error is raised. A handler that cannot
    go on sets `stop`, then `failed` to its error (so no later batch is committed): raised once stopped.
    """
    app = FastStream(broker, logger=None)
    side: asyncio.Task[None] | None = None
    try:
        await app.start()  # connects, then joins the subscriber's group
        for subscriber in broker.subscribers:
            log.info("consuming %s as group %s", ", ".join(subscriber.topic_names), subscriber.group_id)
        side = asyncio.create_task(alongside()) if alongside is not None else None
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([stopped, *([side] if side else [])], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
    finally:
        stop.set()
        try:
            if side is not None:
                await side
        finally:
            await app.stop()
    if failed is not None and failed.done():
        failed.result()


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
