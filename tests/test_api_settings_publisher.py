"""The API's ChannelSettingsChanged producer: what it publishes is the schemas/ model's record (its model
decodes it, the sealed credentials open with the store's key), and a record the model refuses is refused
where it is made, before anything reaches the broker."""
from __future__ import annotations

import pydantic
import pytest
from cryptography.fernet import Fernet

from schemas import topics
from schemas.internal import ChannelSettingsChanged
from services.api.commands import CommandPublisher
from services.api.settings_publisher import SettingsPublisher, record
from services.api.store import ApiStore, SealedChannelSettings
from services.common import channel_settings, records
from services.common.secrets import encryption_key
from services.common.settings import Settings
from tests.conftest import async_wait_until
from tests.e2e_support import Tail

TWILIO = {"account_sid": "AC0000000000000000000000000000000", "auth_token": "auth-token-0123456789",
          "messaging_service_sid": "MG0000000000000000000000000000000"}


async def test_what_the_api_publishes_decodes_with_its_model(kafka_bootstrap, tmp_path):
    settings = Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=tmp_path)
    tail = await Tail(settings, topics.CHANNEL_SETTINGS).start()
    publisher = CommandPublisher(settings)
    try:
        with ApiStore.open(settings) as store:
            stored = await SettingsPublisher(store, publisher).save_and_publish("sms", "twilio", TWILIO, "olga")

        def published() -> list[bytes]:
            return [r.value for r, value in tail.records[topics.CHANNEL_SETTINGS]
                    if isinstance(value, dict) and value.get("settings_id") == stored.settings_id]

        value = (await async_wait_until(published, 30, message="the settings were not published"))[0]
        decoded = records.decode(ChannelSettingsChanged, value)
        assert (decoded.channel, decoded.provider, decoded.settings_id) == ("sms", "twilio", stored.settings_id)
        opened = channel_settings.open_record(value, Fernet(encryption_key(settings)))
        assert dict(opened.credentials) == TWILIO
    finally:
        await publisher.stop()
        await tail.stop()


async def test_a_record_its_model_refuses_is_refused_where_it_is_made(tmp_path):
    sealed = SealedChannelSettings(channel="fax", provider="twilio", sealed_credentials="gAAAA",
                                   settings_id="0b7c6f4e-1d2a-4c3b-9e8f-7a6b5c4d3e2f", updated_at="2026-01-01")
    with pytest.raises(pydantic.ValidationError, match="channel"):
        record(sealed)
    # Nothing but a model goes out (refused before the broker is even asked: none listens on this port).
    publisher = CommandPublisher(Settings(kafka_bootstrap_servers="127.0.0.1:9", data_dir=tmp_path), timeout_s=1)
    with pytest.raises(TypeError):
        await publisher.publish_record(topics.CHANNEL_SETTINGS, "sms", {"type": "ChannelSettingsChanged"})
