"""Channel settings: which provider a channel uses, and its credentials (org_admin only).

Credentials are write-only: a PUT stores them encrypted (services/api/store.py), a GET shows them masked.
Without stored settings a GET shows what the environment configures (the sender's actual settings).

A PUT is published as `ChannelSettingsChanged` on `outreach.internal.channel-settings` (the credentials
sealed with the same key); the sender and the webhook receiver follow that topic and apply the latest
settings of each channel (services/common/channel_settings.py). `applied_to_sender` is true once the
broker acknowledged the record.
"""
from __future__ import annotations

from typing import Any

from services.api.store import StoredChannelSettings
from services.common.settings import Settings

MASK = "****"
SHOWN_TAIL = 4
MIN_LENGTH_FOR_TAIL = 12  # a shorter value would give away too much of itself


def mask(value: str | None) -> str:
    if not value:
        return ""
    if len(value) < MIN_LENGTH_FOR_TAIL:
        return MASK
    return MASK + value[-SHOWN_TAIL:]


def masked_view(stored: StoredChannelSettings, applied: bool = True) -> dict[str, Any]:
    return {"channel": stored.channel, "provider": stored.provider,
            "credentials": {k: mask(v) for k, v in stored.credentials.items()},
            "source": "stored", "updated_by": stored.updated_by, "updated_at": stored.updated_at,
            "applied_to_sender": applied}


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
