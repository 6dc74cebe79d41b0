"""Channel settings: which provider a channel uses, and its credentials (org_admin only).

Credentials are write-only: a PUT stores them encrypted (services/api/store.py), a GET shows them masked.
Without stored settings a GET shows what the environment configures (the sender's actual settings).

The running sender reads its provider settings from the environment when it starts; applying stored
settings to it (a reload, or the sender reading api.db) is not done yet: `applied_to_sender` says so.
"""
from __future__ import annotations

from typing import Any

from services.api.store import StoredChannelSettings
from services.common.settings import Settings

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
MASK = "****"
SHOWN_TAIL = 4
MIN_LENGTH_FOR_TAIL = 12  # a shorter value would give away too much of itself


class SettingsError(ValueError):
    """A provider unknown for the channel, or credentials missing / not expected."""


def check(channel: str, provider: str, credentials: dict[str, str]) -> dict[str, str]:
    providers = PROVIDERS[channel]
    if provider not in providers:
        raise SettingsError(f"provider {provider!r} is not one of {sorted(providers)} for {channel}")
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


def mask(value: str | None) -> str:
    if not value:
        return ""
    if len(value) < MIN_LENGTH_FOR_TAIL:
        return MASK
    return MASK + value[-SHOWN_TAIL:]


def masked_view(stored: StoredChannelSettings) -> dict[str, Any]:
    return {"channel": stored.channel, "provider": stored.provider,
            "credentials": {k: mask(v) for k, v in stored.credentials.items()},
            "source": "stored", "updated_by": stored.updated_by, "updated_at": stored.updated_at,
            "applied_to_sender": False}


def environment_view(channel: str, settings: Settings) -> dict[str, Any]:
    """What the environment configures for the channel, masked the same way."""
    if channel == "sms":
        provider = settings.sms_provider
        values = {} if provider == "inprocess" else {
            "account_sid": settings.twilio_account_sid,
            "auth_token": settings.twilio_auth_token.get_secret_value(),
            "messaging_service_sid": settings.twilio_messaging_service_sid,
            "base_url": settings.twilio_url,
        }
    else:
        provider = settings.email_provider
        if provider == "sendgrid":
            values = {"api_key": settings.sendgrid_api_key.get_secret_value(), "base_url": settings.sendgrid_url}
        elif provider == "smtp":
            values = {"host": settings.smtp_host, "port": str(settings.smtp_port),
                      "username": settings.smtp_username or "",
                      "password": settings.smtp_password.get_secret_value() if settings.smtp_password else ""}
        else:
            values = {}
    return {"channel": channel, "provider": provider, "credentials": {k: mask(v) for k, v in values.items() if v},
            "source": "environment", "updated_by": None, "updated_at": None, "applied_to_sender": True}
