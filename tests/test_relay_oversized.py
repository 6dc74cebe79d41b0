"""The relay never halts every campaign for one record: a stored event whose record would exceed the contract's
1 MiB limit (the handler refuses commands whose events would; one stored before that rule could be) is
parked in the DLQ and the records after it are published. Real broker, both event stores."""
from __future__ import annotations

import uuid

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import topics
from services.common import jsoncodec, kafka
from services.common.settings import get_settings
from services.command_handler.domain.model import Campaign
from services.command_handler.relay import Relay
from tests.conftest import async_wait_until
from tests.handler_driver import Driver


async def read_all(settings, *topic_names: str) -> dict[str, list]:
    consumer = AIOKafkaConsumer(**kafka.consumer_config(settings))
    await consumer.start()
    try:
        partitions = [TopicPartition(t, p) for t in topic_names for p in range(kafka.topic_partitions(settings)[t])]
        ends = await kafka.end_offsets(consumer, partitions)
        await consumer.seek_to_beginning(*partitions)
        out: dict[str, list] = {t: [] for t in topic_names}

        async def caught_up() -> bool:
            for tp, records in (await consumer.getmany(timeout_ms=100)).items():
                out[tp.topic] += records
            return all([await consumer.position(tp) >= end for tp, end in ends.items()])

        await async_wait_until(caught_up, 20, message="could not read the topics to their ends")
        return out
    finally:
        await consumer.stop()


async def test_a_record_over_the_limit_is_parked_and_the_relay_goes_on(event_store_env, kafka_bootstrap,
                                                                       monkeypatch, tmp_path):
    for key, value in {**event_store_env, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
                       "OUTREACH_DATA_DIR": str(tmp_path), "OUTREACH_DEPLOYMENT": f"t{uuid.uuid4().hex[:8]}"}.items():
        monkeypatch.setenv(key, value)
    settings = get_settings()
    await kafka.ensure_topics(settings)
    relay = Relay(settings)
    try:
        # Stored as the handler once could: straight through the aggregate, past today's refusal.
        oversized_id = uuid.uuid4()
        relay.app.save(Campaign(campaign_id=oversized_id, name="n" * (1024 * 1024), description=None, channel="sms",
                                template={"body": "Hi"}, created_by="t", causation_id=str(uuid.uuid4())))
        after = str(uuid.uuid4())
        Driver(relay.app).send("CreateCampaign", after, name="after it", channel="sms", template={"body": "Hi"})
        while await relay.publish_once():
            pass
    finally:
        await relay._drop_producer()
        relay.app.close()
    read = await read_all(settings, topics.CAMPAIGN_EVENTS, topics.COMMANDS_DLQ)
    ours = [r for r in read[topics.COMMANDS_DLQ] if r.key == str(oversized_id).encode()]
    assert len(ours) == 1
    headers = {k: v.decode() for k, v in ours[0].headers}
    assert "not published" in headers["x-error"] and headers["x-source-topic"] == topics.CAMPAIGN_EVENTS
    assert len(ours[0].value) == kafka.DLQ_VALUE_LIMIT
    # (The session's broker is shared: other modules' records, poison ones too, are on the topic.)
    published = [r.value for r in read[topics.CAMPAIGN_EVENTS] if r.key in (str(oversized_id).encode(),
                                                                             after.encode())]
    events = [jsoncodec.loads(value) for value in published]
    assert [(e["campaign_id"], e["type"]) for e in events] == [(after, "CampaignCreated")]
