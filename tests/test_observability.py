"""Metrics and health, the kernel's part (issue 13, item 1): the endpoints, readiness, the instance records,
the naming conventions, the lag arithmetic and the consumer-group table. The whole stack's metrics moving
during a run: tests/test_e2e_metrics.py."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiokafka import TopicPartition
from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from aiokafka import AIOKafkaConsumer

from schemas import topics
from services.common import kafka, lag
from services.common.embedded_broker import EmbeddedBroker, free_port
from services.common.observability import (BREAKER_STATE, CONSUMER_LAG, DLQ_RECORDS, HTTP_REQUESTS, Observability,
                                           http_metrics_middleware, metrics_text, read_instances)
from services.common.settings import Settings


def sample(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples called `name` whose labels include `labels`; None if there is none."""
    found = [s.value for family in text_string_to_metric_families(text) for s in family.samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(found) if found else None


def test_lag_is_end_minus_committed_and_the_whole_partition_without_a_commit():
    a, b, c = TopicPartition("t", 0), TopicPartition("t", 1), TopicPartition("t", 2)
    assert lag.lag_of({a: 5, b: -1}, {a: 12, b: 7, c: 3}) == {a: 7, b: 7, c: 3}
    assert lag.lag_of({a: 9}, {a: 8}) == {a: 0}  # an end read before a later commit: never negative


async def test_the_collector_reads_lag_from_committed_and_end_offsets():
    with EmbeddedBroker("127.0.0.1", free_port()) as broker:  # its own: the DLQ count is exact
        settings = Settings(kafka_bootstrap_servers=broker.bootstrap, partitions=2, deployment="lagtest")
        collector = lag.LagCollector(settings, {"unit": (topics.EXPIRIES,)})
        first, second = TopicPartition(topics.EXPIRIES, 0), TopicPartition(topics.EXPIRIES, 1)
        try:
            assert await collector.collect() == {"lagtest-unit": {first: 0, second: 0}}
            producer = kafka.make_producer(settings)
            await producer.start()
            try:
                for _ in range(5):
                    await producer.send_and_wait(topics.EXPIRIES, b"x", partition=0)
                await producer.send_and_wait(topics.COMMANDS_DLQ, b"poison")
            finally:
                await producer.stop()
            # Nothing committed: the group (a consumer that never ran) lags by the whole partition.
            assert await collector.collect() == {"lagtest-unit": {first: 5, second: 0}}
            assert DLQ_RECORDS._value.get() == 1
            consumer = AIOKafkaConsumer(group_id="lagtest-unit", bootstrap_servers=broker.bootstrap,
                                        enable_auto_commit=False)
            await consumer.start()
            try:
                consumer.assign([first])
                await consumer.commit({first: 3})
            finally:
                await consumer.stop()
            assert (await collector.collect())["lagtest-unit"] == {first: 2, second: 0}
            assert CONSUMER_LAG.labels("lagtest-unit", topics.EXPIRIES, "0")._value.get() == 2
        finally:
            await collector.close()


def test_the_lag_table_names_every_consumer_group_and_its_topics():
    from services.command_handler import app as handler
    from services.projections import app as projections
    from services.sender import app as sender
    from services.timeout_sweeper import app as sweeper

    assert lag.CONSUMER_GROUPS == {
        handler.GROUP_ROLE: handler.INPUT_TOPICS,
        sender.WORK_GROUP_ROLE: (topics.SENDER_WORK,),
        sweeper.GROUP_ROLE: (topics.MESSAGE_STATUS,),
        projections.GROUP_ROLE: projections.INPUT_TOPICS,
    }


def test_metric_names_follow_the_prometheus_conventions():
    ours = [m for m in REGISTRY.collect() if m.name.startswith("outreach_")]
    assert len(ours) >= 14
    for family in ours:
        assert family.name.islower(), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if family.type == "counter":  # exposed as NAME_total
            assert not family.name.endswith("_total"), family.name
    text = metrics_text()[0].decode()
    for name in ("outreach_consumer_lag_records", "outreach_relay_lag_events", "outreach_dlq_records",
                 "outreach_claims_in_flight", "outreach_pending_timers", "outreach_breaker_state",
                 "outreach_messages_total", "outreach_provider_errors_total",
                 "outreach_webhook_verification_failures_total", "outreach_http_requests_total",
                 "outreach_provider_request_duration_seconds", "outreach_rate_limiter_wait_seconds"):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name


async def test_endpoints_readiness_and_the_instance_record(tmp_path):
    settings = Settings(data_dir=tmp_path, metrics_port=0, instance_name="2")
    broken = asyncio.Event()

    async def store() -> bool:
        if broken.is_set():
            raise ConnectionRefusedError("store down")
        return True

    observability = Observability(settings, "unit-service", {"store": store, "assigned": lambda: True})
    async with observability, aiohttp.ClientSession() as http:
        [record] = read_instances(tmp_path)
        assert record["service"] == "unit-service" and record["instance"] == "2"
        assert record["url"] == observability.url and record["metrics_url"].endswith("/metrics")
        assert (tmp_path / "instances" / "unit-service-2.json").exists()
        async with http.get(f"{observability.url}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{observability.url}/readyz") as response:
            assert response.status == 200
            assert (await response.json())["checks"] == {"store": "ok", "assigned": "ok"}
        broken.set()
        async with http.get(f"{observability.url}/readyz") as response:
            assert response.status == 503
            body = await response.json()
            assert body["ready"] is False and body["checks"]["assigned"] == "ok"
            assert "store down" in body["checks"]["store"]
        async with http.get(f"{observability.url}/healthz") as response:
            assert response.status == 200  # alive, though not ready
        async with http.get(f"{observability.url}/metrics") as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
        assert sample(text, "outreach_service_info", service="unit-service", instance="2") == 1
    assert read_instances(tmp_path) == []  # removed when it stops


async def test_http_requests_are_counted_by_route_template():
    app = web.Application(middlewares=[http_metrics_middleware("unit-http")])

    async def thing(request: web.Request) -> web.Response:
        return web.Response(text=request.match_info["id"])

    app.router.add_get("/things/{id}", thing)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            for n in range(3):
                async with http.get(f"http://127.0.0.1:{port}/things/{n}") as response:
                    assert response.status == 200
            async with http.get(f"http://127.0.0.1:{port}/nowhere") as response:
                assert response.status == 404
    finally:
        await runner.cleanup()
    assert HTTP_REQUESTS.labels("unit-http", "GET", "/things/{id}", "200")._value.get() == 3
    assert HTTP_REQUESTS.labels("unit-http", "GET", "unmatched", "404")._value.get() == 1


async def test_the_breaker_state_gauge_follows_the_breaker():
    from services.sender.breaker import ProviderBreaker

    probes = 0
    release = asyncio.Event()

    async def probe() -> bool:  # the first probe fails; the second waits for the test, then succeeds
        nonlocal probes
        probes += 1
        if probes == 1:
            return False
        await release.wait()
        return True

    breaker = ProviderBreaker("unit-provider", probe, threshold=2, first_probe_s=0.01, max_probe_s=0.02)
    gauge = BREAKER_STATE.labels("unit-provider")
    assert gauge._value.get() == 0
    breaker.record(["m1", "m2"], [{"message_id": "m1", "outcome": "presend_error"},
                                  {"message_id": "m2", "outcome": "presend_error"}])
    assert breaker.is_open and gauge._value.get() == 1  # open, probing
    for _ in range(200):
        if gauge._value.get() == 2:
            break
        await asyncio.sleep(0.005)
    assert gauge._value.get() == 2  # the first probe failed: held
    release.set()
    await asyncio.wait_for(breaker.wait_closed(), 2)
    assert gauge._value.get() == 0
    await breaker.close()


def test_read_instances_skips_unreadable_records(tmp_path):
    (tmp_path / "instances").mkdir()
    (tmp_path / "instances" / "a.json").write_text(json.dumps({"service": "a"}))
    (tmp_path / "instances" / "b.json").write_text("{not json")
    assert read_instances(tmp_path) == [{"service": "a"}]


@pytest.mark.parametrize("value", ["-1", "70000"])
def test_a_metrics_port_out_of_range_is_refused(value, monkeypatch):
    monkeypatch.setenv("OUTREACH_METRICS_PORT", value)
    with pytest.raises(ValueError):
        Settings()


def test_pending_timers_are_counted_by_kind(tmp_path, event_store_env, monkeypatch):
    import uuid
    from datetime import datetime, timezone

    from services.timeout_sweeper.timers import TimeoutSettings, TimerStore

    for key, value in event_store_env.items():
        monkeypatch.setenv(key, value)
    store = TimerStore.open(Settings(data_dir=tmp_path))
    try:
        assert store.pending_by_kind() == {"sending": 0, "sent": 0, "retry_window": 0}
        campaign_id, now = str(uuid.uuid4()), datetime.now(timezone.utc)
        statuses = ["sending"] * 3 + ["sent"] * 2 + ["delivered"]
        store.apply([{"message_id": str(uuid.uuid4()), "campaign_id": campaign_id, "channel": "sms",
                      "status": status, "previous_status": None, "sequence": n + 1, "occurred_at": now}
                     for n, status in enumerate(statuses)], TimeoutSettings(600, 600, 3600))
        assert store.pending_by_kind() == {"sending": 3, "sent": 2, "retry_window": 0}
    finally:
        store.close()
