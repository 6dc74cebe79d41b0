"""Timers end to end, every timeout compressed to 2 s: expiries survive a SIGKILLed sweeper and appear once,
an expiry delivered twice changes nothing, late receipts amend both expiries (and the finished campaign's
status follows), an accepted email with no outcome expires, and an email campaign in active_retries leaves
its channel free. Real processes, broker, PostgreSQL event store, Twilio/SendGrid over HTTP to the simulator.

An expiry's record is recognised by its causation_id: the sweeper's deterministic expiry_id for the message,
the record it was armed on (since_sequence) and the kind. Records are counted by distinct event_id (the
status stream is at least once; consumers dedupe on event_id)."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas import topics
from services.command_handler.app import GROUP_ROLE as HANDLER_ROLE
from services.common import ids
from services.common.records import encode
from services.common.settings import Settings
from services.sender.twilio import status_callback_url
from services.simulator.signing import TWILIO_SIGNATURE_HEADER, twilio_signature
from services.timeout_sweeper.app import expiry_record
from services.timeout_sweeper.timers import Timer
from tests.conftest import async_wait_until
from tests.e2e_stack import simulator_submissions, simulator_url, stack_environment
from tests.e2e_support import ALL_TRUE, Tail

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

TIMEOUT_S = 2.0  # OUTREACH_SENT_TIMEOUT_S = OUTREACH_SENDING_TIMEOUT_S = OUTREACH_RETRY_WINDOW_S
FINAL = {"delivered", "assumed_delivered", "failed", "opted_out", "cancelled"}
EXPIRY_KIND = {("assumed_delivered", None): "sent", ("failed", "timed_out"): "sending",
               ("failed", "expired"): "retry_window"}


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(
        stack_bootstrap, tmp_path_factory.mktemp("timers-data"),
        OUTREACH_SENDING_TIMEOUT_S="2", OUTREACH_SENT_TIMEOUT_S="2", OUTREACH_RETRY_WINDOW_S="2",
        OUTREACH_SIM_DEFER_INTERVAL_S="0.5", OUTREACH_EMAIL_BATCH="1",  # one call per address: outcomes stay apart
    )


TAIL_TOPICS = (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS, topics.EXPIRIES)


# ---------------------------------------------------------------- reading the streams

def at(record: dict) -> float:
    return datetime.fromisoformat(record["occurred_at"]).timestamp()


def history(tail: Tail, message_id: str) -> list[dict]:
    """The message's distinct status records, in stream order (one partition per message)."""
    seen: dict[str, dict] = {}
    for r in tail.statuses():
        if r.get("message_id") == message_id:
            seen.setdefault(r["event_id"], r)
    return list(seen.values())


def first(tail: Tail, message_id: str, status: str, reason: str | None = None) -> dict | None:
    return next((r for r in history(tail, message_id) if (r["status"], r["reason"]) == (status, reason)), None)


def final(tail: Tail, message_id: str) -> dict | None:
    records = history(tail, message_id)
    return records[-1] if records and records[-1]["status"] in FINAL else None


def sweeper_expiry_id(record: dict, previous: dict) -> str:
    """The expiry_id the sweeper gives the expiry that caused `record` (armed on `previous`)."""
    kind = EXPIRY_KIND[(record["status"], record["reason"])]
    timer = Timer(record["message_id"], record["campaign_id"], kind, previous["sequence"], 0.0, record["channel"])
    return expiry_record(timer).expiry_id


def status_changes(tail: Tail, campaign: str) -> list[dict]:
    return [e for e in tail.campaign_events(campaign) if e["type"] == "CampaignStatusChanged"]


async def handler_committed(env: dict, tp: TopicPartition) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    await admin.start()
    try:  # tansu needs the partitions named explicitly
        meta = (await admin.list_consumer_group_offsets(Settings().group_id(HANDLER_ROLE), partitions=[tp])).get(tp)
    finally:
        await admin.close()
    return meta.offset if meta is not None else -1


async def late_twilio_receipt(env: dict, campaign: str, message_id: str, to: str, status: str = "delivered") -> None:
    """A signed Twilio status callback to the webhook receiver, as the provider sends a late one."""
    settings = Settings(webhook_port=int(env["OUTREACH_WEBHOOK_PORT"]))
    url = status_callback_url(settings, message_id, campaign)
    sid = "SM" + uuid.uuid4().hex
    form = {"MessageSid": sid, "SmsSid": sid, "MessageStatus": status, "SmsStatus": status, "To": to,
            "From": "+15005550006", "AccountSid": settings.twilio_account_sid, "ApiVersion": "2010-04-01"}
    signature = twilio_signature(settings.twilio_auth_token.get_secret_value(), url, form)
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=form, headers={TWILIO_SIGNATURE_HEADER: signature}) as response:
            assert response.status == 200, await response.text()


async def simulator_answers(env: dict) -> bool:
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{simulator_url(env)}/_simulator/stats") as response:
                return response.status == 200
    except aiohttp.ClientError:
        return False


def contact(row: int, destination: str) -> dict:
    return {"row": row, "destination": destination, "variables": {"name": f"N{row}"}}


# ---------------------------------------------------------------- scenarios

@dataclass(frozen=True)
class Expected:
    status: str
    reason: str | None
    armed_by: str  # the status record that starts the timer (first of its kind)


async def test_expiries_survive_a_sweeper_crash_once_each_and_never_early(stack, env, tail, commands):
    """Every timeout 2 s: no-receipt and never-answers SMS, deferred-forever and never-answers email. The
    sweeper is SIGKILLed while their timers are pending and restarted, its data folder's files gone, after
    they all came due: each expiry
    appears exactly once, none missing, none before its transition's time + timeout, and both campaigns end
    complete_with_errors."""
    sms_rows = ([contact(2 + i, f"+1{301 + i}5550101") for i in range(6)]  # no receipt ever: stays sent
                + [contact(8 + i, f"+1{401 + i}5550106") for i in range(3)]  # never answered
                + [contact(11 + i, f"+1{501 + i}5550100") for i in range(2)])  # delivered (control)
    email_rows = ([contact(2 + i, f"n{i}+deferforever@example.com") for i in range(3)]
                  + [contact(5 + i, f"q{i}+noanswer@example.com") for i in range(2)]
                  + [contact(7, "fine@example.org")])
    sms = await commands.create_ready_campaign("sms", sms_rows)
    email = await commands.create_ready_campaign("email", email_rows)
    expected: dict[str, Expected] = {}
    for row in sms_rows:
        digit = row["destination"][-1]
        expected[ids.message_id(sms, row["row"])] = {
            "1": Expected("assumed_delivered", None, "sent"), "6": Expected("failed", "timed_out", "sending"),
            "0": Expected("delivered", None, "")}[digit]
    for row in email_rows:
        local = row["destination"].split("@")[0]
        expected[ids.message_id(email, row["row"])] = (
            Expected("failed", "expired", "retrying") if local.endswith("+deferforever") else
            Expected("failed", "timed_out", "sending") if local.endswith("+noanswer") else
            Expected("delivered", None, ""))
    expiring = {mid: e for mid, e in expected.items() if e.armed_by}

    await commands.send("RunCampaign", sms, disclaimer=ALL_TRUE)
    await commands.send("RunCampaign", email, disclaimer=ALL_TRUE)
    await async_wait_until(lambda: all(first(tail, mid, e.armed_by) for mid, e in expiring.items()), 30,
                           message="not every timer was started")
    stack.kill("timeout-sweeper")
    killed_at = time.time()
    deadline = {mid: at(first(tail, mid, e.armed_by)) + TIMEOUT_S for mid, e in expiring.items()}
    pending = {mid for mid, due in deadline.items() if due > killed_at}
    assert pending, "every timer had come due before the kill: nothing was pending"
    try:
        # Let every deadline pass while the sweeper is down (waiting for the clock is the point here).
        await asyncio.sleep(max(deadline.values()) + 1.0 - time.time())
        # Only the sweeper fires expiries, and it was dead before these came due.
        assert not [mid for mid in pending if final(tail, mid)], "an expiry fired while the sweeper was dead"
    finally:
        # Its volume lost too: whatever it kept in the data folder goes (the timers are in the store's database).
        for own_file in Path(env["OUTREACH_DATA_DIR"]).glob("timers.db*"):
            own_file.unlink()
        stack.start_service("timeout-sweeper")
    restarted_at = time.time()

    await async_wait_until(lambda: all(final(tail, mid) for mid in expected)
                           and tail.latest_status(sms) == tail.latest_status(email) == "complete_with_errors",
                           60, message=f"not finished: sms {tail.latest_status(sms)}, email {tail.latest_status(email)}")
    for mid, e in expected.items():
        records = history(tail, mid)
        last = records[-1]
        assert (last["status"], last["reason"]) == (e.status, e.reason), (mid, last)
        if not e.armed_by:
            continue
        outcomes = [r for r in records if (r["status"], r["reason"]) == (e.status, e.reason)]
        assert len(outcomes) == 1, (mid, outcomes)  # exactly once
        outcome = outcomes[0]
        assert outcome["causation_id"] == sweeper_expiry_id(outcome, records[-2]), (mid, records[-2:])
        assert at(outcome) >= deadline[mid], (mid, at(outcome) - deadline[mid])  # never early
        if mid in pending:
            assert at(outcome) >= restarted_at, mid  # fired by the restarted sweeper, from its durable timers
    counts = {c: status_changes(tail, c)[-1]["counts"] for c in (sms, email)}
    assert (counts[sms]["assumed_delivered"], counts[sms]["failed"], counts[sms]["delivered"]) == (6, 3, 2)
    assert (counts[email]["failed"], counts[email]["delivered"], counts[email]["total"]) == (5, 1, 6)


async def test_an_expiry_delivered_twice_changes_nothing(stack, env, tail, commands):
    """The same Expiry (the sweeper's own expiry_id) published twice straight to the expiries topic before the
    sweeper's timer is due: one status change, no extra record, the campaign completes once (and the
    sweeper's timer lapses, as the message moved on)."""
    campaign = await commands.create_ready_campaign("sms", [contact(2, "+16175550101")])  # stays sent
    mid = ids.message_id(campaign, 2)
    await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
    await async_wait_until(lambda: first(tail, mid, "sent"), 20, message="never sent")
    expiry = expiry_record(Timer(mid, campaign, "sent", first(tail, mid, "sent")["sequence"], 0.0, "sms"))
    for _ in range(2):
        await commands.producer.send_and_wait(topics.EXPIRIES, value=encode(expiry), key=campaign.encode())
    await async_wait_until(lambda: len([r for r, v in tail.records[topics.EXPIRIES]
                                        if isinstance(v, dict) and v.get("expiry_id") == expiry.expiry_id]) == 2,
                           20, message="the two copies never showed on the expiries topic")
    copies = [r for r, v in tail.records[topics.EXPIRIES]
              if isinstance(v, dict) and v.get("expiry_id") == expiry.expiry_id]
    tp = TopicPartition(topics.EXPIRIES, copies[-1].partition)
    assert {r.partition for r in copies} == {tp.partition}

    async def handler_got_past_the_copies() -> bool:
        return await handler_committed(env, tp) > copies[-1].offset

    await async_wait_until(handler_got_past_the_copies, 20, interval_s=0.2,
                           message="the handler never committed past the two copies")
    # A later record of the same message (same partition) fences the stream: once it is seen, anything the
    # two copies caused has been seen too.
    await late_twilio_receipt(env, campaign, mid, "+16175550101")
    await async_wait_until(lambda: first(tail, mid, "delivered"), 20, message="the fencing receipt never arrived")
    records = history(tail, mid)
    assert [r["status"] for r in records] == ["waiting", "queued", "sending", "sent", "assumed_delivered", "delivered"]
    assert records[4]["causation_id"] == expiry.expiry_id
    assert [(e["previous_status"], e["status"]) for e in status_changes(tail, campaign)][-2:] == [
        ("ready", "in_progress"), ("in_progress", "complete")]


async def test_late_receipts_amend_both_expiries_and_the_campaign_status_follows(stack, env, tail, commands):
    """assumed_delivered -> delivered (the simulator's outcome 7) and failed/timed_out -> delivered (a late
    signed callback): both changes on the status stream, and the finished campaign goes from
    complete_with_errors to complete without taking its channel again."""
    rows = [contact(2, "+17185550107"), contact(3, "+17185550106")]
    campaign = await commands.create_ready_campaign("sms", rows)
    late, silent = ids.message_id(campaign, 2), ids.message_id(campaign, 3)
    await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
    await async_wait_until(lambda: first(tail, silent, "failed", "timed_out") and first(tail, late, "delivered")
                           and tail.latest_status(campaign) == "complete_with_errors", 30,
                           message=f"not finished: {tail.latest_status(campaign)}")
    assert [r["status"] for r in history(tail, late)][-3:] == ["sent", "assumed_delivered", "delivered"]
    await late_twilio_receipt(env, campaign, silent, rows[1]["destination"])
    await async_wait_until(lambda: tail.latest_status(campaign) == "complete", 20,
                           message=f"the campaign status did not follow: {tail.latest_status(campaign)}")
    assert [(r["status"], r["reason"]) for r in history(tail, silent)][-2:] == [("failed", "timed_out"),
                                                                               ("delivered", None)]
    change = status_changes(tail, campaign)[-1]
    assert change["previous_status"] == "complete_with_errors"
    assert (change["counts"]["delivered"], change["counts"]["failed"]) == (2, 0)
    [answer] = await commands.send("StopCampaign", campaign, confirmed=True)
    assert (answer["type"], answer["reason"]) == ("CommandRejected", "campaign_not_running")  # no channel held


async def test_an_accepted_email_with_no_outcome_fails_expired(stack, env, tail, commands):
    """The provider accepts (202) but its events never reach us (the webhook receiver is down): the email
    fails `expired` once the retry window after the Sending deadline has passed."""
    stack.kill("webhooks")
    try:
        campaign = await commands.create_ready_campaign("email", [contact(2, "quiet@example.org")])
        mid = ids.message_id(campaign, 2)
        await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
        await async_wait_until(lambda: final(tail, mid), 30, message="the accepted email never expired")
    finally:
        stack.start_service("webhooks")
    [submission] = (await simulator_submissions(env))[mid]
    assert (submission["outcome"], submission["http_status"]) == ("accepted", 202)
    records = history(tail, mid)
    assert [(r["status"], r["reason"]) for r in records] == [
        ("waiting", None), ("queued", None), ("sending", None), ("failed", "expired")]
    assert records[-1]["causation_id"] == sweeper_expiry_id(records[-1], records[-2])
    assert at(records[-1]) >= at(records[-2]) + 2 * TIMEOUT_S  # Sending deadline, then the whole window
    await async_wait_until(lambda: tail.latest_status(campaign) == "complete_with_errors", 20,
                           message=f"campaign: {tail.latest_status(campaign)}")


async def test_deferred_email_passes_through_active_retries_with_its_channel_free(stack, env, tail, commands):
    """+defer (deferred twice, then delivered): in_progress -> active_retries -> complete, and while it is in
    active_retries another email campaign's RunCampaign is accepted. The deferrals are stretched (2 s apart)
    and the retry window opened (30 s) for this scenario, so the active_retries phase lasts long enough to
    run the other campaign on a loaded machine."""
    overrides = {"simulator": {"OUTREACH_SIM_DEFER_INTERVAL_S": "2"},
                 "timeout-sweeper": {"OUTREACH_RETRY_WINDOW_S": "30"}}
    stack.service_env.update(overrides)
    for name in overrides:
        stack.restart(name)
    try:
        await async_wait_until(lambda: simulator_answers(env), 20, message="the simulator did not come back")
        deferred = await commands.create_ready_campaign("email", [contact(2, "ada+defer@example.com")])
        other = await commands.create_ready_campaign("email", [contact(2, "someone@example.org")])
        mid = ids.message_id(deferred, 2)
        await commands.send("RunCampaign", deferred, disclaimer=ALL_TRUE)
        await async_wait_until(lambda: tail.latest_status(deferred) == "active_retries", 20,
                               message=f"never in active_retries: {tail.latest_status(deferred)}")
        started = await commands.send("RunCampaign", other, disclaimer=ALL_TRUE)
        assert started[0]["type"] == "CampaignRunStarted", started
        await async_wait_until(lambda: tail.latest_status(deferred) == "complete"
                               and tail.latest_status(other) == "complete", 30,
                               message=f"{tail.latest_status(deferred)}, {tail.latest_status(other)}")
    finally:
        for name in overrides:
            stack.service_env.pop(name)
            stack.restart(name)
    changes = status_changes(tail, deferred)
    assert [c["status"] for c in changes][-3:] == ["in_progress", "active_retries", "complete"], changes
    in_retries, completed = changes[-2], changes[-1]
    assert at(in_retries) <= at(started[0]) <= at(completed)  # the other run was accepted during active_retries
    # The second deferral is no status change (and SendGrid's is no SMTP re-submission): no record of its own.
    assert [r["status"] for r in history(tail, mid)] == ["waiting", "queued", "sending", "retrying", "delivered"]


async def test_timers_outlive_every_sweeper_that_applied_them(stack, env, tail, commands):
    """Two sweepers apply a campaign's records into the shared timers (the store's database); both die, their
    data folder's files gone, before the timers come due. A new sweeper instance, with nothing of its own
    and every partition, fires every one of them."""
    stack.start_service("timeout-sweeper", 1)
    try:
        rows = [contact(2 + i, f"+1{601 + i}5550101") for i in range(8)]  # accepted, no receipt: stays sent
        sms = await commands.create_ready_campaign("sms", rows)
        await commands.send("RunCampaign", sms, disclaimer=ALL_TRUE)
        mids = [ids.message_id(sms, row["row"]) for row in rows]
        await async_wait_until(lambda: all(first(tail, mid, "sent") for mid in mids), 30,
                               message="not every message was sent")
        stack.kill("timeout-sweeper", 0)
        stack.kill("timeout-sweeper", 1)
        for own_file in Path(env["OUTREACH_DATA_DIR"]).glob("timers*.db*"):
            own_file.unlink()
        assert not all(final(tail, mid) for mid in mids), "every timer fired before the sweepers died"
        stack.start_service("timeout-sweeper", 2)
        await async_wait_until(lambda: all((final(tail, mid) or {}).get("status") == "assumed_delivered"
                                           for mid in mids), 30, message="a timer was lost with the sweepers")
    finally:
        for instance in (1, 2):
            stack.kill("timeout-sweeper", instance)
        stack.start_service("timeout-sweeper", 0)
