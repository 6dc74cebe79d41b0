"""The webhook receiver (`python -m services.webhook_receiver`): an aiohttp server for the providers'
callbacks (routes.py) publishing through a FastStream `KafkaBroker` (publishing.py).

`build_broker(settings)` is the broker with its publishers declared (what the AsyncAPI document of this
app is generated from). `running(settings)` serves until its block ends: the channel settings set over
the API are read to the end before serving, then followed (signatures.py verifies with them).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from faststream.kafka import KafkaBroker

from services.common import kafka
from services.common.channel_settings import ChannelSettingsFeed
from services.common.observability import Observability, broker_check, event_store_check
from services.common.runtime import run_service
from services.common.settings import Settings
from services.webhook_receiver.bodies import LINGER_S
from services.webhook_receiver.publishing import Outbox, Publisher, declare_publishers
from services.webhook_receiver.routes import RECEIVER, create_app
from services.webhook_receiver.seen import open_seen_store

log = logging.getLogger("outreach.webhooks")

CLIENT_ID = "webhook-receiver"
SHUTDOWN_TIMEOUT_S = 10.0


def broker_with_publishers(settings: Settings) -> tuple[KafkaBroker, dict[str, Publisher]]:
    broker = kafka.make_faststream_broker(settings, client_id=CLIENT_ID)
    return broker, declare_publishers(broker)


def build_broker(settings: Settings) -> KafkaBroker:
    """The receiver's FastStream broker, its publishers declared (for its AsyncAPI document)."""
    broker, _ = broker_with_publishers(settings)
    return broker


@asynccontextmanager
async def running(settings: Settings, **receiver_options: Any) -> AsyncIterator[web.Application]:
    """The receiver listening on webhook_host:webhook_port with its broker connection, until the block ends."""
    await kafka.ensure_topics(settings)
    feed = ChannelSettingsFeed(settings)
    try:
        await feed.load()
    except BaseException:
        await feed.close()
        raise
    broker, publishers = broker_with_publishers(settings)
    outbox = Outbox(publishers)
    own_store = None
    if "seen_store" not in receiver_options:  # shared with the other instances, in the event store's database
        own_store = receiver_options["seen_store"] = open_seen_store(settings)
    runner = None
    # Its own metrics port (every instance its own; the webhook port is shared), and the same endpoints on the
    # webhook port. Ready: the broker and the event store's database (the replay memory) answer.
    observability = Observability(settings, "webhooks", {"broker": broker_check(settings),
                                                         "event_store": event_store_check(settings)})
    following_stop = asyncio.Event()
    following = None
    try:
        await broker.start()
        outbox.start()
        app = create_app(settings, outbox, **receiver_options)
        app.add_routes(observability.routes(healthz=False))
        await observability.start()
        secrets = app[RECEIVER].secrets
        for config in feed.current.values():
            secrets.apply_channel_settings(config)
        following = asyncio.create_task(feed.follow(following_stop, secrets.apply_channel_settings))
        # lingering_time: the rest of a refused (413) body is discarded for at most LINGER_S, then the
        # connection is closed (bodies.py).
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S, lingering_time=LINGER_S)
        await runner.setup()
        # reuse_port: several receiver processes on one machine share the port (the kernel spreads connections).
        await web.TCPSite(runner, settings.webhook_host, settings.webhook_port, reuse_port=True).start()
        log.info("webhook receiver on %s:%s (public %s)", settings.webhook_host, settings.webhook_port,
                 settings.webhook_url)
        yield app
    finally:
        following_stop.set()
        if following is not None:
            await asyncio.gather(following, return_exceptions=True)
        await feed.close()
        if runner is not None:
            await runner.cleanup()  # stop accepting, let requests in hand finish (their records flush)
        await outbox.close()
        await broker.stop()
        await observability.stop()
        if own_store is not None:
            own_store.close()


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    async with running(settings):
        await stop.wait()


def main() -> None:
    run_service(serve, "webhooks")
