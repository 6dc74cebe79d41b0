"""Shared fixtures: one Kafka-compatible broker per session, PostgreSQL databases, polling helpers.

Broker choice (shown in the report header): OUTREACH_TEST_KAFKA=external uses KAFKA_BOOTSTRAP_SERVERS;
a Docker engine (or OUTREACH_TEST_KAFKA=testcontainers) gets Apache Kafka in a container; otherwise
the embedded tansu broker runs on a free port.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from functools import cache
from typing import Any

import pytest

from services.common.embedded_broker import EmbeddedBroker, free_port

pytest_plugins = ["tests.e2e_fixtures"]  # stack, settings, tail, commands for the whole-stack modules

# Small group timeouts: on tansu every group join costs session_timeout/2. Set at import so that
# Settings() in tests and every subprocess they start see them; an explicit environment wins.
os.environ.setdefault("OUTREACH_KAFKA_SESSION_TIMEOUT_MS", "2000")
os.environ.setdefault("OUTREACH_KAFKA_HEARTBEAT_MS", "200")

# The CLI's config file and the stack file `outreach up` writes (outreach/config.py): the tests' own folders, never
# the user's (a test's `outreach up` would name its data folder to the user's operator commands).
_XDG = tempfile.mkdtemp(prefix="outreach-tests-xdg-")
os.environ["XDG_CONFIG_HOME"] = os.path.join(_XDG, "config")
os.environ["XDG_STATE_HOME"] = os.path.join(_XDG, "state")
for _name in ("OUTREACH_API_URL", "OUTREACH_API_TOKEN", "OUTREACH_CONFIG"):
    os.environ.pop(_name, None)

PG_HOST, PG_PORT = "127.0.0.1", 5432


# ---------------------------------------------------------------- broker

def _docker_answers() -> bool:
    try:
        import docker

        return bool(docker.from_env(timeout=2).ping())
    except Exception:  # no engine, no socket, no package: all mean "no Docker"
        return False


@cache
def _broker_choice() -> tuple[str, str]:
    """(kind, description); kind is external, testcontainers or embedded:<port>."""
    mode = os.environ.get("OUTREACH_TEST_KAFKA", "").lower()
    if mode == "external":
        servers = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return "external", f"external Kafka at {servers} (OUTREACH_TEST_KAFKA=external)"
    if mode == "testcontainers" or _docker_answers():
        return "testcontainers", "Apache Kafka in testcontainers (Docker engine answers)"
    port = free_port()
    return f"embedded:{port}", f"embedded tansu at 127.0.0.1:{port} (no Docker engine)"


def pytest_report_header(config: pytest.Config) -> str:
    return f"broker: {_broker_choice()[1]}"


@pytest.fixture(scope="session")
def kafka_broker_kind() -> str:
    """external, testcontainers or embedded: for tests that document broker-specific behaviour."""
    return _broker_choice()[0].split(":")[0]


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    kind, _ = _broker_choice()
    if kind == "external":
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if kind == "testcontainers":
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:
            from testcontainers.kafka import KafkaContainer
        with KafkaContainer().with_kraft() as kafka:
            bootstrap = kafka.get_bootstrap_server()
            os.environ["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
            yield bootstrap
        return
    with EmbeddedBroker("127.0.0.1", int(kind.split(":")[1])) as broker:
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap  # for Settings() and subprocesses
        yield broker.bootstrap


@pytest.fixture(scope="module")
def stack_bootstrap(kafka_bootstrap) -> Iterator[str]:
    """A whole-stack module's broker: on the embedded broker, one of its own (they start in milliseconds), so a
    stack never reads another module's campaigns (every sender reads every campaign event, and a claim for
    a campaign its event store does not know is never answered); on Kafka, the session's."""
    if not _broker_choice()[0].startswith("embedded"):
        yield kafka_bootstrap
        return
    with EmbeddedBroker("127.0.0.1", free_port()) as broker:
        yield broker.bootstrap


# ---------------------------------------------------------------- PostgreSQL

def _pg_admin():
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname="postgres", autocommit=True,
                           connect_timeout=3)


def fresh_postgres_database(prefix: str = "outreach_test") -> str:
    """Create an empty, uniquely named database; return its DSN (dropped with the session, see postgres_dsn)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    _created_databases.append(name)
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"


_created_databases: list[str] = []


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """DSN of a fresh database for the session; every database made by fresh_postgres_database is dropped at the end."""
    try:
        _pg_admin().close()
    except Exception as exc:
        pytest.skip(f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT} ({exc}); CI starts it in .ci/run")
    dsn = fresh_postgres_database("outreach_session")
    yield dsn
    with _pg_admin() as conn:
        for name in reversed(_created_databases):
            # FORCE: a leaked connection of a failed test must not keep its database alive.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _created_databases.clear()


@pytest.fixture(params=["sqlite", "postgres"])
def event_store_env(request: pytest.FixtureRequest, tmp_path) -> dict[str, str]:
    """Environment for a fresh, empty event store of each kind (a new SQLite file / a new database)."""
    if request.param == "sqlite":
        return {"OUTREACH_EVENT_STORE": "sqlite", "OUTREACH_SQLITE_PATH": str(tmp_path / "events.db")}
    request.getfixturevalue("postgres_dsn")  # skips when PostgreSQL is down; drops the databases at the end
    return {"OUTREACH_EVENT_STORE": "postgres", "OUTREACH_POSTGRES_DSN": fresh_postgres_database()}


@pytest.fixture(params=["sqlite", "postgres"])
def read_model(request: pytest.FixtureRequest, tmp_path):
    """A fresh, empty read model of each kind (a new SQLite file / a new database), open."""
    from services.projections.projector import ReadModel

    if request.param == "sqlite":
        location = str(tmp_path / "read-model.db")
    else:
        request.getfixturevalue("postgres_dsn")  # skips when PostgreSQL is down; drops the databases at the end
        location = fresh_postgres_database("outreach_rm")
    with ReadModel(location) as opened:
        yield opened


@pytest.fixture
def app(event_store_env, monkeypatch):
    """The command handler's application on a fresh event store of each kind (a module may define its own)."""
    from services.command_handler.application import OutreachApp
    from services.common.settings import get_settings

    for key, value in event_store_env.items():
        monkeypatch.setenv(key, value)
    application = OutreachApp(get_settings())
    yield application
    application.close()


# ---------------------------------------------------------------- polling (tests never sleep blindly)

def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.05, message: str = "") -> Any:
    """Poll `predicate` until it returns something truthy (returned); AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


async def async_wait_until(
    predicate: Callable[[], Any | Awaitable[Any]], timeout_s: float, interval_s: float = 0.05, message: str = ""
) -> Any:
    """`wait_until` for async tests; `predicate` may be a plain or an async function."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


# ---------------------------------------------------------------- consumer groups

async def committed_total(bootstrap: str, group: str, topic_partitions: list) -> int:
    """The sum of the offsets `group` committed on `topic_partitions` (aiokafka TopicPartitions)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:  # tansu needs the partitions named explicitly
        committed = await admin.list_consumer_group_offsets(group, partitions=topic_partitions)
    finally:
        await admin.close()
    return sum(meta.offset for meta in committed.values() if meta.offset > 0)
