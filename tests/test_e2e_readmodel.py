"""The read model end to end, on PostgreSQL (OUTREACH_READ_MODEL_URL): a campaign of a few thousand SMS
through the real Twilio adapter and the HTTP simulator, during which the projections are SIGKILLed and
restarted twice and the relay's checkpoint is rewound (it republishes part of the stream). When the campaign
is final the live read model equals a replay from the event store (and one from the Kafka topics), row for
row; `--as-of` during the run and after it gives the states the status stream said held at those times.

The broker is the session's, which other modules share: comparisons are restricted to this stack's campaigns
(the live model also holds what other modules published before).
"""
from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from typer.testing import CliRunner

from outreach.cli import app as cli
from outreach.replay import compare_dumps, run_replay
from outreach.up import Stack
from schemas import topics
from schemas.times import rfc3339
from services.common.settings import Settings
from services.projections.projector import ReadModel
from tests.conftest import async_wait_until, fresh_postgres_database
from tests.e2e_stack import stack_environment
from tests.e2e_support import ALL_TRUE, Commands, Tail, sms_contacts

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

SIZE = max(int(os.environ.get("OUTREACH_E2E_SMS_SIZE", "1000")) * 3, 1000)  # default 3,000
FINAL_MESSAGE = {"delivered", "assumed_delivered", "failed", "opted_out", "cancelled"}
runner = CliRunner()


def contacts(n: int) -> list[dict]:
    """Mostly deliverable numbers, plus a tenth each of undelivered (30003), carrier-rejected (30007) and
    503-twice-then-delivered (attempt 3) ones from the simulator's fictional range."""
    special = n // 10
    out = []
    for digit in (2, 3, 4):
        out += sms_contacts(special, start_row=2 + len(out), last_digit=digit)
    rest = n - len(out)
    out += [{"row": 2 + len(out) + i, "destination": f"+1{200 + i % 800}{630 + i // 800:03d}{i % 10000:04d}",
             "variables": {"name": f"P{i}", "city": "Oslo"}} for i in range(rest)]
    return out


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("readmodel-data"),
                             OUTREACH_READ_MODEL_URL=fresh_postgres_database("outreach_e2e_rm"),
                             OUTREACH_SMS_RATE="300")




@pytest.fixture(scope="module")
def live(env):
    with ReadModel(env["OUTREACH_READ_MODEL_URL"]) as model:
        yield model


def latest_by_message(statuses: list[dict], until: str | None = None) -> dict[str, dict]:
    """What the status stream says each message's state was at `until` (its highest sequence by then)."""
    latest: dict[str, dict] = {}
    for r in statuses:
        if until is not None and r["occurred_at"] > until:
            continue
        if r["sequence"] > latest.get(r["message_id"], {"sequence": -1})["sequence"]:
            latest[r["message_id"]] = r
    return latest


def state_of(record: dict) -> tuple:
    return (record["status"], record["reason"], record["provider_code"], record["attempt"], record["run_no"])


def expected_view(tail: Tail, campaign: str, until: str) -> tuple[str | None, dict[str, tuple]]:
    changes = [e for e in tail.campaign_events(campaign)
               if e["type"] == "CampaignStatusChanged" and e["occurred_at"] <= until]
    messages = latest_by_message(tail.statuses(campaign), until)
    return (changes[-1]["status"] if changes else None), {m: state_of(r) for m, r in messages.items()}


def cli_as_of(env: dict[str, str], campaign: str, until: str) -> dict:
    result = runner.invoke(cli, ["campaign", "events", campaign, "--as-of", until, "--json"],
                           env={"OUTREACH_READ_MODEL_URL": env["OUTREACH_READ_MODEL_URL"]})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def seen_view(view: dict) -> tuple[str, dict[str, tuple]]:
    return view["campaign"]["status"], {m["message_id"]: state_of(m) for m in view["messages"]}


def final_count(tail: Tail, campaign: str) -> int:
    return sum(r["status"] in FINAL_MESSAGE for r in latest_by_message(tail.statuses(campaign)).values())


def rewind_relay(env: dict[str, str], stack: Stack) -> int:
    """SIGKILL the relay, move its checkpoint back by half, start it: it republishes that half."""
    stack.kill("relay")
    with psycopg.connect(env["OUTREACH_POSTGRES_DSN"], autocommit=True) as db:
        [(position,)] = db.execute("SELECT position FROM outreach_relay_checkpoint WHERE name = 'relay'").fetchall()
        db.execute("UPDATE outreach_relay_checkpoint SET position = %s WHERE name = 'relay'", (position // 2,))
    stack.start_service("relay")
    return position


def only_campaigns(dump, campaign_ids: set[str]):
    """A canonical dump restricted to some campaigns (the campaign id is each table's first or later column)."""
    at = {"campaigns": 0, "campaign_events": 1, "messages": 1, "message_events": 2}
    return ((table, row) for table, row in dump if row[at[table]] in campaign_ids)


async def test_read_model_survives_kills_and_republishing_and_equals_a_replay(stack, env, live, tmp_path):
    settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    tail = await Tail(settings, topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS).start()
    commands = await Commands(settings, tail).start()
    try:
        campaign = await commands.create_ready_campaign("sms", contacts(SIZE), name="audited")
        await commands.send("RunCampaign", campaign, disclaimer=ALL_TRUE, timeout_s=30)

        async def progressed(fraction: float) -> None:
            await async_wait_until(lambda: final_count(tail, campaign) >= fraction * SIZE, 120, interval_s=0.25,
                                   message=f"fewer than {fraction:.0%} of the messages final")

        await progressed(0.15)
        stack.restart("projections")  # SIGKILL at whatever point it was, then a new process

        # --as-of during the run: a moment a few seconds back, once the stream and the read model have both
        # caught up with it (they converge while the run goes on).
        await progressed(0.35)
        during = rfc3339(datetime.now(timezone.utc) - timedelta(seconds=1))
        await asyncio.sleep(0)

        async def as_of_matches_stream() -> bool:
            view = await asyncio.to_thread(cli_as_of, env, campaign, during)
            return seen_view(view) == expected_view(tail, campaign, during)

        await async_wait_until(as_of_matches_stream, 60, interval_s=0.5,
                               message="--as-of during the run never matched the status stream")
        assert final_count(tail, campaign) < SIZE, "the run ended before --as-of was checked during it"

        await progressed(0.5)
        stack.restart("projections")
        await progressed(0.65)
        position = rewind_relay(env, stack)
        assert position > 0

        await async_wait_until(lambda: tail.latest_status(campaign) in ("complete", "complete_with_errors")
                               and final_count(tail, campaign) == SIZE, 180, interval_s=0.5,
                               message=f"campaign did not finish: {tail.latest_status(campaign)}")
        republished = Counter(r["event_id"] for r in tail.statuses(campaign))
        assert max(republished.values()) > 1, "the relay republished nothing"
        final = {m: state_of(r) for m, r in latest_by_message(tail.statuses(campaign)).items()}
        outcome = Counter(s[0] for s in final.values())
        assert outcome["failed"] == 2 * (SIZE // 10) and outcome["delivered"] == SIZE - 2 * (SIZE // 10)

        # The live read model catches up with the stream...
        def caught_up() -> bool:
            c = live.campaign(campaign)
            return c is not None and c["status"] == tail.latest_status(campaign) \
                and c["counts"]["delivered"] == outcome["delivered"] and c["counts"]["failed"] == outcome["failed"]
        await async_wait_until(caught_up, 60, interval_s=0.5, message="the live read model did not catch up")
        assert {m["message_id"]: state_of(m) for m in live.messages(campaign)} == final
        m = live.messages(campaign, search="P7", limit=1)[0]
        assert m["destination"] and m["variables"]["name"] == "P7" and m["created_at"] < m["updated_at"]

        # ...and equals a replay from the event store, row for row.
        replayed = await asyncio.to_thread(run_replay, Settings(**_stack_settings(env)),
                                           into=str(tmp_path / "rebuilt.db"))
        assert replayed.records_per_s > 0
        with ReadModel(tmp_path / "rebuilt.db") as rebuilt:
            ours = {c["campaign_id"] for c in rebuilt.campaigns()}  # this stack's event store: one campaign
            assert ours == {campaign}

            def identical() -> bool:
                comparison = compare_dumps(only_campaigns(rebuilt.canonical_dump(), ours),
                                           only_campaigns(live.canonical_dump(), ours))
                differences.append(comparison.differences)
                return comparison.identical
            differences: list[list[str]] = []
            try:
                await async_wait_until(lambda: asyncio.to_thread(identical), 60, interval_s=1)
            except AssertionError:
                pytest.fail(f"the live read model differs from the replay: {differences[-1]}")
            assert rebuilt.row_counts()["message_events"] == len(set(republished))

        # The topics read from the beginning (republished records included) give the same rows too.
        from_kafka = await asyncio.to_thread(run_replay, Settings(**_stack_settings(env)), source="kafka",
                                             into=str(tmp_path / "from-kafka.db"))
        assert from_kafka.stored_events >= sum(republished.values())
        with ReadModel(tmp_path / "from-kafka.db") as rebuilt:
            comparison = compare_dumps(only_campaigns(rebuilt.canonical_dump(), ours),
                                       only_campaigns(live.canonical_dump(), ours))
            assert comparison.identical, comparison.differences

        # --as-of after the run, for the moment during it and for now: what the stream says.
        after = rfc3339(datetime.now(timezone.utc))
        for moment in (during, after):
            assert seen_view(await asyncio.to_thread(cli_as_of, env, campaign, moment)) == \
                expected_view(tail, campaign, moment)
        [ready_at] = [e["occurred_at"] for e in tail.campaign_events(campaign)
                      if e["type"] == "CampaignStatusChanged" and e["status"] == "ready"]
        status_before, messages_before = seen_view(live.as_of(campaign, ready_at))
        assert status_before == "ready" and set(s[0] for s in messages_before.values()) == {"waiting"}
    finally:
        await commands.stop()
        await tail.stop()


def _stack_settings(env: dict[str, str]) -> dict:
    return {"event_store": env["OUTREACH_EVENT_STORE"], "postgres_dsn": env["OUTREACH_POSTGRES_DSN"],
            "data_dir": env["OUTREACH_DATA_DIR"], "kafka_bootstrap_servers": env["KAFKA_BOOTSTRAP_SERVERS"]}
