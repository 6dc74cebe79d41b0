"""Fixtures shared by the whole-stack e2e modules (a pytest plugin: tests/conftest.py loads it). A module
that uses them defines its own `env` fixture (stack_environment with its overrides).

Module attributes they read: `STACK_SERVICES` (names from outreach.up.SERVICES; default every service but
the HTTP API, which has its own e2e) and `TAIL_TOPICS` (default campaign events and message status).
"""
from __future__ import annotations

import pytest

from outreach.up import SERVICES, Stack
from schemas import topics
from services.common.settings import Settings
from tests.e2e_support import Commands, Tail

DEFAULT_SERVICES = tuple(name for name in SERVICES if name != "api")
DEFAULT_TAIL_TOPICS = (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS)


def _module_name(request) -> str:
    return request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")


@pytest.fixture(scope="module")
def stack(env, tmp_path_factory, request):
    names = getattr(request.module, "STACK_SERVICES", DEFAULT_SERVICES)
    with Stack(env=env, log_dir=tmp_path_factory.mktemp(f"{_module_name(request)}-logs"), names=names) as running:
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
