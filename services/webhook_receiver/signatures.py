"""Who signed a callback: the receiver's side of the providers' signatures.

Twilio requests are verified with the Twilio auth token, SendGrid event batches with the SendGrid Event
Webhook key, both of the channel settings in force: the environment's, replaced by those an org_admin sets
over the API (followed on `outreach.internal.channel-settings`, services/common/channel_settings.py).
Without a configured SendGrid key, the simulator's public test key is used (the development default).
The algorithms are the kernel's (services/common/webhook_signatures.py), shared with the simulator.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from services.common import channel_settings
from services.common import webhook_signatures as sigs
from services.common.channel_settings import ChannelConfig
from services.common.settings import Settings

log = logging.getLogger("outreach.webhooks")


class CallbackSecrets:
    """The secrets callbacks are verified with now. `sendgrid_public_key` (tests) overrides the settings'."""

    def __init__(self, settings: Settings, *, sendgrid_public_key: Any = None):
        self.settings = settings
        self.environment = settings  # what channel settings set over the API apply over
        self.configs: dict[str, ChannelConfig] = {}
        self._given_sendgrid_key = sendgrid_public_key
        self._sendgrid_key_source = sendgrid_public_key or settings.sendgrid_webhook_public_key
        self._sendgrid_key = None
        self._auth_token = settings.twilio_auth_token.get_secret_value()

    def apply_channel_settings(self, config: ChannelConfig) -> None:
        """A channel's settings changed (published by the API): verify with its current secrets from now on."""
        self.configs[config.channel] = config
        self.settings = channel_settings.apply(self.environment, self.configs)
        self._auth_token = self.settings.twilio_auth_token.get_secret_value()
        self._sendgrid_key_source = self._given_sendgrid_key or self.settings.sendgrid_webhook_public_key
        self._sendgrid_key = None  # loaded again from the new source on the next event batch
        log.info("%s callbacks verified with settings %s (%s)", config.channel, config.settings_id, config.provider)

    def sendgrid_key(self):
        """The SendGrid verification key in force; None (and logged) when it is unusable."""
        if self._sendgrid_key is None:
            source = self._sendgrid_key_source or sigs.SIMULATOR_SENDGRID_PUBLIC_KEY
            try:
                self._sendgrid_key = sigs.load_sendgrid_public_key(source)
            except (ValueError, TypeError) as exc:
                log.error("unusable SendGrid Event Webhook key: %s", exc)
                return None
        return self._sendgrid_key

    def twilio_signed(self, request: web.Request, form: Mapping[str, str]) -> bool:
        """True when the request carries Twilio's signature for its URL and `form` (its parsed body)."""
        url = self.settings.webhook_url + request.raw_path
        signature = request.headers.get(sigs.TWILIO_SIGNATURE_HEADER)
        if not sigs.verify_twilio_signature(self._auth_token, url, form.items(), signature):
            log.warning("rejected %s: bad Twilio signature", request.path)
            return False
        return True

    def sendgrid_signed(self, request: web.Request, body: bytes) -> bool:
        """True when `body` carries SendGrid's signature under the key in force."""
        key = self.sendgrid_key()
        if key is None or not sigs.verify_sendgrid_signature(
                key, body, request.headers.get(sigs.SENDGRID_SIGNATURE_HEADER),
                request.headers.get(sigs.SENDGRID_TIMESTAMP_HEADER)):
            log.warning("rejected SendGrid events: bad signature")
            return False
        return True
