"""Replay from the event store and from Kafka, canonical comparison, and the audit CLI (no services running).

The command handler's application is driven directly (tests/handler_driver.py) so the event store holds a
real campaign; the "live" read model gets the same records as the relay would publish them: at least once,
in random batches, some twice, out of order across messages.
"""
from __future__ import annotations

import json
import random
import uuid

import pytest
from typer.testing import CliRunner

from outreach.cli import app as cli
from outreach.replay import ReplayError, compare_dumps, open_fresh, replay_kafka, run_replay
from schemas import topics
from services.common import ids, jsoncodec
from services.common.kafka import ensure_topics, make_producer
from services.common.settings import Settings, get_settings
from services.command_handler.application import OutreachApp
from services.projections.projector import ReadModel
from tests.conftest import fresh_postgres_database
from tests.handler_driver import Driver, sender_result

ALL_TRUE = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}
runner = CliRunner()


def contacts(rows, start):
    return [{"row": start + i, "destination": f"+1202555{start + i:04d}", "variables": {"name": f"P{start + i}"}}
            for i in range(rows)]


def run_campaign(d: Driver, app: OutreachApp) -> str:
    """A campaign through created, ready (two chunks), run, claims, deliveries, refusals, pre-send errors, stop,
    a retry of the cancelled, and a repeated command; plus a rejection of an unknown campaign."""
    cid = str(uuid.uuid4())
    create = str(uuid.uuid4())
    d.send("CreateCampaign", cid, command_id=create, name="Replayed", channel="sms", template={"body": "Hi {{name}}"})
    d.send("CreateCampaign", cid, command_id=create, name="Replayed", channel="sms",
           template={"body": "Hi {{name}}"})  # repeated: its stored answer is published again, same event ids
    d.send("AddContacts", cid, chunk_no=0, contacts=contacts(30, 2), last_chunk=False)
    d.send("AddContacts", cid, chunk_no=1, contacts=contacts(20, 32), last_chunk=True)
    d.send("RunCampaign", cid, disclaimer=ALL_TRUE)
    d.new_records()
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=35)
    items = [i for r in d.new_records() if r["topic"] == topics.SENDER_WORK for i in r["value"]["items"]]
    results = []
    for n, item in enumerate(items):
        mid = item["message_id"]
        if n % 7 == 0:
            results.append(sender_result(mid, "refused", 1, "21211"))
        elif n % 7 == 1:
            results += [sender_result(mid, "presend_error", 1, "503"),
                        *(sender_result(mid, o, 2) for o in ("accepted", "sent", "delivered"))]
        else:
            results += [sender_result(mid, o, 1) for o in ("accepted", "sent", "delivered")]
    app.apply_results(result_id=str(uuid.uuid4()), campaign_id=cid, results=results)
    d.send("StopCampaign", cid, confirmed=True)
    d.send("RetryFailedMessages", cid, include_cancelled=True)
    app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=100)
    items = [i for r in d.new_records() if r["topic"] == topics.SENDER_WORK for i in r["value"]["items"]]
    app.apply_results(result_id=str(uuid.uuid4()), campaign_id=cid, results=[
        sender_result(i["message_id"], o, i["attempt"] + 1) for i in items for o in ("accepted", "sent", "delivered")])
    d.send("RunCampaign", str(uuid.uuid4()), disclaimer=ALL_TRUE)  # unknown campaign: a sequence-0 rejection
    return cid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An event store holding a finished campaign, and every public record the relay would publish from it."""
    directory = tmp_path_factory.mktemp("replay")
    env = {"OUTREACH_EVENT_STORE": "sqlite", "OUTREACH_SQLITE_PATH": str(directory / "events.db"),
           "OUTREACH_DATA_DIR": str(directory)}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        app = OutreachApp(get_settings())
        d = Driver(app)
        cid = run_campaign(d, app)
        d.position = 0
        records = [r for r in d.new_records() if r["topic"] in (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS)]
        app.close()
    return {"env": env, "dir": directory, "campaign_id": cid, "records": records}


@pytest.fixture
def env(store, monkeypatch):
    for key, value in store["env"].items():
        monkeypatch.setenv(key, value)
    return get_settings()


def feed_at_least_once(model: ReadModel, records: list[dict], seed: int) -> None:
    rng = random.Random(seed)
    values = [(r["topic"], r["value"]) for r in records]
    values += rng.sample(values, len(values) // 4)  # redelivered
    rng.shuffle(values)
    while values:
        n = rng.randint(1, 40)
        batch, values = values[:n], values[n:]
        model.apply(batch)


def test_replay_from_the_event_store_equals_a_live_model_fed_at_least_once(store, env, tmp_path):
    cid = store["campaign_id"]
    with ReadModel(tmp_path / "live.db") as live:
        feed_at_least_once(live, store["records"], seed=11)
        result = run_replay(env, into=str(tmp_path / "rebuilt.db"), compare_with=live)
        assert result.comparison.identical, result.comparison.differences
        assert result.records == len(store["records"])  # the repeated answer included: deduped by event id
        assert result.rows["messages"] == 50 and result.rows["campaigns"] == 1
        with ReadModel(tmp_path / "rebuilt.db") as rebuilt:
            campaign = rebuilt.campaign(cid)
            assert campaign["status"] == "complete" and campaign["stopped"] and campaign["run_no"] == 2
            message = rebuilt.message(ids.message_id(cid, 40))
            assert (message["destination"], message["variables"]) == ("+12025550040", {"name": "P40"})

        # One more record in the live model (a late receipt it saw, say) is found and described.
        late = next(r["value"] for r in store["records"] if r["topic"] == topics.MESSAGE_STATUS
                    and r["value"]["status"] == "delivered")
        live.apply_batch([], [{**late, "event_id": str(uuid.uuid4()), "sequence": late["sequence"] + 1,
                               "status": "assumed_delivered", "previous_status": "delivered"}])
        with ReadModel(tmp_path / "rebuilt.db") as rebuilt:
            comparison = compare_dumps(rebuilt.canonical_dump(), live.canonical_dump())
        assert not comparison.identical and comparison.different_rows == 2  # the message row, its new record
        assert any("only in the live read model" in d for d in comparison.differences)
        assert any(late["message_id"] in d and "assumed_delivered" in d for d in comparison.differences)


def test_replay_into_postgresql_compares_equal_with_sqlite(store, env, tmp_path, postgres_dsn):
    with ReadModel(tmp_path / "live.db") as live:
        live.apply((r["topic"], r["value"]) for r in store["records"])
        target = fresh_postgres_database("outreach_replay")
        result = run_replay(env, into=target, compare_with=live)
        assert result.comparison.identical, result.comparison.differences
        with pytest.raises(ReplayError, match="not empty"):
            open_fresh(target)


def test_replay_command(store, env, tmp_path, monkeypatch):
    live_path = tmp_path / "live.db"
    with ReadModel(live_path) as live:
        feed_at_least_once(live, store["records"], seed=5)
    monkeypatch.setenv("OUTREACH_READ_MODEL_URL", f"sqlite:///{live_path}")
    result = runner.invoke(cli, ["replay", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["identical"] is True and report["records"] == len(store["records"])
    assert report["records_per_s"] > 0 and report["into"].startswith(str(store["dir"]))

    text = runner.invoke(cli, ["replay", "--into", str(tmp_path / "text.db")])
    assert text.exit_code == 0 and "identical" in text.stdout and "records/s" in text.stdout
    assert runner.invoke(cli, ["replay", "--into", str(tmp_path / "text.db")]).exit_code == 2  # not fresh

    with ReadModel(live_path) as live:  # the live model loses a record: the replay tells
        live.apply_batch([], [])
        with live._backend.transaction() as s:
            s.run("DELETE FROM message_events WHERE row = 7 AND status = 'delivered'")
    differs = runner.invoke(cli, ["replay", "--into", str(tmp_path / "third.db")])
    assert differs.exit_code == 1 and "differs" in differs.stdout and "only in the replay" in differs.stdout


def test_campaign_events_command_shows_history_and_as_of(store, env, tmp_path, monkeypatch):
    cid = store["campaign_id"]
    live_path = tmp_path / "live.db"
    monkeypatch.setenv("OUTREACH_READ_MODEL_URL", str(live_path))
    with ReadModel(live_path) as live:
        feed_at_least_once(live, store["records"], seed=9)
        history = live.history(cid)
        campaign_events = live.events(cid)

    full = runner.invoke(cli, ["campaign", "events", cid, "--json"])
    assert full.exit_code == 0 and json.loads(full.stdout) == history
    statuses = [r["value"] for r in store["records"] if r["topic"] == topics.MESSAGE_STATUS]
    assert len(history) == len(campaign_events) + len(statuses)
    short = runner.invoke(cli, ["campaign", "events", cid, "--no-messages", "--json"])
    assert json.loads(short.stdout) == campaign_events

    text = runner.invoke(cli, ["campaign", "events", cid])
    assert text.exit_code == 0
    assert "disclaimer accepted: consent, content_compliance, opt_out, data_responsibility" in text.stdout
    assert "accepted by alice" in text.stdout and "stopped by alice" in text.stdout
    assert "sending -> failed (reason unknown, provider_code 21211, attempt 1, run_no 1)" in text.stdout \
        or "sending -> failed (reason invalid_destination, provider_code 21211, attempt 1, run_no 1)" in text.stdout

    # As of a moment in the middle of the stream: what the status records up to then say.
    times = sorted({s["occurred_at"] for s in statuses})
    moment = times[len(times) // 2]
    expected: dict[str, dict] = {}
    for s in statuses:
        if s["occurred_at"] <= moment and s["sequence"] > expected.get(s["message_id"], {}).get("sequence", -1):
            expected[s["message_id"]] = s
    as_of = runner.invoke(cli, ["campaign", "events", cid, "--as-of", moment, "--json"])
    assert as_of.exit_code == 0, as_of.output
    view = json.loads(as_of.stdout)
    assert {m["message_id"]: (m["status"], m["attempt"]) for m in view["messages"]} == \
        {mid: (s["status"], s["attempt"]) for mid, s in expected.items()}
    events_then = [e for e in campaign_events if e["occurred_at"] <= moment and e["type"] == "CampaignStatusChanged"]
    assert view["campaign"]["status"] == events_then[-1]["status"]
    assert sum(view["campaign"]["counts"].values()) == 2 * len(expected)

    table = runner.invoke(cli, ["campaign", "events", cid, "--as-of", moment])
    assert table.exit_code == 0 and f"as of {moment}" in table.stdout and "+12025550002" in table.stdout
    assert runner.invoke(cli, ["campaign", "events", cid, "--as-of", "yesterday"]).exit_code == 2
    assert runner.invoke(cli, ["campaign", "events", cid, "--as-of", "2024-05-01T12:00:00"]).exit_code == 2
    out_of_range = runner.invoke(cli, ["campaign", "events", cid, "--as-of", "0001-01-01T00:00:00+01:00"])
    assert out_of_range.exit_code == 2 and "out of range" in out_of_range.output
    before = runner.invoke(cli, ["campaign", "events", cid, "--as-of", "2000-01-01T00:00:00Z"])
    assert before.exit_code == 1


async def test_replay_from_kafka_reads_the_topics_from_the_beginning(store, tmp_path, kafka_bootstrap):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path)
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        for r in store["records"] + store["records"][:25]:  # some published twice, as a relay resend does
            await producer.send(r["topic"], jsoncodec.dumps(r["value"]), key=r["value"]["campaign_id"].encode()
                                if r["topic"] == topics.CAMPAIGN_EVENTS else r["value"]["message_id"].encode())
        await producer.send_and_wait(topics.MESSAGE_STATUS, b"{poison", key=b"x")
    finally:
        await producer.stop()
    cid = store["campaign_id"]
    with ReadModel(tmp_path / "from-kafka.db") as from_kafka, ReadModel(tmp_path / "expected.db") as expected:
        read, applied = await replay_kafka(settings, from_kafka)
        assert read >= len(store["records"]) + 26 and applied <= read
        expected.apply((r["topic"], r["value"]) for r in store["records"])
        assert from_kafka.campaign(cid) == expected.campaign(cid)
        assert from_kafka.history(cid) == expected.history(cid)
        assert from_kafka.messages(cid) == expected.messages(cid)
