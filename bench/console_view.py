"""Benchmark: the console's campaign view of a 300,000-message campaign on the PostgreSQL read model, over real
HTTP (prints figures; not a test).

A database of its own is made on PostgreSQL (127.0.0.1:5432, user postgres, trust) and dropped at the end. The
campaign's events go through the projector's own write path (ReadModel.apply_batch); its 300,000 messages and
two status records each (`waiting`, then the latest) are bulk-loaded with COPY, as the projector would have left
them. The API runs as its own process (`python -m services.api`, uvicorn) on that read model; a console user
signs in, and each page is asked `--repeat` times (after one warm-up), timed to the last byte:

- first page: GET /console/campaigns/ID (the campaign, counts by status and reason, the first 50 messages);
- page 500: the page after the row where page 499 ends (keyset: what any later page costs);
- filtered: failed messages of one reason; search: one recipient by a part of its number;
- one message's history page, and the first live-counts event (SSE).

With `--during-run`, the campaign is in progress instead (half its messages final, the rest queued) and a writer
applies status records through the projector's write path while the pages are timed (`--rate` messages a
second, each queued -> sending -> sent -> delivered), as the projections do during a run.

    nice -n 19 .venv/bin/python bench/console_view.py [--messages 300000] [--repeat 7] [--during-run]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from schemas.times import rfc3339  # noqa: E402
from services.common import ids, jsoncodec  # noqa: E402
from services.common.embedded_broker import free_port  # noqa: E402
from services.projections.projector import ReadModel  # noqa: E402

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PASSWORD = "bench console password"
PAGE_SIZE = 50  # the console's (services/api/console/campaign_view.py)
START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
# The latest status of message n (of every 100): delivered mostly, some of each other final status; failures
# spread over five reasons.
FAILURE_REASONS = ("invalid_destination", "carrier_rejected", "undeliverable", "timed_out", "provider_error")


def final_status(n: int) -> tuple[str, str | None]:
    slot = n % 100
    if slot < 84:
        return "delivered", None
    if slot < 89:
        return "assumed_delivered", None
    if slot < 97:
        return "failed", FAILURE_REASONS[n % len(FAILURE_REASONS)]
    if slot < 99:
        return "opted_out", None
    return "cancelled", None


def destination(row: int) -> str:
    return f"+1202{row:07d}"


def at(seconds: float) -> str:
    return rfc3339(START + timedelta(seconds=seconds))


def campaign_event(campaign_id: str, sequence: int, type_: str, seconds: float, **body) -> dict:
    return {"type": type_, "event_id": ids.record_event_id(campaign_id, sequence, 0), "campaign_id": campaign_id,
            "sequence": sequence, "occurred_at": at(seconds), "causation_id": str(uuid.uuid4()), **body}


def campaign_events(campaign_id: str, size: int, during_run: bool) -> list[dict]:
    summary = {"name": "Bench 300k", "channel": "sms", "message_count": size, "preview": "Hi {{first_name}}",
               "encoding": "GSM-7", "segments": 1, "segments_total": size}
    events = [
        campaign_event(campaign_id, 10, "CampaignCreated", 0, name="Bench 300k", description=None, channel="sms",
                       template={"body": "Hi {{first_name}}"}, created_by="user:bench"),
        campaign_event(campaign_id, 20, "CampaignReady", 60, message_count=size, summary=summary),
        campaign_event(campaign_id, 21, "CampaignStatusChanged", 60, status="ready", previous_status="created",
                       stopped=False, counts={"total": size, "waiting": size}),
        campaign_event(campaign_id, 30, "CampaignRunStarted", 120, run_no=1, accepted_by="user:bench",
                       disclaimer={"consent": True, "content_compliance": True, "opt_out": True,
                                   "data_responsibility": True}, message_count=size, suppressed_count=0),
        campaign_event(campaign_id, 31, "CampaignStatusChanged", 120, status="in_progress", previous_status="ready",
                       stopped=False, counts={"total": size, "queued": size}),
    ]
    if not during_run:
        events.append(campaign_event(campaign_id, 40, "CampaignStatusChanged", 3600, status="complete_with_errors",
                                     previous_status="in_progress", stopped=False, counts={"total": size}))
    return events


def latest_of(row: int, n: int, during_run: bool, size: int) -> tuple[str, str | None, str | None]:
    """(status, previous_status, reason) of the message of `row`, the n-th of the campaign."""
    if during_run and n >= size // 2:
        return "queued", "waiting", None
    status, reason = final_status(n)
    previous = {"delivered": "sent", "assumed_delivered": "sent", "failed": "sending", "opted_out": "sending",
                "cancelled": "queued"}[status]
    return status, previous, reason


def load(dsn: str, campaign_id: str, size: int, during_run: bool) -> None:
    """The campaign's events through the projector, its messages and their records by COPY, then ANALYZE."""
    with ReadModel(dsn) as model:
        model.apply_batch(campaign_events(campaign_id, size, during_run), [])
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        with cursor.copy("COPY messages (message_id, campaign_id, row, channel, destination, variables, status, "
                         "previous_status, reason, provider_code, attempt, run_no, created_at, updated_at, "
                         "last_sequence) FROM STDIN") as copy:
            for n in range(size):
                row = n + 2
                status, previous, reason = latest_of(row, n, during_run, size)
                copy.write_row((ids.message_id(campaign_id, row), campaign_id, row, "sms", destination(row),
                                jsoncodec.dumps({"first_name": f"Name{row}", "city": "Springfield"}).decode(),
                                status, previous, reason, "30003" if reason == "carrier_rejected" else None, 1, 1,
                                at(60), at(120 + n / 100), 400))
        with cursor.copy("COPY message_events (event_id, message_id, campaign_id, row, channel, run_no, status, "
                         "previous_status, reason, provider_code, attempt, occurred_at, causation_id, sequence, "
                         "extra) FROM STDIN") as copy:
            for n in range(size):
                row = n + 2
                message_id = ids.message_id(campaign_id, row)
                copy.write_row((ids.record_event_id(campaign_id, 20, row), message_id, campaign_id, row, "sms",
                                None, "waiting", None, None, None, None, at(60), None, 100,
                                jsoncodec.dumps({"destination": destination(row), "variables": {
                                    "first_name": f"Name{row}", "city": "Springfield"}}).decode()))
                status, previous, reason = latest_of(row, n, during_run, size)
                copy.write_row((ids.record_event_id(campaign_id, 400, row), message_id, campaign_id, row, "sms",
                                1, status, previous, reason, None, 1, at(120 + n / 100), None, 400, None))
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")  # as autovacuum would have by then: index-only scans, fresh statistics
    print(f"loaded {size:,} messages and {2 * size:,} status records in {time.perf_counter() - started:.1f} s")


class RunWriter:
    """Status records through the projector's write path while pages are timed: the queued messages, in row
    order, each queued -> sending -> sent -> delivered, `rate` messages a second, in batches as the projections
    apply them (every 0.1 s)."""

    def __init__(self, dsn: str, campaign_id: str, size: int, rate: int):
        self.dsn, self.campaign_id, self.size, self.rate = dsn, campaign_id, size, rate
        self.stop = threading.Event()
        self.applied = 0
        self.thread = threading.Thread(target=self._run, name="run-writer", daemon=True)

    def _records(self, n: int) -> list[dict]:
        row = n + 2
        message_id = ids.message_id(self.campaign_id, row)
        out, previous = [], "queued"
        for step, status in enumerate(("sending", "sent", "delivered"), start=1):
            out.append({"type": "MessageStatusChanged", "event_id": ids.record_event_id(self.campaign_id, 1000 + step,
                                                                                         row),
                        "message_id": message_id, "campaign_id": self.campaign_id, "channel": "sms", "row": row,
                        "run_no": 1, "status": status, "previous_status": previous, "reason": None,
                        "provider_code": None, "attempt": 1, "occurred_at": rfc3339(datetime.now(UTC)),
                        "causation_id": None, "sequence": 400 + step * 100})
            previous = status
        return out

    def _run(self) -> None:
        with ReadModel(self.dsn) as model:
            n, per_batch = self.size // 2, max(1, self.rate // 10)
            while not self.stop.is_set() and n < self.size:
                began = time.monotonic()
                batch = [r for k in range(n, min(n + per_batch, self.size)) for r in self._records(k)]
                model.apply_batch([], batch)
                n += per_batch
                self.applied += len(batch)
                self.stop.wait(max(0.0, 0.1 - (time.monotonic() - began)))

    def __enter__(self) -> RunWriter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@contextlib.contextmanager
def bench_database() -> Iterator[str]:
    name = f"outreach_bench_console_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def api_process(dsn: str, data_dir: Path) -> Iterator[str]:
    """The API as `outreach up` runs it (its own process, uvicorn) on the read model `dsn`; no broker is needed
    for reads (its readiness says so, and nothing here asks it)."""
    from services.api.store import ApiStore
    from services.common.settings import Settings

    with ApiStore.open(Settings(data_dir=data_dir)) as store:
        store.create_user("bench", "campaigner", PASSWORD, created_by="cli:bench")
    port = free_port("127.0.0.1")
    env = {**os.environ, "OUTREACH_READ_MODEL_URL": dsn, "OUTREACH_DATA_DIR": str(data_dir),
           "OUTREACH_API_HOST": "127.0.0.1", "OUTREACH_API_PORT": str(port),
           "OUTREACH_METRICS_PORT": str(free_port("127.0.0.1")), "OUTREACH_EVENT_STORE": "sqlite",
           "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port('127.0.0.1')}", "OUTREACH_LOG_LEVEL": "WARNING"}
    log = open(data_dir / "api.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "services.api"], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start; see {data_dir / 'api.log'}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@contextlib.contextmanager
def signed_in(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as client:
        form = client.get("/console/sign-in")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        answer = client.post("/console/sign-in", data={"username": "bench", "password": PASSWORD,
                                                       "csrf_token": token})
        assert answer.status_code == 303, answer.text
        yield client


def timed_get(client: httpx.Client, path: str, params: dict | None = None, expect: str | None = None) -> float:
    started = time.perf_counter()
    response = client.get(path, params=params)
    elapsed = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, (path, response.status_code, response.text[:500])
    if expect is not None:
        assert expect in response.text, (path, params, expect)
    return elapsed


def first_event_ms(client: httpx.Client, path: str) -> float:
    started = time.perf_counter()
    with client.stream("GET", path) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                return (time.perf_counter() - started) * 1000
    raise AssertionError("the stream ended without an event")


def measure(name: str, work, repeat: int) -> tuple[str, float, float]:
    work()  # warm-up: the first request of a kind also loads the page's template and plans
    figures = [work() for _ in range(repeat)]
    median, worst = statistics.median(figures), max(figures)
    print(f"{name:<40} median {median:7.1f} ms   max {worst:7.1f} ms", flush=True)
    return name, median, worst


def time_pages(dsn: str, campaign_id: str, args: argparse.Namespace) -> None:
    size = args.messages
    with tempfile.TemporaryDirectory(prefix="outreach-bench-console-") as data:
        with api_process(dsn, Path(data)) as url, signed_in(url) as client:
            view = f"/console/campaigns/{campaign_id}"
            late_page = min(500, size // PAGE_SIZE)  # page 500 of 300,000 messages (6,000 pages)
            late_after = 2 + (late_page - 1) * PAGE_SIZE - 1  # rows start at 2: the page before ends at this row
            failed_row = next(n + 2 for n in range(size) if final_status(n) == ("failed", "carrier_rejected"))
            searched = destination(size // 3 + 2)
            results = []
            writer = RunWriter(dsn, campaign_id, size, args.rate) if args.during_run else contextlib.nullcontext()
            with writer:
                results.append(measure("first page", lambda: timed_get(client, view, expect='data-count="total"'),
                                       args.repeat))
                results.append(measure(f"page {late_page} (keyset)", lambda: timed_get(
                    client, view, {"after": late_after}, expect=destination(late_after + 1)), args.repeat))
                results.append(measure("filtered: failed, carrier_rejected", lambda: timed_get(
                    client, view, {"status": "failed", "reason": "carrier_rejected"}, expect=destination(failed_row)),
                    args.repeat))
                results.append(measure("search: one recipient", lambda: timed_get(
                    client, view, {"q": searched[-7:]}, expect=searched), args.repeat))
                results.append(measure("one message's history", lambda: timed_get(
                    client, f"{view}/messages/{ids.message_id(campaign_id, 2)}"), args.repeat))
                results.append(measure("live counts: first event", lambda: first_event_ms(
                    client, f"{view}/progress"), args.repeat))
            if args.during_run:
                print(f"status records applied meanwhile: {writer.applied:,}")
            worst = max(r[2] for r in results)
            print(f"{'slowest (max)':<40} {worst:.1f} ms: {'under' if worst < 1000 else 'OVER'} one second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--during-run", action="store_true", help="time the pages while status records are applied")
    parser.add_argument("--rate", type=int, default=300, help="with --during-run: messages a second (default 300)")
    args = parser.parse_args()

    campaign_id = str(uuid.uuid4())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    with bench_database() as dsn:
        load(dsn, campaign_id, args.messages, args.during_run)
        time_pages(dsn, campaign_id, args)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
