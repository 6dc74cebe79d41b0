"""The Kafka kernel against the session broker (tansu here, real Kafka where Docker runs)."""
import asyncio
import contextlib
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from faststream.kafka import KafkaMessage

from schemas.topics import (ALL_TOPICS, COMMANDS_DLQ, HEARTBEAT_RETENTION_MS, HEARTBEATS, MAX_RECORD_BYTES,
                           SINGLE_PARTITION_TOPICS)
from services.common import jsoncodec
from services.common.embedded_broker import EmbeddedBroker, free_port
from services.common.kafka import (
    MAX_REQUEST_BYTES,
    batch_subscriber,
    commit,
    consumer_config,
    end_offsets_total,
    ensure_topics,
    make_faststream_broker,
    make_producer,
    records_of,
    run_consumer,
    topic_partitions,
    wait_for_broker,
)
from services.common.settings import Settings
from tests.conftest import async_wait_until, committed_total


@pytest.fixture
def settings(kafka_bootstrap: str) -> Settings:
    return Settings(kafka_bootstrap_servers=kafka_bootstrap)


async def describe(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(sorted(existing))}
    finally:
        await admin.close()


async def create_topic(bootstrap: str, partitions: int) -> str:
    """A private topic per test, so no other test's consumer sees these records."""
    name = f"test.{uuid.uuid4().hex[:12]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


def test_topic_partitions():
    assert topic_partitions(Settings(partitions=3)) == {
        t: 1 if t in SINGLE_PARTITION_TOPICS else 3 for t in ALL_TOPICS
    }
    assert topic_partitions(Settings())[COMMANDS_DLQ] == 1


async def test_ensure_topics_waits_for_a_starting_broker_and_creates_every_topic():
    port = free_port()
    s = Settings(kafka_bootstrap_servers=f"127.0.0.1:{port}", partitions=3)
    # Nothing listens yet: ensure_topics retries until the broker below answers.
    creating = asyncio.create_task(ensure_topics(s, timeout_s=15))
    with EmbeddedBroker("127.0.0.1", port) as broker:
        assert await creating == sorted(ALL_TOPICS)
        assert await describe(broker.bootstrap) == topic_partitions(s)
        assert await ensure_topics(s) == []  # idempotent


async def test_wait_for_broker_times_out_on_a_dead_address():
    with pytest.raises(TimeoutError):
        await wait_for_broker(f"127.0.0.1:{free_port()}", timeout_s=0.5)


async def test_ensure_topics_on_the_session_broker(settings):
    await ensure_topics(settings)
    assert await ensure_topics(settings) == []
    partitions = await describe(settings.kafka_bootstrap_servers)
    assert {t: partitions[t] for t in ALL_TOPICS} == topic_partitions(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        [described] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, COMMANDS_DLQ)])
        [heartbeats] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, HEARTBEATS)])
    finally:
        await admin.close()
    entries = {name: value for name, value, *_ in described.resources[0][4]}
    assert entries["max.message.bytes"] == str(MAX_REQUEST_BYTES)
    entries = {name: value for name, value, *_ in heartbeats.resources[0][4]}
    assert entries["retention.ms"] == str(HEARTBEAT_RETENTION_MS)  # heartbeats are kept an hour, not for ever


async def test_record_round_trip(settings):
    topic = await create_topic(settings.kafka_bootstrap_servers, 4)
    key = str(uuid.uuid4()).encode()
    value = {"type": "Ping", "id": str(uuid.uuid4()), "text": "héllo"}
    producer = make_producer(settings)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, jsoncodec.dumps(value), key=key, headers=[("h", b"1")])
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, group_id=f"g.{topic}", **consumer_config(settings))
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 15)
        await consumer.commit()
    finally:
        await consumer.stop()
    assert (record.key, jsoncodec.loads(record.value), record.headers) == (key, value, (("h", b"1"),))
    assert (record.partition, record.offset) == (sent.partition, sent.offset)


async def test_end_offsets_total(settings):
    missing = f"test.missing.{uuid.uuid4().hex[:12]}"
    assert await end_offsets_total(settings, missing) is None
    assert missing not in await describe(settings.kafka_bootstrap_servers)  # the lookup created nothing

    topic = await create_topic(settings.kafka_bootstrap_servers, 3)
    assert await end_offsets_total(settings, topic) == 0
    producer = make_producer(settings)
    await producer.start()
    try:
        for i in range(7):
            await producer.send(topic, b"{}", key=f"k{i}".encode())
        await producer.flush()
    finally:
        await producer.stop()
    assert await end_offsets_total(settings, topic) == 7


@contextlib.asynccontextmanager
async def consumer_running(broker):
    """`broker` served by `run_consumer` for the block's duration, then stopped (the batch in hand finishes)."""
    stop = asyncio.Event()
    consuming = asyncio.create_task(run_consumer(broker, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(consuming, 15)


async def test_a_consumer_on_faststream_reads_two_topics_in_batches_committed_by_hand(settings):
    """The consumers' shape (batch_subscriber, commit, run_consumer) over the real broker: one subscriber on
    two topics, batches of at most max_records, a nacked batch redelivered, the offsets committed once each
    batch is handled, and records FastStream's own parser would choke on (a header that is not UTF-8, a null
    value) handed over like any other."""
    first, second = [await create_topic(settings.kafka_bootstrap_servers, 4) for _ in range(2)]
    group = f"g.{first}"
    sent = [jsoncodec.dumps({"n": n}) for n in range(40)]
    producer = make_producer(settings)
    await producer.start()
    for n, value in enumerate(sent[:20]):  # some before the group exists: auto_offset_reset=earliest
        await producer.send(first if n % 2 else second, value, key=f"k{n % 5}".encode())
    await producer.send(first, None, key=b"k0", headers=[("h", b"\xff\xfe")])
    await producer.flush()

    broker = make_faststream_broker(settings, client_id="kernel-test")
    received: list[bytes] = []
    batches: list[int] = []

    @batch_subscriber(broker, first, second, group_id=group, max_records=8, settings=settings)
    async def handle(values: list[records_of(int)], msg: KafkaMessage) -> None:
        batches.append(len(values))
        if len(batches) == 1:
            await msg.nack()  # the first batch comes again
            return
        assert values == [r.value or b"" for r in msg.raw_message]
        received.extend(values)
        await commit(msg)

    try:
        async with consumer_running(broker):
            for n, value in enumerate(sent[20:], 20):
                await producer.send(first if n % 2 else second, value, key=f"k{n % 5}".encode())
            await producer.flush()
            await async_wait_until(lambda: len(received) >= len(sent) + 1, 30, message=f"got {len(received)} of 41")
    finally:
        await producer.stop()

    assert sorted(received) == sorted([*sent, b""]) and len(received) == len(sent) + 1  # nacked batch: once
    assert max(batches) <= 8
    partitions = [TopicPartition(t, p) for t in (first, second) for p in range(4)]
    assert await committed_total(settings.kafka_bootstrap_servers, group, partitions) == len(sent) + 1


async def test_run_consumer_raises_what_stopped_it(settings):
    """A failing `alongside` task and a handler's `failed` future both stop the app and are raised."""
    stop = asyncio.Event()

    async def breaks() -> None:
        raise RuntimeError("the timer loop broke")

    with pytest.raises(RuntimeError, match="timer loop"):
        await asyncio.wait_for(run_consumer(make_faststream_broker(settings), stop, alongside=breaks), 30)
    assert stop.is_set()

    stop = asyncio.Event()
    failed = asyncio.get_running_loop().create_future()
    stop.set()
    failed.set_exception(ValueError("a batch could not be applied"))
    with pytest.raises(ValueError, match="could not be applied"):
        await asyncio.wait_for(run_consumer(make_faststream_broker(settings), stop, failed=failed), 30)


async def test_record_size_limits(settings, kafka_broker_kind):
    """A ~1.05 MiB value (the contract's 1 MiB plus a little) fits under the 1 MiB + 64 KiB limit everywhere;
    beyond it, the producer refuses before the broker is asked."""
    topic = await create_topic(settings.kafka_bootstrap_servers, 1)
    big = b"x" * int(1.05 * MAX_RECORD_BYTES)
    producer = make_producer(settings)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, big, key=b"k")
        with pytest.raises(MessageSizeTooLargeError):
            await producer.send_and_wait(topic, b"x" * (MAX_REQUEST_BYTES + 1), key=b"k")
    finally:
        await producer.stop()
    assert sent.offset == 0

    consumer = AIOKafkaConsumer(topic, group_id=f"g.{topic}", **consumer_config(settings))
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), 15)
    finally:
        await consumer.stop()
    assert record.value == big

    # A producer without our limit: tansu stores a 2 MiB record despite max.message.bytes (it keeps the
    # config but does not enforce it); Kafka refuses it. So make_producer's limit is the one that holds.
    loose = make_producer(settings, max_request_size=4 * MAX_RECORD_BYTES)
    await loose.start()
    try:
        if kafka_broker_kind == "embedded":
            assert (await loose.send_and_wait(topic, b"x" * 2 * MAX_RECORD_BYTES)).offset == 1
        else:
            with pytest.raises(KafkaError):
                await loose.send_and_wait(topic, b"x" * 2 * MAX_RECORD_BYTES)
    finally:
        await loose.stop()


async def test_a_batch_whose_handler_fails_is_delivered_again_never_committed_past(settings):
    """With manual acknowledgement FastStream only logs a handler's error and fetches on, so the next batch's
    commit would skip the failed one: the kernel's subscriber rewinds it and delivers it again (after a
    back-off), until the handler gets through; nothing is lost and everything is committed once."""
    topic = await create_topic(settings.kafka_bootstrap_servers, 2)
    group = f"g.{topic}"
    sent = [jsoncodec.dumps({"n": n}) for n in range(30)]
    producer = make_producer(settings)
    await producer.start()
    for n, value in enumerate(sent[:10]):
        await producer.send(topic, value, key=f"k{n % 3}".encode())
    await producer.flush()

    broker = make_faststream_broker(settings, client_id="kernel-test")
    received: list[bytes] = []
    failures = 0

    @batch_subscriber(broker, topic, group_id=group, max_records=4, settings=settings)
    async def handle(values: list[records_of(int)], msg: KafkaMessage) -> None:
        nonlocal failures
        if failures < 3:  # a store outage: the first three deliveries fail
            failures += 1
            raise ConnectionError("the store is down")
        received.extend(values)
        await commit(msg)

    try:
        async with consumer_running(broker):
            for n, value in enumerate(sent[10:], 10):
                await producer.send(topic, value, key=f"k{n % 3}".encode())
            await producer.flush()
            await async_wait_until(lambda: len(received) >= len(sent), 30, message=f"got {len(received)} of 30")
    finally:
        await producer.stop()

    assert failures == 3
    assert sorted(received) == sorted(sent) and len(received) == len(sent)
    partitions = [TopicPartition(topic, p) for p in range(2)]
    assert await committed_total(settings.kafka_bootstrap_servers, group, partitions) == len(sent)
