"""What `outreach status` reports, gathered (the kernel's part: the CLI prints it, the console's Operations
page shows it): every instance's health and the stack's lags, breakers, timers and parked records.

Instances are discovered without a hand-kept list, by the heartbeat each running service keeps
(services/common/observability.py) in two places, merged (one instance: one service, instance name and host):
- its record in the local data folder, `data_dir/instances/SERVICE[-N].json`, rewritten every few seconds:
  the instances of this host (`outreach up`; in docker-compose each container has a data folder of its own);
- its heartbeat on the broker (`outreach.internal.heartbeats`, key `SERVICE[-N]@host`): every host's. The
  topic is read from the last hour's first record to its end, without a consumer group, keeping each key's
  latest record (a tombstone: the instance stopped, it is forgotten). With no broker answering, the local
  records are shown and the report says so.

Each instance found is asked for `/readyz` and `/metrics` at once (at the address its heartbeat advertises):

- **ready**: `/readyz` answers 200;
- **alive**: it answers, not ready (503, naming the failing checks);
- **unreachable**: no answer, but it is known from the broker only and its heartbeat is recent (within three
  of its intervals): it runs somewhere this host cannot reach (OUTREACH_METRICS_ADVERTISED_URL);
- **down**: no answer (killed, hung, or its host gone): the record stays behind, with its last heartbeat
  (on the broker: down once that heartbeat is older than three intervals);
- **restarting**: `outreach up`'s supervisor (its `logs/supervision.json`, trusted only while that supervisor
  runs) waits to start it again, or started it again and the new process does not serve yet.

The numbers come from the metrics the services export: consumer lag per group and partition, the relay's lag
and the DLQ count from the relay processes (computed centrally, services/common/lag.py), breaker states from
each sender, pending timers from the sweepers. Exit code: 0 when every instance is ready, 1 otherwise (one is
down, unreachable, restarting or not ready, or no instance is recorded at all).
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import psutil
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from schemas import topics
from schemas.internal import InstanceHeartbeat
from services.common import kafka, records
from services.common.observability import HEARTBEAT_INTERVAL_S, broker_check, read_instances
from services.common.settings import Settings

PROBE_TIMEOUT_S = 3.0
BROKER_READ_TIMEOUT_S = 10.0
BREAKER_STATES = {0: "closed", 1: "open", 2: "held"}  # outreach_breaker_state's values
STATES = ("ready", "alive", "unreachable", "restarting", "down")
STALE_BEATS = 3  # a heartbeat older than this many of its intervals is a missed one
LOCAL_HOST = socket.gethostname()


@dataclass
class InstanceHealth:
    service: str
    instance: str
    state: str  # one of STATES
    pid: int | None = None
    url: str | None = None
    detail: str = ""
    heartbeat_age_s: float | None = None
    restarts: int = 0
    checks: dict[str, str] = field(default_factory=dict)
    host: str = LOCAL_HOST
    seen_in: list[str] = field(default_factory=lambda: ["file"])  # "file" (this data folder), "broker"

    @property
    def label(self) -> str:
        name = self.service if self.instance in ("", "0") else f"{self.service}-{self.instance}"
        return name if self.host == LOCAL_HOST else f"{name}@{self.host}"


# ------------------------------------------------------------------ what the supervisor says

def _alive(pid: Any) -> bool:
    try:
        return isinstance(pid, int) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read_supervision(data_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """`outreach up`'s record of each instance, {(service, instance): entry}; empty unless its supervisor runs
    (a record left by a stopped `outreach up` says nothing of what runs now)."""
    try:
        entries = json.loads((data_dir / "logs" / "supervision.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, list):
        return {}
    return {(str(e.get("service")), str(e.get("instance") or 0)): e for e in entries
            if isinstance(e, dict) and _alive(e.get("supervisor_pid"))}


# ------------------------------------------------------------------ asking each instance

async def _get(http: httpx.AsyncClient, url: str) -> tuple[int, str]:
    try:
        response = await http.get(url)
        return response.status_code, response.text
    except httpx.HTTPError as exc:
        return 0, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _probe(http: httpx.AsyncClient, record: dict[str, Any]) -> tuple[tuple[int, str], tuple[int, str]]:
    url = record.get("url") or ""
    return tuple(await asyncio.gather(_get(http, f"{url}/readyz"), _get(http, f"{url}/metrics")))  # type: ignore


def _health(record: dict[str, Any] | None, supervised: dict[str, Any] | None, readyz: tuple[int, str] | None,
            now: float) -> InstanceHealth:
    record = record or {}
    service = str(record.get("service") or (supervised or {}).get("service"))
    instance = str(record.get("instance") or (supervised or {}).get("instance") or 0)
    beat = record.get("heartbeat_at") or record.get("started_at")
    health = InstanceHealth(service, instance, "down", pid=record.get("pid"), url=record.get("url"),
                            heartbeat_age_s=round(now - beat, 1) if isinstance(beat, (int, float)) else None,
                            restarts=int((supervised or {}).get("restarts") or 0),
                            host=str(record.get("host") or LOCAL_HOST),
                            seen_in=list(record.get("seen_in") or ["file"]))
    if supervised is not None:
        if supervised.get("state") == "waiting to restart":
            health.state, health.pid = "restarting", None
            health.detail = (f"exited ({supervised.get('last_exit')}) at {supervised.get('last_exit_time')}; "
                             f"outreach up starts it again" + (" (crash loop)" if supervised.get("crash_loop") else ""))
            return health
        if supervised.get("state") == "configuration refused":
            health.detail = "refused its configuration; outreach up does not restart it (read its log)"
            return health
        if supervised.get("pid") != record.get("pid") and _alive(supervised.get("pid")):
            health.state, health.pid, health.url = "restarting", supervised.get("pid"), None
            health.detail = "started again, not serving yet"
            return health
    status, body = readyz or (0, "not recorded")
    if status:
        try:
            health.checks = {str(k): str(v) for k, v in (json.loads(body).get("checks") or {}).items()}
        except (ValueError, AttributeError):
            pass
    if status == 200:
        health.state = "ready"
    elif status:
        health.state = "alive"
        failing = [k for k, v in health.checks.items() if v != "ok"]
        health.detail = f"not ready: {', '.join(failing) or f'HTTP {status}'}"
    else:
        health.detail = f"no answer at {health.url} ({body})"
        age = health.heartbeat_age_s
        stale = age is None or age > STALE_BEATS * float(record.get("interval_s") or HEARTBEAT_INTERVAL_S)
        if stale and age is not None:
            health.detail += f"; last heartbeat {age:.0f} s ago"
        elif not stale and "file" not in health.seen_in:  # known from the broker only, and beating: it runs
            health.state = "unreachable"
            health.detail += (f"; its heartbeat on the broker is {age:.0f} s old: running, but not reachable "
                              "from here (OUTREACH_METRICS_ADVERTISED_URL)")
    return health


# ------------------------------------------------------------------ the heartbeats on the broker

class BrokerUnreachable(RuntimeError):
    """No broker answers a TCP connection at the bootstrap servers."""


def _seconds(wire_time: str) -> float:
    return datetime.strptime(wire_time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def _heartbeat_record(beat: InstanceHeartbeat) -> dict[str, Any]:
    """A heartbeat as an instance file's record (times in POSIX seconds)."""
    return {"service": beat.service, "instance": beat.instance or "0", "host": beat.host, "pid": beat.pid,
            "url": beat.url, "metrics_url": beat.metrics_url, "interval_s": beat.interval_s,
            "started_at": _seconds(beat.started_at), "heartbeat_at": _seconds(beat.at), "seen_in": ["broker"]}


async def read_heartbeats(settings: Settings) -> list[dict[str, Any]]:
    """The latest heartbeat of each instance of this deployment (OUTREACH_DEPLOYMENT) published in the last
    hour (the topic's retention), as instance records; stopped instances (a tombstone last) left out.
    BrokerUnreachable when no broker answers."""
    if not await broker_check(settings)():  # a TCP refusal, said at once (aiokafka would log and retry)
        raise BrokerUnreachable(f"no broker answers at {settings.kafka_bootstrap_servers}")
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=50, request_timeout_ms=5000)
    await consumer.start()
    try:
        if topics.HEARTBEATS not in await consumer.topics():  # all topics' metadata: creates nothing
            return []
        tps = [TopicPartition(topics.HEARTBEATS, p) for p in sorted(consumer.partitions_for_topic(topics.HEARTBEATS)
                                                                    or {0})]
        ends = await kafka.end_offsets(consumer, tps)
        since = await consumer.offsets_for_times({tp: int(time.time() * 1000) - topics.HEARTBEAT_RETENTION_MS
                                                  for tp in tps})
        latest: dict[bytes | None, bytes | None] = {}
        pending = set()
        for tp in tps:
            first = since.get(tp)
            # None (Kafka) or a timestamp of -1 (tansu): nothing that recent.
            if first is not None and first.timestamp >= 0 and first.offset < ends[tp]:
                consumer.seek(tp, first.offset)
                pending.add(tp)
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=200)
            for tp, batch in batches.items():
                for record in batch:
                    if record.offset < ends[tp]:
                        latest[record.key] = record.value
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    out = []
    for value in latest.values():
        if value is None:
            continue
        try:
            beat = records.decode(InstanceHeartbeat, value)
        except records.InvalidRecord:
            continue  # not a heartbeat (written by something else): nothing to show
        if beat.deployment == settings.deployment:
            out.append(_heartbeat_record(beat))
    return out


def _merged(files: list[dict[str, Any]],
            heartbeats: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """{(service, instance, host): record}: an instance both in this data folder and on the broker once, by
    its latest heartbeat (a file without a host is this host's)."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for record in [*({**r, "seen_in": ["file"]} for r in files), *heartbeats]:
        key = (str(record.get("service")), str(record.get("instance") or 0), str(record.get("host") or LOCAL_HOST))
        known = out.get(key)
        if known is None:
            out[key] = record
            continue
        seen_in = sorted(set(known["seen_in"]) | set(record["seen_in"]))
        newer = record if (record.get("heartbeat_at") or 0) > (known.get("heartbeat_at") or 0) else known
        out[key] = {**newer, "seen_in": seen_in}
    return out


# ------------------------------------------------------------------ the numbers, from the metrics

def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    try:
        return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]
    except Exception:  # a half-written answer: no numbers from it, the instance's state says the rest
        return []


def summarize(metrics: dict[str, str]) -> dict[str, Any]:
    """The stack's numbers from each instance's metrics text ({label: text}; the service is told by the
    instance's own `outreach_service_info`). Lags and the DLQ count are computed by every relay process: the
    highest of their readings is shown (they read the same broker moments apart)."""
    lag: dict[tuple[str, str, str], float] = {}
    relay_lag: float | None = None
    dlq: float | None = None
    timers: dict[str, float] = {}
    breakers: dict[str, dict[str, str]] = {}
    for label, text in metrics.items():
        for name, labels, value in _samples(text):
            if name == "outreach_consumer_lag_records":
                key = (labels.get("group", ""), labels.get("topic", ""), labels.get("partition", ""))
                lag[key] = max(lag.get(key, 0.0), value)
            elif name == "outreach_relay_lag_events":
                relay_lag = max(relay_lag or 0.0, value)
            elif name == "outreach_dlq_records":
                dlq = max(dlq or 0.0, value)
            elif name == "outreach_pending_timers":
                kind = labels.get("kind", "")
                timers[kind] = max(timers.get(kind, 0.0), value)
            elif name == "outreach_breaker_state":
                breakers.setdefault(label, {})[labels.get("provider", "")] = BREAKER_STATES.get(int(value), str(value))
    groups: dict[str, dict[str, Any]] = {}
    for (group, topic, partition), value in sorted(lag.items()):
        entry = groups.setdefault(group, {"lag": 0, "partitions": []})
        entry["lag"] += int(value)
        entry["partitions"].append({"topic": topic, "partition": int(partition), "lag": int(value)})
    return {"consumer_lag": groups, "relay_lag_events": None if relay_lag is None else int(relay_lag),
            "dlq_records": None if dlq is None else int(dlq),
            "pending_timers": {k: int(v) for k, v in sorted(timers.items())}, "breakers": breakers}


# ------------------------------------------------------------------ the report

async def gather(data_dir: Path, timeout_s: float = PROBE_TIMEOUT_S,
                 broker: Settings | None = None) -> dict[str, Any]:
    """Every recorded, supervised or (with `broker`'s settings) heartbeating instance's health and the stack's
    numbers, as one JSON-able report."""
    heartbeats: list[dict[str, Any]] = []
    broker_report: dict[str, Any] | None = None
    if broker is not None:
        broker_report = {"bootstrap": broker.kafka_bootstrap_servers, "reachable": True, "error": None}
        try:
            heartbeats = await asyncio.wait_for(read_heartbeats(broker), BROKER_READ_TIMEOUT_S)
        except Exception as exc:  # unreachable, timed out, refused: the local records are still shown
            broker_report.update(reachable=False, error=str(exc) or type(exc).__name__)
        broker_report["heartbeats"] = len(heartbeats)
    records = _merged(read_instances(data_dir), heartbeats)
    supervision = {(service, instance, LOCAL_HOST): entry
                   for (service, instance), entry in read_supervision(data_dir).items()}
    async with httpx.AsyncClient(timeout=timeout_s) as http:
        keys = sorted(set(records) | set(supervision))
        answers = await asyncio.gather(*(_probe(http, records[k]) if k in records else _nothing() for k in keys))
    now = time.time()
    instances, metrics = [], {}
    for key, (readyz, scraped) in zip(keys, answers):
        health = _health(records.get(key), supervision.get(key), readyz, now)
        instances.append(health)
        if health.state in ("ready", "alive") and scraped[0] == 200:
            metrics[health.label] = scraped[1]
    counts = {state: sum(1 for i in instances if i.state == state) for state in STATES}
    return {"data_dir": str(data_dir), "supervised": bool(supervision), "at": now, "broker": broker_report,
            "healthy": bool(instances) and counts["ready"] == len(instances), "counts": counts,
            "instances": [asdict(i) | {"label": i.label} for i in instances], **summarize(metrics)}


async def _nothing() -> tuple[None, tuple[int, str]]:
    return None, (0, "")


def exit_code(report: dict[str, Any]) -> int:
    return 0 if report["healthy"] else 1
