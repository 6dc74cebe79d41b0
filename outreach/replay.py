"""`outreach replay`: rebuild every read model into a fresh database, then compare it with the live one.

Two sources of the same records:
- the event store (the durable truth): the notification log read from the start, each stored event mapped to
  its wire records by the relay's own pure mapping (`services/command_handler/wire.py`), applied in large
  batches;
- the Kafka topics read from the beginning (what the broker still holds): every partition of
  `outreach.campaign-events` and `outreach.message-status` assigned without a consumer group, read up to the
  end offsets it had when the replay started, poison records skipped as the projections skip them.

Then the canonical dumps (every row of every table, in key order, normalised so SQLite and PostgreSQL compare
equal) of the rebuilt and the live read model are compared: identical, or the first differences (exit 1).
Run it when the projections have caught up (a live model still consuming differs by what it has not yet read).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from itertools import islice
from typing import Any, Optional

import typer

from schemas import topics
from services.common import kafka
from outreach.config import operator_settings
from services.common.settings import Settings
from services.projections import storage
from services.projections.projector import ReadModel, apply_isolating_poison, decode_batch
from services.projections.schema import TABLES

BATCH_RECORDS = 20_000  # records applied per transaction
NOTIFICATION_PAGE = 100  # stored events read per query (a block event stands for up to 1,000 records)
KAFKA_IDLE_TIMEOUT_S = 30.0  # no record for this long before the end offsets: the broker is not delivering
DIFFERENCES_SHOWN = 10

Progress = Callable[[int, int | None, int], None]  # (done, total, records applied)


class ReplayError(RuntimeError):
    """The replay cannot start or finish (target not empty, broker silent, ...)."""


@dataclass
class Comparison:
    identical: bool
    differences: list[str] = field(default_factory=list)  # the first ones, described
    different_rows: int = 0  # in all


@dataclass
class ReplayResult:
    source: str
    into: str
    stored_events: int  # notifications (event store) or Kafka records read
    records: int  # records applied to the read model
    seconds: float
    rows: dict[str, int]
    comparison: Comparison | None = None

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        result = {"source": self.source, "into": self.into, "stored_events": self.stored_events,
                  "records": self.records, "seconds": round(self.seconds, 3),
                  "records_per_s": round(self.records_per_s, 1), "rows": self.rows, "identical": None}
        if self.comparison is not None:
            result.update(identical=self.comparison.identical, differences=self.comparison.differences,
                          different_rows=self.comparison.different_rows)
        return result


# ------------------------------------------------------------------ target

def default_target(settings: Settings) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    return str(settings.data_dir / f"replay-{stamp}.db")


def open_fresh(location: str) -> ReadModel:
    """The read model at `location`, which must be empty (a PostgreSQL database that does not exist is created)."""
    if storage.is_postgres(location):
        _create_postgres_database(location)
    model = ReadModel(location)
    rows = model.row_counts()
    if any(rows.values()):
        model.close()
        raise ReplayError(f"{model.location} is not empty ({rows}); replay builds into a fresh database")
    return model


def _create_postgres_database(dsn: str) -> None:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    name = params.get("dbname")
    if not name or name == "postgres":
        return
    with psycopg.connect(make_conninfo(dsn, dbname="postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


# ------------------------------------------------------------------ sources

class _Batcher:
    """Collects records and applies them in large transactions, one batch being written while the next is
    mapped (the database works while Python maps)."""

    def __init__(self, target: ReadModel):
        self.target = target
        self.campaign_events: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.applied = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-writer")
        self._writing: Future | None = None

    def add(self, topic: str, value: dict[str, Any]) -> None:
        if topic == topics.CAMPAIGN_EVENTS:
            self.campaign_events.append(value)
        elif topic == topics.MESSAGE_STATUS:
            self.statuses.append(value)

    @property
    def pending(self) -> int:
        return len(self.campaign_events) + len(self.statuses)

    def flush(self) -> None:
        """Hand the collected records to the writer (after the batch it is writing)."""
        if not self.pending:
            return
        self._wait()
        self._writing = self._writer.submit(apply_isolating_poison, self.target, self.campaign_events, self.statuses)
        self.applied += self.pending
        self.campaign_events, self.statuses = [], []

    def finish(self) -> None:
        """Apply what is left and wait until everything is written."""
        self.flush()
        self._wait()

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    def _wait(self) -> None:
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()


def replay_event_store(settings: Settings, target: ReadModel, progress: Progress | None = None) -> tuple[int, int]:
    """Apply every record of the event store's notification log to `target`; (stored events, records)."""
    from services.command_handler import wire
    from services.command_handler.application import open_app

    app = open_app(settings)
    batcher = _Batcher(target)
    try:
        total = app.recorder.max_notification_id() or 0
        position = read = 0
        while True:
            notifications = app.recorder.select_notifications(start=position + 1, limit=NOTIFICATION_PAGE)
            if not notifications:
                break
            for notification in notifications:
                for record in wire.to_records(app.mapper.to_domain_event(notification)):
                    batcher.add(record.topic, record.value)
                position = notification.id
                read += 1
                if batcher.pending >= BATCH_RECORDS:
                    batcher.flush()
                    if progress:
                        progress(position, max(total, position), batcher.applied)
        batcher.finish()
        if progress:
            progress(max(total, position), max(total, position), batcher.applied)
        return read, batcher.applied
    finally:
        batcher.close()
        app.close()


async def replay_kafka(settings: Settings, target: ReadModel, progress: Progress | None = None) -> tuple[int, int]:
    """Apply every record the broker holds on the two event topics (from the beginning up to the end offsets
    at the start) to `target`; (records read, records applied)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    await kafka.ensure_topics(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    batcher = _Batcher(target)
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for topic in (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS)
                      for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = await kafka.end_offsets(consumer, partitions)  # the ends at the start: what is replayed
        begins = await consumer.beginning_offsets(partitions)
        await consumer.seek_to_beginning(*partitions)
        targets = {tp: ends[tp] for tp in partitions if ends[tp] > begins[tp]}  # an empty one: nothing to read
        total = sum(ends[tp] - begins[tp] for tp in targets)
        read = 0
        last_record = time.monotonic()

        async def unfinished() -> bool:
            for tp, end in targets.items():
                if await consumer.position(tp) < end:
                    return True
            return False

        while await unfinished():
            batches = await consumer.getmany(*targets, timeout_ms=500, max_records=BATCH_RECORDS)
            records = [r for tp, rs in batches.items() for r in rs
                       if r.offset < targets[tp]]  # not past the end at the start
            if records:
                last_record = time.monotonic()
                read += len(records)
                campaign_events, statuses, _skipped = decode_batch(records)
                for value in campaign_events:
                    batcher.add(topics.CAMPAIGN_EVENTS, value)
                for value in statuses:
                    batcher.add(topics.MESSAGE_STATUS, value)
                if batcher.pending >= BATCH_RECORDS:
                    await asyncio.to_thread(batcher.flush)
                if progress:
                    progress(read, total, batcher.applied)
            elif time.monotonic() - last_record > KAFKA_IDLE_TIMEOUT_S:
                raise ReplayError(f"the broker delivered nothing for {KAFKA_IDLE_TIMEOUT_S:.0f} s before the end "
                                  f"offsets ({read} of {total} records read)")
            for tp in targets:  # finished partitions: fetch them no more
                if await consumer.position(tp) >= targets[tp]:
                    consumer.pause(tp)
        await asyncio.to_thread(batcher.finish)
        if progress:
            progress(read, read, batcher.applied)
        return read, batcher.applied
    finally:
        await asyncio.to_thread(batcher.close)
        await consumer.stop()


# ------------------------------------------------------------------ comparing

def compare_dumps(rebuilt: Iterator[tuple[str, tuple]], live: Iterator[tuple[str, tuple]],
                  shown: int = DIFFERENCES_SHOWN) -> Comparison:
    """Merge two canonical dumps (each in table order, then key order: the key is a row's first value)."""
    order = {table: n for n, table in enumerate(TABLES)}
    comparison = Comparison(identical=True)

    def note(text: str) -> None:
        comparison.identical = False
        comparison.different_rows += 1
        if len(comparison.differences) < shown:
            comparison.differences.append(text)

    a, b = next(rebuilt, None), next(live, None)
    while a is not None or b is not None:
        key_a = (order[a[0]], a[1][0]) if a is not None else None
        key_b = (order[b[0]], b[1][0]) if b is not None else None
        if key_b is None or (key_a is not None and key_a < key_b):
            note(f"{a[0]} {a[1][0]}: only in the replay: {a[1]}")
            a = next(rebuilt, None)
        elif key_a is None or key_b < key_a:
            note(f"{b[0]} {b[1][0]}: only in the live read model: {b[1]}")
            b = next(live, None)
        else:
            if a[1] != b[1]:
                changed = [f"column {i}: replay {x!r}, live {y!r}" for i, (x, y) in enumerate(zip(a[1], b[1]))
                           if x != y]
                note(f"{a[0]} {a[1][0]}: " + "; ".join(changed))
            a, b = next(rebuilt, None), next(live, None)
    return comparison


# ------------------------------------------------------------------ the whole replay

def run_replay(settings: Settings, *, source: str = "event-store", into: str | None = None,
               compare_with: ReadModel | None = None, progress: Progress | None = None) -> ReplayResult:
    """Rebuild into `into` (default: a new SQLite file in data_dir) and compare with `compare_with` if given."""
    location = into or default_target(settings)
    target = open_fresh(location)
    try:
        started = time.perf_counter()
        if source == "event-store":
            read, applied = replay_event_store(settings, target, progress)
        elif source == "kafka":
            read, applied = asyncio.run(replay_kafka(settings, target, progress))
        else:
            raise ReplayError(f"unknown source {source!r} (event-store or kafka)")
        seconds = time.perf_counter() - started
        result = ReplayResult(source, target.location, read, applied, seconds, target.row_counts())
        if compare_with is not None:
            result.comparison = compare_dumps(target.canonical_dump(), compare_with.canonical_dump())
        return result
    finally:
        target.close()


# ------------------------------------------------------------------ the command

class Source(str, Enum):
    event_store = "event-store"
    kafka = "kafka"


def replay(
    source: Source = typer.Option(Source.event_store, "--source", help="Rebuild from the event store, or from "
                                  "the Kafka topics read from the beginning (what the broker still holds)."),
    into: Optional[str] = typer.Option(None, "--into", metavar="URL", help="Fresh database to build: a path, "
                                       "sqlite:///path or postgresql://... (default: data_dir/replay-<time>.db)."),
    compare: bool = typer.Option(True, "--compare/--no-compare",
                                 help="Compare the rebuilt read model with the live one (exit 1 if they differ)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of text."),
) -> None:
    """Rebuild every read model from the event store (or Kafka) into a fresh database, then compare."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

    console, err = Console(highlight=False), Console(stderr=True, highlight=False)
    settings = operator_settings()  # the running stack's data folder, whatever the current folder
    live = ReadModel.open_existing(settings) if compare else None
    bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
              TextColumn("{task.fields[rate]}"), console=err, disable=as_json)
    task = bar.add_task(f"replay from {source.value}", total=None, rate="")
    started = time.perf_counter()

    def show(done: int, total: int | None, records: int) -> None:
        elapsed = time.perf_counter() - started
        bar.update(task, completed=done, total=total or None,
                   rate=f"{records} records, {records / elapsed:,.0f}/s" if elapsed > 0 else "")

    try:
        with bar:
            result = run_replay(settings, source=source.value, into=into, compare_with=live, progress=show)
    except ReplayError as exc:
        if as_json:
            typer.echo(_json({"error": str(exc)}))
        else:
            err.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(2)
    finally:
        if live is not None:
            live.close()
    if as_json:
        typer.echo(_json(result.as_dict()))
    else:
        console.print(f"replayed {result.stored_events} {'stored events' if source == Source.event_store else 'records'}"
                      f" -> {result.records} records into {result.into} in {result.seconds:.2f} s "
                      f"({result.records_per_s:,.0f} records/s)")
        console.print("rows: " + ", ".join(f"{t} {n}" for t, n in result.rows.items()))
        if result.comparison is None:
            console.print("not compared" + ("" if compare else " (--no-compare)") +
                          ("" if live is not None or not compare else ": no live read model yet"))
        elif result.comparison.identical:
            console.print("[green]identical[/green] to the live read model")
        else:
            console.print(f"[red]differs[/red] from the live read model in {result.comparison.different_rows} "
                          "rows; the first:")
            for line in islice(result.comparison.differences, DIFFERENCES_SHOWN):
                console.print(f"  {line}", soft_wrap=True)
    if result.comparison is not None and not result.comparison.identical:
        raise typer.Exit(1)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, ensure_ascii=False, default=str)
