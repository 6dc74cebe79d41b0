"""The entry point every service process shares: logging, settings from the environment, and a clean
stop on SIGTERM / SIGINT (the `stop` event a service's `serve(settings, stop)` watches)."""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from services.common.settings import Settings, get_settings

Serve = Callable[[Settings, asyncio.Event], Awaitable[None]]


def run_service(serve: Serve) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings()

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(runner())
