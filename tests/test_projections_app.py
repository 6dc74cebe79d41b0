"""The projections consumer against the session broker: applies both topics, skips poison records, stops."""
import asyncio
import uuid

from schemas import topics
from services.common import jsoncodec
from services.common.kafka import ensure_topics, make_producer
from services.common.settings import Settings
from services.projections.app import serve
from services.projections.read_model import ReadModel
from tests.conftest import async_wait_until
from tests.test_projections import created_events, lifecycle


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
