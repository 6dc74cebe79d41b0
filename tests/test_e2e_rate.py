"""OUTREACH_SMS_RATE=50: a campaign of 500 one-segment SMS takes at least 9.5 s, end to end over HTTP.

Its own module: a stack with other settings must not share the broker's consumer groups with another stack."""
from __future__ import annotations

import pytest

from outreach.up import Stack
from schemas import topics
from services.common.settings import Settings
from tests.e2e_stack import stack_environment
from tests.e2e_support import ALL_TRUE, Commands, Tail
from tests.test_e2e_sending import deliverable_sms, finished, simulator_log

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


@pytest.fixture(scope="module")
def slow_env(kafka_bootstrap, tmp_path_factory):
    return stack_environment(kafka_bootstrap, tmp_path_factory.mktemp("slow-data"), OUTREACH_SMS_RATE="50")


async def test_sms_rate_50_makes_500_messages_take_at_least_9_5_s(slow_env, tmp_path_factory):
    with Stack(env=slow_env, log_dir=tmp_path_factory.mktemp("slow-logs")):
        settings = Settings(kafka_bootstrap_servers=slow_env["KAFKA_BOOTSTRAP_SERVERS"])
        tail = await Tail(settings, topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS).start()
        commands = await Commands(settings, tail).start()
        try:
            campaign = await commands.create_ready_campaign("sms", deliverable_sms(500, 650))
            [started] = [e for e in await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
                         if e["type"] == "CampaignRunStarted"]
            await finished(tail, campaign, 500, 60)
            ended = [e for e in tail.campaign_events(campaign) if e["type"] == "CampaignStatusChanged"][-1]
            assert _seconds_between(started["occurred_at"], ended["occurred_at"]) >= 9.5
            log = await simulator_log(slow_env)
            times = sorted(e["at"] for entries in log.values() for e in entries if e.get("campaign_id") == campaign)
            assert len(times) == 500 and times[-1] - times[0] >= (500 - 12.5) / 50 - 0.15
        finally:
            await commands.stop()
            await tail.stop()


def _seconds_between(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()
