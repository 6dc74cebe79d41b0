"""OUTREACH_SMS_RATE=50: a campaign of 500 one-segment SMS takes at least 9.5 s, end to end over HTTP.

Its own module: a stack with other settings must not share the broker's consumer groups with another stack."""
from __future__ import annotations

import pytest

from tests.e2e_stack import simulator_submissions, stack_environment
from tests.e2e_support import ALL_TRUE
from tests.test_e2e_sending import deliverable_sms, finished

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("slow-data"), OUTREACH_SMS_RATE="50")


async def test_sms_rate_50_makes_500_messages_take_at_least_9_5_s(env, stack, tail, commands):
    campaign = await commands.create_ready_campaign("sms", deliverable_sms(500, 650))
    [started] = [e for e in await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
                 if e["type"] == "CampaignRunStarted"]
    await finished(tail, campaign, 500, 60)
    ended = [e for e in tail.campaign_events(campaign) if e["type"] == "CampaignStatusChanged"][-1]
    assert _seconds_between(started["occurred_at"], ended["occurred_at"]) >= 9.5
    log = await simulator_submissions(env)
    times = sorted(e["at"] for entries in log.values() for e in entries if e.get("campaign_id") == campaign)
    assert len(times) == 500 and times[-1] - times[0] >= (500 - 12.5) / 50 - 0.15


def _seconds_between(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()
