"""End to end over the real broker, every service as its own process, event store on PostgreSQL.

Sizes come from settings so CI can run smaller campaigns: OUTREACH_E2E_SMS_SIZE (default 1000 rows).
"""
from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter, defaultdict

import pytest
from aiokafka.partitioner import DefaultPartitioner

from outreach.up import SERVICES
from schemas import topics
from schemas.events import CAMPAIGN_EVENT_ADAPTER, MessageStatusChanged
from services.common import jsoncodec
from tests.conftest import async_wait_until
from tests.e2e_fixtures import api_client, stack_token
from tests.e2e_stack import stack_environment
from tests.e2e_support import ALL_TRUE, Tail, command, email_contacts, sms_contacts

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

SMS_SIZE = int(os.environ.get("OUTREACH_E2E_SMS_SIZE", "1000"))
FINAL = {"complete", "complete_with_errors", "failed"}


TAIL_TOPICS = (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS, topics.COMMANDS_DLQ)
STACK_SERVICES = tuple(SERVICES)  # the API too: the CLI's campaign commands go through it


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    # A campaign of SMS_SIZE lasts several seconds: Stop and channel_busy land mid-run.
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("core-data"),
                             OUTREACH_SMS_RATE="100",  # the default rate: claims of 200, two in flight
                             OUTREACH_EMAIL_RATE="250", OUTREACH_PRESEND_BACKOFF_S="0.05")


def with_invalid_rows(contacts: list[dict]) -> tuple[list[dict], int]:
    """Replaces 10 rows by invalid ones of every kind; returns (contacts, invalid count)."""
    bad = [("12025550123", "invalid_e164"), ("+0123", "invalid_e164"), ("", "missing_destination"),
           ("   ", "missing_destination"), ("+1 202 555 0101", "invalid_e164"), ("abc", "invalid_e164"),
           ("+12025550199999999", "invalid_e164"), ("+", "invalid_e164")]
    out = [dict(c) for c in contacts]
    for i, (destination, _) in enumerate(bad):
        out[10 + i * 7]["destination"] = destination
    out[500]["destination"] = out[3]["destination"]  # duplicates of earlier rows
    out[600]["destination"] = out[4]["destination"]
    return out, 10


def message_histories(statuses: list[dict]) -> dict[str, list[dict]]:
    """Per message, its distinct status records (first copy of each event_id) in arrival order."""
    seen = set()
    out: dict[str, list[dict]] = defaultdict(list)
    for s in statuses:
        if s["event_id"] not in seen:
            seen.add(s["event_id"])
            out[s["message_id"]].append(s)
    return out


async def wait_final(tail: Tail, campaign_id: str, timeout_s: float = 90) -> dict:
    await async_wait_until(lambda: tail.latest_status(campaign_id) in FINAL, timeout_s,
                           message=f"campaign {campaign_id} never finished (last status {tail.latest_status(campaign_id)})")
    return [e for e in tail.campaign_events(campaign_id) if e["type"] == "CampaignStatusChanged"][-1]


@pytest.fixture(scope="module")
def cli_env(env) -> dict[str, str]:
    """The stack's environment signed in to its API with a campaigner token (the CLI's campaign commands)."""
    token = stack_token(env, "core-cli", "campaigner")
    return {**env, "OUTREACH_API_URL": f"http://127.0.0.1:{env['OUTREACH_API_PORT']}", "OUTREACH_API_TOKEN": token}


def create_from_csv_with_cli(env: dict, path, contacts: list[dict]) -> dict:
    """`outreach campaign create` on a CSV file (header + one line per contact), as a user would."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["phone", "name"])
        for c in contacts:
            writer.writerow([c["destination"], c["variables"]["name"]])
    done = subprocess.run([sys.executable, "-m", "outreach.cli", "campaign", "create", str(path), "--name", "csv",
                           "--channel", "sms", "--template-body", "Hello {{name}}", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


async def test_sms_and_email_run_together_busy_disclaimer_and_all_delivered(stack, cli_env, tail, commands,
                                                                          tmp_path):
    contacts, invalid = with_invalid_rows(sms_contacts(SMS_SIZE))
    async with api_client(cli_env, cli_env["OUTREACH_API_TOKEN"]):
        pass  # the API answers
    imported = await asyncio.to_thread(create_from_csv_with_cli, cli_env, tmp_path / "contacts.csv", contacts)
    campaign = imported["campaign_id"]
    assert (imported["valid"], imported["invalid"]) == (SMS_SIZE - invalid, invalid)
    assert imported["invalid_reasons"]["duplicate_destination"]["count"] == 2
    assert imported["ready"] and imported["message_count"] == SMS_SIZE - invalid
    other_sms = await commands.create_ready_campaign("sms", sms_contacts(5, last_digit=0))
    email = await commands.create_ready_campaign("email", email_contacts(300))

    [refused] = await commands.send("RunCampaign", campaign, disclaimer={**ALL_TRUE, "consent": False})
    assert refused["reason"] == "disclaimer_not_accepted"
    assert tail.latest_status(campaign) == "ready"
    assert not [s for s in tail.statuses(campaign) if s["status"] == "queued"]

    started = await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
    assert started[0]["type"] == "CampaignRunStarted" and started[0]["message_count"] == SMS_SIZE - invalid
    email_started = await commands.send("RunCampaign", email, disclaimer=ALL_TRUE)
    assert email_started[0]["type"] == "CampaignRunStarted"  # one SMS and one email campaign run together
    [busy] = await commands.send("RunCampaign", other_sms, disclaimer=ALL_TRUE)
    assert busy["reason"] == "channel_busy"
    assert tail.latest_status(campaign) == "in_progress"

    final = await wait_final(tail, campaign)
    assert final["status"] == "complete"
    assert final["counts"]["delivered"] == SMS_SIZE - invalid == final["counts"]["total"]
    email_final = await wait_final(tail, email)
    assert email_final["status"] == "complete" and email_final["counts"]["delivered"] == 300
    histories = message_histories(tail.statuses(campaign))
    assert len(histories) == SMS_SIZE - invalid
    for history in histories.values():
        assert [h["status"] for h in history] == ["waiting", "queued", "sending", "sent", "delivered"]
        MessageStatusChanged.model_validate(history[-1])
    for event in tail.campaign_events(campaign):
        CAMPAIGN_EVENT_ADAPTER.validate_python(event)


async def test_stop_mid_run_cancels_only_queued(stack, tail, commands):
    campaign = await commands.create_ready_campaign("sms", sms_contacts(SMS_SIZE, last_digit=0))
    await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
    await async_wait_until(lambda: sum(s["status"] == "sending" for s in tail.statuses(campaign)) >= 50, 30,
                           message="sending never started")
    stopped = await commands.send("StopCampaign", campaign, confirmed=True)
    assert stopped[0]["type"] == "CampaignStopped"
    cancelled_count = stopped[0]["cancelled_count"]
    assert 0 < cancelled_count < SMS_SIZE
    final = await wait_final(tail, campaign)
    assert final["stopped"] is True and final["status"] == "complete"
    histories = message_histories(tail.statuses(campaign))
    cancelled = [h for h in histories.values() if h[-1]["status"] == "cancelled"]
    claimed = [h for h in histories.values() if any(s["status"] == "sending" for s in h)]
    assert len(cancelled) == cancelled_count
    assert all(h[-1]["previous_status"] == "queued" for h in cancelled)  # only Queued ones were cancelled
    assert all(h[-1]["status"] == "delivered" for h in claimed)  # claimed ones carried on to a final state
    assert len(claimed) + len(cancelled) == SMS_SIZE


async def test_a_command_published_three_times_has_one_effect(stack, tail, commands):
    campaign_id = str(uuid.uuid4())
    value = command("CreateCampaign", campaign_id, name="thrice", channel="sms", template={"body": "x"})
    for _ in range(3):
        await commands.publish(value)
    await async_wait_until(lambda: len(tail.answers(value["command_id"])) >= 3, 15,
                           message="each copy is answered")
    answers = tail.answers(value["command_id"])
    assert len(answers) == 3 and len({a["event_id"] for a in answers}) == 1
    assert len([e for e in tail.campaign_events(campaign_id) if e["type"] == "CampaignCreated"]) == 1


async def test_malformed_records_go_to_dlq_or_get_rejected(stack, tail, commands):
    campaign = await commands.create_ready_campaign("sms", sms_contacts(3))
    before = tail.campaign_events(campaign)
    fresh = lambda: str(uuid.uuid4())
    to_dlq: list[bytes] = []
    to_dlq += [b"{not json" + str(i).encode() for i in range(30)]
    to_dlq += [b"\xff\xfe" + bytes([i]) for i in range(10)]
    to_dlq += [jsoncodec.dumps(v) for v in ([1, 2], "string", 42, None, True)] * 4
    to_dlq += [jsoncodec.dumps({"type": "RunCampaign", "command_id": fresh(), "campaign_id": bad})
               for bad in ("", "not-a-uuid", campaign.upper(), 12, None)] * 4
    to_dlq += [jsoncodec.dumps({"type": "RunCampaign", "command_id": bad, "campaign_id": campaign})
               for bad in ("x", fresh().upper(), 5, None, "{" + fresh() + "}")] * 4
    to_dlq += [jsoncodec.dumps({"type": t, "command_id": fresh(), "campaign_id": campaign})
               for t in (None, 1, ["RunCampaign"], {"a": 1}, True)] * 2
    to_reject: list[tuple[dict, str]] = []
    to_reject += [(command("LaunchRockets", campaign), "invalid_command") for _ in range(20)]
    to_reject += [(command("StopCampaign", campaign, confirmed=v), "invalid_command")
                  for v in ("yes", 1, "true", 0, None) for _ in range(4)]
    to_reject += [(command("RunCampaign", campaign, disclaimer={**ALL_TRUE, "consent": v}), "invalid_command")
                  for v in ("yes", 1, "true", 0, []) for _ in range(4)]
    to_reject += [(command("AddContacts", campaign, chunk_no=v, contacts=[], last_chunk=True), "invalid_command")
                  for v in ("3", 1.5, None, -1, True) for _ in range(2)]
    to_reject += [(command("RetryFailedMessages", campaign, message_ids=["nope"]), "invalid_command") for _ in range(5)]
    no_principal = [command("StopCampaign", campaign, confirmed=True) for _ in range(5)]
    for value in no_principal:
        del value["issued_by"]
    to_reject += [(v, "invalid_command") for v in no_principal]
    to_reject += [(command("CreateCampaign", fresh(), name="x", template={"body": "x"}), "invalid_command")
                  for _ in range(5)]  # no channel
    big_contacts = [{"row": i + 1, "destination": f"+1202555{i:04d}", "variables": {"pad": "x" * 1000}}
                    for i in range(950)]
    to_reject += [(command("AddContacts", campaign, chunk_no=1, contacts=big_contacts[:1000], last_chunk=True),
                   "invalid_command") for _ in range(3)]
    to_reject += [(command("UpdateTemplate", campaign, template={"body": "y" * 1_060_000}), "invalid_command")
                  for _ in range(2)]
    assert len(to_dlq) + len(to_reject) == 200
    for raw in to_dlq:
        await commands.publish(raw, key=campaign)
    for value, _ in to_reject:
        await commands.publish(value)
    valid = await commands.send("UpdateTemplate", campaign, template={"body": "still served"})
    assert valid[0]["type"] == "TemplateUpdated"  # the handler kept serving
    for value, reason in to_reject:
        answers = await commands.answer(value["command_id"])
        assert [(a["type"], a["reason"]) for a in answers] == [("CommandRejected", reason)], answers
    await async_wait_until(lambda: len(tail.values(topics.COMMANDS_DLQ)) >= len(to_dlq), 15,
                           message="every unanswerable record reaches the DLQ")
    dlq = tail.records[topics.COMMANDS_DLQ]
    assert all(dict(r.headers).get("x-error") for r, _ in dlq)
    after = tail.campaign_events(campaign)
    changed = [e for e in after if e not in before and e["type"] not in ("CommandRejected", "TemplateUpdated")]
    assert changed == []  # no campaign changed
    assert tail.latest_status(campaign) == "ready"


def assigned_command_partitions(log_path) -> set[int]:
    """The outreach.commands partitions a handler process was last assigned (from aiokafka's log line)."""
    lines = [line for line in log_path.read_text().splitlines() if "Setting newly assigned partitions" in line]
    if not lines:
        return set()
    return {int(p) for p in re.findall(r"topic='outreach\.commands', partition=(\d+)", lines[-1])}


def _partition(key: str, count: int) -> int:
    return DefaultPartitioner()(key.encode(), list(range(count)), list(range(count)))


async def test_two_handlers_racing_runs_exactly_one_wins(stack, tail, commands, settings):
    """Two command-handler processes; Runs for two Ready SMS campaigns on different partitions published at once.
    The sender is paused so the winner keeps its channel until we stop it."""
    stack.kill("sender")
    second = stack.start_service("command-handler", instance=1)
    try:
        handlers = stack.processes["command-handler"]
        await async_wait_until(lambda: all(assigned_command_partitions(h.log_path) for h in handlers)
                               and not set.intersection(*(assigned_command_partitions(h.log_path) for h in handlers)),
                               30, message="the two handlers never shared the command partitions")
        first_handler, second_handler = (assigned_command_partitions(h.log_path) for h in handlers)
        partitions = settings.partitions
        for round_no in range(10):  # each round a real race between the two processes
            ready = []
            while len(ready) < 2:
                candidate = await commands.create_ready_campaign("sms", sms_contacts(2, start_row=2))
                # One campaign handled by each process.
                wanted = first_handler if not ready else second_handler
                if _partition(candidate, partitions) in wanted:
                    ready.append(candidate)
            runs = [command("RunCampaign", c, disclaimer=ALL_TRUE) for c in ready]
            await asyncio.gather(*(commands.producer.send(topics.COMMANDS, jsoncodec.dumps(r), key=r["campaign_id"].encode())
                                   for r in runs))
            await commands.producer.flush()
            answers = [(await commands.answer(r["command_id"]))[0] for r in runs]
            outcomes = sorted(a["type"] if a["type"] != "CommandRejected" else a["reason"] for a in answers)
            assert outcomes == ["CampaignRunStarted", "channel_busy"], (round_no, answers)
            winner = ready[[a["type"] for a in answers].index("CampaignRunStarted")]
            stopped = await commands.send("StopCampaign", winner, confirmed=True)
            assert stopped[0]["type"] == "CampaignStopped"
    finally:
        second.kill()
        stack.start_service("sender")


async def test_relay_killed_mid_campaign_loses_and_reorders_nothing(stack, tail, commands, env):
    campaign = await commands.create_ready_campaign("sms", sms_contacts(SMS_SIZE, last_digit=0))
    await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE)
    await async_wait_until(lambda: sum(s["status"] == "delivered" for s in tail.statuses(campaign)) >= SMS_SIZE // 5,
                           60, message="no progress")
    stack.kill("relay")
    await asyncio.sleep(0.5)  # a real gap: work goes on in the handler and sender while the relay is down
    stack.start_service("relay")
    final = await wait_final(tail, campaign, timeout_s=120)
    assert final["status"] == "complete" and final["counts"]["delivered"] == SMS_SIZE
    histories = message_histories(tail.statuses(campaign))
    assert len(histories) == SMS_SIZE
    for history in histories.values():
        assert [h["status"] for h in history] == ["waiting", "queued", "sending", "sent", "delivered"]
        assert [h["sequence"] for h in history] == sorted(h["sequence"] for h in history)
    journal = sqlite3.connect(os.path.join(env["OUTREACH_DATA_DIR"], "sender-journal.db"))
    sent_per_message = Counter(mid for (mid,) in journal.execute(
        "SELECT message_id FROM handoffs WHERE campaign_id = ?", (campaign,)))
    assert len(sent_per_message) == SMS_SIZE and set(sent_per_message.values()) == {1}  # none sent twice
