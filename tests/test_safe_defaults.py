"""Safe defaults (services/common/safe_defaults.py): with a provider endpoint that is not the simulator's, the
public development secrets are refused everywhere: the rule itself (pure), service processes at start-up
(exit 78 naming each setting), the API at start-up and on `PUT /settings/channels/{channel}` (422), and the
channel-settings feed (a record that would make it so is skipped)."""
from __future__ import annotations

import base64
import inspect
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common import channel_settings as cs
from services.common import safe_defaults
from services.common import webhook_signatures as sigs
from services.common.embedded_broker import free_port
from services.common.runtime import EXIT_CONFIG
from services.common.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[1]
OWN_KEY = base64.b64encode(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
OWN = {"unsubscribe_secret": "a-long-random-unsubscribe-secret-0123", "twilio_auth_token": "our-twilio-auth-token-0123",
       "sendgrid_webhook_public_key": OWN_KEY}
ALL_THREE = ["OUTREACH_UNSUBSCRIBE_SECRET", "OUTREACH_TWILIO_AUTH_TOKEN", "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY"]


def named(problems) -> list[str]:
    return [problem.setting for problem in problems]


# ------------------------------------------------------------------ the rule (pure)

@pytest.mark.parametrize("fields", [
    {},
    {"twilio_base_url": "http://127.0.0.1:8930"},
    {"twilio_base_url": "http://localhost:8930/", "sendgrid_base_url": "http://127.0.0.1:8930"},
    {"simulator_port": 9999, "twilio_base_url": "http://127.0.0.1:9999"},
    {"simulator_public_url": "http://simulator:8930", "twilio_base_url": "http://simulator:8930",
     "sendgrid_base_url": "http://SIMULATOR:8930/"},  # docker-compose
    {"twilio_base_url": ""},
    {"email_provider": "smtp"},  # the development SMTP, 127.0.0.1:2525
    {"email_provider": "smtp", "smtp_host": "localhost"},
    {"email_provider": "sendgrid", "smtp_host": "mail.example.org"},  # SMTP configured but not used
    {"sms_provider": "inprocess", "email_provider": "inprocess"},
], ids=lambda fields: ",".join(f"{k}={v}" for k, v in fields.items()) or "defaults")
def test_the_simulator_everywhere_needs_no_secrets(fields):
    settings = Settings(**fields)
    assert safe_defaults.real_endpoints(settings) == []
    assert safe_defaults.unsafe_defaults(settings) == []


@pytest.mark.parametrize("fields, endpoint", [
    ({"twilio_base_url": "https://api.twilio.com"}, "OUTREACH_TWILIO_BASE_URL=https://api.twilio.com"),
    ({"sendgrid_base_url": "https://api.sendgrid.com"}, "OUTREACH_SENDGRID_BASE_URL=https://api.sendgrid.com"),
    ({"twilio_base_url": "http://127.0.0.1:8931"}, "OUTREACH_TWILIO_BASE_URL=http://127.0.0.1:8931"),  # other port
    ({"twilio_base_url": "https://127.0.0.1:8930"}, "OUTREACH_TWILIO_BASE_URL"),  # other scheme
    ({"twilio_base_url": "http://127.0.0.1:8930/proxy"}, "OUTREACH_TWILIO_BASE_URL"),  # other path
    ({"twilio_base_url": "http://simulator:8930"}, "OUTREACH_TWILIO_BASE_URL"),  # compose's, without its setting
    ({"twilio_base_url": "http://[::1"}, "OUTREACH_TWILIO_BASE_URL"),  # not a URL: not the simulator's
    ({"email_provider": "smtp", "smtp_host": "mail.example.org", "smtp_port": 587},
     "OUTREACH_SMTP_HOST:OUTREACH_SMTP_PORT=mail.example.org:587"),
    ({"email_provider": "smtp", "smtp_port": 25}, "OUTREACH_SMTP_HOST:OUTREACH_SMTP_PORT=127.0.0.1:25"),
])
def test_a_real_endpoint_with_the_public_secrets_is_refused_naming_each(fields, endpoint):
    settings = Settings(**fields)
    assert any(found.startswith(endpoint) for found in safe_defaults.real_endpoints(settings))
    problems = safe_defaults.unsafe_defaults(settings)
    assert named(problems) == ALL_THREE
    message = safe_defaults.refusal(settings, problems)
    assert message.startswith("refusing to start: a real provider endpoint is configured (")
    assert endpoint in message and all(name in message for name in ALL_THREE)
    assert "simulator-auth-token" not in message and "change-me" not in message  # names, never values
    with pytest.raises(safe_defaults.UnsafeDefaults, match="OUTREACH_TWILIO_AUTH_TOKEN"):
        safe_defaults.check(settings)
    safe_defaults.check(Settings(**fields, **OWN))  # every secret set: nothing to refuse


def test_each_secret_is_named_only_while_it_keeps_its_public_value():
    real = {"twilio_base_url": "https://api.twilio.com"}
    for kept in OWN:
        others = {name: value for name, value in OWN.items() if name != kept}
        assert named(safe_defaults.unsafe_defaults(Settings(**real, **others))) == [
            "OUTREACH_" + kept.upper()], kept


@pytest.mark.parametrize("secret, value, why", [
    ("unsubscribe_secret", "change-me-unsubscribe-secret", "the default"),
    ("unsubscribe_secret", "  change-me-unsubscribe-secret ", "the default"),
    ("unsubscribe_secret", "short-secret", "too short"),
    ("unsubscribe_secret", "", "too short"),
    ("twilio_auth_token", "simulator-auth-token", "simulator's"),
    ("twilio_auth_token", " ", "simulator's"),
    ("sendgrid_webhook_public_key", sigs.SIMULATOR_SENDGRID_PUBLIC_KEY, "simulator's"),
    ("sendgrid_webhook_public_key", "", "simulator's"),
    ("sendgrid_webhook_public_key", "PEM", "simulator's"),  # the simulator's key in PEM form
])
def test_the_public_values_in_every_form(secret, value, why):
    if value == "PEM":
        value = sigs.load_sendgrid_public_key(sigs.SIMULATOR_SENDGRID_PUBLIC_KEY).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    settings = Settings(twilio_base_url="https://api.twilio.com", **{**OWN, secret: value})
    [problem] = safe_defaults.unsafe_defaults(settings)
    assert problem.setting == "OUTREACH_" + secret.upper() and why in problem.reason


def test_an_empty_variable_is_an_unset_one(monkeypatch):
    """docker-compose passes `${OUTREACH_UNSUBSCRIBE_SECRET:-}`: empty means the default, which is refused."""
    for name in list(os.environ):
        if name.startswith("OUTREACH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OUTREACH_TWILIO_BASE_URL", "https://api.twilio.com")
    for name in ALL_THREE:
        monkeypatch.setenv(name, "")
    settings = get_settings()
    assert settings.unsubscribe_secret.get_secret_value() == safe_defaults.DEFAULT_UNSUBSCRIBE_SECRET
    assert settings.sendgrid_webhook_public_key is None
    assert named(safe_defaults.unsafe_defaults(settings)) == ALL_THREE


def test_a_channel_settings_record_may_not_bring_a_public_secret_back():
    """The feed's rule: a record is skipped when, over the environment and the other channels, it would leave a
    secret at its public value with a real endpoint that the environment alone does not have."""
    simulator_env, own_env = Settings(), Settings(**OWN)
    real_twilio = {"account_sid": "AC1", "auth_token": "our-twilio-auth-token-0123",
                   "messaging_service_sid": "MG1", "base_url": "https://api.twilio.com"}

    def config(channel, provider, credentials):
        return cs.ChannelConfig("id", channel, provider, credentials, cs.overrides(channel, provider, credentials))

    sms = config("sms", "twilio", real_twilio)
    refused = cs.unsafe_change(simulator_env, {}, sms)
    assert "OUTREACH_UNSUBSCRIBE_SECRET" in refused and "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY" in refused
    assert "OUTREACH_TWILIO_AUTH_TOKEN" not in refused  # the record sets its own
    assert cs.unsafe_change(own_env, {}, sms) is None
    assert cs.unsafe_change(own_env, {}, config("sms", "twilio", {**real_twilio, "auth_token": "simulator-auth-token"}))
    simulator_key = config("email", "sendgrid", {"api_key": "SG.k",
                                                 "webhook_public_key": sigs.SIMULATOR_SENDGRID_PUBLIC_KEY})
    assert cs.unsafe_change(own_env, {}, simulator_key) is None  # no real endpoint yet
    assert "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY" in cs.unsafe_change(own_env, {"sms": sms}, simulator_key)
    # An environment that already has a real endpoint and a public secret (a test's, not a started service's):
    # a record that makes nothing worse applies.
    real_env = Settings(twilio_base_url="http://127.0.0.1:1")
    same_endpoint = config("sms", "twilio", {**real_twilio, "base_url": "http://127.0.0.1:1"})
    assert cs.unsafe_change(real_env, {}, same_endpoint) is None


# ------------------------------------------------------------------ service processes

def service_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("OUTREACH_") and name != "KAFKA_BOOTSTRAP_SERVERS"}
    # Nothing listens there: a refusal comes before any connection.
    env.update(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}", OUTREACH_DATA_DIR=str(tmp_path),
               OUTREACH_API_PORT=str(free_port()), OUTREACH_WEBHOOK_PORT=str(free_port()), **variables)
    return env


@pytest.mark.parametrize("module, code", [
    ("services.webhook_receiver", EXIT_CONFIG),
    ("services.sender", EXIT_CONFIG),
    ("services.api", 3),  # uvicorn's start-up failure
])
def test_a_service_refuses_to_start_with_public_secrets_and_a_real_endpoint(tmp_path, module, code):
    env = service_env(tmp_path, OUTREACH_SENDGRID_BASE_URL="https://api.sendgrid.com",
                      OUTREACH_TWILIO_AUTH_TOKEN="our-twilio-auth-token-0123", OUTREACH_UNSUBSCRIBE_SECRET="")
    done = subprocess.run([sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == code, done.stderr[-3000:]
    assert "a real provider endpoint is configured (OUTREACH_SENDGRID_BASE_URL=https://api.sendgrid.com)" in done.stderr
    assert "OUTREACH_UNSUBSCRIBE_SECRET" in done.stderr and "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY" in done.stderr
    assert "  - OUTREACH_TWILIO_AUTH_TOKEN" not in done.stderr  # set: not named


def test_every_service_but_the_api_and_the_simulator_starts_through_run_service():
    """The refusal is in the one start-up path (services/common/runtime.py); the API has its own (its router's
    lifespan), the simulator is the development provider."""
    import importlib

    from outreach.up import SERVICES

    for name, module in SERVICES.items():
        if name in ("api", "simulator"):
            continue
        entry = importlib.import_module(module if module.endswith("relay") else module + ".app")
        assert "run_service(" in inspect.getsource(entry.main), module


# ------------------------------------------------------------------ the API

@pytest.fixture
def api(tmp_path):
    """The API with the environment's default secrets, its broker unreachable (a refusal publishes nothing)."""
    from services.api.app import BackgroundServer, create_app
    from services.api.commands import CommandPublisher
    from services.api.store import ApiStore

    def start(**fields):
        settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", data_dir=tmp_path, **fields)
        with ApiStore.open(settings) as store:
            token = store.create_token("olga", "org_admin")[0]
        server = BackgroundServer(create_app(settings, publisher=CommandPublisher(settings, timeout_s=1))).start()
        opened.append(server)
        return httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {token}"})

    opened = []
    yield start
    for server in opened:
        server.stop()


TWILIO = {"account_sid": "ACsafe00000000000000000000000001", "auth_token": "our-twilio-auth-token-0123",
          "messaging_service_sid": "MGsafe00000000000000000000000001"}


def test_put_channel_settings_with_a_real_endpoint_and_public_secrets_is_422(api):
    client = api()
    refused = client.put("/settings/channels/sms", json={"provider": "twilio", "credentials": {
        **TWILIO, "auth_token": "simulator-auth-token", "base_url": "https://api.twilio.com"}})
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert "real provider endpoint (OUTREACH_TWILIO_BASE_URL=https://api.twilio.com)" in detail
    assert all(name in detail for name in ALL_THREE) and "credentials.auth_token" in detail
    assert "simulator-auth-token" not in detail

    own_token = client.put("/settings/channels/sms", json={"provider": "twilio", "credentials": {
        **TWILIO, "base_url": "https://api.twilio.com"}})
    assert own_token.status_code == 422 and "OUTREACH_TWILIO_AUTH_TOKEN" not in own_token.json()["detail"]
    assert "OUTREACH_UNSUBSCRIBE_SECRET" in own_token.json()["detail"]  # the environment's: only it can set it

    smtp = client.put("/settings/channels/email", json={"provider": "smtp", "credentials": {
        "host": "mail.example.org", "port": "587"}})
    assert smtp.status_code == 422 and "mail.example.org:587" in smtp.json()["detail"]

    assert client.get("/settings/channels/sms").json()["source"] == "environment"  # nothing was stored
    # The simulator's endpoints need nothing: stored (503: the broker is away, the settings are kept).
    assert client.put("/settings/channels/sms", json={"provider": "twilio", "credentials": TWILIO}).status_code == 503


def test_put_channel_settings_counts_the_other_channels_stored_settings(api):
    client = api(unsubscribe_secret=OWN["unsubscribe_secret"], sendgrid_webhook_public_key=OWN_KEY)
    real_sms = client.put("/settings/channels/sms", json={"provider": "twilio", "credentials": {
        **TWILIO, "base_url": "https://api.twilio.com"}})
    assert real_sms.status_code == 503  # taken (stored; the broker is away)
    # Email on the simulator, but with the simulator's public key while SMS goes to the real Twilio: refused.
    public_key = client.put("/settings/channels/email", json={"provider": "sendgrid", "credentials": {
        "api_key": "SG.k", "webhook_public_key": sigs.SIMULATOR_SENDGRID_PUBLIC_KEY}})
    assert public_key.status_code == 422
    assert "OUTREACH_TWILIO_BASE_URL=https://api.twilio.com" in public_key.json()["detail"]
    assert "credentials.webhook_public_key" in public_key.json()["detail"]
    assert client.put("/settings/channels/email", json={"provider": "sendgrid", "credentials": {
        "api_key": "SG.k"}}).status_code == 503  # the environment's own key


async def test_the_api_does_not_start_with_a_real_endpoint_and_public_secrets(tmp_path):
    """Its lifespan fails (uvicorn then exits 3: test_a_service_refuses_to_start_...)."""
    from services.api.app import create_app
    from services.api.commands import CommandPublisher

    for fields, refused in (({}, True), (OWN, False)):
        settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", data_dir=tmp_path,
                            twilio_base_url="https://api.twilio.com", **fields)
        app = create_app(settings, publisher=CommandPublisher(settings, timeout_s=1))
        if refused:
            with pytest.raises(safe_defaults.UnsafeDefaults, match="(?s)the API refuses to start: .*TWILIO_AUTH"):
                async with app.router.lifespan_context(app):
                    pass
        else:
            async with app.router.lifespan_context(app):
                pass
