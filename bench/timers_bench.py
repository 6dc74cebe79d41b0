"""Benchmark: the timeout sweeper with 100,000 pending timers (prints figures; not a test).

The timers live in the event store's database, shared by every sweeper: `--store sqlite` (a file beside the
SQLite event store) or `--store postgres` (tables in a fresh database on OUTREACH_POSTGRES_DSN's server).

In process, on the sweeper's own code (TimerStore and its fire loop `fire_due`), no broker:
- RSS of this process before and after loading the timers (fed in the sweeper's batches of 5,000, so the
  input never sits in memory at once);
- time to apply 100,000 status records that start timers (`sent`), and 100,000 that lapse them (`delivered`);
- CPU of the due-poll loop while nothing is due (process CPU seconds over `--idle-s`);
- time to fire 100,000 due timers (expiry records built and handed to a producer that only counts them).
Then the real process, `python -m services.timeout_sweeper`, on an embedded broker (tansu):
- idle with an empty data dir and with 100,000 pending timers in it: RSS and CPU% over `--idle-s`;
- 100,000 timers already due at start: seconds until every expiry is published to the broker.

    python bench/timers_bench.py [--timers 100000] [--idle-s 10] [--skip-process] [--store sqlite|postgres]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import psycopg  # noqa: E402

from services.common.embedded_broker import EmbeddedBroker, free_port  # noqa: E402
from services.timeout_sweeper.app import fire_due  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.timeout_sweeper.timers import StatusRecord, TimeoutSettings, TimerStore  # noqa: E402

STORE = "sqlite"  # --store
ADMIN_DSN = os.environ.get("OUTREACH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASES: list[str] = []  # made for this run, dropped at its end


def store_env(data_dir: Path) -> dict[str, str]:
    """The environment of a sweeper whose timers are `data_dir`'s (SQLite) or a fresh database's (PostgreSQL)."""
    env = {"OUTREACH_DATA_DIR": str(data_dir), "OUTREACH_EVENT_STORE": STORE}
    if STORE == "postgres":
        name = f"timers_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        DATABASES.append(name)
        env["OUTREACH_POSTGRES_DSN"] = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    return env


def settings_of(env: dict[str, str]) -> Settings:
    return Settings(data_dir=Path(env["OUTREACH_DATA_DIR"]), event_store=env["OUTREACH_EVENT_STORE"],
                    postgres_dsn=env.get("OUTREACH_POSTGRES_DSN", ADMIN_DSN))


def drop_databases() -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        for name in DATABASES:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

BATCH = 5000  # the sweeper's max_records per poll
TIMEOUTS = TimeoutSettings(sending_s=600, sent_s=600, retry_window_s=259_200)
SETTLE_S = 5.0  # after the process says it runs: its consumer group join (session timeout / 2) is done


def rss_mb(process: psutil.Process | None = None) -> float:
    return (process or psutil.Process()).memory_info().rss / 2**20


def cpu_s(process: psutil.Process | None = None) -> float:
    times = (process or psutil.Process()).cpu_times()
    return times.user + times.system


def message_ids(n: int) -> list[str]:
    return [str(uuid.uuid5(uuid.NAMESPACE_OID, f"bench:{i}")) for i in range(n)]


def apply_all(store: TimerStore, mids: list[str], status: str, previous: str, sequence: int, occurred_at: float) -> float:
    """Feeds one status record per message in the sweeper's batches; returns the seconds it took."""
    started = time.perf_counter()
    when = datetime.fromtimestamp(occurred_at, timezone.utc)
    for start in range(0, len(mids), BATCH):
        batch = [StatusRecord(message_id=mid, campaign_id=f"00000000-0000-4000-8000-{n % 100:012d}", channel="sms",
                              sequence=sequence, status=status, previous_status=previous, occurred_at=when)
                 for n, mid in enumerate(mids[start:start + BATCH], start)]
        store.apply(batch, TIMEOUTS)
    return time.perf_counter() - started


class CountingProducer:
    """The publisher interface `fire_due` uses; counts instead of publishing."""

    def __init__(self) -> None:
        self.sent = 0

    async def publish(self, value: bytes, *, key: bytes, no_confirm: bool) -> asyncio.Future:
        self.sent += 1
        acknowledged = asyncio.get_running_loop().create_future()
        acknowledged.set_result(None)
        return acknowledged


async def poll_idle(store: TimerStore, seconds: float) -> tuple[float, int]:
    """Runs the fire loop for `seconds` with nothing due: (process CPU seconds used, expiries published)."""
    producer, stop = CountingProducer(), asyncio.Event()
    loop_task = asyncio.create_task(fire_due(store, producer, TIMEOUTS, stop))
    before = cpu_s()
    await asyncio.sleep(seconds)
    used = cpu_s() - before
    stop.set()
    await loop_task
    return used, producer.sent


async def fire_all(store: TimerStore) -> tuple[float, int]:
    producer, stop = CountingProducer(), asyncio.Event()
    started = time.perf_counter()
    loop_task = asyncio.create_task(fire_due(store, producer, TIMEOUTS, stop))
    while store.pending():
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    stop.set()
    await loop_task
    return elapsed, producer.sent


def size_mb(store: TimerStore, env: dict[str, str]) -> float:
    if STORE == "postgres":
        with psycopg.connect(env["OUTREACH_POSTGRES_DSN"]) as db:
            return db.execute("SELECT pg_total_relation_size('outreach_timers') "
                              "+ pg_total_relation_size('outreach_timer_positions')").fetchone()[0] / 2**20
    return sum(f.stat().st_size for f in Path(env["OUTREACH_DATA_DIR"]).glob("*.timers.db*")) / 2**20


def in_process(n: int, idle_s: float, workdir: Path) -> None:
    print(f"In process: TimerStore + fire_due, {n:,} timers "
          f"({'PostgreSQL' if STORE == 'postgres' else 'SQLite WAL, synchronous=NORMAL'})")
    mids = message_ids(n)
    gc.collect()
    env = store_env(workdir / "pending")
    store = TimerStore.open(settings_of(env))
    base = rss_mb()
    now = time.time()
    took = apply_all(store, mids, "sent", "sending", 20, now)  # due in 10 minutes: pending, none due
    gc.collect()
    print(f"  apply {n:,} `sent` records (start timers): {took:.2f} s ({n / took:,.0f} records/s)")
    print(f"  RSS before loading {base:.1f} MB, after {rss_mb():.1f} MB (+{rss_mb() - base:.1f} MB); "
          f"pending {store.pending():,}; timers and positions {size_mb(store, env):.1f} MB")
    used, fired = asyncio.run(poll_idle(store, idle_s))
    print(f"  due-poll loop idle for {idle_s:.0f} s: {used:.3f} CPU s ({100 * used / idle_s:.2f} % of a core), "
          f"{fired} fired")
    took = apply_all(store, mids, "delivered", "sent", 30, now + 1)
    print(f"  apply {n:,} `delivered` records (lapse timers): {took:.2f} s ({n / took:,.0f} records/s); "
          f"pending {store.pending():,}")
    store.close()

    store = TimerStore.open(settings_of(store_env(workdir / "due")))
    apply_all(store, mids, "sent", "sending", 20, now - 3600)  # came due an hour ago
    took, fired = asyncio.run(fire_all(store))
    print(f"  fire {fired:,} due timers (expiry records built; a producer that only counts): {took:.2f} s "
          f"({fired / took:,.0f}/s)")
    store.close()


def fill_store(store_env: dict[str, str], n: int, occurred_at: float) -> None:
    Path(store_env["OUTREACH_DATA_DIR"]).mkdir(parents=True, exist_ok=True)
    store = TimerStore.open(settings_of(store_env))
    apply_all(store, message_ids(n), "sent", "sending", 20, occurred_at)
    store.close()


def pending_in(store_env: dict[str, str]) -> int:
    store = TimerStore.open(settings_of(store_env))
    try:
        return store.pending()
    finally:
        store.close()


def start_sweeper(bootstrap: str, store_env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "OUTREACH_EXTERNAL_KAFKA": "true", **store_env}
    data_dir = Path(store_env["OUTREACH_DATA_DIR"])
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "sweeper.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.timeout_sweeper"], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    return process, log_path


def wait_running(process: subprocess.Popen, log_path: Path, timeout_s: float = 60) -> float:
    deadline = time.monotonic() + timeout_s
    while "pending timers" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the sweeper did not start; see {log_path}")
        time.sleep(0.05)
    return time.monotonic()


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def idle_process(bootstrap: str, store_env: dict[str, str], idle_s: float) -> tuple[float, float, int]:
    """(RSS MB, CPU % of one core over idle_s, pending timers) of an idle sweeper process."""
    process, log_path = start_sweeper(bootstrap, store_env)
    try:
        wait_running(process, log_path)
        time.sleep(SETTLE_S)
        watched = psutil.Process(process.pid)
        before, started = cpu_s(watched), time.monotonic()
        time.sleep(idle_s)
        used, wall = cpu_s(watched) - before, time.monotonic() - started
        return rss_mb(watched), 100 * used / wall, pending_in(store_env)
    finally:
        stop(process)


def real_process(n: int, idle_s: float, workdir: Path) -> None:
    print(f"\nThe real process (python -m services.timeout_sweeper) on an embedded broker, idle {idle_s:.0f} s "
          f"after a {SETTLE_S:.0f} s settle:")
    with EmbeddedBroker("127.0.0.1", free_port("127.0.0.1")) as broker:
        empty = store_env(workdir / "empty")
        rss, cpu, pending = idle_process(broker.bootstrap, empty, idle_s)
        print(f"  no timers:                 RSS {rss:6.1f} MB, CPU {cpu:5.2f} % of a core, {pending:,} pending")
        loaded = store_env(workdir / "loaded")
        fill_store(loaded, n, time.time())  # due in 10 minutes
        rss, cpu, pending = idle_process(broker.bootstrap, loaded, idle_s)
        print(f"  {n:,} pending timers:    RSS {rss:6.1f} MB, CPU {cpu:5.2f} % of a core, {pending:,} pending")

        due = store_env(workdir / "due-at-start")
        fill_store(due, n, time.time() - 3600)  # all due at start
        process, log_path = start_sweeper(broker.bootstrap, due)
        try:
            started = wait_running(process, log_path)
            watched = psutil.Process(process.pid)
            cpu_before = cpu_s(watched)
            while pending_in(due):
                if time.monotonic() - started > 300:
                    raise RuntimeError("the sweeper did not fire everything within 300 s")
                time.sleep(0.1)
            took = time.monotonic() - started
            print(f"  {n:,} timers due at start: all published to the broker in {took:.1f} s "
                  f"({n / took:,.0f}/s, {cpu_s(watched) - cpu_before:.1f} CPU s), RSS then {rss_mb(watched):.1f} MB")
        finally:
            stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timers", type=int, default=100_000)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--skip-process", action="store_true", help="only the in-process measurements")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    global STORE
    STORE = args.store
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    try:
        with tempfile.TemporaryDirectory(prefix="timers-bench-") as tmp:
            in_process(args.timers, args.idle_s, Path(tmp))
            if not args.skip_process:
                real_process(args.timers, args.idle_s, Path(tmp))
    finally:
        if DATABASES:
            drop_databases()


if __name__ == "__main__":
    main()
