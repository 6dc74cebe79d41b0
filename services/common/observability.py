"""Metrics and health, the same on every service (issue 13, item 1).

- The metrics: one place declares them all (Prometheus client, its naming conventions: `outreach_` prefix,
  `_total` counters, `_seconds` histograms, base units). A process exposes those it moves.
- `Observability(settings, service)`: one small aiohttp server per process on `OUTREACH_METRICS_PORT`
  (0: a free port) serving `/metrics`, `/healthz` (the process is alive: always 200) and `/readyz` (200 when
  every readiness check passes, else 503 naming the failing ones). Services add their checks: the broker
  (`broker_check`), their store (`event_store_check`, `read_model_check`), their partitions assigned
  (`assigned_check`). Lag is a metric, never a readiness condition. `routes()` mounts the same endpoints on a
  service's own aiohttp server; the API mounts them on FastAPI.
- Each running server records where it listens in `data_dir/instances/SERVICE[-INSTANCE].json` (`outreach up`
  starts every process with port 0, so every instance has its own), which is how operators and the tests
  find every service's endpoints. The record is its heartbeat too: rewritten every
  OUTREACH_HEARTBEAT_INTERVAL_S (5 s) with `heartbeat_at`, so `outreach status` tells a process that stopped
  answering (killed, hung) by its age.
- A data folder is one host's (each docker-compose container has its own): so each server also publishes
  its heartbeat on the broker at the same pace (`outreach.internal.heartbeats`, key `SERVICE[-N]@host`, an
  `InstanceHeartbeat` naming the address other hosts reach it at), and a tombstone when it stops. Its own
  small producer, opened once the broker answers and dropped on any failure (logged at debug, tried again
  the next beat): the broker being away never delays or stops the service.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from schemas import topics
from schemas.internal import InstanceHeartbeat
from schemas.times import from_timestamp, utc_now
from services.common import kafka, records
from services.common.settings import Settings

log = logging.getLogger("outreach.observability")

# ------------------------------------------------------------------ the metrics (one declaration each)

SERVICE_INFO = Gauge("outreach_service_info", "1 for each running service process", ["service", "instance"])
MESSAGES = Counter(
    "outreach_messages", "Message status changes published by the relay, by channel, new status and failure "
    "reason (reason empty unless failed; a republish after an empty broker counts again)",
    ["channel", "status", "reason"])
PROVIDER_REQUEST_SECONDS = Histogram(
    "outreach_provider_request_duration_seconds", "Provider calls (one HTTP request or SMTP submission)",
    ["provider"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
PROVIDER_ERRORS = Counter(
    "outreach_provider_errors", "Provider calls that did not succeed, by provider and code (HTTP status or "
    "provider error code; `network` when nothing was answered)", ["provider", "code"])
BREAKER_STATE = Gauge("outreach_breaker_state", "Circuit breaker per provider: 0 closed, 1 open (sending "
                      "paused, probing), 2 held (a probe failed: the provider's campaigns are held)", ["provider"])
RATE_LIMITER_WAIT_SECONDS = Histogram(
    "outreach_rate_limiter_wait_seconds", "Time a send waited for rate-limit tokens", ["channel"],
    buckets=(0, .001, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
CLAIMS_IN_FLIGHT = Gauge("outreach_claims_in_flight", "Work claims this sender is working on")
CONSUMER_LAG = Gauge(
    "outreach_consumer_lag_records", "End offset minus the group's committed offset (the whole partition when "
    "nothing is committed), computed centrally by the relay processes", ["group", "topic", "partition"])
RELAY_LAG = Gauge("outreach_relay_lag_events", "Stored events (notifications) not yet published by the relay")
PENDING_TIMERS = Gauge("outreach_pending_timers", "Durable timers not yet fired, by kind", ["kind"])
DLQ_RECORDS = Gauge("outreach_dlq_records", "Records in outreach.commands.dlq (the sum of its end offsets)")
WEBHOOK_VERIFICATION_FAILURES = Counter(
    "outreach_webhook_verification_failures", "Callbacks refused for a bad or missing signature", ["provider"])
HTTP_REQUESTS = Counter("outreach_http_requests", "HTTP requests answered", ["service", "method", "route", "code"])
HTTP_REQUEST_SECONDS = Histogram("outreach_http_request_duration_seconds", "HTTP request durations",
                                 ["service", "method", "route"])



def metrics_text() -> tuple[bytes, str]:
    """The process's metrics in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------ readiness checks

Check = Callable[[], Awaitable[bool] | bool]
CHECK_TIMEOUT_S = 3.0
HEARTBEAT_INTERVAL_S = 5.0  # OUTREACH_HEARTBEAT_INTERVAL_S's default: a record without `interval_s` beat at it
BROKER_STOP_S = 2.0  # the longest a stopping server waits to publish its tombstone and close its producer
# The longest one beat's publishing may take, connecting included: never less than this, however short the
# interval (a loaded host takes a while to connect), and the next beat waits for it.
PUBLISH_TIMEOUT_FLOOR_S = 5.0


def broker_check(settings: Settings) -> Check:
    """The broker answers: a TCP connection to one of the bootstrap servers opens."""
    async def check() -> bool:
        for server in settings.kafka_bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 2)
            except (OSError, ValueError, asyncio.TimeoutError):
                continue
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return True
        return False
    return check


def _postgres_answers(dsn: str) -> bool:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as connection:
        connection.execute("SELECT 1")
    return True


def _sqlite_answers(path: Path) -> bool:
    import sqlite3

    if not path.exists():
        return False
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=2)
    try:
        connection.execute("SELECT 1").fetchone()
    finally:
        connection.close()
    return True


def event_store_check(settings: Settings) -> Check:
    """The event store's database answers a query (PostgreSQL), or its SQLite file opens."""
    async def check() -> bool:
        if settings.event_store == "postgres":
            return await asyncio.to_thread(_postgres_answers, settings.postgres_dsn)
        return await asyncio.to_thread(_sqlite_answers, Path(settings.event_store_sqlite_path))
    return check


def read_model_check(settings: Settings) -> Check:
    """The read model's database answers (PostgreSQL) or its SQLite file opens."""
    url = settings.read_model_url or str(Path(settings.data_dir) / "read-model.db")

    async def check() -> bool:
        if url.startswith(("postgresql://", "postgres://")):
            return await asyncio.to_thread(_postgres_answers, url)
        return await asyncio.to_thread(_sqlite_answers, Path(url.removeprefix("sqlite:///")))
    return check


def assigned_check(consumer: Callable[[], Any]) -> Check:
    """The consumer (an aiokafka consumer, or what `consumer()` returns once it exists) has partitions."""
    def check() -> bool:
        current = consumer()
        return current is not None and bool(current.assignment())
    return check


def subscriber_consumer(broker: Any) -> Callable[[], Any]:
    """The aiokafka consumer of a FastStream broker's (first) subscriber, once it started."""
    def current() -> Any:
        for subscriber in broker.subscribers:
            consumer = getattr(subscriber, "consumer", None)
            if consumer is not None:
                return consumer
        return None
    return current


# ------------------------------------------------------------------ the endpoints

class Observability:
    """A process's metrics and health endpoints: `await start()` serves them on OUTREACH_METRICS_PORT and
    records the address in `data_dir/instances/`; `routes()` mounts them on an aiohttp app of its own."""

    def __init__(self, settings: Settings, service: str, checks: dict[str, Check] | None = None):
        self.settings = settings
        self.service = service
        self.instance = settings.instance_name or "0"
        self.host = socket.gethostname()
        self.interval_s = settings.heartbeat_interval_s
        self.publish_timeout_s = max(self.interval_s, PUBLISH_TIMEOUT_FLOOR_S)
        self.checks: dict[str, Check] = dict(checks or {})
        self.started = time.time()
        self.url: str | None = None
        self._runner: web.AppRunner | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._broker_heartbeat: asyncio.Task[None] | None = None
        self._producer: Any = None  # the heartbeat's aiokafka producer, while the broker takes its records
        self._stopping = False
        SERVICE_INFO.labels(service, self.instance).set(1)

    def add_check(self, name: str, check: Check) -> None:
        self.checks[name] = check

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, {check: "ok" | why not}) with every check run at once, each within CHECK_TIMEOUT_S."""
        async def run(check: Check) -> str:
            try:
                result = check()
                if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
                    result = await asyncio.wait_for(result, CHECK_TIMEOUT_S)
                return "ok" if result else "failing"
            except Exception as exc:  # unreachable, timed out...: not ready, said why
                return f"failing: {type(exc).__name__}: {exc}"[:300]

        names = list(self.checks)
        results = await asyncio.gather(*(run(self.checks[name]) for name in names))
        report = dict(zip(names, results))
        return all(r == "ok" for r in results), report

    # aiohttp handlers
    async def _metrics(self, _: web.Request) -> web.Response:
        body, content_type = metrics_text()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": self.service})

    async def _readyz(self, _: web.Request) -> web.Response:
        ready, report = await self.readiness()
        return web.json_response({"ready": ready, "service": self.service, "checks": report},
                                 status=200 if ready else 503)

    def routes(self, healthz: bool = True) -> list[web.RouteDef]:
        """The endpoints as aiohttp routes (`healthz=False` for an app that answers /healthz itself)."""
        return [web.get("/metrics", self._metrics), web.get("/readyz", self._readyz),
                *([web.get("/healthz", self._healthz)] if healthz else [])]

    async def start(self) -> "Observability":
        app = web.Application(middlewares=[http_metrics_middleware(f"{self.service}-metrics")])
        app.add_routes(self.routes())
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        host = self.settings.metrics_host
        site = web.TCPSite(self._runner, host, self.settings.metrics_port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{port}"
        self._record()
        self._heartbeat = asyncio.create_task(self._beat())
        self._broker_heartbeat = asyncio.create_task(self._beat_on_broker())
        log.info("metrics and health of %s at %s (/metrics, /healthz, /readyz)", self.service, self.url)
        return self

    def instance_path(self) -> Path:
        suffix = f"-{self.settings.instance_name}" if self.settings.instance_name else ""
        return Path(self.settings.data_dir) / "instances" / f"{self.service}{suffix}.json"

    def _record(self) -> None:
        path = self.instance_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps({"service": self.service, "instance": self.instance, "host": self.host,
                                           "pid": os.getpid(), "metrics_url": f"{self.url}/metrics", "url": self.url,
                                           "started_at": self.started, "heartbeat_at": time.time(),
                                           "interval_s": self.interval_s}))
            os.replace(partial, path)
        except OSError:
            log.warning("could not record the metrics address in %s", path, exc_info=True)

    async def _beat(self) -> None:
        # The record rewritten from the event loop: a process that is killed or whose loop hangs stops beating.
        while True:
            await asyncio.sleep(self.interval_s)
            self._record()  # in the loop (a small file): never after stop() removed it

    # ---------------------------------------------------------------- the heartbeat on the broker

    def advertised_url(self) -> str:
        """Where other hosts reach these endpoints: OUTREACH_METRICS_ADVERTISED_URL, else the listening address
        with the host's name in place of a wildcard (0.0.0.0: a docker-compose container, reached by name)."""
        if self.settings.metrics_advertised_url:
            return self.settings.metrics_advertised_url.rstrip("/")
        host = self.settings.metrics_host
        if host in ("", "0.0.0.0", "::", "[::]"):
            host = self.host
        port = self._runner.addresses[0][1] if self._runner is not None else self.settings.metrics_port
        return f"http://{host}:{port}"

    def heartbeat_key(self) -> str:
        suffix = f"-{self.settings.instance_name}" if self.settings.instance_name else ""
        return f"{self.service}{suffix}@{self.host}"

    def heartbeat(self) -> InstanceHeartbeat:
        url = self.advertised_url()
        return InstanceHeartbeat(deployment=self.settings.deployment, service=self.service, instance=self.instance,
                                 host=self.host, pid=os.getpid(), url=url, metrics_url=f"{url}/metrics",
                                 interval_s=self.interval_s, started_at=from_timestamp(self.started), at=utc_now())

    async def _publish(self, value: bytes | None) -> None:
        """One record on the heartbeat topic (None: the tombstone), through the producer kept between beats,
        opened first if need be. Raises whatever went wrong (the caller drops the producer)."""
        if self._producer is None:
            if not await broker_check(self.settings)():  # a TCP refusal: no aiokafka error lines every beat
                raise ConnectionError(f"no broker answers at {self.settings.kafka_bootstrap_servers}")
            # Sends expire with the beat (a broker gone away does not hold them longer).
            self._producer = kafka.make_producer(self.settings, linger_ms=0, acks=1,
                                                 request_timeout_ms=int(self.publish_timeout_s * 1000))
            await self._producer.start()
        # All-topics metadata (creates nothing), every beat: a send to a missing topic would make tansu create it
        # with 4 partitions. Every service ensures the topics at start; this is for a process that does not, and
        # for a memory-only broker that restarted empty.
        if topics.HEARTBEATS not in (await self._producer.client.fetch_all_metadata()).topics():
            await kafka.ensure_topics(self.settings, timeout_s=self.publish_timeout_s)
        await self._producer.send_and_wait(topics.HEARTBEATS, value, key=self.heartbeat_key().encode())

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(BROKER_STOP_S):
                    await producer.stop()

    async def _beat_on_broker(self) -> None:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that arrives as the awaited
        # call finishes (seen here: stop() then waited for ever); the flag ends the loop even so.
        while not self._stopping:
            try:
                async with asyncio.timeout(self.publish_timeout_s):
                    await self._publish(records.encode(self.heartbeat()))
            except Exception as exc:  # the broker is away or refuses: the service goes on, the next beat retries
                log.debug("heartbeat not published on %s (%s: %s); trying again in %s s",
                          self.settings.kafka_bootstrap_servers, type(exc).__name__, exc, self.interval_s)
                await self._close_producer()
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        self._stopping = True
        if self._broker_heartbeat is not None:
            self._broker_heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._broker_heartbeat
            self._broker_heartbeat = None
            if self._producer is not None:  # stopped, not dead: `outreach status` forgets it
                try:
                    async with asyncio.timeout(BROKER_STOP_S):
                        await self._publish(None)
                except Exception as exc:
                    log.debug("heartbeat tombstone not published (%s: %s)", type(exc).__name__, exc)
            await self._close_producer()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(OSError):
            path = self.instance_path()
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()

    async def __aenter__(self) -> "Observability":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


def http_metrics_middleware(service: str) -> Any:
    """aiohttp middleware counting requests and their durations by route (the route's pattern, never the
    raw path, so ids do not become labels)."""
    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        start = time.perf_counter()
        code = 500
        try:
            response = await handler(request)
            code = response.status
            return response
        except web.HTTPException as exc:
            code = exc.status
            raise
        finally:
            info = request.match_info.route.resource
            route = info.canonical if info is not None else "unmatched"
            HTTP_REQUESTS.labels(service, request.method, route, str(code)).inc()
            HTTP_REQUEST_SECONDS.labels(service, request.method, route).observe(time.perf_counter() - start)
    return middleware


def read_instances(data_dir: Path | str) -> list[dict[str, Any]]:
    """The recorded endpoints of every running service instance of a data folder."""
    out = []
    for path in sorted((Path(data_dir) / "instances").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()))
    return out
