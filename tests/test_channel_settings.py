"""Channel settings set over the API take effect: the kernel's mapping and record handling (pure), the
channel-settings topic read and followed (real broker), the API publishing what it stores, and the sender
switching a channel's adapter on a record (real broker, the HTTP provider simulator)."""
from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from schemas import topics
from schemas.internal import ChannelSettingsChanged
from services.api.app import BackgroundServer, create_app
from services.api.store import ApiStore
from services.common import channel_settings as cs
from services.common import jsoncodec, secrets
from services.common import webhook_signatures as sigs
from services.common.embedded_broker import EmbeddedBroker, free_port
from services.common.kafka import ensure_topics, make_producer
from services.common.settings import Settings
from services.simulator.app import Simulator
from tests.conftest import async_wait_until
from tests.test_sender_broker import SMS_TEMPLATE, FakeHandler, by_message, check_alive, items_for, running_sender

TWILIO = {"account_sid": "ACnew000000000000000000000000000", "auth_token": "new-auth-token-0123456789",
          "messaging_service_sid": "MGnew000000000000000000000000000"}
# Secrets of this deployment's own: settings pointing at a real provider (SMTP at mail.example.org) are applied
# only with them (services/common/safe_defaults.py).
OWN_SECRETS = {"unsubscribe_secret": "channel-settings-test-unsubscribe-secret",
               "sendgrid_webhook_public_key": "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1"
                                              "flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="}


# ------------------------------------------------------------------ the mapping (pure)

def test_overrides_map_each_provider_to_settings_fields():
    sms = cs.overrides("sms", "twilio", TWILIO)
    assert sms == {"sms_provider": "twilio", "twilio_account_sid": TWILIO["account_sid"],
                   "twilio_auth_token": SecretStr(TWILIO["auth_token"]),
                   "twilio_messaging_service_sid": TWILIO["messaging_service_sid"]}
    assert cs.overrides("sms", "twilio", {**TWILIO, "base_url": "https://api.twilio.com"})["twilio_base_url"] == \
        "https://api.twilio.com"
    assert cs.overrides("sms", "inprocess", {}) == {"sms_provider": "inprocess"}
    assert cs.overrides("email", "sendgrid", {"api_key": "SG.k", "webhook_public_key": "MFk"}) == {
        "email_provider": "sendgrid", "sendgrid_api_key": SecretStr("SG.k"), "sendgrid_webhook_public_key": "MFk"}
    smtp = cs.overrides("email", "smtp", {"host": "mail.example.org", "port": "587", "username": "u",
                                          "password": "p", "starttls": "true"})
    assert smtp == {"email_provider": "smtp", "smtp_host": "mail.example.org", "smtp_port": 587, "smtp_username": "u",
                    "smtp_password": SecretStr("p"), "smtp_starttls": True}
    # SMTP settings replace the credentials as a whole: what is left out is empty, not the environment's.
    assert cs.overrides("email", "smtp", {"host": "h", "port": "25"}) == {
        "email_provider": "smtp", "smtp_host": "h", "smtp_port": 25, "smtp_username": None, "smtp_password": None,
        "smtp_starttls": False}


@pytest.mark.parametrize("channel, provider, credentials, error", [
    ("sms", "sendgrid", {}, "not one of"),
    ("fax", "twilio", {}, "channel"),
    ("sms", "twilio", {"account_sid": "AC1"}, "missing"),
    ("email", "sendgrid", {"api_key": "k", "colour": "red"}, "not expected"),
    ("email", "smtp", {"host": "h", "port": "twenty-five"}, "not a number"),
    ("email", "smtp", {"host": "h", "port": "70000"}, "out of range"),
    ("email", "smtp", {"host": "h", "port": "25", "starttls": "maybe"}, "true or false"),
    ("sms", "twilio", {**TWILIO, "auth_token": 42}, "strings"),
])
def test_overrides_refuse_what_a_provider_does_not_take(channel, provider, credentials, error):
    with pytest.raises(cs.SettingsError, match=error):
        cs.overrides(channel, provider, credentials)


def test_apply_puts_each_channel_over_the_environment(tmp_path):
    environment = Settings(data_dir=tmp_path, twilio_base_url="http://twilio.test", email_provider="smtp")
    config = cs.ChannelConfig("id", "sms", "twilio", TWILIO, cs.overrides("sms", "twilio", TWILIO))
    applied = cs.apply(environment, {"sms": config})
    assert applied.twilio_auth_token.get_secret_value() == TWILIO["auth_token"]
    assert applied.twilio_account_sid == TWILIO["account_sid"]
    assert applied.twilio_url == "http://twilio.test"  # not given: where the provider is stays the environment's
    assert applied.email_provider == "smtp" and applied.data_dir == tmp_path
    assert environment.twilio_auth_token.get_secret_value() == "simulator-auth-token"  # untouched
    assert cs.apply(environment, {}) is environment


# ------------------------------------------------------------------ records (pure)

def sealed_record(cipher: Fernet, channel: str, provider: str, credentials: dict, settings_id: str | None = None,
                  ) -> dict:
    return {"type": "ChannelSettingsChanged", "settings_id": settings_id or str(uuid.uuid4()), "channel": channel,
            "provider": provider, "credentials": cs.seal(cipher, credentials),
            "occurred_at": "2026-01-01T00:00:00.000000Z"}


def test_a_record_round_trips_and_never_carries_plaintext():
    cipher = Fernet(Fernet.generate_key())
    record = sealed_record(cipher, "sms", "twilio", TWILIO)
    value = jsoncodec.dumps(record)
    assert TWILIO["auth_token"].encode() not in value and b"auth_token" not in value
    ChannelSettingsChanged.model_validate(jsoncodec.loads(value))
    config = cs.open_record(value, cipher)
    assert (config.channel, config.provider, dict(config.credentials)) == ("sms", "twilio", TWILIO)
    assert config.settings_id == record["settings_id"]
    assert config.overrides == cs.overrides("sms", "twilio", TWILIO)
    assert TWILIO["auth_token"] not in repr(config)


def test_records_that_do_not_open_are_refused_with_a_reason():
    cipher, other = Fernet(Fernet.generate_key()), Fernet(Fernet.generate_key())
    with pytest.raises(cs.BadRecord, match="do not decrypt"):
        cs.open_record(jsoncodec.dumps(sealed_record(other, "sms", "twilio", TWILIO)), cipher)
    with pytest.raises(cs.BadRecord, match="not a ChannelSettingsChanged"):
        cs.open_record(b"{not json", cipher)
    with pytest.raises(cs.BadRecord, match="not a ChannelSettingsChanged"):
        cs.open_record(jsoncodec.dumps({**sealed_record(cipher, "sms", "twilio", TWILIO), "channel": "fax"}), cipher)
    with pytest.raises(cs.BadRecord, match="missing"):
        cs.open_record(jsoncodec.dumps(sealed_record(cipher, "sms", "twilio", {"account_sid": "AC1"})), cipher)
    with pytest.raises(cs.BadRecord, match="not an object"):
        record = sealed_record(cipher, "sms", "twilio", {})
        record["credentials"] = cipher.encrypt(b"[1, 2]").decode()
        cs.open_record(jsoncodec.dumps(record), cipher)


def test_the_key_is_the_setting_else_one_file_shared_by_every_service(tmp_path):
    first = secrets.encryption_key(Settings(data_dir=tmp_path))
    assert secrets.encryption_key(Settings(data_dir=tmp_path)) == first  # a second service finds the same
    assert (tmp_path / secrets.KEY_FILE_NAME).stat().st_mode & 0o777 == 0o600
    given = Fernet.generate_key()
    assert secrets.encryption_key(Settings(data_dir=tmp_path, api_encryption_key=given.decode())) == given
    with pytest.raises(ValueError):
        secrets.encryption_key(Settings(data_dir=tmp_path, api_encryption_key="not-a-key"))


# ------------------------------------------------------------------ on the broker

@pytest.fixture(scope="module")
def kafka_bootstrap(kafka_bootstrap, request):
    """A private broker: the feed reads the whole topic, and the sender every campaign event."""
    import os

    if os.environ.get("OUTREACH_TEST_KAFKA") in ("external", "testcontainers"):
        return kafka_bootstrap
    broker = EmbeddedBroker("127.0.0.1", free_port("127.0.0.1"))
    broker.start()
    request.addfinalizer(broker.stop)
    return broker.bootstrap


async def publish(settings: Settings, *values: bytes, key: str = "sms") -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topics.CHANNEL_SETTINGS, value, key=key.encode())
    finally:
        await producer.stop()


async def test_the_feed_loads_the_latest_good_record_then_follows_skipping_poison(kafka_bootstrap, tmp_path):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path, **OWN_SECRETS)
    await ensure_topics(settings)
    cipher = secrets.cipher(settings)
    older = sealed_record(cipher, "sms", "twilio", {**TWILIO, "auth_token": "older-token-000000"})
    latest = sealed_record(cipher, "sms", "twilio", TWILIO)
    foreign = sealed_record(Fernet(Fernet.generate_key()), "sms", "inprocess", {})  # another deployment's key
    await publish(settings, jsoncodec.dumps(older), jsoncodec.dumps(latest), jsoncodec.dumps(foreign), b"\xff junk")
    feed = cs.ChannelSettingsFeed(settings)
    try:
        loaded = await asyncio.wait_for(feed.load(), 30)
        assert loaded["sms"].settings_id == latest["settings_id"]  # the poison after it changed nothing
        assert feed.skipped >= 2
        seen: list[cs.ChannelConfig] = []
        stop = asyncio.Event()
        follower = asyncio.create_task(feed.follow(stop, seen.append))
        email = sealed_record(cipher, "email", "smtp", {"host": "mail.example.org", "port": "587"})
        # The real SendGrid with the simulator's (public) Event Webhook key: skipped, as the API refuses it.
        public_key = sealed_record(cipher, "email", "sendgrid", {
            "api_key": "SG.k", "base_url": "https://api.sendgrid.com",
            "webhook_public_key": sigs.SIMULATOR_SENDGRID_PUBLIC_KEY})
        await publish(settings, b"[]", jsoncodec.dumps(email), key="email")
        await async_wait_until(lambda: seen, 30, message="the followed record never came")
        skipped = feed.skipped
        await publish(settings, jsoncodec.dumps(public_key), key="email")
        await async_wait_until(lambda: feed.skipped > skipped, 30, message="the unsafe record was not skipped")
        assert [c.settings_id for c in seen] == [email["settings_id"]] and not follower.done()
        assert set(feed.current) == {"sms", "email"} and feed.current["email"].provider == "smtp"
        stop.set()
        await asyncio.wait_for(follower, 10)
    finally:
        await feed.close()


async def test_the_api_publishes_what_it_stores_and_again_when_it_starts(kafka_bootstrap, tmp_path):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path, **OWN_SECRETS)
    await ensure_topics(settings)
    with ApiStore.open(settings) as store:
        token = store.create_token("olga", "org_admin")[0]
        stored_before = store.save_channel_settings("email", "smtp", {"host": "mail.example.org", "port": "25"}, "cli")
    with BackgroundServer(create_app(settings)) as server, httpx.Client(
            base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        saved = client.put("/settings/channels/sms", json={"provider": "twilio", "credentials": TWILIO})
        assert saved.status_code == 200 and saved.json()["applied_to_sender"] is True
        refused = client.put("/settings/channels/email", json={"provider": "smtp", "credentials": {
            "host": "h", "port": "smtp"}})
        assert refused.status_code == 422 and "port" in refused.text  # what the sender could not apply

        feed = cs.ChannelSettingsFeed(settings)  # the same data_dir: the same key file
        try:
            async def both_published() -> bool:
                await feed.load()
                return set(feed.current) == {"sms", "email"}

            await async_wait_until(both_published, 30, message="the stored settings were not published")
            assert dict(feed.current["sms"].credentials) == TWILIO
            assert feed.current["email"].settings_id == stored_before.settings_id  # republished at start
        finally:
            await feed.close()
        assert client.get("/settings/channels/email").json()["applied_to_sender"] is True


async def test_a_put_the_broker_does_not_take_is_stored_and_answered_503(tmp_path):
    from services.api.commands import CommandPublisher

    settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", data_dir=tmp_path)
    with ApiStore.open(settings) as store:
        token = store.create_token("olga", "org_admin")[0]
    app = create_app(settings, publisher=CommandPublisher(settings, timeout_s=1))
    with BackgroundServer(app) as server, httpx.Client(
            base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        response = client.put("/settings/channels/sms", json={"provider": "twilio", "credentials": TWILIO})
        assert response.status_code == 503 and "stored" in response.json()["detail"]
        shown = client.get("/settings/channels/sms").json()
        assert shown["source"] == "stored" and shown["applied_to_sender"] is False


# ------------------------------------------------------------------ the sender switches its adapter

@pytest.fixture
async def fake(kafka_bootstrap: str, tmp_path):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path / "fake",
                        sqlite_path=tmp_path / "outreach-events.db")  # the event store beside which the fence lives
    async with FakeHandler.running(settings) as handler:
        yield handler


@pytest.fixture
async def simulator(tmp_path):
    """The HTTP provider simulator, taking only the TWILIO credentials."""
    settings = Settings(data_dir=tmp_path / "sim", simulator_port=free_port("127.0.0.1"),
                        twilio_account_sid=TWILIO["account_sid"], twilio_auth_token=TWILIO["auth_token"],
                        twilio_messaging_service_sid=TWILIO["messaging_service_sid"], sim_late_receipt_s=3600)
    sim = Simulator(settings)
    await sim.start()
    yield settings
    await sim.stop()


async def run_sms_campaign(fake: FakeHandler, sender: asyncio.Task, n: int) -> dict[str, list[dict]]:
    campaign_id = str(uuid.uuid4())
    items = items_for(campaign_id, [f"+1202555{2000 + i:04d}" for i in range(n)])
    fake.queue(campaign_id, "sms", items)
    await fake.publish_event(campaign_id, "CampaignCreated", name="s", channel="sms", template=SMS_TEMPLATE,
                             created_by="t")
    await fake.publish_event(campaign_id, "CampaignRunStarted", run_no=1, accepted_by="t", disclaimer={},
                             message_count=n, suppressed_count=0)

    def answered() -> bool:
        check_alive(sender)
        return len(by_message(fake.results[campaign_id])) == n

    await async_wait_until(answered, 30, message="the campaign's messages were not all answered")
    results: dict[str, list[dict]] = {}
    for result in fake.results[campaign_id]:
        results.setdefault(result["message_id"], []).append(result)
    return results


async def test_a_settings_record_switches_the_senders_adapter(kafka_bootstrap, fake, simulator, tmp_path):
    # The environment's credentials are not the simulator's: its submissions are refused (20003).
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path / "sender",
                        sqlite_path=tmp_path / "outreach-events.db",  # the fence the fake relay opens
                        sms_provider="twilio",
                        email_provider="inprocess", twilio_base_url=simulator.simulator_url, presend_retries=0)
    groups = f"test-settings-{uuid.uuid4().hex[:8]}"
    made: list[tuple[str, str]] = []

    def adapter_factory(s: Settings, channel: str):
        from services.sender.providers import adapter_for

        made.append((channel, s.twilio_account_sid))
        return adapter_for(s, channel)

    async with running_sender(settings, groups, adapter_factory=adapter_factory) as sender:
        before = await run_sms_campaign(fake, sender, 3)
        assert all([r["outcome"] for r in rs] == ["refused"] and rs[0]["provider_code"] == "20003"
                   for rs in before.values()), before

        cipher = secrets.cipher(settings)  # the sender's data_dir key file, as the API's on `outreach up`
        await publish(settings, jsoncodec.dumps(sealed_record(cipher, "sms", "twilio", TWILIO)))
        await async_wait_until(lambda: ("sms", TWILIO["account_sid"]) in made, 30,
                               message="the sender did not build an adapter with the new credentials")

        after = await run_sms_campaign(fake, sender, 3)
        assert all(rs[0]["outcome"] == "accepted" and rs[0]["provider_message_id"] for rs in after.values()), after
    assert made[:2] == [("sms", settings.twilio_account_sid), ("email", settings.twilio_account_sid)]


async def test_the_sender_starts_with_the_stored_settings_and_skips_what_it_cannot_open(
        kafka_bootstrap, fake, simulator, tmp_path):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path / "sender",
                        sqlite_path=tmp_path / "outreach-events.db",  # the fence the fake relay opens
                        sms_provider="inprocess",
                        email_provider="inprocess", twilio_base_url=simulator.simulator_url, presend_retries=0)
    await ensure_topics(settings)
    cipher = secrets.cipher(settings)
    await publish(settings, jsoncodec.dumps(sealed_record(cipher, "sms", "twilio", TWILIO)),
                  jsoncodec.dumps(sealed_record(Fernet(Fernet.generate_key()), "sms", "inprocess", {})), b"junk")
    async with running_sender(settings, f"test-settings-{uuid.uuid4().hex[:8]}") as sender:
        results = await run_sms_campaign(fake, sender, 2)
        assert all(rs[0]["outcome"] == "accepted" for rs in results.values()), results
        async with httpx.AsyncClient() as client:  # through Twilio (the HTTP simulator), not in-process
            submitted = (await client.get(f"{simulator.simulator_url}/_simulator/submissions")).json()
        assert set(results) <= set(submitted)
        await publish(settings, b"{}", jsoncodec.dumps(sealed_record(cipher, "sms", "twilio", {
            **TWILIO, "auth_token": "wrong-token-0000000000"})))
        await async_wait_until(lambda: sender_refuses(fake, sender), 30, message="the wrong token never applied")


async def sender_refuses(fake: FakeHandler, sender: asyncio.Task) -> bool:
    results = await run_sms_campaign(fake, sender, 1)
    return all(rs[0]["outcome"] == "refused" and rs[0]["provider_code"] == "20003" for rs in results.values())
