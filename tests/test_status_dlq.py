"""`outreach status` and `outreach dlq`, their parts without a stack (issue 13, item 2): how an instance's state
is told from its record, the supervisor's and its answer; instances found by their heartbeats on the broker
(and shown without one); the numbers from metrics text; what a replay checks before publishing; and the
command handler naming the replaying operator on the events that answer a replayed command (both event
stores). The whole stack: tests/test_e2e_status_dlq.py."""
from __future__ import annotations

import io
import json
import os
import socket
import time
import uuid

import pytest
from rich.console import Console

from outreach import dlq
from outreach.status import _health, exit_code, gather, render, summarize
from schemas import topics
from schemas.events import CAMPAIGN_EVENT_ADAPTER
from services.command_handler.application import OutreachApp
from services.common import jsoncodec
from services.common.embedded_broker import free_port
from services.common.observability import Observability
from services.common.settings import Settings, get_settings
from tests.conftest import async_wait_until
from tests.handler_driver import Driver

NOW = 1_800_000_000.0
RECORD = {"service": "sender", "instance": "0", "pid": 4242, "url": "http://127.0.0.1:1", "started_at": NOW - 100,
          "heartbeat_at": NOW - 2}


# ------------------------------------------------------------------ status: an instance's state

def test_ready_alive_and_down_come_from_the_instance_s_answer():
    assert _health(RECORD, None, (200, '{"ready": true, "checks": {"broker": "ok"}}'), NOW).state == "ready"
    alive = _health(RECORD, None, (503, '{"ready": false, "checks": {"broker": "ok", "assigned": "failing"}}'), NOW)
    assert (alive.state, alive.detail) == ("alive", "not ready: assigned")
    down = _health({**RECORD, "heartbeat_at": NOW - 60}, None, (0, "ConnectError"), NOW)
    assert down.state == "down"
    assert "no answer at http://127.0.0.1:1" in down.detail and "last heartbeat 60 s ago" in down.detail
    assert down.heartbeat_age_s == 60


def test_the_supervisor_s_record_tells_restarting():
    waiting = {"service": "sender", "instance": 0, "pid": 4242, "state": "waiting to restart", "restarts": 2,
               "last_exit": -9, "last_exit_time": "2026-12-05T13:00:00+00:00", "crash_loop": False}
    health = _health(RECORD, waiting, (0, "ConnectError"), NOW)
    assert (health.state, health.restarts) == ("restarting", 2) and "exited (-9)" in health.detail
    # Started again (a live pid of its own) but its new record is not written yet: restarting, not down.
    started = {**waiting, "state": "running", "pid": os.getpid()}
    assert _health(RECORD, started, (0, "ConnectError"), NOW).state == "restarting"
    assert _health(None, started, None, NOW).state == "restarting"
    # Its new process recorded itself: judged by its answer again.
    assert _health({**RECORD, "pid": os.getpid()}, started, (200, "{}"), NOW).state == "ready"
    refused = _health(RECORD, {**waiting, "state": "configuration refused"}, (0, ""), NOW)
    assert refused.state == "down" and "refused its configuration" in refused.detail


async def test_a_stopped_supervisor_s_record_is_ignored_and_no_instance_is_unhealthy(tmp_path):
    report = await gather(tmp_path, timeout_s=0.5)
    assert report["instances"] == [] and exit_code(report) == 1
    (tmp_path / "instances").mkdir()
    (tmp_path / "instances" / "sender.json").write_text(json.dumps({**RECORD, "heartbeat_at": time.time()}))
    (tmp_path / "logs").mkdir()
    dead_supervisor = 2 ** 22 + 17  # above pid_max's default: no such process
    (tmp_path / "logs" / "supervision.json").write_text(json.dumps([
        {"service": "sender", "instance": 0, "pid": 1, "state": "waiting to restart", "supervisor_pid": dead_supervisor}]))
    report = await gather(tmp_path, timeout_s=0.5)
    assert not report["supervised"]
    [sender] = report["instances"]
    assert sender["state"] == "down" and exit_code(report) == 1  # nothing answers at port 1


# ------------------------------------------------------------------ status: heartbeats on the broker

def test_an_instance_known_from_the_broker_only_is_unreachable_while_it_beats_then_down():
    elsewhere = {**RECORD, "host": "sender-7f3a", "seen_in": ["broker"], "interval_s": 5.0}
    unreachable = _health(elsewhere, None, (0, "ConnectError"), NOW)
    assert (unreachable.state, unreachable.label) == ("unreachable", "sender@sender-7f3a")
    assert "OUTREACH_METRICS_ADVERTISED_URL" in unreachable.detail
    down = _health({**elsewhere, "heartbeat_at": NOW - 16}, None, (0, "ConnectError"), NOW)  # 3 beats missed
    assert down.state == "down" and "last heartbeat 16 s ago" in down.detail
    # Known from this data folder too: no answer is down at once, as before.
    assert _health({**elsewhere, "seen_in": ["broker", "file"]}, None, (0, "ConnectError"), NOW).state == "down"


async def test_instances_are_found_by_their_heartbeats_on_the_broker_and_forgotten_once_stopped(kafka_bootstrap,
                                                                                               tmp_path):
    """Two instances of one service, their files in a data folder status does not read: the broker's heartbeats
    are all it has. One stopped publishes its tombstone and is no longer listed."""
    broker = Settings(kafka_bootstrap_servers=kafka_bootstrap, deployment=f"beats-{uuid.uuid4().hex[:8]}",
                      heartbeat_interval_s=0.2, metrics_port=0)
    first = await Observability(broker.model_copy(update={"data_dir": tmp_path / "a"}), "sender").start()
    second = await Observability(broker.model_copy(update={"data_dir": tmp_path / "b", "instance_name": "1"}),
                                 "sender").start()
    empty = tmp_path / "status"
    try:
        async def both_ready() -> dict | None:
            report = await gather(empty, timeout_s=2, broker=broker)
            found = {i["label"]: (i["state"], i["seen_in"], i["url"]) for i in report["instances"]}
            return report if found == {"sender": ("ready", ["broker"], first.url),
                                       "sender-1": ("ready", ["broker"], second.url)} else None
        report = await async_wait_until(both_ready, 30, 0.2, message="the heartbeats never listed both senders")
        assert report["broker"]["reachable"] and report["broker"]["heartbeats"] == 2 and exit_code(report) == 0
        other_deployment = await gather(empty, timeout_s=2, broker=broker.model_copy(update={"deployment": "other"}))
        assert not any(i["service"] == "sender" and i["host"] == socket.gethostname() and i["pid"] == os.getpid()
                       for i in other_deployment["instances"])  # another deployment's heartbeats are not shown
        await second.stop()

        async def only_the_first() -> bool:
            report = await gather(empty, timeout_s=2, broker=broker)
            return [i["label"] for i in report["instances"]] == ["sender"]
        await async_wait_until(only_the_first, 30, 0.2, message="the stopped instance was still listed")
    finally:
        await first.stop()
        await second.stop()


async def test_without_a_broker_the_local_instances_are_shown_and_the_broker_named_unreachable(tmp_path):
    nowhere = Settings(data_dir=tmp_path, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", metrics_port=0,
                       heartbeat_interval_s=0.1)
    started = time.monotonic()
    async with Observability(nowhere, "projections") as local:  # no broker: it serves all the same
        report = await gather(tmp_path, timeout_s=2, broker=nowhere)
        assert [(i["label"], i["state"], i["seen_in"]) for i in report["instances"]] == [
            ("projections", "ready", ["file"])]
        assert report["broker"]["reachable"] is False and "no broker answers" in report["broker"]["error"]
        assert local.url and (tmp_path / "instances" / "projections.json").exists()
        screen = io.StringIO()
        render(report, Console(file=screen, width=200))
        assert f"unreachable (no broker answers at {nowhere.kafka_bootstrap_servers}): only the instances " \
               f"recorded in {tmp_path} are shown" in screen.getvalue()
    assert time.monotonic() - started < 5  # neither its start nor its stop waited for the broker


def test_the_advertised_address_names_the_host_when_listening_on_every_address():
    everywhere = Observability(Settings(metrics_host="0.0.0.0", metrics_port=9464), "relay")
    assert everywhere.advertised_url() == f"http://{socket.gethostname()}:9464"
    told = Observability(Settings(metrics_host="0.0.0.0", metrics_advertised_url="http://relay-2:9464/"), "relay")
    assert told.advertised_url() == "http://relay-2:9464"
    assert told.heartbeat_key() == f"relay@{socket.gethostname()}"


def test_the_numbers_come_from_the_metrics():
    relay = """
# TYPE outreach_consumer_lag_records gauge
outreach_consumer_lag_records{group="outreach-projections",partition="0",topic="outreach.message-status"} 5.0
outreach_consumer_lag_records{group="outreach-projections",partition="1",topic="outreach.message-status"} 2.0
outreach_consumer_lag_records{group="outreach-sender-work",partition="0",topic="outreach.internal.sender-work"} 0.0
# TYPE outreach_relay_lag_events gauge
outreach_relay_lag_events 3.0
# TYPE outreach_dlq_records gauge
outreach_dlq_records 1.0
"""
    standby = relay.replace("} 5.0", "} 7.0").replace("outreach_dlq_records 1.0", "outreach_dlq_records 0.0")
    sender = '# TYPE outreach_breaker_state gauge\noutreach_breaker_state{provider="twilio"} 1.0\n'
    sweeper = '# TYPE outreach_pending_timers gauge\noutreach_pending_timers{kind="sending"} 4.0\n'
    numbers = summarize({"relay": relay, "relay-1": standby, "sender-1": sender, "timeout-sweeper": sweeper,
                         "broken": "not { metrics"})
    assert numbers["consumer_lag"]["outreach-projections"] == {"lag": 9, "partitions": [
        {"topic": "outreach.message-status", "partition": 0, "lag": 7},
        {"topic": "outreach.message-status", "partition": 1, "lag": 2}]}  # the highest reading of each
    assert numbers["consumer_lag"]["outreach-sender-work"]["lag"] == 0
    assert (numbers["relay_lag_events"], numbers["dlq_records"]) == (3, 1)
    assert numbers["breakers"] == {"sender-1": {"twilio": "open"}}
    assert numbers["pending_timers"] == {"sending": 4}
    assert summarize({})["dlq_records"] is None  # unknown, not zero, when no relay answered


# ------------------------------------------------------------------ dlq: what a replay checks

def parked(value: bytes, source: str = topics.COMMANDS) -> dlq.Parked:
    return dlq.Parked(0, 3, "k", value, {"x-source-topic": source, "x-error": "boom"}, int(NOW * 1000))


def create_command(**overrides) -> dict:
    return {"type": "CreateCampaign", "command_id": str(uuid.uuid4()), "campaign_id": str(uuid.uuid4()),
            "issued_by": "alice", "issued_at": "2026-12-05T13:00:00Z", "name": "n", "channel": "sms",
            "template": {"body": "Hi"}, **overrides}


@pytest.mark.parametrize("value, complaint", [
    (b"not json", "is not JSON"),
    (jsoncodec.dumps(create_command(command_id="NOT-A-UUID")), "would be parked again ('command_id'"),
    (jsoncodec.dumps(create_command(channel="fax")), "would be rejected as invalid_command"),
])
def test_a_replay_that_would_be_parked_or_refused_again_is_refused(value, complaint):
    with pytest.raises(dlq.DlqError, match=complaint.replace("(", r"\(")) as refused:
        dlq.plan_replay(parked(value), None, "ops@host")
    assert refused.value.code == dlq.EXIT_REFUSED


def test_a_replayed_command_names_the_operator_and_is_keyed_by_its_campaign():
    command = create_command()
    planned = dlq.plan_replay(parked(b"garbage"), jsoncodec.dumps(command), "ops@host")  # the corrected body
    assert (planned.topic, planned.key, planned.command_id) == (topics.COMMANDS, command["campaign_id"].encode(),
                                                                command["command_id"])
    assert jsoncodec.loads(planned.value) == {**command, "replayed_by": "ops@host"}
    assert dict(planned.headers) == {"x-replayed-by": b"ops@host", "x-replayed-from": b"outreach.commands.dlq:0:3"}
    # An internal record goes back as it is (no field added to it); a record without a source cannot go back.
    internal = dlq.plan_replay(parked(b"{}", topics.SENDER_RESULTS), None, "ops@host")
    assert (internal.topic, internal.value, internal.command_id) == (topics.SENDER_RESULTS, b"{}", None)
    with pytest.raises(dlq.DlqError, match="names no source topic"):
        dlq.plan_replay(parked(b"{}", ""), None, "ops@host")


@pytest.mark.parametrize("ref, expected", [("12", (0, 12)), ("2:7", (2, 7))])
def test_dlq_offsets(ref, expected):
    assert dlq.parse_ref(ref) == expected


@pytest.mark.parametrize("ref", ["-1", "x", "1:x", ":"])
def test_malformed_dlq_offsets_are_refused(ref):
    import typer

    with pytest.raises(typer.BadParameter):
        dlq.parse_ref(ref)


# ------------------------------------------------------------------ the handler names the replaying operator

def test_the_events_answering_a_replayed_command_name_the_operator(app):
    d = Driver(app)
    cid = str(uuid.uuid4())
    command_id = str(uuid.uuid4())
    created = d.send("CreateCampaign", cid, command_id=command_id, name="c", channel="sms",
                     template={"body": "Hi"}, replayed_by="ops@host")
    assert [(e["type"], e["created_by"], e["replayed_by"]) for e in created] == [("CampaignCreated", "alice",
                                                                                  "ops@host")]
    CAMPAIGN_EVENT_ADAPTER.validate_python(created[0])
    # Replayed again: the stored answer, the same event, nothing new decided.
    assert d.send("CreateCampaign", cid, command_id=command_id, name="other", channel="sms",
                  template={"body": "Hi"}, replayed_by="ops@host") == created
    # A command that was not replayed says nothing of it; a rejection of a replayed one names the operator.
    [added, *_] = d.send("AddContacts", cid, chunk_no=0, contacts=[], last_chunk=True)
    assert added["type"] == "ContactsAdded" and "replayed_by" not in added
    # Every answer names its command's issuer (the history names the person behind each command).
    assert created[0]["issued_by"] == added["issued_by"] == "alice"
    [rejected] = d.send("CreateCampaign", cid, name="c", channel="sms", template={"body": "Hi"},
                        replayed_by="ops@host")
    assert (rejected["reason"], rejected["replayed_by"]) == ("campaign_exists", "ops@host")
    [unknown] = d.send("RunCampaign", str(uuid.uuid4()), disclaimer={}, replayed_by="ops@host")
    assert (unknown["type"], unknown["replayed_by"]) == ("CommandRejected", "ops@host")
    # The campaign, read back from the store without the cache, still loads and decides (the extra attribute
    # of its stored event is kept, never applied).
    again = OutreachApp(get_settings())
    try:
        [deleted, *_] = Driver(again).send("DeleteCampaign", cid)
        assert deleted["type"] == "CampaignDeleted" and "replayed_by" not in deleted
    finally:
        again.close()


def test_the_events_answering_a_command_through_the_api_say_so(app):
    """issued_via travels like replayed_by: on every event answering the command, rejections included, and
    never on the answer to a command a Kafka producer published."""
    d = Driver(app)
    cid = str(uuid.uuid4())
    [created] = d.send("CreateCampaign", cid, name="c", channel="sms", template={"body": "Hi"}, issued_via="api")
    assert created["issued_via"] == "api" and "replayed_by" not in created
    CAMPAIGN_EVENT_ADAPTER.validate_python(created)
    [added, *_] = d.send("AddContacts", cid, chunk_no=0, contacts=[], last_chunk=True)
    assert "issued_via" not in added
    [rejected] = d.send("CreateCampaign", cid, name="c", channel="sms", template={"body": "Hi"}, issued_via="api")
    assert (rejected["reason"], rejected["issued_via"]) == ("campaign_exists", "api")
    [unknown] = d.send("RunCampaign", str(uuid.uuid4()), disclaimer={}, issued_via="api", replayed_by="ops@host")
    assert (unknown["issued_via"], unknown["replayed_by"]) == ("api", "ops@host")
