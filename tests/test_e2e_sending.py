"""Sending under stress, end to end over HTTP: Stop in a large campaign, the sender SIGKILLed mid-run, the
provider down for 30 s, and the rate limits. The simulator's own log is the witness of what was sent.

Sizes come from OUTREACH_E2E_SMS_SIZE (default 1000 rows)."""
from __future__ import annotations

import asyncio
import os
from collections import Counter

import aiohttp
import pytest

from tests.conftest import async_wait_until
from tests.e2e_stack import simulator_submissions, simulator_url, stack_environment
from tests.e2e_support import ALL_TRUE, Tail, email_contacts

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

SIZE = int(os.environ.get("OUTREACH_E2E_SMS_SIZE", "1000"))
FINAL_MESSAGE = {"delivered", "assumed_delivered", "failed", "opted_out", "cancelled"}


def deliverable_sms(n: int, exchange: int) -> list[dict]:
    """Numbers outside the simulator's special range: each is delivered."""
    return [{"row": i + 2, "destination": f"+1{200 + i % 800}{exchange + i // 800:03d}{i % 10000:04d}",
             "variables": {"name": f"P{i}"}} for i in range(n)]


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    # The contract's default rates (SMS 100 segments/s, email 1000/s); a Sending limit that leaves the
    # messages a killed sender stranded mid-call a bounded wait.
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("sending-data"),
                             OUTREACH_SENDING_TIMEOUT_S="30")




def handed_off(entries: list[dict]) -> int:
    """Submissions the provider took (or may have taken): everything but pre-send refusals."""
    return sum(1 for e in entries if e.get("outcome") not in ("presend_error",))


async def finished(tail: Tail, campaign: str, total: int, timeout_s: float) -> dict[str, dict]:
    await async_wait_until(lambda: tail.latest_status(campaign) in ("complete", "complete_with_errors")
                           and len(tail.latest_per_message(campaign)) == total
                           and all(r["status"] in FINAL_MESSAGE for r in tail.latest_per_message(campaign).values()),
                           timeout_s, message=f"not finished: {tail.latest_status(campaign)}")
    return tail.latest_per_message(campaign)


async def test_stop_in_a_large_campaign_sends_no_cancelled_message(stack, env, tail, commands):
    campaign = await commands.create_ready_campaign("sms", deliverable_sms(SIZE, 610))
    await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
    await async_wait_until(lambda: sum(r["status"] == "sent" for r in tail.statuses(campaign)) >= 50, 30,
                           message="nothing was sent")
    [stopped] = [e for e in await commands.send("StopCampaign", campaign, confirmed=True)
                 if e["type"] == "CampaignStopped"]
    assert 0 < stopped["cancelled_count"] < SIZE
    last = await finished(tail, campaign, SIZE, 60)
    cancelled = {m for m, r in last.items() if r["status"] == "cancelled"}
    assert len(cancelled) == stopped["cancelled_count"]
    log = await simulator_submissions(env)
    assert not cancelled & set(log), "a cancelled message reached the provider"
    claimed = {m for m, r in last.items() if r["status"] != "cancelled"}
    assert claimed <= set(log) and all(last[m]["status"] == "delivered" for m in claimed)


async def test_sender_killed_three_times_sends_nothing_twice(stack, env, tail, commands):
    campaign = await commands.create_ready_campaign("sms", deliverable_sms(SIZE, 620))
    await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
    for kill in range(3):
        await async_wait_until(
            lambda: sum(r["status"] == "sent" for r in tail.statuses(campaign)) >= (kill + 1) * SIZE // 5, 60,
            message=f"no progress before kill {kill + 1}")
        stack.restart("sender")  # SIGKILL, then a new process
    last = await finished(tail, campaign, SIZE, 120)
    log = await simulator_submissions(env)
    per_message = Counter({m: handed_off(entries) for m, entries in log.items()
                           if entries and entries[0].get("campaign_id") == campaign})
    assert per_message and max(per_message.values()) == 1, "a message reached the provider twice"
    statuses = Counter(r["status"] for r in last.values())
    # Calls in flight at a kill may never be answered: those time out (a duplicate is worse than a late
    # failure); everything else is delivered.
    assert statuses["delivered"] + statuses["failed"] == SIZE
    assert statuses["failed"] <= 3 * 64, statuses
    assert all(r["reason"] == "timed_out" for r in last.values() if r["status"] == "failed")


async def test_provider_down_30_s_fails_nothing_and_the_campaign_completes(stack, env, tail, commands):
    campaign = await commands.create_ready_campaign("sms", deliverable_sms(SIZE, 630))
    await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
    await async_wait_until(lambda: sum(r["status"] == "sent" for r in tail.statuses(campaign)) >= 100, 30,
                           message="nothing was sent")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{simulator_url(env)}/_simulator/outage", params={"seconds": "30"}) as response:
            assert response.status == 200
    await async_wait_until(lambda: any(e["type"] == "CampaignSendingHeld" for e in tail.campaign_events(campaign)),
                           30, message="the campaign never showed it was held")
    last = await finished(tail, campaign, SIZE, 150)
    assert all(r["status"] == "delivered" for r in last.values()), Counter(
        (r["status"], r["reason"]) for r in last.values())
    assert not [r for r in tail.statuses(campaign) if r["reason"] == "provider_error"]
    assert any(e["type"] == "CampaignSendingResumed" for e in tail.campaign_events(campaign))
    assert tail.latest_status(campaign) == "complete"


async def test_default_rates_are_honoured(stack, env, tail, commands):
    """OUTREACH_SMS_RATE defaults to 100 segments/s and OUTREACH_EMAIL_RATE to 1000/s: the simulator's log of
    submission times shows it."""
    # The email path's first call pays one-time costs in the sender (about 0.6 s here, on a busy machine more
    # than the 0.15 s allowed below): a one-recipient campaign pays them first, so the gap measured is the
    # bucket's.
    warm_up = await commands.create_ready_campaign("email", email_contacts(1, local="warm"))
    await commands.send("RunCampaign", warm_up, disclaimer=ALL_TRUE)
    await finished(tail, warm_up, 1, 60)
    sms = await commands.create_ready_campaign("sms", deliverable_sms(300, 640))
    email = await commands.create_ready_campaign("email", email_contacts(2000, local="rate"))
    await commands.send("RunCampaign", sms, disclaimer=ALL_TRUE)
    await commands.send("RunCampaign", email, disclaimer=ALL_TRUE)
    await asyncio.gather(finished(tail, sms, 300, 60), finished(tail, email, 2000, 60))
    log = await simulator_submissions(env)
    sms_times = sorted(e["at"] for entries in log.values() for e in entries if e.get("campaign_id") == sms)
    assert len(sms_times) == 300
    # 300 one-segment messages at 100/s after a burst of a quarter second's worth (25): at least 2.75 s.
    assert sms_times[-1] - sms_times[0] >= 2.75 - 0.15  # less the first connection's set-up
    # (The bucket's exact burst and per-second windows are checked on virtual time in test_sender_ratelimit.py;
    # arrival times here also carry the simulator's own scheduling jitter.)
    email_calls = sorted({e["at"] for entries in log.values() for e in entries if e.get("campaign_id") == email})
    # 2,000 recipients in calls of 1,000 at 1,000/s: the burst is one call, the second waits a second.
    assert len(email_calls) == 2 and email_calls[1] - email_calls[0] >= 1.0 - 0.15  # less building the first body

