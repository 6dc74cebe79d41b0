"""One logging configuration (services/common/logs.py): text and JSON lines, the campaign, message and command
ids of the context on every line, quiet third-party loggers, and real service processes writing JSON."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from outreach.up import Stack
from schemas import topics
from services.common import jsoncodec, kafka, logs
from services.common.embedded_broker import EmbeddedBroker, free_port
from services.common.runtime import EXIT_CONFIG
from services.common.settings import LogSettings, Settings
from services.sender.twilio import TwilioAdapter
from tests.conftest import async_wait_until
from tests.e2e_support import command

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGN, MESSAGE, COMMAND = (str(uuid.uuid4()) for _ in range(3))


@pytest.fixture
def restore_logging():
    """Put back the test process's logging (pytest's capture handlers, levels) after a test configures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    touched = [*logs.QUIET_LOGGERS, *logs.UVICORN_LOGGERS, "outreach"]
    saved = {name: (logging.getLogger(name).level, logging.getLogger(name).handlers[:],
                    logging.getLogger(name).propagate) for name in touched}
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, (lvl, hs, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(lvl)
        logger.handlers[:] = hs
        logger.propagate = propagate


def configured(service: str = "sender", **settings) -> io.StringIO:
    stream = io.StringIO()
    logs.configure(service, LogSettings(**settings), stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# ------------------------------------------------------------------ the configuration, in process

def test_a_text_line_ends_with_the_ids_it_knows_only(restore_logging):
    stream = configured()
    log = logging.getLogger("outreach.sender")
    log.info("no ids here")
    with logs.context(campaign_id=CAMPAIGN, command_id=COMMAND):
        log.warning("about a command")
    first, second = lines(stream)
    datetime.strptime(first[:23], "%Y-%m-%d %H:%M:%S,%f")  # the time first, as tests and operators read it
    assert first.endswith(" outreach.sender INFO no ids here")
    assert second.endswith(f" outreach.sender WARNING about a command campaign={CAMPAIGN} command={COMMAND}")
    assert "message=" not in second


def test_a_json_line_parses_and_carries_service_instance_and_the_context_ids(restore_logging):
    stream = configured("command-handler", log_format="json", instance_name="2")
    log = logging.getLogger("outreach.command_handler")
    with logs.context(campaign_id=CAMPAIGN, message_id=MESSAGE):
        log.info("handling %s", "it")
        try:
            raise ValueError("broken")
        except ValueError:
            log.exception("it failed")
    log.info("after")
    handled, failed, after = (json.loads(line) for line in lines(stream))
    assert handled == {"time": handled["time"], "level": "INFO", "logger": "outreach.command_handler",
                       "message": "handling it", "service": "command-handler", "instance": "2",
                       "campaign_id": CAMPAIGN, "message_id": MESSAGE}
    assert datetime.fromisoformat(handled["time"]).utcoffset().total_seconds() == 0
    assert failed["level"] == "ERROR" and "ValueError: broken" in failed["exc_info"]
    assert failed["campaign_id"] == CAMPAIGN
    assert "campaign_id" not in after and "message_id" not in after and after["instance"] == "2"


async def test_ids_follow_tasks_and_threads_and_end_with_their_context(restore_logging):
    stream = configured(log_format="json")
    log = logging.getLogger("outreach.test")

    async def job(campaign_id: str) -> None:
        logs.bind(campaign_id=campaign_id)  # a task of its own: bound for the task only
        await asyncio.sleep(0)
        log.info("job")

    with logs.context(command_id=COMMAND):
        await asyncio.gather(job(CAMPAIGN), job(MESSAGE))
        await asyncio.to_thread(log.info, "in a thread")
        with logs.context(message_id=MESSAGE):
            logs.bind(campaign_id=CAMPAIGN)
            log.info("nested")
        log.info("outer again")
    log.info("none")
    records = [json.loads(line) for line in lines(stream)]
    assert sorted(r.get("campaign_id") for r in records[:2]) == sorted([CAMPAIGN, MESSAGE])
    assert all(r["command_id"] == COMMAND for r in records[:5])
    thread, nested, outer, none = records[2:]
    assert "campaign_id" not in thread
    assert (nested["campaign_id"], nested["message_id"]) == (CAMPAIGN, MESSAGE)
    assert "campaign_id" not in outer and "message_id" not in outer
    assert not {"campaign_id", "message_id", "command_id"} & set(none)


def test_third_party_chatter_is_quiet_but_warnings_show(restore_logging):
    stream = configured(log_format="json")
    logging.getLogger("aiokafka.consumer.fetcher").info("Fetch offset reset")
    logging.getLogger("aiokafka.consumer.group_coordinator").info("Setting newly assigned partitions {} for group g")
    logging.getLogger("httpx").info("HTTP Request: GET /campaigns")
    logging.getLogger("aiokafka.conn").warning("connection lost")
    logging.getLogger("uvicorn.error").info("Application startup complete.")  # uvicorn's own: through ours
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 7,
                                            extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"})
    logging.getLogger("outreach.faststream").info("Received", extra={"message_id": "12-1700000000", "topic": "t"})
    records = [json.loads(line) for line in lines(stream)]
    assert [r["message"] for r in records] == ["Setting newly assigned partitions {} for group g",
                                               "connection lost", "Application startup complete.",
                                               "Started server process [7]", "Received"]
    assert "color_message" not in records[2]
    fast = records[-1]
    assert "message_id" not in fast and fast["faststream_message_id"] == "12-1700000000" and fast["topic"] == "t"


def test_per_logger_levels_and_any_case_from_the_environment(restore_logging, monkeypatch):
    monkeypatch.setenv("OUTREACH_LOG_LEVEL", "warning")
    monkeypatch.setenv("OUTREACH_LOG_FORMAT", "json")
    monkeypatch.setenv("OUTREACH_LOG_LEVELS", '{"aiokafka": "info", "outreach.sender": "DEBUG"}')
    stream = io.StringIO()
    used = logs.configure("sender", stream=stream)
    assert (used.log_level, used.log_format) == ("WARNING", "json")
    logging.getLogger("aiokafka").info("group joined")
    logging.getLogger("outreach.sender").debug("detail")
    logging.getLogger("outreach.relay").info("not at WARNING")
    assert [json.loads(line)["message"] for line in lines(stream)] == ["group joined", "detail"]


def test_a_default_level_for_foreground_commands_unless_the_environment_says(restore_logging, monkeypatch):
    monkeypatch.delenv("OUTREACH_LOG_LEVEL", raising=False)
    assert logs.logging_config("up", LogSettings(), default_level="WARNING")["root"]["level"] == "WARNING"
    monkeypatch.setenv("OUTREACH_LOG_LEVEL", "INFO")
    assert logs.logging_config("up", LogSettings(), default_level="WARNING")["root"]["level"] == "INFO"


def test_refused_log_settings_name_the_variable_and_fall_back_to_the_defaults(monkeypatch):
    monkeypatch.setenv("OUTREACH_LOG_FORMAT", "yaml")
    with pytest.raises(ValidationError, match="log_format"):
        Settings()
    fallback, error = logs.log_settings()
    assert error is not None and (fallback.log_format, fallback.log_level) == ("text", "INFO")


def test_ids_of_records_take_only_wire_ids():
    poison = {"campaign_id": CAMPAIGN, "message_id": "x" * 5000, "command_id": 7}
    assert logs.ids_of(poison) == {"campaign_id": CAMPAIGN}
    assert logs.ids_in_json(b"{not json") == {} and logs.ids_in_json(None) == {}
    assert logs.ids_in_json(jsoncodec.dumps({"command_id": COMMAND})) == {"command_id": COMMAND}
    assert logs.key_id(CAMPAIGN.encode()) == CAMPAIGN and logs.key_id(b"+12025550100") is None


async def test_each_message_the_sender_cannot_send_is_named_with_its_campaign(restore_logging, tmp_path):
    """The Twilio adapter against a closed port, inside a claim's campaign (as the sender's job binds it):
    each message's warning names the campaign and that message."""
    stream = configured("sender", log_format="json")
    adapter = TwilioAdapter(Settings(twilio_base_url=f"http://127.0.0.1:{free_port()}", data_dir=tmp_path),
                            connect_timeout_s=1)
    items = [{"message_id": str(uuid.uuid4()), "row": row, "destination": "+12025550100", "variables": {},
              "attempt": 0} for row in (2, 3)]
    try:
        with logs.context(campaign_id=CAMPAIGN):
            results = await adapter.submit("sms", items, {"body": "Hi"})
    finally:
        await adapter.close()
    assert {result["outcome"] for result in results} == {"presend_error"}
    warned = [json.loads(line) for line in lines(stream) if "not reached for message" in line]
    assert sorted((line["campaign_id"], line["message_id"]) for line in warned) == sorted(
        (CAMPAIGN, item["message_id"]) for item in items)
    assert all(line["message_id"] in line["message"] for line in warned)  # each line's id is its own message's


# ------------------------------------------------------------------ real processes

def test_a_refused_setting_is_logged_in_the_chosen_format(tmp_path):
    """Logging is configured before the other settings are read: the refusal is a JSON line too."""
    env = dict(os.environ, OUTREACH_LOG_FORMAT="json", OUTREACH_DEFAULT_REGION="XX", OUTREACH_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "services.command_handler"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_CONFIG, done.stderr
    [line] = [json.loads(line) for line in done.stderr.splitlines()]
    assert (line["level"], line["service"], line["logger"]) == ("CRITICAL", "command-handler", "outreach")
    assert "OUTREACH_DEFAULT_REGION" in line["message"]


@pytest.fixture(scope="module")
def json_stack(tmp_path_factory):
    """The command handler and the HTTP API as processes (SQLite stores, a broker of this module's own),
    logging JSON."""
    data_dir = tmp_path_factory.mktemp("logging-data")
    with EmbeddedBroker("127.0.0.1", free_port()) as broker:
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap, OUTREACH_EXTERNAL_KAFKA="true",
                   OUTREACH_DATA_DIR=str(data_dir), OUTREACH_EVENT_STORE="sqlite", OUTREACH_LOG_FORMAT="json",
                   OUTREACH_API_PORT=str(free_port()), OUTREACH_KAFKA_SESSION_TIMEOUT_MS="2000",
                   OUTREACH_KAFKA_HEARTBEAT_MS="200")
        for name in ("OUTREACH_READ_MODEL_URL", "OUTREACH_LOG_LEVEL", "OUTREACH_LOG_LEVELS", "OUTREACH_SQLITE_PATH"):
            env.pop(name, None)
        with Stack(env=env, log_dir=data_dir / "logs", names=("command-handler", "api")) as stack:
            yield stack, Settings(kafka_bootstrap_servers=broker.bootstrap)


def json_lines(stack: Stack, service: str) -> list[dict]:
    """Every line of a service's log, each parsed as JSON (a line that is not JSON fails the test)."""
    path = stack.log_dir / f"{service}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    complete = text[:text.rfind("\n") + 1]  # a line being written is read next time
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


async def test_the_command_handler_logs_json_lines_naming_the_command_it_rejects(json_stack):
    stack, settings = json_stack
    rejected = command("DeleteCampaign", CAMPAIGN)  # no such campaign: rejected
    poison_key = str(uuid.uuid4())
    producer = kafka.make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topics.COMMANDS, jsoncodec.dumps(rejected), key=CAMPAIGN.encode())
        await producer.send_and_wait(topics.COMMANDS, b"{not json", key=poison_key.encode())
    finally:
        await producer.stop()

    def about(predicate) -> list[dict]:
        return [line for line in json_lines(stack, "command-handler") if predicate(line)]

    await async_wait_until(lambda: about(lambda line: "DeleteCampaign rejected" in line["message"])
                           and about(lambda line: "ALARM" in line["message"]), 90,
                           message=f"no rejection or DLQ line; see {stack.log_dir / 'command-handler.log'}")
    [line] = about(lambda line: "DeleteCampaign rejected" in line["message"])
    assert (line["command_id"], line["campaign_id"]) == (rejected["command_id"], CAMPAIGN)
    assert (line["service"], line["instance"], line["level"]) == ("command-handler", "0", "INFO")
    [alarm] = about(lambda line: "ALARM" in line["message"])
    assert alarm["campaign_id"] == poison_key and "command_id" not in alarm  # the key names its campaign
    everything = json_lines(stack, "command-handler")
    assert {line["service"] for line in everything} == {"command-handler"}
    # aiokafka's INFO lines are quiet, except the group coordinator's few a rebalance (which partitions it reads).
    chatter = [line for line in everything if line["logger"].startswith("aiokafka") and line["level"] == "INFO"]
    assert {line["logger"] for line in chatter} <= {"aiokafka.consumer.group_coordinator"}
    assert any("Setting newly assigned partitions" in line["message"] for line in chatter)


async def test_uvicorn_lines_go_through_the_same_configuration(json_stack):
    stack, _ = json_stack
    await async_wait_until(lambda: any("Application startup complete" in line["message"]
                                       for line in json_lines(stack, "api")), 60,
                           message=f"the API did not start; see {stack.log_dir / 'api.log'}")
    [started] = [line for line in json_lines(stack, "api") if "Application startup complete" in line["message"]]
    assert (started["logger"], started["service"]) == ("uvicorn.error", "api")
