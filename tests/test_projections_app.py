"""The projections consumer against the session broker: applies both topics, skips poison records, stops."""
import asyncio
import uuid

from schemas import topics
from services.common import jsoncodec
from services.common.kafka import ensure_topics, make_producer
from services.common.settings import Settings
from services.projections.app import serve
from services.projections.projector import ReadModel
from tests.conftest import async_wait_until, committed_total
from tests.test_projections import created_events, lifecycle


async def publish(settings: Settings, events: list[dict], statuses: list[dict]) -> None:
    """Campaign events keyed by campaign, status records by message, as the relay publishes them."""
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        for event in events:
            await producer.send(topics.CAMPAIGN_EVENTS, jsoncodec.dumps(event), key=event["campaign_id"].encode())
        for record in statuses:
            await producer.send(topics.MESSAGE_STATUS, jsoncodec.dumps(record), key=record["message_id"].encode())
        await producer.flush()
    finally:
        await producer.stop()


async def test_consumer_applies_records_skips_poison_and_stops(kafka_bootstrap, tmp_path):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path)
    await ensure_topics(settings)
    cid = str(uuid.uuid4())
    events = created_events(cid, 2)
    statuses = lifecycle(cid, 2) + lifecycle(cid, 3, "failed")

    producer = make_producer(settings)
    await producer.start()
    try:
        key = cid.encode()
        await producer.send_and_wait(topics.CAMPAIGN_EVENTS, b"{poison", key=key)
        for event in events + events[:2]:  # duplicates
            await producer.send(topics.CAMPAIGN_EVENTS, jsoncodec.dumps(event), key=key)
        await producer.send_and_wait(topics.MESSAGE_STATUS, b"\x00not json", key=key)
        for record in statuses + statuses[:3]:
            await producer.send(topics.MESSAGE_STATUS, jsoncodec.dumps(record), key=record["message_id"].encode())
        await producer.flush()
    finally:
        await producer.stop()

    model = ReadModel.open(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, model, group_id=f"test-projections-{uuid.uuid4().hex[:8]}"))
    try:
        def done():
            c = model.campaign(cid)
            return c is not None and c["status"] == "ready" and c["counts"]["delivered"] == 1 \
                and c["counts"]["failed"] == 1
        await async_wait_until(done, timeout_s=30, message="the read model did not catch up")
        c = model.campaign(cid)
        assert c["counts"]["total"] == 2 and len(model.events(cid)) == len(events)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        model.close()


async def test_a_new_read_model_is_fed_from_the_beginning_whatever_the_group_committed(kafka_bootstrap, tmp_path):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path)
    cid = str(uuid.uuid4())
    await publish(settings, created_events(cid, 1), lifecycle(cid, 2))

    group = f"test-projections-{uuid.uuid4().hex[:8]}"
    for name in ("first.db", "second.db"):  # the second model is new; the group has committed past everything
        model = ReadModel(tmp_path / name)
        assert not model.fed_from_start
        stop = asyncio.Event()
        task = asyncio.create_task(serve(settings, stop, model, group_id=group))
        try:
            await async_wait_until(lambda: (model.campaign(cid) or {}).get("counts", {}).get("delivered") == 1,
                                   timeout_s=30, message=f"{name} was not fed from the beginning")
            assert model.fed_from_start
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            model.close()


def test_a_read_model_of_an_older_schema_is_rebuilt(tmp_path):
    import sqlite3

    path = tmp_path / "read-model.db"
    with sqlite3.connect(path) as old:  # the first schema: no meta table, no destination column
        old.execute("CREATE TABLE campaigns (campaign_id TEXT PRIMARY KEY, status TEXT)")
        old.execute("INSERT INTO campaigns VALUES ('c', 'ready')")
    with ReadModel(path) as model:
        assert model.row_counts() == {"campaigns": 0, "campaign_events": 0, "messages": 0, "message_events": 0}
        assert not model.fed_from_start
        cid = str(uuid.uuid4())
        model.apply_batch(created_events(cid, 1), lifecycle(cid, 2)[:1])
        assert model.fed_from_start and model.campaign(cid)["counts"]["waiting"] == 1
    with ReadModel(path) as reopened:  # same version: kept
        assert reopened.fed_from_start and reopened.campaign(cid) is not None


async def test_an_unavailable_read_model_holds_the_batch_uncommitted_until_it_is_back(kafka_bootstrap, tmp_path):
    """While the read model cannot be written the batch is retried and nothing is committed; a stop in that
    wait leaves it for the next consumer, which applies it once the database is back."""
    from aiokafka import TopicPartition

    from services.projections.storage import ReadModelUnavailable

    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path)
    cid = str(uuid.uuid4())
    await publish(settings, created_events(cid, 1), [])

    async def committed(group: str) -> int:
        return await committed_total(kafka_bootstrap, group, [
            TopicPartition(topics.CAMPAIGN_EVENTS, p) for p in range(settings.partitions)])

    group = f"test-projections-{uuid.uuid4().hex[:8]}"
    model = ReadModel.open(settings)
    tries = []
    real_apply = model.apply_batch

    def unavailable(*args):
        tries.append(1)
        raise ReadModelUnavailable("disk full")

    model.apply_batch = unavailable
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, model, group_id=group))
    try:
        await async_wait_until(lambda: len(tries) >= 3, timeout_s=30, message="the batch was not retried")
        assert await committed(group) == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert await committed(group) == 0 and model.campaign(cid) is None

    model.apply_batch = real_apply  # the database is back
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop, model, group_id=group))
    try:
        await async_wait_until(lambda: model.campaign(cid) is not None, timeout_s=30,
                               message="the batch held back was not applied")
        async def batch_committed() -> bool:
            return await committed(group) > 0
        await async_wait_until(batch_committed, timeout_s=15, message="the applied batch was not committed")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        model.close()
