"""Several instances of every service that scales, under kills (issue 11's acceptance test): command handler,
relay with its standby, sender, timeout sweeper, projections, webhook receiver and HTTP API (two processes
on one port each); the simulator runs once.

On the PostgreSQL stores (events, fence, timers, read model): an SMS campaign and an email campaign of
2,500 messages each, and a third (email) campaign stopped mid-run, while a random instance of a scaled
service (the active relay among them) is SIGKILLed and restarted every few seconds, slower than the 2 s
group session. From the simulator's submission log and the status stream: nothing accepted twice, nothing
submitted after its cancellation, every message final; the read model equals a replay of the event store;
the relay's standby took over.
"""
from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import pytest

from outreach.replay import compare_dumps, run_replay
from outreach.up import SERVICES
from schemas import topics
from services.common.settings import Settings
from services.projections.projector import ReadModel
from tests.conftest import async_wait_until, fresh_postgres_database
from tests.e2e_stack import simulator_submissions, stack_environment
from tests.e2e_support import ALL_TRUE, occurred_at

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

SIZE = 2500
SCALED = ("command-handler", "relay", "sender", "timeout-sweeper", "projections", "webhooks", "api")
STACK_SERVICES = tuple(SERVICES)  # the HTTP API too: two of it, killed in turn like the others
TAIL_TOPICS = (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS, topics.COMMANDS_DLQ)
KILLS = 10  # at most: the killing stops once the campaigns are final and every service was killed


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(
        stack_bootstrap, tmp_path_factory.mktemp("scale-out-data"),
        OUTREACH_READ_MODEL_URL=fresh_postgres_database("outreach_e2e_rm"),
        OUTREACH_SENDING_TIMEOUT_S="8", OUTREACH_SENT_TIMEOUT_S="3",
        OUTREACH_SMS_RATE="100", OUTREACH_EMAIL_RATE="100", OUTREACH_EMAIL_BATCH="50",
    )


def sms_contacts(n: int) -> list[dict]:
    contacts = []
    for i in range(n):
        if i % 50 == 0:  # accepted, no receipt: the sweeper's Sent timer ends it assumed_delivered
            destination = f"+1{300 + i // 50}5550101"
        else:
            destination = f"+1{200 + i % 700}{670 + i // 700:03d}{i % 10000:04d}"
        contacts.append({"row": i + 2, "destination": destination, "variables": {"name": f"P{i}"}})
    return contacts


def email_contacts(n: int, tag: str) -> list[dict]:
    return [{"row": i + 2, "destination": f"success+{tag}{i}@simulator.amazonses.com", "variables": {"name": f"E{i}"}}
            for i in range(n)]


def active_relay(log_dir: Path) -> int | None:
    """The relay instance whose log last said it became active (None if none did yet)."""
    latest: tuple[str, int] | None = None
    for instance, name in enumerate(("relay.log", "relay-1.log")):
        path = log_dir / name
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if "active: this relay holds the lock" in line and (latest is None or line[:23] > latest[0]):
                latest = (line[:23], instance)
    return latest[1] if latest else None


def takeovers(log_dir: Path) -> int:
    return sum(path.read_text(errors="replace").count("active: this relay holds the lock")
               for path in log_dir.glob("relay*.log"))


async def kill_now_and_then(stack, stop: asyncio.Event, kills: list[tuple[str, int]]) -> None:
    """SIGKILL an instance of a scaled service every 3-5 s and start it again, each service in turn (a random
    instance of it); the second kill is the active relay's."""
    rng = random.Random(11)
    # Every scaled service once before any twice: the first five kills reach all of them.
    plan = iter([service for _ in range(KILLS) for service in rng.sample(SCALED, len(SCALED))])
    while not stop.is_set() and len(kills) < KILLS:
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(3.0, 5.0))
            return
        except TimeoutError:
            pass
        if len(kills) == 1 and (relay := active_relay(stack.log_dir)) is not None:
            service, instance = "relay", relay  # besides the plan
        else:
            service, instance = next(plan), rng.randrange(2)
        stack.kill(service, instance)
        kills.append((service, instance))
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        stack.start_service(service, instance)


async def test_two_of_every_scaled_service_under_kills_lose_nothing_and_send_nothing_twice(
        stack, env, tail, commands, tmp_path):
    for service in SCALED:
        stack.start_service(service, 1)
    sms = await commands.create_ready_campaign("sms", sms_contacts(SIZE))
    third = await commands.create_ready_campaign("email", email_contacts(SIZE, "t"))
    email = await commands.create_ready_campaign("email", email_contacts(SIZE, "e"))
    await commands.send("RunCampaign", sms, disclaimer=ALL_TRUE, timeout_s=30)
    await commands.send("RunCampaign", third, disclaimer=ALL_TRUE, timeout_s=30)

    stop_killing, kills = asyncio.Event(), []
    killer = asyncio.create_task(kill_now_and_then(stack, stop_killing, kills))
    try:
        await async_wait_until(lambda: sum(r["status"] == "delivered" for r in tail.statuses(third)) >= 100, 60,
                               interval_s=0.25, message="the third campaign sent nothing")
        [stopped] = [e for e in await commands.send("StopCampaign", third, confirmed=True, timeout_s=30)
                     if e["type"] == "CampaignStopped"]
        assert stopped["cancelled_count"] > 0
        await async_wait_until(lambda: tail.all_final(third, SIZE), 120, interval_s=1.0,
                               message="the stopped campaign's messages did not all end")
        await commands.send("RunCampaign", email, disclaimer=ALL_TRUE, timeout_s=30)  # the email channel is free
        await async_wait_until(lambda: tail.all_final(sms, SIZE) and tail.all_final(email, SIZE), 240,
                               interval_s=1.0, message="not every message became final")
        # Every scaled service killed at least once, also if the campaigns were quicker than the plan.
        await async_wait_until(lambda: {service for service, _ in kills} >= set(SCALED), 60, interval_s=0.5,
                               message=f"the kills stopped short: {kills}")
    finally:
        stop_killing.set()
        await killer
    for service in SCALED:  # the last kill may have left one down for a moment
        for instance in (0, 1):
            if not stack.processes[service][instance].running:
                stack.start_service(service, instance)
    print(f"kills: {Counter(service for service, _ in kills)}; relay takeovers {takeovers(stack.log_dir)}")
    assert {service for service, _ in kills} == set(SCALED), kills  # each scaled service killed at least once

    log = await simulator_submissions(env)
    accepted_twice = [mid for mid, entries in log.items() if sum(e["outcome"] == "accepted" for e in entries) > 1]
    assert not accepted_twice, f"{len(accepted_twice)} messages accepted twice"
    cancelled = {mid: occurred_at(r) for mid, r in tail.latest_per_message(third).items() if r["status"] == "cancelled"}
    after_cancel = [mid for mid, at in cancelled.items() if any(e["at"] > at for e in log.get(mid, []))]
    assert not after_cancel, after_cancel[:5]
    outcomes = {campaign: Counter(r["status"] for r in tail.latest_per_message(campaign).values())
                for campaign in (sms, email, third)}
    print("outcomes", outcomes)
    assert set(outcomes[sms]) <= {"delivered", "assumed_delivered", "failed"}
    assert outcomes[sms]["assumed_delivered"] >= SIZE // 50  # the sweepers' Sent timers all fired
    assert set(outcomes[third]) <= {"delivered", "cancelled", "failed"}
    assert tail.values(topics.COMMANDS_DLQ) == []
    assert takeovers(stack.log_dir) >= 2, "the relay's standby never took over"

    # The read model (two projections instances, one killed now and then) equals a replay of the event store.
    settings = Settings(event_store="postgres", postgres_dsn=env["OUTREACH_POSTGRES_DSN"],
                        data_dir=env["OUTREACH_DATA_DIR"], kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    await asyncio.to_thread(run_replay, settings, into=str(tmp_path / "rebuilt.db"))
    with ReadModel(tmp_path / "rebuilt.db") as rebuilt, ReadModel(env["OUTREACH_READ_MODEL_URL"]) as live:
        differences: list = []

        def identical() -> bool:
            comparison = compare_dumps(rebuilt.canonical_dump(), live.canonical_dump())
            differences.append(comparison.differences)
            return comparison.identical

        try:
            await async_wait_until(lambda: asyncio.to_thread(identical), 60, interval_s=1)
        except AssertionError:
            pytest.fail(f"the live read model differs from the replay: {differences[-1][:5]}")
