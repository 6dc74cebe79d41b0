"""The embedded broker keeps nothing: restarted empty between two campaigns, the relay notices and
republishes the whole history, and the next campaign runs normally. (Losing a broker in mid-flight is
real Kafka's job to prevent: see the README.)"""
from __future__ import annotations

import os

import pytest

from outreach.up import Stack
from schemas import topics
from services.common.embedded_broker import EmbeddedBroker, free_port
from services.common.settings import Settings
from tests.conftest import async_wait_until, fresh_postgres_database
from tests.e2e_support import ALL_TRUE, Commands, Tail, email_contacts, sms_contacts

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


async def run_to_completion(settings: Settings, channel: str, contacts: list[dict]) -> tuple[str, Tail]:
    tail = await Tail(settings, topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS).start()
    commands = await Commands(settings, tail).start()
    try:
        campaign = await commands.create_ready_campaign(channel, contacts)
        started = await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE, timeout_s=30)
        assert started[0]["type"] == "CampaignRunStarted", started
        await async_wait_until(lambda: tail.latest_status(campaign) == "complete", 60,
                               message=f"campaign never completed ({tail.latest_status(campaign)})")
        return campaign, tail
    finally:
        await commands.stop()


async def test_broker_restarted_empty_relay_republishes_history(tmp_path):
    port = free_port("127.0.0.1")
    bootstrap = f"127.0.0.1:{port}"
    env = dict(os.environ)
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "OUTREACH_EXTERNAL_KAFKA": "true",
        "OUTREACH_EVENT_STORE": "postgres",
        "OUTREACH_POSTGRES_DSN": fresh_postgres_database("outreach_restart"),
        "OUTREACH_DATA_DIR": str(tmp_path / "data"),
        "OUTREACH_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "OUTREACH_KAFKA_HEARTBEAT_MS": "200",
        "OUTREACH_SIMULATOR_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_WEBHOOK_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_SMS_RATE": "1000",
    })
    settings = Settings(kafka_bootstrap_servers=bootstrap)
    broker = EmbeddedBroker("127.0.0.1", port)
    broker.start()
    try:
        with Stack(env=env, log_dir=tmp_path / "logs"):
            first, tail = await run_to_completion(settings, "sms", sms_contacts(50))
            history = tail.campaign_events(first)
            statuses = {s["event_id"] for s in tail.statuses(first)}
            await tail.stop()

            broker.stop()
            broker = EmbeddedBroker("127.0.0.1", port)
            broker.start()  # a new, empty broker on the same address

            fresh = await Tail(settings, topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS).start()
            try:
                await async_wait_until(lambda: len(fresh.campaign_events(first)) == len(history)
                                       and statuses <= {s["event_id"] for s in fresh.statuses(first)}, 60,
                                       message="the relay did not republish the first campaign's history")
                assert fresh.campaign_events(first) == history  # same events, same ids, same order
            finally:
                await fresh.stop()

            second, tail2 = await run_to_completion(settings, "email", email_contacts(40))
            counts = [e for e in tail2.campaign_events(second) if e["type"] == "CampaignStatusChanged"][-1]["counts"]
            assert counts["delivered"] == 40
            await tail2.stop()
    finally:
        broker.stop()
