"""Stored channel settings, published for the services that apply them (`ChannelSettingsChanged` on
`outreach.internal.channel-settings`, key channel; the credentials stay sealed with the store's key).

After each PUT, and for every stored channel when the API starts: the embedded broker keeps nothing across
a restart, and settings the broker never acknowledged (a PUT answered 503) go out then.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3

from schemas import topics
from schemas.internal import ChannelSettingsChanged
from schemas.times import utc_now
from services.api.commands import BrokerUnavailable, CommandPublisher
from services.api.store import ApiStore, SealedChannelSettings
from services.common.retry import retrying

log = logging.getLogger("outreach.api.settings")

REPUBLISH_FIRST_WAIT_S = 0.5
REPUBLISH_LONGEST_WAIT_S = 10.0


def record(sealed: SealedChannelSettings) -> ChannelSettingsChanged:
    """The record that publishes one channel's stored settings (validated here, where it is made)."""
    return ChannelSettingsChanged(settings_id=sealed.settings_id, channel=sealed.channel, provider=sealed.provider,
                                  credentials=sealed.sealed_credentials, occurred_at=utc_now())


class SettingsPublisher:
    """Publishes stored settings, one channel at a time (a lock keeps the broker's order the store's), and
    remembers which stored settings the broker acknowledged (`applied_to_sender`)."""

    def __init__(self, store: ApiStore, publisher: CommandPublisher):
        self.store = store
        self.publisher = publisher
        self.lock = asyncio.Lock()
        self.published: set[str] = set()  # settings_ids the broker acknowledged

    async def _publish(self, sealed: SealedChannelSettings) -> None:
        await self.publisher.publish_record(topics.CHANNEL_SETTINGS, sealed.channel, record(sealed))
        self.published.add(sealed.settings_id)

    async def _stored(self, channel: str | None = None) -> list[SealedChannelSettings]:
        rows = await asyncio.to_thread(self.store.sealed_channel_settings)
        return [row for row in rows if channel is None or row.channel == channel]

    async def save_and_publish(self, channel: str, provider: str, credentials: dict[str, str], updated_by: str):
        """Store, then publish (BrokerUnavailable if not acknowledged: the settings stay stored, published
        again when the API next starts or with the next PUT). Returns the stored settings."""
        async with self.lock:
            stored = await asyncio.to_thread(self.store.save_channel_settings, channel, provider, credentials,
                                             updated_by)
            for sealed in await self._stored(channel):
                await self._publish(sealed)
            return stored

    async def republish_stored(self) -> None:
        """Every stored channel's settings, again; retried while the broker or the store is unavailable, until
        the broker takes them (or cancelled). Anything else (a stored row its record refuses) is a bug: logged
        and raised, not retried."""
        try:
            async for attempt in retrying(on=(BrokerUnavailable, sqlite3.Error), timeout_s=None,
                                          first_wait_s=REPUBLISH_FIRST_WAIT_S, longest_wait_s=REPUBLISH_LONGEST_WAIT_S):
                with attempt:
                    async with self.lock:
                        stored = await self._stored()
                        for sealed in stored:
                            await self._publish(sealed)
        except Exception:
            log.exception("the stored channel settings cannot be published")
            raise
        if stored:
            log.info("published the stored settings of %s", ", ".join(s.channel for s in stored))
