"""Fixtures shared by the whole-stack e2e modules (a pytest plugin: tests/conftest.py loads it). A module
that uses them defines its own `env` fixture (stack_environment with its overrides).

Module attributes they read: `STACK_SERVICES` (names from outreach.up.SERVICES; default every service but
the HTTP API, which has its own e2e), `STACK_SERVICE_ENV` (per-service environment overrides) and
`TAIL_TOPICS` (default campaign events and message status). `api_client(env, token)` is the HTTP API of a
stack that runs it, once it answers; `stack_token(env, name, role)` makes a token that API knows.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

import httpx
import pytest

from outreach.up import SERVICES, Stack
from schemas import topics
from services.api.store import ApiStore
from services.common.settings import Settings
from tests.conftest import async_wait_until
from tests.e2e_support import Commands, Tail

DEFAULT_SERVICES = tuple(name for name in SERVICES if name != "api")
DEFAULT_TAIL_TOPICS = (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS)


def _module_name(request) -> str:
    return request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")


@pytest.fixture(scope="module")
def stack(env, tmp_path_factory, request):
    names = getattr(request.module, "STACK_SERVICES", DEFAULT_SERVICES)
    service_env = getattr(request.module, "STACK_SERVICE_ENV", {})
    with Stack(env=env, log_dir=tmp_path_factory.mktemp(f"{_module_name(request)}-logs"), names=names,
               service_env=service_env) as running:
        yield running


@pytest.fixture(scope="module")
def settings(env) -> Settings:
    """Settings of a client of the stack (its broker)."""
    return Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])


@pytest.fixture
async def tail(settings, stack, request):
    t = await Tail(settings, *getattr(request.module, "TAIL_TOPICS", DEFAULT_TAIL_TOPICS)).start()
    yield t
    await t.stop()


@pytest.fixture
async def commands(settings, tail):
    c = await Commands(settings, tail).start()
    yield c
    await c.stop()


def stack_token(env: dict[str, str], name: str, role: str) -> str:
    """A new API token for `name` in the stack's own store: on PostgreSQL the API's tokens are in its database
    (every API instance sees them), else in its data folder."""
    with ApiStore.open(Settings(data_dir=env["OUTREACH_DATA_DIR"], event_store=env["OUTREACH_EVENT_STORE"],
                                postgres_dsn=env["OUTREACH_POSTGRES_DSN"])) as store:
        return store.create_token(name, role)[0]


@contextlib.asynccontextmanager
async def api_client(env: dict[str, str], token: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the stack's API acting with `token`, once the API answers its health check."""
    async def healthy() -> bool:
        try:
            return (await client.get("/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['OUTREACH_API_PORT']}", timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        await async_wait_until(healthy, 60, 0.1, message="the API did not start")
        yield client


@contextlib.asynccontextmanager
async def console_as(env: dict[str, str], username: str, password: str) -> AsyncIterator[httpx.AsyncClient]:
    """A person's browser, without the browser: an HTTP client of the stack's console, signed in through the
    sign-in form (its CSRF token taken from the form, the session kept in the client's cookies)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['OUTREACH_API_PORT']}", timeout=60,
                                 follow_redirects=False) as client:
        form = await client.get("/console/sign-in")
        signed = await client.post("/console/sign-in", data={"username": username, "password": password,
                                                             "csrf_token": hidden_value(form.text, "csrf_token")})
        assert signed.status_code == 303, signed.text
        yield client


def hidden_value(page: str, name: str) -> str:
    """The value of the page's (first) hidden field `name`."""
    found = re.search(rf'name="{name}" value="([^"]+)"', page)
    assert found, page
    return found.group(1)
