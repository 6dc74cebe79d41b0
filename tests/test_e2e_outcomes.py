"""Every outcome of the contract's simulator table, on both channels, end to end: the real Twilio and SendGrid
adapters over HTTP against the simulator, signed callbacks through the webhook receiver, timers compressed."""
from __future__ import annotations

import pytest

from schemas import topics
from services.common import ids
from services.common.settings import Settings
from tests.conftest import async_wait_until
from tests.e2e_stack import simulator_submissions, stack_environment
from tests.e2e_support import ALL_TRUE, Commands, Tail

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

# destination -> (final status, reason, attempt of the last record or None to skip, statuses it passes through)
SMS_OUTCOMES = {
    "+15005550001": ("failed", "invalid_destination", 1, set()),
    "+15005550002": ("failed", "undeliverable", 1, set()),
    "+15005550003": ("failed", "blocked", 1, set()),
    "+15005550004": ("opted_out", None, 1, set()),
    "+15005550009": ("failed", "invalid_destination", 1, set()),
    "+12025550100": ("delivered", None, 1, {"sent"}),
    "+12025550101": ("assumed_delivered", None, 1, {"sent"}),
    "+12025550102": ("failed", "undeliverable", 1, {"sent"}),
    "+12025550103": ("failed", "carrier_rejected", 1, {"sent"}),
    "+12025550104": ("delivered", None, 3, {"sent"}),
    "+12025550105": ("failed", "provider_error", 4, set()),
    "+12025550106": ("failed", "timed_out", 1, set()),  # handed off, no answer: the fence counted it
    "+12025550107": ("delivered", None, 1, {"sent", "assumed_delivered"}),
    "+14155550123": ("delivered", None, 1, {"sent"}),
}
SES = "simulator.amazonses.com"
EMAIL_OUTCOMES = {
    f"success@{SES}": ("delivered", None, 1, set()),
    f"success+label@{SES}": ("delivered", None, 1, set()),
    f"ooto@{SES}": ("delivered", None, 1, set()),
    f"bounce@{SES}": ("failed", "bounced", 1, set()),
    f"suppressionlist@{SES}": ("failed", "bounced", 1, set()),
    f"complaint@{SES}": ("delivered", None, 1, set()),
    "ada+defer@example.com": ("delivered", None, 1, {"retrying"}),
    "bob+deferforever@example.com": ("failed", "expired", 1, {"retrying"}),
    "cy+fail503x2@example.com": ("delivered", None, 3, set()),
    "dee+fail503@example.com": ("failed", "provider_error", 4, set()),
    "eve+noanswer@example.com": ("failed", "timed_out", 1, set()),
    "someone@example.org": ("delivered", None, 1, set()),
}


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(
        stack_bootstrap, tmp_path_factory.mktemp("outcomes-data"),
        OUTREACH_SENDING_TIMEOUT_S="4", OUTREACH_SENT_TIMEOUT_S="2", OUTREACH_RETRY_WINDOW_S="5",
        OUTREACH_SIM_DEFER_INTERVAL_S="0.5", OUTREACH_EMAIL_BATCH="1",  # one call per address: outcomes stay apart
    )




async def run_campaign(env, channel: str, destinations: list[str]) -> tuple[str, Tail]:
    settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    tail = await Tail(settings, topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS).start()
    commands = await Commands(settings, tail).start()
    try:
        contacts = [{"row": n + 2, "destination": d, "variables": {"name": f"N{n}"}} for n, d in enumerate(destinations)]
        campaign = await commands.create_ready_campaign(channel, contacts)
        started = await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE, timeout_s=30)
        assert started[0]["type"] == "CampaignRunStarted", started
        await async_wait_until(lambda: tail.latest_status(campaign) in ("complete", "complete_with_errors")
                               and _all_final(tail, campaign, len(destinations)), 90,
                               message=f"campaign did not finish: {tail.latest_status(campaign)}")
        return campaign, tail
    finally:
        await commands.stop()


def _all_final(tail: Tail, campaign: str, count: int) -> bool:
    last = tail.latest_per_message(campaign)
    return len(last) == count and all(
        r["status"] in ("delivered", "assumed_delivered", "failed", "opted_out", "cancelled") for r in last.values())


def check_outcomes(tail: Tail, campaign: str, table: dict, submissions: dict[str, list[dict]]) -> None:
    """Each message's final record as the table says, and its `attempt` the provider's own count of the
    submissions it got (the simulator's log), whichever came first, the receipt or the sender's result."""
    last = tail.latest_per_message(campaign)
    for row, (destination, (status, reason, attempt, through)) in enumerate(table.items(), start=2):
        mid = ids.message_id(campaign, row)
        final = last[mid]
        assert (final["status"], final["reason"]) == (status, reason), (destination, final)
        assert final["attempt"] == attempt == len(submissions.get(mid, [])), (destination, final)
        seen = {r["status"] for r in tail.statuses(campaign) if r["message_id"] == mid}
        assert through <= seen, (destination, seen)


async def test_every_sms_outcome_of_the_simulator_table(stack, env):
    campaign, tail = await run_campaign(env, "sms", list(SMS_OUTCOMES))
    try:
        # The late receipt (digit 7) may land after the campaign first looked complete: wait for it.
        late = ids.message_id(campaign, 2 + list(SMS_OUTCOMES).index("+12025550107"))
        await async_wait_until(lambda: tail.latest_per_message(campaign)[late]["status"] == "delivered", 30,
                               message="the late receipt never turned assumed_delivered into delivered")
        check_outcomes(tail, campaign, SMS_OUTCOMES, await simulator_submissions(env))
        assert tail.latest_status(campaign) == "complete_with_errors"
    finally:
        await tail.stop()


async def test_every_email_outcome_of_the_simulator_table(stack, env):
    campaign, tail = await run_campaign(env, "email", list(EMAIL_OUTCOMES))
    try:
        check_outcomes(tail, campaign, EMAIL_OUTCOMES, await simulator_submissions(env))
        assert tail.latest_status(campaign) == "complete_with_errors"
        statuses = [e["status"] for e in tail.campaign_events(campaign) if e["type"] == "CampaignStatusChanged"]
        assert "active_retries" in statuses or "in_progress" in statuses
    finally:
        await tail.stop()


async def test_refused_credentials_fail_the_run_and_release_the_channel(env, stack, tmp_path_factory):
    """A sender whose Twilio credentials the provider refuses (20003): every message fails `setup_error`,
    the campaign ends `failed`, and the SMS channel is free again."""
    stack.kill("sender")
    stack.service_env["sender"] = {"OUTREACH_TWILIO_AUTH_TOKEN": "not-the-token"}
    stack.start_service("sender")
    try:
        settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
        tail = await Tail(settings, topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS).start()
        commands = await Commands(settings, tail).start()
        try:
            contacts = [{"row": n + 2, "destination": f"+1{300 + n}6000000", "variables": {"name": "x"}}
                        for n in range(20)]
            campaign = await commands.create_ready_campaign("sms", contacts)
            other = await commands.create_ready_campaign("sms", contacts[:1])
            await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
            await async_wait_until(lambda: tail.latest_status(campaign) == "failed", 30,
                                   message=f"the campaign did not fail: {tail.latest_status(campaign)}")
            last = {r["message_id"]: r for r in tail.statuses(campaign)}
            assert {(r["status"], r["reason"]) for r in last.values()} == {("failed", "setup_error")}
            answer = await commands.send("RunCampaign", other, disclaimer=ALL_TRUE)
            assert answer[0]["type"] == "CampaignRunStarted"  # the channel was released
        finally:
            await commands.stop()
            await tail.stop()
    finally:
        stack.kill("sender")
        stack.service_env.pop("sender")
        stack.start_service("sender")
