"""RetryFailedMessages end to end, as the contract defines it: the default set (failed, except timed_out),
named ids (timed_out included; opted-out never), include_cancelled to resume a stopped campaign, a new run
number, attempts counted across runs, and the one-running-campaign-per-channel rule. The simulator's log of
submissions is the witness of what reached the provider."""
from __future__ import annotations

import uuid
from collections import Counter

import pytest

from services.common import ids
from tests.conftest import async_wait_until
from tests.e2e_stack import simulator_submissions, stack_environment
from tests.e2e_support import ALL_TRUE, Commands, Tail

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

FINAL = {"delivered", "assumed_delivered", "failed", "opted_out", "cancelled"}


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("retry-data"),
                             OUTREACH_SENDING_TIMEOUT_S="2", OUTREACH_SENT_TIMEOUT_S="2",
                             OUTREACH_RETRY_WINDOW_S="2")




async def submissions(env) -> dict[str, int]:
    """Provider calls per message id, from the simulator's log."""
    return {mid: len(entries) for mid, entries in (await simulator_submissions(env)).items()}


async def finished(tail: Tail, campaign: str, total: int, run_no: int, timeout_s: float = 60) -> dict[str, dict]:
    """Waits until every message is final and the campaign's status says so after run `run_no`."""
    def done() -> bool:
        last = tail.latest_per_message(campaign)
        changes = [e for e in tail.campaign_events(campaign) if e["type"] == "CampaignStatusChanged"]
        runs = [e for e in tail.campaign_events(campaign) if e["type"] in ("CampaignRunStarted", "RetryStarted")]
        return (len(last) == total and all(r["status"] in FINAL for r in last.values())
                and len(runs) == run_no and changes[-1]["sequence"] > runs[-1]["sequence"]
                and changes[-1]["status"] in ("complete", "complete_with_errors"))

    await async_wait_until(done, timeout_s, message=f"not finished: {tail.latest_status(campaign)}")
    return tail.latest_per_message(campaign)


def contact(row: int, destination: str) -> dict:
    return {"row": row, "destination": destination, "variables": {"name": f"N{row}"}}


async def retry(commands: Commands, campaign: str, **payload) -> list[dict]:
    return await commands.send("RetryFailedMessages", campaign, **payload)


def rejected(answer: list[dict]) -> str | None:
    return answer[0]["reason"] if answer[0]["type"] == "CommandRejected" else None


async def test_retry_resends_only_the_retryable_failed_messages_and_keeps_their_attempts(stack, env, tail, commands):
    rows = {
        2: ("+12025550100", "delivered", None),
        3: ("+12035550102", "failed", "undeliverable"),  # retryable: sent again, fails again
        4: ("+12045550103", "failed", "carrier_rejected"),
        5: ("+15005550001", "failed", "invalid_destination"),
        6: ("+12065550105", "failed", "provider_error"),  # 503 to every submission: 4 per run
        7: ("+12075550106", "failed", "timed_out"),  # may have reached the recipient: only when named
        8: ("+15005550004", "opted_out", None),  # never re-queued
        9: ("+12095550101", "assumed_delivered", None),
    }
    campaign = await commands.create_ready_campaign("sms", [contact(row, d) for row, (d, _, _) in rows.items()])
    mid = {row: ids.message_id(campaign, row) for row in rows}
    await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
    last = await finished(tail, campaign, len(rows), run_no=1)
    assert {row: (last[mid[row]]["status"], last[mid[row]]["reason"]) for row in rows} == {
        row: (status, reason) for row, (_, status, reason) in rows.items()}
    assert tail.latest_status(campaign) == "complete_with_errors"
    first_attempts = {row: last[mid[row]]["attempt"] for row in rows}
    before = await submissions(env)

    answer = await retry(commands, campaign)
    assert answer[0]["type"] == "RetryStarted", answer
    assert (answer[0]["run_no"], answer[0]["message_count"]) == (2, 4)
    last = await finished(tail, campaign, len(rows), run_no=2)
    after = await submissions(env)
    resent = {row for row in rows if after.get(mid[row], 0) > before.get(mid[row], 0)}
    assert resent == {3, 4, 5, 6}  # neither the timed_out one, nor the opted-out, delivered or assumed ones
    for row in (3, 4, 5, 6):
        record = last[mid[row]]
        assert (record["status"], record["reason"], record["run_no"]) == ("failed", rows[row][2], 2)
        # Attempts count provider submissions across runs: the retry's continue from the first run's.
        assert record["attempt"] == first_attempts[row] + (4 if row == 6 else 1), (row, record)
        requeued = [r for r in tail.statuses(campaign) if r["message_id"] == mid[row] and r["status"] == "queued"]
        assert [r["run_no"] for r in requeued] == [1, 2] and requeued[1]["previous_status"] == "failed"
    assert first_attempts[6] == 4 and after[mid[6]] == 8  # the provider saw every one of them
    for row in (2, 7, 8, 9):
        assert last[mid[row]]["run_no"] == 1  # untouched by the retry

    # Named ids: an opted-out message (with a delivered one) is never re-queued; unknown ids are invalid.
    assert rejected(await retry(commands, campaign, message_ids=[mid[8]])) == "nothing_to_retry"
    assert rejected(await retry(commands, campaign, message_ids=[mid[8], mid[2]])) == "nothing_to_retry"
    assert rejected(await retry(commands, campaign, message_ids=[str(uuid.uuid4())])) == "invalid_command"
    # ... and a timed_out one is re-sent when named.
    before = await submissions(env)
    answer = await retry(commands, campaign, message_ids=[mid[7]])
    assert answer[0]["type"] == "RetryStarted" and (answer[0]["run_no"], answer[0]["message_count"]) == (3, 1)
    last = await finished(tail, campaign, len(rows), run_no=3)
    after = await submissions(env)
    assert {row for row in rows if after.get(mid[row], 0) > before.get(mid[row], 0)} == {7}
    assert (last[mid[7]]["status"], last[mid[7]]["reason"], last[mid[7]]["run_no"]) == ("failed", "timed_out", 3)


async def test_channel_busy_and_a_stopped_campaign_resumed_with_its_cancelled_messages(stack, env, tail, commands):
    """The sweeper gets a 30 s Sending limit here: a backlog waits up to two claims (4 s) in the sender between
    its claim and its submission, and this scenario is about retry, not about messages timing out there."""
    # The relay too: it gives each claim its Sending deadline at the hand-off fence.
    for service in ("timeout-sweeper", "relay"):
        stack.service_env[service] = {"OUTREACH_SENDING_TIMEOUT_S": "30"}
        stack.restart(service)
    try:
        await _channel_busy_and_resume(env, tail, commands)
    finally:
        for service in ("timeout-sweeper", "relay"):
            stack.service_env.pop(service)
            stack.restart(service)


async def _channel_busy_and_resume(env, tail: Tail, commands: Commands) -> None:
    refused = await commands.create_ready_campaign("sms", [contact(2, "+15005550001")])
    await commands.send("RunCampaign", refused, disclaimer=ALL_TRUE)
    await finished(tail, refused, 1, run_no=1)
    # 7 s at the default 100 segments/s; the sender holds two claims of 2 s worth (400) at a time, so queued
    # messages are left when the retry and the stop come.
    size = 700
    running = await commands.create_ready_campaign("sms", [
        contact(i + 2, f"+1{200 + i % 800}{660 + i // 800:03d}{i % 10000:04d}") for i in range(size)])
    await commands.send("RunCampaign", running, disclaimer=ALL_TRUE)
    # Another SMS campaign holds the channel: a retry is refused for it (the rule applies to retries too).
    assert rejected(await retry(commands, refused)) == "channel_busy"

    await async_wait_until(lambda: sum(r["status"] == "sent" for r in tail.statuses(running)) >= 30, 30,
                           message="nothing was sent")
    [stopped] = [e for e in await commands.send("StopCampaign", running, confirmed=True)
                 if e["type"] == "CampaignStopped"]
    assert 0 < stopped["cancelled_count"] < size
    last = await finished(tail, running, size, run_no=1)
    cancelled = {m for m, r in last.items() if r["status"] == "cancelled"}
    assert len(cancelled) == stopped["cancelled_count"]
    before = await submissions(env)
    assert not cancelled & set(before), "a cancelled message reached the provider"
    # The channel is free again: the refused campaign's retry is accepted now.
    assert (await retry(commands, refused))[0]["type"] == "RetryStarted"
    await finished(tail, refused, 1, run_no=2)

    # Nothing failed, so a plain retry has nothing to do; include_cancelled resumes the stopped campaign.
    assert rejected(await retry(commands, running)) == "nothing_to_retry"
    answer = await retry(commands, running, include_cancelled=True)
    assert answer[0]["type"] == "RetryStarted", answer
    assert (answer[0]["run_no"], answer[0]["message_count"]) == (2, len(cancelled))
    last = await finished(tail, running, size, run_no=2)
    assert all(r["status"] == "delivered" for r in last.values()), Counter(
        (r["status"], r["reason"], r["run_no"], m in cancelled) for m, r in last.items())
    after = await submissions(env)
    resent = {m for m in last if after.get(m, 0) > before.get(m, 0)}
    assert resent == cancelled  # exactly the cancelled ones...
    assert all(after[m] == 1 for m in last)  # ...and no message of the campaign reached the provider twice
    assert {last[m]["run_no"] for m in cancelled} == {2} and {last[m]["run_no"] for m in set(last) - cancelled} == {1}
    final_change = [e for e in tail.campaign_events(running) if e["type"] == "CampaignStatusChanged"][-1]
    assert (final_change["status"], final_change["stopped"]) == ("complete", True)  # stopped stays true
