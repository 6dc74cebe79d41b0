"""A module-scoped stack for end-to-end tests: every service a process, on the session's broker."""
from __future__ import annotations

import os

import aiohttp

from services.common.embedded_broker import free_port
from tests.conftest import fresh_postgres_database


def stack_environment(kafka_bootstrap: str, data_dir, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "OUTREACH_EXTERNAL_KAFKA": "true",
        "OUTREACH_EVENT_STORE": "postgres",
        "OUTREACH_POSTGRES_DSN": fresh_postgres_database("outreach_e2e"),
        "OUTREACH_DATA_DIR": str(data_dir),
        "OUTREACH_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "OUTREACH_KAFKA_HEARTBEAT_MS": "200",
        "OUTREACH_SIMULATOR_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_WEBHOOK_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_API_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_PRESEND_BACKOFF_S": "0.1",
    })
    env.update(overrides)
    return env


async def simulator_submissions(env: dict[str, str]) -> dict[str, list[dict]]:
    """The simulator's log of provider calls: message id -> one entry per submission."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{simulator_url(env)}/_simulator/submissions") as response:
            return await response.json()


def simulator_url(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['OUTREACH_SIMULATOR_PORT']}"
