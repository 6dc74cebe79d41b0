"""The CLI as a client of the HTTP API (issue 13, items 5 and 6), against a fake API (httpx.MockTransport): the
sign-in and its config file, what each campaign command sends, malformed ids refused before anything is contacted,
the operator commands' data folder, and `outreach up`'s port check."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from outreach import api_client, config
from outreach.cli import app
from outreach.up import ServicePortTaken, check_service_ports
from services.common.embedded_broker import free_port
from services.common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
T0 = "2024-05-01T12:00:00.000000Z"


class FakeApi:
    """Answers the routes the CLI uses, like the real API (202 answered / pending, rejections with a reason)."""

    def __init__(self):
        self.requests: list[httpx.Request] = []
        self.pending: dict[str, list[dict]] = {}  # command_id -> the answer GET /commands/ID gives

    def event(self, type_: str, campaign_id: str, command_id: str, **body) -> dict:
        return {"type": type_, "event_id": str(uuid.uuid4()), "campaign_id": campaign_id, "sequence": 10,
                "occurred_at": T0, "causation_id": command_id, **body}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("Authorization") != "Bearer t0ken":
            return httpx.Response(401, json={"detail": "unknown token"})
        path, method = request.url.path, request.method
        if method == "GET" and path == "/campaigns":
            return httpx.Response(200, json={"total": 1, "limit": 1000, "offset": 0, "items": [
                {"campaign_id": "0b6c7a9e-5f1d-4c2b-9a8e-3d4f5a6b7c8d", "name": "Spring", "channel": "sms",
                 "status": "ready", "stopped": False, "counts": {"total": 2, "delivered": 0, "failed": 0}}]})
        if method == "GET" and path.startswith("/commands/"):
            command_id = path.rsplit("/", 1)[1]
            events = self.pending.get(command_id)
            if events is None:
                return httpx.Response(202, json={"command_id": command_id, "state": "pending", "events": []})
            return httpx.Response(200, json={"command_id": command_id, "state": "answered", "events": events})
        if method == "GET" and path.startswith("/campaigns/"):
            return httpx.Response(404, json={"detail": "no campaign"})
        if method == "POST" and path == "/campaigns":
            campaign_id, create_id, chunk_id = (str(uuid.uuid4()) for _ in range(3))
            check = {"contacts": 2, "valid": 1, "invalid": 1, "missing_variables": [], "default_region": None,
                     "invalid_reasons": {"invalid_e164": {"count": 1, "first_rows": [3]}}}
            self.pending[chunk_id] = [self.event("ContactsAdded", campaign_id, chunk_id, chunk_no=0, valid=1,
                                                 invalid=1, invalid_rows=[{"row": 3, "reason": "invalid_e164"}]),
                                      self.event("CampaignReady", campaign_id, chunk_id, message_count=1)]
            return httpx.Response(202, json={
                "command_id": create_id, "campaign_id": campaign_id, "command_type": "CreateCampaign",
                "state": "pending", "events": [self.event("CampaignCreated", campaign_id, create_id, name="Spring",
                                                          created_by="grace")],
                "contacts": 2, "has_header": True, "destination_column": "phone", "variables": {"name": "name"},
                "contacts_command_ids": [chunk_id], "contacts_events": [], "check": check,
                "missing_variables": []})
        campaign_id = path.split("/")[2]
        command_id = str(uuid.uuid4())
        if path.endswith("/run"):  # pending: the CLI waits at GET /commands/ID
            self.pending[command_id] = [self.event("CampaignRunStarted", campaign_id, command_id, run_no=1,
                                                   accepted_by="grace", message_count=2, suppressed_count=0)]
            return httpx.Response(202, json={"command_id": command_id, "campaign_id": campaign_id,
                                             "command_type": "RunCampaign", "state": "pending", "events": []})
        if path.endswith("/stop"):
            rejected = {**self.event("CommandRejected", campaign_id, command_id, command_type="StopCampaign",
                                     reason="campaign_not_running", detail="not running"), "command_id": command_id}
            return httpx.Response(409, json={"detail": "not running", "reason": "campaign_not_running",
                                             "command_id": command_id, "campaign_id": campaign_id,
                                             "command_type": "StopCampaign", "state": "rejected",
                                             "events": [rejected]})
        return httpx.Response(202, json={"command_id": command_id, "campaign_id": campaign_id,
                                         "command_type": "RetryFailedMessages", "state": "answered",
                                         "events": [self.event("RetryStarted", campaign_id, command_id, run_no=2,
                                                               message_count=1)]})


@pytest.fixture
def fake_api(monkeypatch, tmp_path) -> FakeApi:
    api = FakeApi()
    monkeypatch.setattr(api_client, "TRANSPORT", httpx.MockTransport(api))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("OUTREACH_READ_MODEL_URL", raising=False)
    return api


def test_login_writes_a_private_config_file_the_commands_use(fake_api, tmp_path):
    assert runner.invoke(app, ["login", "--url", "http://api.invalid/", "--token", "wrong"]).exit_code == 1  # 401
    assert not config.config_path().exists()
    result = runner.invoke(app, ["login", "--url", "http://api.invalid/", "--token", "t0ken"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "config" / "outreach" / "config.toml"
    assert config.config_path() == path and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.api_target() == config.ApiTarget("http://api.invalid", "t0ken", str(path))

    listed = runner.invoke(app, ["campaign", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [c["name"] for c in json.loads(listed.stdout)] == ["Spring"]
    assert fake_api.requests[-1].url.host == "api.invalid"


def test_the_environment_wins_and_without_either_the_cli_says_how_to_sign_in(fake_api, monkeypatch):
    result = runner.invoke(app, ["campaign", "list"])
    assert result.exit_code == 1 and "outreach login" in result.output
    config.write_config("http://api.invalid", "stale")
    monkeypatch.setenv("OUTREACH_API_TOKEN", "t0ken")
    assert runner.invoke(app, ["campaign", "list", "--json"]).exit_code == 0
    monkeypatch.setenv("OUTREACH_API_TOKEN", "revoked")
    refused = runner.invoke(app, ["campaign", "list"])
    assert refused.exit_code == 1 and "HTTP 401" in refused.output and "outreach login" in refused.output


@pytest.fixture
def signed_in(fake_api, monkeypatch) -> FakeApi:
    monkeypatch.setenv("OUTREACH_API_URL", "http://api.invalid")
    monkeypatch.setenv("OUTREACH_API_TOKEN", "t0ken")
    return fake_api


def test_create_uploads_the_csv_and_waits_for_the_last_chunk(signed_in, tmp_path):
    csv_path = tmp_path / "contacts.csv"
    csv_path.write_text("name,phone\nAnn,+15555550100\nBad,12345\n")
    result = runner.invoke(app, ["campaign", "create", str(csv_path), "--name", "Spring", "--channel", "sms",
                                 "--template-body", "Hi {{name}}", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["valid"], out["invalid"], out["ready"], out["message_count"]) == (1, 1, True, 1)
    assert out["invalid_reasons"] == {"invalid_e164": {"count": 1, "first_rows": [3]}}
    upload, wait = signed_in.requests
    assert (upload.method, upload.url.path) == ("POST", "/campaigns")
    body = upload.content.decode()
    for part in ('name="name"\r\n\r\nSpring', 'name="channel"\r\n\r\nsms', 'name="consent_confirmed"\r\n\r\ntrue',
                 '{"body": "Hi {{name}}"}', "Ann,+15555550100"):
        assert part in body
    assert "issued_by" not in body and "issued_via" not in body  # the API decides both
    assert wait.url.path == f"/commands/{out['events'][-1]['causation_id']}" and "wait" in wait.url.params


def test_as_is_gone(signed_in, tmp_path):
    csv_path = tmp_path / "contacts.csv"
    csv_path.write_text("phone\n+15555550100\n")
    result = runner.invoke(app, ["campaign", "create", str(csv_path), "--name", "S", "--channel", "sms",
                                 "--template-body", "Hi", "--as", "mallory"])
    assert result.exit_code == 2 and "--as" in result.output
    assert signed_in.requests == []


def test_run_stop_retry_through_their_routes(signed_in):
    campaign_id = str(uuid.uuid4())
    run = runner.invoke(app, ["campaign", "run", campaign_id, "--accept-disclaimer", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["events"][0]["accepted_by"] == "grace"
    summary, posted, waited = signed_in.requests
    assert (summary.method, summary.url.path) == ("GET", f"/campaigns/{campaign_id}")
    assert (posted.method, posted.url.path) == ("POST", f"/campaigns/{campaign_id}/run")
    assert json.loads(posted.content) == {"disclaimer": {"consent": True, "content_compliance": True,
                                                         "opt_out": True, "data_responsibility": True}}
    assert waited.url.path.startswith("/commands/")

    stop = runner.invoke(app, ["campaign", "stop", campaign_id, "--yes"])
    assert stop.exit_code == 1 and "campaign_not_running" in stop.output  # a rejection: exit 1
    assert json.loads(signed_in.requests[-1].content) == {"confirmed": True}

    message_id = str(uuid.uuid4())
    retry = runner.invoke(app, ["campaign", "retry", campaign_id, "--message-id", message_id, "--json"])
    assert retry.exit_code == 0, retry.output
    assert json.loads(signed_in.requests[-1].content) == {"include_cancelled": False, "message_ids": [message_id]}


@pytest.mark.parametrize("argv", [
    ["campaign", "run", "not-an-id", "--accept-disclaimer"],
    ["campaign", "show", "0B6C7A9E-5F1D-4C2B-9A8E-3D4F5A6B7C8D"],  # upper case is not the contract's form
    ["campaign", "stop", "0b6c7a9e-5f1d-4c2b-9a8e-3d4f5a6b7c8", "--yes"],
    ["campaign", "delete", "12", "--yes"],
    ["campaign", "events", "x"],
    ["campaign", "retry", "0b6c7a9e-5f1d-4c2b-9a8e-3d4f5a6b7c8d", "--message-id", "m1"],
])
def test_a_malformed_id_is_refused_at_once(signed_in, argv):
    started = time.monotonic()
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output
    assert signed_in.requests == [] and time.monotonic() - started < 5


# ------------------------------------------------------------------ operator commands: the stack's data folder

def test_operator_commands_find_the_stack_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("OUTREACH_DATA_DIR", raising=False)
    assert config.operator_settings().data_dir == Settings().data_dir  # no stack file: the default
    assert config.write_stack(tmp_path / "stack-data") == tmp_path / "state" / "outreach" / "stack.json"
    monkeypatch.chdir(tmp_path)
    assert config.operator_settings().data_dir == (tmp_path / "stack-data").resolve()
    monkeypatch.setenv("OUTREACH_DATA_DIR", str(tmp_path / "explicit"))
    assert config.operator_settings().data_dir == tmp_path / "explicit"  # the environment wins


def test_token_create_from_another_folder_writes_into_the_stack_store(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("OUTREACH_DATA_DIR", raising=False)
    monkeypatch.delenv("OUTREACH_EVENT_STORE", raising=False)
    config.write_stack(tmp_path / "stack-data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["token", "create", "casey", "--role", "campaigner", "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "stack-data" / "api.db").exists()
    assert not (elsewhere / "var").exists()  # no stray var/


# ------------------------------------------------------------------ outreach up: every port first

def test_the_port_check_names_each_taken_port_and_its_service():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(api_port=port, simulator_port=free_port("127.0.0.1"), webhook_port=free_port("127.0.0.1"))
        with pytest.raises(ServicePortTaken, match=rf"port {port} on 127.0.0.1 \(api, OUTREACH_API_PORT\) is taken"):
            check_service_ports(settings)
    check_service_ports(settings)  # free again


def test_outreach_up_names_a_taken_port_before_starting_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port('127.0.0.1')}",
               "OUTREACH_DATA_DIR": str(tmp_path / "var"), "OUTREACH_WEBHOOK_PORT": str(port),
               "OUTREACH_SIMULATOR_PORT": str(free_port("127.0.0.1")),
               "OUTREACH_API_PORT": str(free_port("127.0.0.1"))}
        env.pop("OUTREACH_EXTERNAL_KAFKA", None)
        env.pop("OUTREACH_EVENT_STORE", None)
        done = subprocess.run([sys.executable, "-m", "outreach.cli", "up"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"port {port} on 127.0.0.1 (webhooks, OUTREACH_WEBHOOK_PORT) is taken" in done.stderr
    assert "Serving" not in done.stdout and "Embedded broker" not in done.stdout
    assert not (tmp_path / "var" / "logs").exists()  # nothing was started


# ------------------------------------------------------------------ issued_via on commands

def test_issued_via_is_optional_and_only_api():
    from pydantic import ValidationError

    from schemas.commands import make_command, parse_command
    from services.common import jsoncodec

    campaign_id = str(uuid.uuid4())
    assert parse_command(jsoncodec.dumps(make_command("DeleteCampaign", campaign_id, "kafka-producer"))).issued_via \
        is None
    via_api = make_command("DeleteCampaign", campaign_id, "grace", issued_via="api")
    assert parse_command(jsoncodec.dumps(via_api)).issued_via == "api"
    with pytest.raises(ValidationError):
        parse_command(jsoncodec.dumps({**via_api, "issued_via": "cli"}))
