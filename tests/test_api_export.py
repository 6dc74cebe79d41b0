"""A 300,000-row CSV export is streamed in bounded memory: the API runs as its own process (`python -m
services.api`) and its resident memory is sampled with psutil while the whole CSV is downloaded. The same
for a 300,000-row CSV upload, read as a stream and published chunk by chunk.

The read model is SQLite by default, and SQLite keeps the pages it reads in a per-connection page cache that
the read model caps at 64 MiB: the first full read of a campaign fills that cache whatever the query (a
bounded, one-off cost, the same for a search that matches nothing). So the cache is warmed first by such a
search, and the export is then measured on its own: that figure is what streaming costs.

    .venv/bin/python -m pytest -q -s tests/test_api_export.py     # prints the figures
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from services.api.store import ApiStore
from services.common.embedded_broker import EmbeddedBroker, free_port
from services.common.settings import Settings
from services.projections.projector import ReadModel
from tests.conftest import wait_until
from tests.test_api import ready_campaign

ROWS = 300_000
CAMPAIGN_ID = "0b0b0b0b-0000-4000-8000-000000000001"
SQLITE_CACHE_CAP = 64 * 1024 * 1024  # the read model's PRAGMA cache_size, per connection
STREAMING_BOUND = 16 * 1024 * 1024  # what the export may add to the server's RSS (the CSV is ~38 MiB)
ROOT = Path(__file__).resolve().parents[1]


def fill(data_dir: Path) -> None:
    """ROWS messages as their `waiting` records carry them (destination and three variables each)."""
    occurred_at = "2026-01-05T09:00:01.000000Z"
    with ReadModel.open(Settings(data_dir=data_dir)) as model:
        events, _ = ready_campaign(CAMPAIGN_ID, [], name="Big")
        model.apply_batch(events, [])
        batch = []
        for row in range(2, ROWS + 2):
            batch.append({
                "type": "MessageStatusChanged", "event_id": str(uuid.uuid4()), "message_id": str(uuid.uuid4()),
                "campaign_id": CAMPAIGN_ID, "channel": "sms", "row": row, "run_no": None, "status": "waiting",
                "previous_status": None, "reason": None, "provider_code": None, "attempt": None,
                "occurred_at": occurred_at, "causation_id": CAMPAIGN_ID, "sequence": 10,
                "destination": f"+1{200 + row % 800}{555 + row // 800:04d}{row % 1000:03d}",
                "variables": {"first_name": f"Person{row}", "city": "Springfield", "code": f"=X{row}"},
            })
            if len(batch) == 50_000:
                model.apply_batch([], batch)
                batch = []
        if batch:
            model.apply_batch([], batch)


@pytest.fixture(scope="module")
def broker():
    """A broker of this module's own: the 300,000 contacts it publishes must not reach the session's broker,
    where the next stack's command handler would import them."""
    with EmbeddedBroker("127.0.0.1", free_port()) as own:
        yield own.bootstrap


@pytest.fixture(scope="module")
def api(tmp_path_factory, broker):
    data_dir = tmp_path_factory.mktemp("export-data")
    port = free_port()
    env = dict(os.environ, OUTREACH_DATA_DIR=str(data_dir), OUTREACH_API_PORT=str(port),
               KAFKA_BOOTSTRAP_SERVERS=broker)
    env.pop("OUTREACH_READ_MODEL_URL", None)  # the default: SQLite in data_dir
    log = open(data_dir / "api.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "services.api"], env=env, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        fill(data_dir)
        with ApiStore.open(Settings(data_dir=data_dir)) as store:
            token, _ = store.create_token("exporter", "campaigner")
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, 60, 0.1, message=f"the API did not start; see {data_dir / 'api.log'}")
        yield url, {"Authorization": f"Bearer {token}"}, psutil.Process(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


class PeakRss:
    """Samples a process's RSS every 5 ms in a thread; `growth` is the peak over the RSS at the start."""

    def __init__(self, process: psutil.Process):
        self.process = process
        self.before = self.peak = process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.before


def export_measuring_rss(url: str, headers: dict, process: psutil.Process) -> dict:
    """Download the whole CSV (counting, keeping nothing) while sampling the server's RSS."""
    size = lines = 0
    head = b""
    started = time.monotonic()
    with PeakRss(process) as rss, httpx.stream("GET", f"{url}/campaigns/{CAMPAIGN_ID}/messages.csv", headers=headers,
                                               timeout=300) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            if len(head) < 4096:
                head += chunk[:4096]
            size += len(chunk)
            lines += chunk.count(b"\n")
    return {"bytes": size, "lines": lines, "head": head.decode(), "seconds": time.monotonic() - started,
            "growth": rss.growth}


def test_300k_row_export_streams_in_bounded_memory(api):
    url, headers, process = api
    mb = 1024 * 1024
    campaign = httpx.get(f"{url}/campaigns/{CAMPAIGN_ID}", headers=headers).json()  # the first request's one-off costs
    assert campaign["counts"]["total"] == ROWS
    before_scan = process.memory_info().rss
    nothing = httpx.get(f"{url}/campaigns/{CAMPAIGN_ID}/messages", params={"q": "no such contact", "limit": 1},
                        headers=headers, timeout=120).json()  # reads every message of the campaign
    assert nothing["total"] == 0
    page_cache = process.memory_info().rss - before_scan
    export = export_measuring_rss(url, headers, process)
    print(f"\nexport of {ROWS:,} rows: CSV {export['bytes'] / mb:.1f} MiB in {export['seconds']:.1f} s; server RSS "
          f"{before_scan / mb:.0f} MiB at rest, +{page_cache / mb:.1f} MiB after a full scan (SQLite page cache, "
          f"capped at {SQLITE_CACHE_CAP // mb} MiB), then peak +{export['growth'] / mb:.1f} MiB during the export")
    assert export["lines"] == ROWS + 1  # the header and every row
    header, first = export["head"].split("\r\n")[:2]
    assert header.endswith("first_name,city,code")
    assert first.startswith("2,") and ",'+1202" in first and first.endswith(",'=X2")  # neutralised
    assert export["growth"] < STREAMING_BOUND, export
    assert export["growth"] < export["bytes"] / 4, export
    assert page_cache < SQLITE_CACHE_CAP + STREAMING_BOUND


def test_300k_row_upload_is_read_as_a_stream(api):
    url, headers, process = api
    mb = 1024 * 1024
    body = "phone,first_name,city\n" + "".join(
        f"+1{200 + i % 800}{555 + i // 800:04d}{i % 1000:03d},Person{i},Springfield\n" for i in range(ROWS))
    started = time.monotonic()
    with PeakRss(process) as rss:
        response = httpx.post(f"{url}/campaigns", headers=headers, timeout=300,
                              files={"contacts": ("contacts.csv", body.encode(), "text/csv")},
                              data={"name": "Big upload", "channel": "sms", "template": '{"body": "Hi {{first_name}}"}',
                                    "consent_confirmed": "true"})
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["contacts"] == ROWS and len(accepted["contacts_command_ids"]) == ROWS // 1000
    print(f"\nupload of {ROWS:,} rows: CSV {len(body) / mb:.1f} MiB published as {ROWS // 1000} chunks in "
          f"{time.monotonic() - started:.1f} s; server RSS peak +{rss.growth / mb:.1f} MiB")
    assert rss.growth < STREAMING_BOUND, rss.growth
