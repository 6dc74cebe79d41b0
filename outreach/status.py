"""`outreach status`: every instance's health and the stack's lags, breakers, timers and parked records.

Instances are discovered without a hand-kept list: every running service records its endpoints in
`data_dir/instances/SERVICE[-N].json` and rewrites that record every few seconds (its heartbeat,
services/common/observability.py). Each recorded instance is asked for `/readyz` and `/metrics` at once:

- **ready**: `/readyz` answers 200;
- **alive**: it answers, not ready (503, naming the failing checks);
- **down**: no answer (killed, hung, or its host gone): the record stays behind, with its last heartbeat;
- **restarting**: `outreach up`'s supervisor (its `logs/supervision.json`, trusted only while that supervisor
  runs) waits to start it again, or started it again and the new process does not serve yet.

The numbers come from the metrics the services export: consumer lag per group and partition, the relay's lag
and the DLQ count from the relay processes (computed centrally, services/common/lag.py), breaker states from
each sender, pending timers from the sweepers. Exit code: 0 when every instance is ready, 1 otherwise (one is
down, restarting or not ready, or no instance is recorded at all).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from services.common.observability import HEARTBEAT_INTERVAL_S, read_instances

PROBE_TIMEOUT_S = 3.0
BREAKER_STATES = {0: "closed", 1: "open", 2: "held"}  # outreach_breaker_state's values
STATES = ("ready", "alive", "restarting", "down")


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

    @property
    def label(self) -> str:
        return self.service if self.instance in ("", "0") else f"{self.service}-{self.instance}"


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
                            restarts=int((supervised or {}).get("restarts") or 0))
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
        if health.heartbeat_age_s is not None and health.heartbeat_age_s > 3 * HEARTBEAT_INTERVAL_S:
            health.detail += f"; last heartbeat {health.heartbeat_age_s:.0f} s ago"
    return health


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

async def gather(data_dir: Path, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Every recorded or supervised instance's health and the stack's numbers, as one JSON-able report."""
    records = {(str(r.get("service")), str(r.get("instance") or 0)): r for r in read_instances(data_dir)}
    supervision = read_supervision(data_dir)
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
    return {"data_dir": str(data_dir), "supervised": bool(supervision), "at": now,
            "healthy": bool(instances) and counts["ready"] == len(instances), "counts": counts,
            "instances": [asdict(i) | {"label": i.label} for i in instances], **summarize(metrics)}


async def _nothing() -> tuple[None, tuple[int, str]]:
    return None, (0, "")


def exit_code(report: dict[str, Any]) -> int:
    return 0 if report["healthy"] else 1


# ------------------------------------------------------------------ the screen

STATE_STYLE = {"ready": "green", "alive": "yellow", "restarting": "yellow", "down": "red"}


def render(report: dict[str, Any], console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    counts = report["counts"]
    shown = ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no instance recorded"
    console.print(f"[bold]Outreach[/bold] at {escape(report['data_dir'])}"
                  + (" (supervised by outreach up)" if report["supervised"] else "") + f": {shown}", soft_wrap=True)
    table = Table(title="Instances", title_justify="left")
    for column in ("instance", "state", "pid", "endpoints", "detail"):
        table.add_column(column)
    for i in report["instances"]:
        style = STATE_STYLE[i["state"]]
        restarts = f"restarted {i['restarts']}x by outreach up" if i["restarts"] else ""
        table.add_row(i["label"], f"[{style}]{i['state']}[/{style}]", str(i["pid"] or ""), i["url"] or "",
                      escape("; ".join(part for part in (i["detail"], restarts) if part)))
    console.print(table)
    lags = Table(title="Consumer lag (records)", title_justify="left")
    lags.add_column("group")
    lags.add_column("lag", justify="right")
    lags.add_column("partitions behind")
    for group, entry in report["consumer_lag"].items():
        behind = ", ".join(f"{p['topic']}[{p['partition']}] {p['lag']}" for p in entry["partitions"] if p["lag"])
        lags.add_row(group, str(entry["lag"]), behind)
    if report["consumer_lag"]:
        console.print(lags)
    else:
        console.print("Consumer lag: [yellow]unknown[/yellow] (no relay answered)")

    def number(value: Any) -> str:
        return "[yellow]unknown[/yellow]" if value is None else str(value)

    console.print(f"Relay lag: {number(report['relay_lag_events'])} stored events not yet published")
    timers = ", ".join(f"{kind} {n}" for kind, n in report["pending_timers"].items())
    console.print(f"Pending timers: {timers or '[yellow]unknown[/yellow] (no sweeper answered)'}")
    breakers = "; ".join(f"{label}: " + ", ".join(f"{p} {s}" for p, s in sorted(states.items()))
                         for label, states in report["breakers"].items())
    console.print(f"Breakers: {breakers or 'none reported (no sender answered, or none has sent yet)'}")
    dlq = report["dlq_records"]
    style = "red" if dlq else "green"
    console.print(f"Parked (DLQ): [{style}]{number(dlq)}[/{style}] record(s)"
                  + (" (outreach dlq list)" if dlq else ""))


def status(as_json: bool = False, timeout: float = PROBE_TIMEOUT_S) -> int:
    """Print the report of the stack whose data folder the operator commands find; return the exit code."""
    from rich.console import Console

    from outreach.config import operator_settings

    report = asyncio.run(gather(Path(operator_settings().data_dir), timeout))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render(report, Console(highlight=False))
    return exit_code(report)
