"""`outreach status` and `outreach dlq` against a running stack (issue 13, item 2), each run as the operator runs
it (the CLI as a subprocess, finding the stack by OUTREACH_DATA_DIR / KAFKA_BOOTSTRAP_SERVERS):

- status shows every service ready (exit 0), a SIGKILLed instance as down (exit 1) and ready again once it is
  back; under `outreach up` a killed service shows as restarting, then ready;
- pointed at an empty data folder and the stack's broker (as in one docker-compose container), status finds
  every instance by its heartbeat on the broker, a second sweeper too, and that one as down once killed;
- a poison command is parked, `dlq list` and `dlq show` find it, replaying it as parked is refused (it would be
  parked again), replaying it corrected from a file gets it answered (the campaign is created) and the history
  names the replaying operator; replaying it again changes nothing."""
from __future__ import annotations

import asyncio
import getpass
import json
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from outreach.up import SERVICES
from tests.conftest import async_wait_until, wait_until
from tests.e2e_stack import stack_environment

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[1]
OUTREACH = str(ROOT / ".venv" / "bin" / "outreach")
STACK_SERVICES = tuple(name for name in SERVICES if name != "api")
OPERATOR = f"{getpass.getuser()}@{socket.gethostname()}"


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("status-data"),
                             OUTREACH_METRICS_LAG_INTERVAL_S="0.5", OUTREACH_HEARTBEAT_INTERVAL_S="0.5",
                             XDG_STATE_HOME=str(tmp_path_factory.mktemp("status-state")))


def outreach(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([OUTREACH, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(env["OUTREACH_DATA_DIR"]).parent)


def status(env: dict[str, str]) -> tuple[int, dict]:
    done = outreach(env, "status", "--json")
    return done.returncode, json.loads(done.stdout)


def states(report: dict) -> dict[str, str]:
    return {i["label"]: i["state"] for i in report["instances"]}


async def a_status(env: dict[str, str]) -> tuple[int, dict]:
    return await asyncio.to_thread(status, env)


async def test_status_shows_every_service_then_a_killed_one_down(stack, env):
    everyone_ready = {name: "ready" for name in STACK_SERVICES}

    async def all_ready() -> bool:
        code, report = await a_status(env)
        return code == 0 and states(report) == everyone_ready and report["consumer_lag"]
    await async_wait_until(all_ready, 120, 0.5, message=f"not every service ready: {(await a_status(env))[1]}")

    code, report = await a_status(env)
    assert report["healthy"] and report["counts"]["ready"] == len(STACK_SERVICES)
    assert not report["supervised"]  # the tests' stack is not `outreach up`
    assert set(report["consumer_lag"]) >= {"outreach-command-handler", "outreach-projections",
                                           "outreach-sender-work", "outreach-timeout-sweeper"}
    partitions = report["consumer_lag"]["outreach-projections"]["partitions"]
    assert {p["topic"] for p in partitions} == {"outreach.campaign-events", "outreach.message-status",
                                                "outreach.internal.opt-out-list"}  # (the opt-out lists)
    assert report["relay_lag_events"] is not None and report["dlq_records"] is not None
    assert set(report["pending_timers"])
    relay = next(i for i in report["instances"] if i["service"] == "relay")
    assert relay["checks"].get("broker") == "ok"  # what /readyz checked
    text = await asyncio.to_thread(outreach, env, "status")
    assert text.returncode == 0, text.stdout + text.stderr
    for name in STACK_SERVICES:
        assert name in text.stdout
    assert "Consumer lag" in text.stdout and "Parked (DLQ)" in text.stdout

    killed_pid = next(i["pid"] for i in report["instances"] if i["service"] == "timeout-sweeper")
    stack.kill("timeout-sweeper")  # SIGKILL: its instance record stays behind
    code, report = await a_status(env)
    assert code == 1 and not report["healthy"]
    [sweeper] = [i for i in report["instances"] if i["service"] == "timeout-sweeper"]
    assert (sweeper["state"], sweeper["pid"]) == ("down", killed_pid) and "no answer" in sweeper["detail"]
    assert states(report) == {**everyone_ready, "timeout-sweeper": "down"}
    text = await asyncio.to_thread(outreach, env, "status")
    assert text.returncode == 1 and "down" in text.stdout

    stack.start_service("timeout-sweeper")
    await async_wait_until(all_ready, 60, 0.5, message="the restarted sweeper never showed as ready")


async def test_a_parked_command_is_listed_shown_and_replayed_once(stack, env, tail, commands, tmp_path):
    campaign_id = str(uuid.uuid4())
    poison = {"type": "CreateCampaign", "command_id": "NOT-A-UUID", "campaign_id": campaign_id, "issued_by": "alice",
              "issued_at": "2026-12-05T13:00:00Z", "name": "Parked", "channel": "sms", "template": {"body": "Hi"}}
    await commands.publish(poison)

    def listed() -> dict | None:
        done = outreach(env, "dlq", "list", "--json")
        assert done.returncode == 0, done.stderr
        return next((p for p in json.loads(done.stdout) if p["key"] == campaign_id), None)
    entry = await asyncio.to_thread(wait_until, listed, 60, 0.5, "the poison command was not parked")
    assert entry["source_topic"] == "outreach.commands" and entry["consumer"] == "outreach-command-handler"
    assert "command_id" in entry["error"] and entry["size"] > 0 and entry["time"].endswith("Z")
    offset = str(entry["offset"])
    text = await asyncio.to_thread(outreach, env, "dlq", "list")
    assert text.returncode == 0 and campaign_id[:8] in text.stdout

    shown = await asyncio.to_thread(outreach, env, "dlq", "show", offset, "--json")
    record = json.loads(shown.stdout)
    assert record["value"] == poison and record["headers"]["x-source-topic"] == "outreach.commands"
    shown = await asyncio.to_thread(outreach, env, "dlq", "show", offset)
    assert '"command_id": "NOT-A-UUID"' in shown.stdout and "x-error:" in shown.stdout  # pretty JSON, headers

    # As parked it would be parked again: refused, nothing published.
    refused = await asyncio.to_thread(outreach, env, "dlq", "replay", offset)
    assert refused.returncode == 2 and "would be parked again" in refused.stderr

    corrected = tmp_path / "corrected.json"
    command_id = str(uuid.uuid4())
    corrected.write_text(json.dumps({**poison, "command_id": command_id}))
    replayed = await asyncio.to_thread(outreach, env, "dlq", "replay", offset, "--from-file", str(corrected),
                                       "--json")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    answer = json.loads(replayed.stdout)
    [created] = answer["events"]
    assert (created["type"], created["created_by"], created["replayed_by"]) == ("CampaignCreated", "alice", OPERATOR)
    assert answer["replayed_by"] == OPERATOR and answer["command_id"] == command_id

    # The history (the read model, as `outreach campaign events` reads it) names the replaying operator.
    history_env = {**env, "OUTREACH_READ_MODEL_URL": str(Path(env["OUTREACH_DATA_DIR"]) / "read-model.db")}

    def history() -> str:
        done = outreach(history_env, "campaign", "events", campaign_id, "--no-messages")
        return done.stdout if "CampaignCreated" in done.stdout else ""
    shown = await asyncio.to_thread(wait_until, history, 60, 0.5, "the history never showed the campaign")
    assert f"created by alice (replayed from the DLQ by {OPERATOR})" in shown

    # Replayed again: the command_id's stored answer, nothing new.
    again = await asyncio.to_thread(outreach, env, "dlq", "replay", offset, "--from-file", str(corrected), "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["events"] == [created]
    await commands.send("DeleteCampaign", campaign_id)  # a later command's answer: the replay's is in by then
    events = [e["type"] for e in tail.campaign_events(campaign_id)]
    assert events.count("CampaignCreated") == 1 and "CampaignDeleted" in events
    history_types = await asyncio.to_thread(
        lambda: json.loads(outreach(history_env, "campaign", "events", campaign_id, "--no-messages",
                                    "--json").stdout))
    assert [e["type"] for e in history_types].count("CampaignCreated") == 1

    code, report = await a_status(env)
    assert report["dlq_records"] >= 1


async def test_status_finds_every_instance_by_its_heartbeat_on_the_broker(stack, env, tmp_path):
    """No instance file where status looks: every instance is found by its heartbeat on the broker, with its
    health; a killed one shows down once its heartbeat is older than three intervals (1.5 s here)."""
    broker_only = {**env, "OUTREACH_DATA_DIR": str(tmp_path / "elsewhere")}
    stack.start_service("timeout-sweeper", 1)
    everyone_ready = {**{name: "ready" for name in STACK_SERVICES}, "timeout-sweeper-1": "ready"}

    async def all_ready() -> dict | None:
        code, report = await a_status(broker_only)
        return report if code == 0 and states(report) == everyone_ready else None
    report = await async_wait_until(all_ready, 60, 0.5, message="not every instance found ready on the broker")
    assert report["broker"]["reachable"] and report["broker"]["heartbeats"] >= len(everyone_ready)
    assert {tuple(i["seen_in"]) for i in report["instances"]} == {("broker",)}
    assert not (tmp_path / "elsewhere" / "instances").exists()
    assert report["consumer_lag"]  # the relay's metrics, asked at the address its heartbeat gave
    second = next(i for i in report["instances"] if i["label"] == "timeout-sweeper-1")

    stack.kill("timeout-sweeper", 1)
    seen: list[str] = []

    async def killed_one_down() -> tuple[int, dict] | None:
        code, report = await a_status(broker_only)
        [killed] = [i for i in report["instances"] if i["label"] == "timeout-sweeper-1"]
        seen.append(killed["state"])
        return (code, report) if killed["state"] == "down" else None
    code, report = await async_wait_until(killed_one_down, 30, 0.3, message=f"never down: {seen}")
    [killed] = [i for i in report["instances"] if i["label"] == "timeout-sweeper-1"]
    assert code == 1 and killed["pid"] == second["pid"] and "last heartbeat" in killed["detail"]
    assert set(seen) <= {"ready", "unreachable", "down"}  # unreachable: no answer, its heartbeat still recent
    assert states(report) == {**everyone_ready, "timeout-sweeper-1": "down"}
    text = await asyncio.to_thread(outreach, broker_only, "status")
    assert text.returncode == 1 and "heartbeat(s) on the broker" in text.stdout


# ------------------------------------------------------------------ under `outreach up`

def test_a_service_outreach_up_restarts_shows_as_restarting_then_ready(tmp_path):
    """SIGKILL one service of a running `outreach up`: status says restarting (its supervisor starts it again),
    then ready; `outreach status` finds the stack from its stack file, from another folder."""
    import os
    import signal

    from tests.test_make_run import embedded_defaults

    env = {**embedded_defaults(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    with open(tmp_path / "up.out", "wb") as out:
        up = subprocess.Popen([OUTREACH, "up"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    operator_env = {k: v for k, v in env.items() if k != "OUTREACH_DATA_DIR"}  # found through the stack file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def status_here() -> tuple[int, dict]:
        done = subprocess.run([OUTREACH, "status", "--json"], env=operator_env, cwd=elsewhere, capture_output=True,
                              text=True, timeout=60)
        return done.returncode, json.loads(done.stdout)

    try:
        def all_ready() -> dict | None:
            assert up.poll() is None, (tmp_path / "up.out").read_text()[-3000:]
            code, report = status_here()
            return report if code == 0 and set(states(report)) == set(SERVICES) else None
        report = wait_until(all_ready, 120, 0.5, "outreach up never showed every service ready")
        assert report["supervised"] and report["data_dir"] == str(tmp_path / "var")
        victim = next(i for i in report["instances"] if i["service"] == "projections")
        os.kill(victim["pid"], signal.SIGKILL)
        seen: list[str] = []

        def restarted_and_ready() -> bool:
            _, report = status_here()
            [projections] = [i for i in report["instances"] if i["service"] == "projections"]
            seen.append(projections["state"])
            return projections["state"] == "ready" and projections["pid"] != victim["pid"] \
                and projections["restarts"] == 1
        wait_until(restarted_and_ready, 90, 0.2, f"projections never came back ready: {seen}")
        # Between the kill and its new process serving (several seconds for a Python service), it is restarting.
        assert "restarting" in seen and "ready" not in seen[:seen.index("restarting")], seen
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
