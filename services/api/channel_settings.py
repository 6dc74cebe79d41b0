"""Channel settings: which provider a channel uses, and its credentials (org_admin only).

Credentials are write-only: a PUT stores them encrypted (services/api/store.py), a GET shows them masked.
Without stored settings a GET shows what the environment configures (the sender's actual settings).

A PUT is published as `ChannelSettingsChanged` on `outreach.internal.channel-settings` (the credentials
sealed with the same key); the sender and the webhook receiver follow that topic and apply the latest
settings of each channel (services/common/channel_settings.py). `applied_to_sender` is true once the
broker acknowledged the record.

A PUT is refused (422) when the settings it would put in force, over the environment and the other channel's
stored settings, point at a real provider while a secret keeps its public development value
(`unsafe_with`, services/common/safe_defaults.py): the sender and the webhook receiver would skip it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.api.store import CredentialsUnreadable, StoredChannelSettings
from services.common import safe_defaults
from services.common.channel_settings import CHANNELS, SettingsError, overrides
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
    provider, values = environment_credentials(channel, settings)
    return {"channel": channel, "provider": provider, "credentials": {k: mask(v) for k, v in values.items() if v},
            "source": "environment", "updated_by": None, "updated_at": None, "applied_to_sender": True}


def environment_credentials(channel: str, settings: Settings) -> tuple[str, dict[str, str]]:
    """The provider the environment configures for the channel and its credentials, in clear (for masking,
    or for the console's form, which shows only those that are not secrets)."""
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
    return provider, values


def in_force_with(settings: Settings, channel: str, provider: str, credentials: dict[str, str],
                  stored: Callable[[str], StoredChannelSettings | None]) -> Settings:
    """The settings the services would apply once `channel` has these: the environment's, the other channels'
    stored settings over them (those that do not open or no longer check are left out, as the services skip
    them), then these."""
    update: dict[str, Any] = {}
    for other in CHANNELS:
        if other == channel:
            continue
        try:
            kept = stored(other)
            if kept is not None:
                update.update(overrides(other, kept.provider, kept.credentials))
        except (CredentialsUnreadable, SettingsError):
            continue
    update.update(overrides(channel, provider, credentials))
    return settings.model_copy(update=update)


def unsafe_with(settings: Settings, channel: str, provider: str, credentials: dict[str, str],
                stored: Callable[[str], StoredChannelSettings | None]) -> str | None:
    """Why these settings are refused (a real provider endpoint while secrets keep their public development
    values, each named), or None."""
    in_force = in_force_with(settings, channel, provider, credentials, stored)
    problems = safe_defaults.unsafe_defaults(in_force)
    if not problems:
        return None
    return (f"refused: these settings use a real provider endpoint "
            f"({', '.join(safe_defaults.real_endpoints(in_force))}) while secrets keep their public development "
            f"values; set each first: " + "; ".join(str(problem) for problem in problems))
