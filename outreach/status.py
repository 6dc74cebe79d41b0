"""`outreach status`: every instance's health and the stack's lags, breakers, timers and parked records.

What it reports, and how instances are found and judged, is gathered by services/common/stack_status.py (the
console's Operations page shows the same report); this module prints it and gives the exit code.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from services.common.stack_status import (  # noqa: F401  (names the tests and the CLI use from here)
    PROBE_TIMEOUT_S,
    STATES,
    InstanceHealth,
    _health,
    exit_code,
    gather,
    read_heartbeats,
    summarize,
)

# ------------------------------------------------------------------ the screen

STATE_STYLE = {"ready": "green", "alive": "yellow", "unreachable": "yellow", "restarting": "yellow", "down": "red"}


def render(report: dict[str, Any], console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    counts = report["counts"]
    shown = ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no instance recorded"
    console.print(f"[bold]Outreach[/bold] at {escape(report['data_dir'])}"
                  + (" (supervised by outreach up)" if report["supervised"] else "") + f": {shown}", soft_wrap=True)
    broker = report.get("broker")
    if broker and broker["reachable"]:
        console.print(f"Instances from {escape(report['data_dir'])}/instances and {broker['heartbeats']} heartbeat(s) "
                      f"on the broker at {escape(broker['bootstrap'])}", soft_wrap=True)
    elif broker:
        console.print(f"[red]Broker at {escape(broker['bootstrap'])} unreachable[/red] ({escape(broker['error'])}): "
                      f"only the instances recorded in {escape(report['data_dir'])} are shown", soft_wrap=True)
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

    from outreach.dlq import operator_broker_settings

    settings = operator_broker_settings()  # the operator settings, with the broker `outreach up` recorded
    report = asyncio.run(gather(Path(settings.data_dir), timeout, broker=settings))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render(report, Console(highlight=False))
    return exit_code(report)
