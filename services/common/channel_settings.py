"""Channel settings set over the API, as every service applies them (the kernel's part).

The API publishes `ChannelSettingsChanged` on `outreach.internal.channel-settings` (key channel) after an
org_admin stores a channel's provider and credentials; the sender and the webhook receiver take the latest
record of each channel over what the environment configures:

- `PROVIDERS`: the providers of each channel and their credential fields (what the API accepts);
- `overrides(channel, provider, credentials)`: the `Settings` fields those set (pure);
- `open_record(value, cipher)`: a record's value -> `ChannelConfig` (decrypted, checked) or `BadRecord`;
- `ChannelSettingsFeed`: reads the topic from its beginning to its end (`load`), then follows it (`follow`),
  handing each good record to a callback. A record it cannot decrypt or validate is logged and skipped, and
  so is one that would point a channel at a real provider while a secret keeps its public development value
  (services/common/safe_defaults.py; the API refuses such settings, this holds if one comes anyway).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr

from schemas import topics
from schemas.internal import ChannelSettingsChanged
from services.common import jsoncodec, kafka, records, safe_defaults
from services.common.secrets import cipher as settings_cipher
from services.common.settings import Settings

log = logging.getLogger("outreach.channel-settings")

# channel -> provider -> (required credential fields, optional ones)
PROVIDERS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "sms": {
        "twilio": (("account_sid", "auth_token", "messaging_service_sid"), ("base_url",)),
        "inprocess": ((), ()),
    },
    "email": {
        "sendgrid": (("api_key",), ("base_url", "webhook_public_key")),
        "smtp": (("host", "port"), ("username", "password", "starttls")),
        "inprocess": ((), ()),
    },
}
CHANNELS = tuple(PROVIDERS)
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


class SettingsError(ValueError):
    """A provider unknown for the channel, or credentials missing / not expected / malformed."""


def check(channel: str, provider: str, credentials: Mapping[str, Any]) -> dict[str, str]:
    """The credentials without empty values, if they are what `provider` takes on `channel`."""
    providers = PROVIDERS.get(channel)
    if providers is None:
        raise SettingsError(f"channel {channel!r} is not one of {list(CHANNELS)}")
    if provider not in providers:
        raise SettingsError(f"provider {provider!r} is not one of {sorted(providers)} for {channel}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in credentials.items()):
        raise SettingsError("credentials must map field names to strings")
    required, optional = providers[provider]
    missing = [f for f in required if not credentials.get(f)]
    unexpected = [f for f in credentials if f not in required and f not in optional]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"not expected {unexpected}")
        raise SettingsError(f"{provider} credentials: {'; '.join(parts)} (required {list(required)}, "
                            f"optional {list(optional)})")
    return {k: v for k, v in credentials.items() if v != ""}


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise SettingsError(f"smtp port {value!r} is not a number") from None
    if not 0 < port < 65536:
        raise SettingsError(f"smtp port {port} is out of range")
    return port


def _flag(name: str, value: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingsError(f"{name} {value!r} is not true or false")


def overrides(channel: str, provider: str, credentials: Mapping[str, str]) -> dict[str, Any]:
    """The `Settings` fields that stored settings set, typed as `Settings` holds them.

    A channel's settings replace its provider choice and credentials as a whole; an optional field left
    out keeps the environment's value where it is about where the provider is (base URLs, the SendGrid
    webhook key) and takes its empty value where it is a credential (SMTP username, password, STARTTLS).
    """
    creds = check(channel, provider, credentials)
    if channel == "sms":
        result: dict[str, Any] = {"sms_provider": provider}
        if provider == "twilio":
            result.update(twilio_account_sid=creds["account_sid"], twilio_auth_token=SecretStr(creds["auth_token"]),
                          twilio_messaging_service_sid=creds["messaging_service_sid"])
            if "base_url" in creds:
                result["twilio_base_url"] = creds["base_url"]
        return result
    result = {"email_provider": provider}
    if provider == "sendgrid":
        result["sendgrid_api_key"] = SecretStr(creds["api_key"])
        if "base_url" in creds:
            result["sendgrid_base_url"] = creds["base_url"]
        if "webhook_public_key" in creds:
            result["sendgrid_webhook_public_key"] = creds["webhook_public_key"]
    elif provider == "smtp":
        result.update(smtp_host=creds["host"], smtp_port=_port(creds["port"]),
                      smtp_username=creds.get("username"),
                      smtp_password=SecretStr(creds["password"]) if "password" in creds else None,
                      smtp_starttls=_flag("starttls", creds.get("starttls", "")))
    return result


@dataclass(frozen=True)
class ChannelConfig:
    """One channel's stored settings, decrypted and checked."""
    settings_id: str
    channel: str
    provider: str
    credentials: Mapping[str, str] = field(repr=False)
    overrides: Mapping[str, Any] = field(repr=False)


def apply(settings: Settings, configs: Mapping[str, ChannelConfig] | Any) -> Settings:
    """`settings` with each channel's stored settings over the environment's."""
    update: dict[str, Any] = {}
    for config in (configs.values() if isinstance(configs, Mapping) else configs):
        update.update(config.overrides)
    return settings.model_copy(update=update) if update else settings


def unsafe_change(environment: Settings, current: Mapping[str, ChannelConfig], config: ChannelConfig) -> str | None:
    """Why `config` may not be applied over `environment` and the `current` configs: it would leave a secret at
    its public development value with a real provider endpoint (a problem the environment alone has not, so a
    service started on it runs as before). None when it may."""
    already = {problem.setting for problem in safe_defaults.unsafe_defaults(environment)}
    in_force = apply(environment, {**current, config.channel: config})
    new = [problem for problem in safe_defaults.unsafe_defaults(in_force) if problem.setting not in already]
    if not new:
        return None
    return safe_defaults.refusal(in_force, new, doing=f"{config.channel} settings {config.settings_id} not applied")


class BadRecord(ValueError):
    """A channel-settings record that is not JSON, not a ChannelSettingsChanged, does not decrypt with our
    key, or does not hold credentials the provider takes."""


def seal(cipher: Fernet, credentials: Mapping[str, str]) -> str:
    return cipher.encrypt(jsoncodec.dumps(dict(credentials))).decode("ascii")


def open_record(value: bytes | None, cipher: Fernet) -> ChannelConfig:
    """A record's value, decrypted and checked (BadRecord if it cannot be)."""
    try:
        record = records.decode(ChannelSettingsChanged, value)
    except records.InvalidRecord as exc:
        raise BadRecord(f"not a ChannelSettingsChanged: {exc}") from None
    try:
        credentials = jsoncodec.loads(cipher.decrypt(record.credentials.encode("ascii")))
    except (InvalidToken, UnicodeEncodeError, ValueError):
        raise BadRecord(f"{record.channel} settings {record.settings_id}: the credentials do not decrypt with this "
                        "service's key (OUTREACH_API_ENCRYPTION_KEY must be the API's)") from None
    if not isinstance(credentials, dict):
        raise BadRecord(f"{record.channel} settings {record.settings_id}: the credentials are not an object")
    try:
        fields = overrides(record.channel, record.provider, credentials)
    except SettingsError as exc:
        raise BadRecord(f"{record.channel} settings {record.settings_id}: {exc}") from None
    return ChannelConfig(record.settings_id, record.channel, record.provider, credentials, fields)


OnChange = Callable[[ChannelConfig], Any]


class ChannelSettingsFeed:
    """The channel-settings topic read without a consumer group (every instance reads every record).

    `await load()` reads it from the beginning to the end offsets it finds and returns the latest good
    config of each channel; `await follow(stop, on_change)` then hands each later good record to
    `on_change` (a callable or coroutine function), until `stop` is set. `close()` at the end.
    """

    def __init__(self, settings: Settings, cipher: Fernet | None = None, *, poll_ms: int = 200):
        self.settings = settings
        self.cipher = cipher or settings_cipher(settings)
        self.current: dict[str, ChannelConfig] = {}
        self.skipped = 0  # records logged and skipped
        self._poll_ms = poll_ms
        self._consumer: AIOKafkaConsumer | None = None

    async def _start(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap_servers,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    max_partition_fetch_bytes=4 * 1024 * 1024)
        await consumer.start()
        self._consumer = consumer
        return consumer

    async def load(self) -> dict[str, ChannelConfig]:
        """Read the topic (created by `ensure_topics` beforehand) to its end: the latest config per channel."""
        consumer = self._consumer or await self._start()
        await consumer.topics()  # all-topics metadata: creates nothing
        tps = [TopicPartition(topics.CHANNEL_SETTINGS, p)
               for p in sorted(consumer.partitions_for_topic(topics.CHANNEL_SETTINGS) or ())]
        if not tps:
            raise RuntimeError(f"topic {topics.CHANNEL_SETTINGS} does not exist (ensure_topics first)")
        ends = await kafka.end_offsets(consumer, tps)
        await consumer.seek_to_beginning(*tps)
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batches = await consumer.getmany(timeout_ms=self._poll_ms)
            for records in batches.values():
                for record in records:
                    self._take(record)
        return dict(self.current)

    async def follow(self, stop: asyncio.Event, on_change: OnChange) -> None:
        consumer = self._consumer or await self._start()
        if not consumer.assignment():
            await self.load()
        while not stop.is_set():
            try:
                batches = await consumer.getmany(timeout_ms=self._poll_ms)
            except Exception:  # the broker away for a while: keep the settings in hand, try again
                log.exception("reading %s failed; retrying", topics.CHANNEL_SETTINGS)
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for record in records:
                    config = self._take(record)
                    if config is None:
                        continue
                    try:
                        outcome = on_change(config)
                        if asyncio.iscoroutine(outcome):
                            await outcome
                    except Exception:
                        log.exception("applying %s settings %s failed", config.channel, config.settings_id)

    def _take(self, record) -> ChannelConfig | None:
        try:
            config = open_record(record.value, self.cipher)
            refused = unsafe_change(self.settings, self.current, config)
            if refused:
                raise BadRecord(refused)
        except BadRecord as exc:
            self.skipped += 1
            log.error("%s[%d]@%d skipped: %s", record.topic, record.partition, record.offset, exc)
            return None
        self.current[config.channel] = config
        log.info("%s settings %s: provider %s", config.channel, config.settings_id, config.provider)
        return config

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()
